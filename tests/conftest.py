"""Every test process sees 8 simulated CPU devices (unless XLA_FLAGS already says otherwise).

Set before jax is imported anywhere, since the device count is fixed when the
CPU backend starts.
"""

import os

# XLA:CPU aborts the process when a collective's rendezvous waits longer than
# its termination timeout. Eight simulated devices per test worker, on two
# shared cores, can be that slow under load: give them minutes, not seconds.
PATIENT_COLLECTIVES = (
  "--xla_cpu_collective_timeout_seconds=900 --xla_cpu_collective_call_terminate_timeout_seconds=900"
)

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
  _flags += " " + PATIENT_COLLECTIVES
os.environ["XLA_FLAGS"] = _flags.strip()

# `experiments.train` flags for a seconds-long job: the default config's `tiny` variant
# (vgg_tiny on 16 px digit crops; experiments/configs/base.py); CLI tests add their own
# steps and devices.
TINY_JOB_FLAGS = ("--config=experiments/configs/default.py:tiny",)


def tiny_config(**overrides):
  """`experiments/configs/default.py:tiny` with dotted-field overrides.

  E.g. `tiny_config(**{"train.num_steps": 4, "data.augment.crop_size": 12})`; an unknown
  field is an error (`experiments.sweep.apply_overrides`, what sweep points use).
  """
  from experiments.configs import default
  from experiments.sweep import apply_overrides

  return apply_overrides(default.get_config("tiny"), overrides)


def train_cli(workdir, *args, xla_flags=""):
  """`python -m experiments.train --workdir=WORKDIR` on the tiny job + `args`, completed.

  Runs with patient collectives and `xla_flags` appended to XLA_FLAGS (e.g. a device
  count; without one the script simulates `parallel.num_devices`).
  """
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *TINY_JOB_FLAGS, *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, XLA_FLAGS=f"{PATIENT_COLLECTIVES} {xla_flags}".strip()),
    timeout=300,
  )
