r"""Benchmark one training step: strategies x collectives, SPMD overhead, FLOP/s, memory.

  python -m experiments.benchmark_step [--quick] [--overlap=deferred|none]
      [--two_level_mesh="(('node', 2), ('local', 4))"] [--out=benchmarks/step_YYYY-MM-DD.md]

Four markdown tables (printed, and written to --out):

1. Step time of every strategy x collective on 8 (simulated) devices, small model,
   as a ratio to `gspmd` measured in the same run. Target: hand-written <= 1.05x.
2. SPMD overhead: 8-device step / 1-device step at the same global batch (target <= 1.10).
3. Achieved FLOP/s: XLA's FLOPs of one step / measured step time, as a fraction of a
   large 3x3 convolution's FLOP/s measured in the same run (target >= 0.8).
4. Per-device memory of the paper's Table 2 model (`deep_image_16`, 224x224, 1000
   classes) on 8 devices, compile only (`memory_analysis`), and the check that
   `lazy` keeps <= 1.05 x (parameter + optimizer bytes) / 8 per device.
5. (only, with --two_level_mesh) every shard_map strategy on a node x local mesh
   against the one-axis mesh of the same devices, paired ratio (target <= 1.10).

Every timed program (the step of each configuration, the 1-device step and the
reference convolution) is compiled and warmed up first, then timed round-robin,
one call each per round with the starting point rotated, so that noise from other
processes on the machine hits all of them alike. Ratios are of medians; the
"paired" ratio is the median over rounds of the per-round ratio.

On a CPU-only machine the run simulates 8 host devices unless XLA_FLAGS already
sets --xla_force_host_platform_device_count.
"""

from __future__ import annotations

import ast
import math
import os
import sys
import time

# Importing jax does not start its backends: main can still set the device count.
import jax
from absl import app, flags, logging

from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.validation import OVERLAPS
from experiments.configs import base
from experiments.markdown import machine_markdown
from experiments.step_programs import PAPER_CLASSES
from experiments.step_tables import (
  CONV_SHAPE,
  MEMORY_CONFIGS,
  STEP_CONFIGS,
  measure_steps,
  measure_two_level,
  memory_markdown,
  memory_rows,
  step_markdown,
  two_level_markdown,
)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: importing the module defines no flags."""
  flags.DEFINE_bool("quick", False, "Fewer repeats (a smoke run, not a measurement).")
  flags.DEFINE_string("out", None, "Also write the markdown report to this file.")
  flags.DEFINE_integer("repeats", 30, "Timed rounds per program (--quick: 4).")
  flags.DEFINE_string("model", "vgg_small", "Model of the step-time tables.")
  flags.DEFINE_integer("image_size", 32, "Training crop side of --model.")
  flags.DEFINE_integer("batch", 64, "Global batch of the step-time tables.")
  flags.DEFINE_integer("devices", 8, "Simulated devices (ignored if XLA_FLAGS sets it).")
  flags.DEFINE_string("memory_model", "deep_image_16", "Model of the memory table.")
  flags.DEFINE_integer("memory_batch", 64, "Global batch of the memory table.")
  flags.DEFINE_bool("skip_memory", False, "Skip the (slow) memory table.")
  flags.DEFINE_string(
    "two_level_mesh",
    "",
    "A parallel.mesh literal, e.g. \"(('node', 2), ('local', 4))\": measure only table 5, "
    "every shard_map strategy on this mesh against one axis (paired ratio).",
  )
  flags.DEFINE_enum(
    "overlap",
    base.get_config().parallel.overlap,
    list(OVERLAPS),
    "parallel.overlap of data / lazy / hybrid.",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Must run before anything asks JAX for its devices.
  mesh_lib.configure_host_devices(FLAGS.devices)
  devices = jax.devices()
  n = len(devices)
  repeats = 4 if FLAGS.quick else FLAGS.repeats
  command = " ".join(["python -m experiments.benchmark_step"] + sys.argv[1:])
  parts = ["## Step benchmark", "", machine_markdown(command)]

  if FLAGS.two_level_mesh:
    spec = ast.literal_eval(FLAGS.two_level_mesh)
    rows = measure_two_level(
      FLAGS.model, FLAGS.image_size, FLAGS.batch, spec, devices, repeats, overlap=FLAGS.overlap
    )
    parts += ["", two_level_markdown(rows, spec, FLAGS.model, FLAGS.image_size, FLAGS.batch, n)]
    print("\n".join(parts), flush=True)
    _write(parts)
    return

  t0 = time.perf_counter()
  result = measure_steps(
    FLAGS.model,
    FLAGS.image_size,
    FLAGS.batch,
    STEP_CONFIGS,
    devices,
    repeats,
    conv_shape=CONV_SHAPE,
    overlap=FLAGS.overlap,
  )
  logging.info("step tables took %.0f s", time.perf_counter() - t0)
  parts += ["", step_markdown(result, FLAGS.model, FLAGS.image_size, FLAGS.batch, n)]
  bad = {k: v for k, v in result["loss"].items() if not math.isfinite(v)}
  if bad:
    parts += ["", f"WARNING: non-finite loss after timing (timings suspect): {bad}"]
  print("\n".join(parts), flush=True)

  if not FLAGS.skip_memory:
    t0 = time.perf_counter()
    rows = memory_rows(
      FLAGS.memory_model,
      224,
      PAPER_CLASSES,
      FLAGS.memory_batch,
      MEMORY_CONFIGS,
      devices,
      overlap=FLAGS.overlap,
    )
    logging.info("memory table took %.0f s", time.perf_counter() - t0)
    mem = memory_markdown(rows, FLAGS.memory_model, FLAGS.memory_batch, n)
    parts += ["", mem]
    print("\n" + mem, flush=True)

  _write(parts)


def _write(parts: list[str]) -> None:
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
