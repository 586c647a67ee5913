r"""Which strategy, mesh and algorithm to run on a cluster: every setup predicted and ranked.

  python -m experiments.plan --config=experiments/configs/scaling.py --cluster=h100 \
      --gpus=64 [--per_gpu_batch=64] [--compile] [--config.parallel.prefetch_mb=100 ...]

For every strategy x mesh (one axis; node x local with local = the cluster's GPUs per
node, when --gpus spans several nodes) x algorithm (and node_collective) that fits: the
predicted step time, speedup over one GPU on the same mini-batch, efficiency, MiB per
GPU per step inside a node and across nodes, memory per GPU (the model's estimate;
with --compile, argument + temp of a deviceless H100 compile of each setup). A markdown
table (fastest first), what does not fit and why, the recommendation and why, and three
last lines:

  flat: <strategy> <algorithm> <X>x       the fastest setup on a one-axis mesh
  best: <strategy> <mesh> <algorithm>     the fastest setup (mesh: G or NODESxLOCAL)
  speedup@<G>: <X>x                       the best setup's speedup

An algorithm 'a/b' is a node x local setup with node_collective a and collective b.
Everything is predicted by the cost model (`deep_image.parallel.planner`), not measured.
--compile needs the CUDA jax venv (`experiments.gpu_target.VENV_SETUP`) and --cluster=h100;
without the CUDA packages it says so and uses the model's memory. Progress goes to stderr.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from deep_image.config_error import ConfigError
from deep_image.parallel import planner
from experiments import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: importing the module defines no flags."""
  flags.DEFINE_string("cluster", "h100", "Cluster preset: h100 | minwa | cpu.")
  flags.DEFINE_integer("gpus", 8, "GPUs (devices) to plan for.")
  flags.DEFINE_integer(
    "per_gpu_batch", None, "Images per GPU (default: the config's train.batch_size / --gpus)."
  )
  flags.DEFINE_bool(
    "compile", False, "Memory per GPU from a deviceless H100 compile of each setup."
  )


class _Progress:
  """One stderr line every few seconds: the planner's candidate and its count."""

  def __init__(self, every_s: float = 3.0):
    self.start = self.last = time.perf_counter()
    self.every_s = every_s

  def __call__(self, i: int, total: int, setup) -> None:
    now = time.perf_counter()
    if now - self.last >= self.every_s:
      self.last = now
      print(
        f"plan: {i}/{total} {setup.label} ({now - self.start:.0f} s)", file=sys.stderr, flush=True
      )


def _compiled_memory(cluster, gpus: int):
  """memory_of(config, setup) from deviceless H100 compiles, or None (why on stderr)."""
  from experiments.gpu_target import cuda_missing, setup_hint

  if cluster.name != "h100":
    raise ConfigError(
      f"--compile compiles for H100 SXM: it needs --cluster=h100, not {cluster.name!r}"
    )
  missing = cuda_missing()
  if missing:
    print(
      f"plan: --compile skipped: {missing}; memory is the model's estimate. To compile: "
      f"{setup_hint('experiments.plan')}",
      file=sys.stderr,
    )
    return None
  from deep_image.parallel import mesh as mesh_lib

  mesh_lib.add_gpu_overlap_flags()  # before JAX starts its backends, as in training
  from experiments import step_programs
  from experiments.gpu_target import h100_devices

  hosts = max(1, gpus // cluster.devices_per_node)
  devices = h100_devices(gpus, hosts)

  def memory_of(config, setup) -> float:
    print(f"plan: compiling {setup.label}", file=sys.stderr, flush=True)
    strategy = step_programs.make_strategy(config, devices)
    images, labels = step_programs.abstract_batch(strategy, config)
    compiled = strategy.lower_train_step(strategy.abstract_state(), images, labels).compile()
    mem = compiled.memory_analysis()
    return float(mem.argument_size_in_bytes + mem.temp_size_in_bytes)

  return memory_of


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cluster = planner.cluster_for_plan(FLAGS.cluster)
  memory_of = _compiled_memory(cluster, FLAGS.gpus) if FLAGS.compile else None
  plan = planner.plan(
    _CONFIG.value,
    cluster,
    FLAGS.gpus,
    FLAGS.per_gpu_batch,
    memory_of=memory_of,
    progress=_Progress(),
  )
  command = "python -m experiments.plan " + " ".join(sys.argv[1:])
  print(planner.plan_text(plan, header=f"command: `{command}`"))


if __name__ == "__main__":
  _CONFIG = cli.define_config()
  _define_flags()
  cli.run(main)
