"""The deviceless H100 target of the GPU compiles (`experiments.compile_gpu`, `experiments.scaling
--gpu_compile`): its description, the CUDA venv it needs, and its devices.

XLA's GPU compiler runs on a CPU-only machine given the CUDA plugin of jax, kept out of
requirements.txt; `setup_hint` says how to install it.
"""

from __future__ import annotations

import importlib.util
import os

# XLA's description of an H100 SXM 80 GB (gpu_device_info: SMs, memory, ...): what
# `topologies.get_topology_desc` compiles for, kept in the repository.
TARGET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu", "h100_sxm.pbtxt")
# A venv with the CUDA wheels beside the CPU one (jax of requirements.txt's version).
VENV_SETUP = (
  'python3 -m venv /tmp/gpu-aot && /tmp/gpu-aot/bin/pip install "jax[cuda12]==0.10.2" '
  "-r requirements.txt && /tmp/gpu-aot/bin/pip install -e . --no-deps"
)
# How a script runs in it: CPU backend, the CUDA plugin only compiling.
VENV_PYTHON = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu /tmp/gpu-aot/bin/python"


def setup_hint(module: str) -> str:
  """One line: set up the venv, then run `module` with it."""
  return f"{VENV_SETUP}; then run with {VENV_PYTHON} -m {module}"


def cuda_missing() -> str | None:
  """Why the deviceless GPU compile cannot run here, or None."""
  if importlib.util.find_spec("jax_plugins") is None or (
    importlib.util.find_spec("jax_plugins.xla_cuda12") is None
  ):
    return "the CUDA plugin of jax (jax[cuda12]) is not installed"
  if not os.path.exists(TARGET_CONFIG):
    return f"the GPU description {os.path.normpath(TARGET_CONFIG)} is missing"
  return None


def h100_devices(gpus: int, hosts: int) -> list:
  """The devices of `gpus` H100 SXM on `hosts` hosts (gpus / hosts each), compile only."""
  from jax.experimental import topologies

  with open(TARGET_CONFIG) as f:
    topo = topologies.get_topology_desc(
      platform="cuda", target_config=f.read(), topology=f"1x{hosts}x{gpus // hosts}"
    )
  return list(topo.devices)
