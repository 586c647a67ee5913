r"""Benchmark checkpoints: how long a save blocks training, and how long restores take.

  python -m experiments.benchmark_checkpoint [--model=deep_image_16] [--strategy=lazy] \
      [--restore_as=gspmd] [--repeats=3] [--out=benchmarks/checkpoint_YYYY-MM-DD.md]

For the train state (parameters + momentum) of `--model` laid out by `--strategy`
on the simulated devices, with `deep_image.train.checkpoint.Checkpointer`:

- save, blocking: the time `save` takes to return (copying the arrays off the
  devices; the step that follows may then donate the state);
- save, total: until the files are committed (the rest runs in the background
  while training goes on);
- restore, same layout: straight into the strategy's shardings (a resume);
- restore, other layout: into `--restore_as` (whole leaves read, converted,
  laid out again).

Medians over --repeats, the checkpoint's size on disk and the peak host memory. On a CPU-only
machine the run simulates --devices host devices unless XLA_FLAGS sets them.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time

from absl import app, flags

from experiments.configs import base
from experiments.step_programs import PAPER_CLASSES, make_config, make_strategy

_MODEL = flags.DEFINE_string("model", "deep_image_16", "Model (deep_image.models.vgg.MODELS).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side of --model.")
_CLASSES = flags.DEFINE_integer("classes", PAPER_CLASSES, "Classes of --model.")
_STRATEGY = flags.DEFINE_string("strategy", "lazy", "Strategy that saves.")
_RESTORE_AS = flags.DEFINE_string("restore_as", "gspmd", "Strategy of the cross-layout restore.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (ignored if XLA_FLAGS sets it).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves and restores timed (medians reported).")
_DIR = flags.DEFINE_string("dir", None, "Where to write checkpoints (default: a temp dir).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown report to this file.")


def _strategy(name: str):
  """(config, strategy) of `--model` laid out by strategy `name` on every device."""
  import jax

  collective = base.get_config().parallel.collective
  c = make_config(
    _MODEL.value,
    _IMAGE_SIZE.value,
    8 * jax.device_count(),
    name,
    collective,
    classes=_CLASSES.value,
  )
  return c, make_strategy(c, jax.devices())


class _NoInput:
  kind = "none"

  def get_state(self):
    return {}

  def set_state(self, state):
    del state


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(root: str) -> dict:
  import jax

  from deep_image.train.checkpoint import Checkpointer

  config, strategy = _strategy(_STRATEGY.value)
  state = strategy.init(jax.random.key(0))
  jax.block_until_ready(state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  blocking, total, same, other = [], [], [], []
  other_cfg, other_strategy = _strategy(_RESTORE_AS.value)
  for k in range(_REPEATS.value):
    workdir = os.path.join(root, f"run{k}")
    ckpt = Checkpointer(workdir, keep=1)
    start = time.perf_counter()
    ckpt.save(state, _NoInput(), strategy=strategy, config=config)
    blocking.append(time.perf_counter() - start)
    ckpt.wait()
    total.append(time.perf_counter() - start)
    ckpt.close()
    disk = _dir_bytes(os.path.join(workdir, "checkpoints"))

    start = time.perf_counter()
    jax.block_until_ready(Checkpointer(workdir, 1).restore(0, strategy, config, _NoInput()))
    same.append(time.perf_counter() - start)
    start = time.perf_counter()
    restored = Checkpointer(workdir, 1).restore(0, other_strategy, other_cfg, _NoInput())
    jax.block_until_ready(restored)
    other.append(time.perf_counter() - start)
    del restored
    shutil.rmtree(workdir)
  return {
    "state_bytes": state_bytes,
    "disk_bytes": disk,
    "save_blocking": blocking,
    "save_total": total,
    "restore_same": same,
    "restore_other": other,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "devices": jax.device_count(),
    "backend": jax.default_backend(),
  }


def markdown(r: dict) -> str:
  def cell(xs):
    return f"{statistics.median(xs):.2f} s (first {xs[0]:.2f} s)"

  lines = [
    f"Checkpoint of `{_MODEL.value}` ({_IMAGE_SIZE.value} px, {_CLASSES.value} classes): "
    f"train state {r['state_bytes'] / 2**20:,.0f} MiB (parameters + momentum), "
    f"{r['disk_bytes'] / 2**20:,.0f} MiB on disk; `{_STRATEGY.value}` on {r['devices']} "
    f"{r['backend']} devices; medians of {_REPEATS.value}; {datetime.date.today()}, "
    f"{platform.machine()} {os.cpu_count()} cores.",
    "",
    "| operation | time |",
    "|---|---:|",
    f"| save, blocking (training waits) | {cell(r['save_blocking'])} |",
    f"| save, total (committed) | {cell(r['save_total'])} |",
    f"| restore, same layout (resume) | {cell(r['restore_same'])} |",
    f"| restore as `{_RESTORE_AS.value}` (other layout) | {cell(r['restore_other'])} |",
    "",
    f"Peak host memory of the whole run: {r['peak_rss_bytes'] / 2**30:.1f} GiB (the simulated "
    "devices share the host's memory).",
  ]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from deep_image.parallel.mesh import configure_host_devices

  configure_host_devices(_DEVICES.value)
  root = _DIR.value or tempfile.mkdtemp(prefix="benchmark_checkpoint_")
  md = markdown(measure(root))
  print(md)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(f"`python -m experiments.benchmark_checkpoint` ({datetime.date.today()})\n\n{md}")


if __name__ == "__main__":
  app.run(main)
