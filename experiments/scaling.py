r"""The paper's scaling study (section 3.3, Figure 3): strategies x devices, measured and compiled.

  python -m experiments.scaling [--quick] [--out=benchmarks/scaling_YYYY-MM-DD.md]
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu /tmp/gpu-aot/bin/python \
      -m experiments.scaling --gpu_compile [--out=...]
  python -m experiments.scaling --model_only --preset=minwa
  python -m experiments.scaling --redraw [--out=...]

Parts (each writes its rows into the JSON beside --out, keeping the rows of the other
parts already there, then the markdown and the PNG are redrawn from all rows):

1. Measured on simulated CPU devices (`--xla_force_host_platform_device_count=8`, set
   before JAX starts): for `scaling_8conv_3fc` and `deep_image_16`, each strategy with
   the default algorithm at N = 1, 2, 4, 8 devices, the other algorithms at N = 8 only
   (--algorithm_devices); a fixed per-device batch, so the global batch grows with N.
   Step time (median of round-robin rounds, as experiments.benchmark_step), images/s,
   per-device memory (`memory_analysis` argument + temp) and the collectives of the
   compiled program. The simulated devices share this machine's cores, so the step time
   is at a reduced image size (--image_size) and its absolute scaling is not a GPU's.
   Also: compile-only memory and bytes at 224 px (--compile_size, --compile_devices);
   2 processes x 4 devices against 1 process x 8 (jax.distributed, gloo); and the
   speedup of the default strategy at fixed global batches (--speedup_batches).
2. `--gpu_compile` (needs the CUDA jax venv, README "How the strategies scale"): deviceless XLA GPU
   compiles for 8..64 H100s on 1..8 hosts (8 per host): per-device memory, collectives,
   bytes sent per device and the fraction of async collectives the scheduler overlaps
   (`deep_image.analysis.overlap.overlap_summary`). Nothing runs; skipped with a message when
   the CUDA plugin is missing.
3. `--model_only --preset=NAME [--plot=FILE.png]`: `deep_image.parallel.scaling_model.report(NAME,
   model)`, and the predicted Figure 3 (`write_model_figure`).

Bytes sent per device per step are read from the compiled (post-optimization) HLO text
by `deep_image.analysis.bytes_sent.collective_ops` (its docstring has the conventions: every
collective op once, with its replica-group size).

The tables split the bytes sent into weights and the rest: the parameters a strategy
synchronises every step (replicated ones; every one for `lazy`, whose 1/N shards are
gathered whole) cost a ring all-reduce's 2 (N-1)/N of their bytes per device; the rest
follows the batch (activations of the split FC layers for hybrid and gspmd). Hybrid's
rest per image of the global batch, over (N-1)/N, is the check that its FC traffic
follows activations, not weights.

This file is the command line only: the programs and their rows are
`experiments.scaling_measure` (on `experiments.step_programs`), the claims and the cost
model's errors `experiments.scaling_checks`, the JSON, markdown and figures
`experiments.scaling_report`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Sequence

# Importing JAX does not start a backend: the host device count set later still applies.
import jax
from absl import app, flags, logging

from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import scaling_model
from deep_image.parallel.collectives import ALGORITHMS
from deep_image.parallel.layout_policy import STRATEGIES
from experiments.gpu_target import VENV_SETUP, cuda_missing
from experiments.markdown import machine_markdown
from experiments.scaling_checks import claim_checks, recheck
from experiments.scaling_measure import (
  DEFAULT_ALGORITHM,
  DEFAULT_STRATEGY,
  MODELS,
  compile_program,
  gpu_compile_rows,
  measure,
  process_worker,
  run_processes,
)
from experiments.scaling_report import load, merge, paths, save, write_model_figure
from experiments.step_programs import PAPER_CLASSES, Program

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: importing the module defines no flags."""
  flags.DEFINE_string("out", None, "Markdown report (default benchmarks/scaling_<date>.md); "
                      "the JSON and PNG go beside it.")  # fmt: skip
  flags.DEFINE_bool("quick", False, "A smoke run: 8conv only, N=1,2, 2 rounds, no extras.")
  flags.DEFINE_list("models", list(MODELS), "Models of the measured CPU table.")
  flags.DEFINE_list("strategies", list(STRATEGIES), "Strategies (parallel.strategy).")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "parallel.collective of shard_map ones.")
  flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Simulated device counts (CPU part).")
  flags.DEFINE_list("algorithm_devices", ["8"], "Device counts of the non-default algorithms.")
  flags.DEFINE_list("algorithm_models", [MODELS[0]], "Models of the non-default algorithms.")
  flags.DEFINE_integer("per_device_batch", 4, "Images per device (the paper's slices: 64).")
  flags.DEFINE_integer("image_size", 32, "Image side of the measured CPU steps (divisible by 32).")
  flags.DEFINE_integer("classes", PAPER_CLASSES, "Output classes.")
  flags.DEFINE_integer("repeats", 3, "Timed round-robin rounds per program.")
  flags.DEFINE_float("memory_budget_gb", 6.0, "Host memory of one round-robin group of programs.")
  flags.DEFINE_integer("compile_size", 224, "Image side of the compile-only CPU rows (0: none).")
  flags.DEFINE_list("compile_devices", ["8"], "Device counts of the compile-only CPU rows.")
  flags.DEFINE_integer("compile_batch", 64, "Per-device batch of the compile-only CPU rows.")
  flags.DEFINE_list("process_strategies", [DEFAULT_STRATEGY], "Strategies timed as 2 x 4 and "
                    "1 x 8 processes x devices (empty: skip).")  # fmt: skip
  flags.DEFINE_list("speedup_batches", ["32", "64", "128"], "Fixed global batches of the "
                    "speedup panel (default strategy, 8conv; empty: skip).")  # fmt: skip
  flags.DEFINE_bool("gpu_compile", False, "Part 2 only: deviceless H100 compiles.")
  flags.DEFINE_list("gpu_devices", ["8", "16", "32", "64"], "H100 counts (8 per host).")
  flags.DEFINE_list("gpu_models", ["scaling_8conv_3fc:8,16,32,64", "deep_image_16:8,16,32,64"],
                    "model:GPU counts of the H100 compiles.")  # fmt: skip
  flags.DEFINE_integer("gpu_per_device_batch", 64, "Images per GPU (the paper's 64).")
  flags.DEFINE_bool("model_only", False, "Print the cost model's prediction and exit.")
  flags.DEFINE_string("preset", "minwa", "Cluster preset of --model_only.")
  flags.DEFINE_string("model", "scaling_8conv_3fc", "Model of --model_only.")
  flags.DEFINE_string("plot", None, "--model_only: also draw the predicted Figure 3 here (PNG).")
  flags.DEFINE_bool(
    "redraw", False, "Only recompute the checks and redraw the markdown and PNG from the JSON."
  )
  # A worker of the over-processes rows (started by this script, not by hand).
  flags.DEFINE_string("worker", None, "JSON spec of one process of a multi-process timing.")


def _ints(values: Sequence[str]) -> list[int]:
  return [int(v) for v in values if v]


def cpu_study() -> None:
  """Part 1 (measured on simulated CPU devices) into the JSON / markdown / PNG."""
  mesh_lib.configure_host_devices(max(_ints(FLAGS.devices) + [8]))
  devices = jax.devices()
  quick = FLAGS.quick
  models = FLAGS.models[:1] if quick else FLAGS.models
  ns = [n for n in _ints(FLAGS.devices) if n <= len(devices)]
  ns = ns[:2] if quick else ns
  alg_ns = [] if quick else _ints(FLAGS.algorithm_devices)
  repeats = 2 if quick else FLAGS.repeats
  b = FLAGS.per_device_batch
  size, classes = FLAGS.image_size, FLAGS.classes
  if size % 32:
    raise app.UsageError(f"--image_size={size} must be divisible by 32 (five 2x2 poolings)")
  t_start = time.perf_counter()
  data = load(paths(FLAGS.out)[1])
  command = " ".join(["python -m experiments.scaling"] + sys.argv[1:])
  data.setdefault("meta", {})["cpu_header"] = machine_markdown(command)
  checks, skipped = {}, []

  programs = []
  for m in models:
    for n in ns:
      for s in FLAGS.strategies:
        algs = [DEFAULT_ALGORITHM] + (
          [a for a in FLAGS.algorithms if a != DEFAULT_ALGORITHM]
          if n in alg_ns and s != "gspmd" and n > 1 and m in FLAGS.algorithm_models
          else []
        )
        for a in algs:  # fmt: skip
          programs.append(Program(m, s, a, n, size, b * n, classes))
  t0 = time.perf_counter()
  rows = [dict(r, part="cpu") for r in measure(programs, devices, repeats, FLAGS.memory_budget_gb)]
  logging.info("measured %d programs in %.0f s", len(rows), time.perf_counter() - t0)
  if alg_ns:
    skipped.append(
      f"cpu: algorithms other than {DEFAULT_ALGORITHM} only at N={alg_ns} and for "
      f"{FLAGS.algorithm_models} (time: a data-parallel step on 8 simulated devices takes "
      "5-14 s here, by load)"
    )
  checks.update(claim_checks(rows, "cpu", "measured CPU"))
  data = merge(data, ["cpu"], rows, checks, skipped)
  save(data, FLAGS.out)

  if quick:
    return
  if FLAGS.speedup_batches:
    m = models[0]
    sp = [Program(m, DEFAULT_STRATEGY, DEFAULT_ALGORITHM, n, size, gb, classes)
          for gb in _ints(FLAGS.speedup_batches) for n in ns if gb % n == 0]  # fmt: skip
    t0 = time.perf_counter()
    sp_rows = [
      dict(r, part="speedup") for r in measure(sp, devices, repeats, FLAGS.memory_budget_gb)
    ]
    logging.info("speedup rows in %.0f s", time.perf_counter() - t0)
    data = merge(data, ["speedup"], sp_rows, {}, [])
    save(data, FLAGS.out)

  if FLAGS.process_strategies:
    n = max(ns)
    progs = [Program(models[0], s, DEFAULT_ALGORITHM, n, size, b * n, classes)
             for s in FLAGS.process_strategies]  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      proc_rows = []
      for procs in (1, 2):
        proc_rows += [dict(r, part="process") for r in run_processes(progs, procs, n, repeats, tmp)]
    logging.info("process rows in %.0f s", time.perf_counter() - t0)
    data = merge(data, ["process"], proc_rows, {}, [])
    save(data, FLAGS.out)

  if FLAGS.compile_size:
    cb = FLAGS.compile_batch
    comp = []
    for m in models:
      for n in _ints(FLAGS.compile_devices):
        for s in FLAGS.strategies:
          p = Program(m, s, DEFAULT_ALGORITHM, n, FLAGS.compile_size, cb * n, classes)
          logging.info("compiling %s (compile only)", p.label)
          _, _, (row, _) = compile_program(p, devices[:n])
          comp.append(dict(row, part="cpu_compile"))
    data = merge(data, ["cpu_compile"], comp, {}, [])
    save(recheck(data), FLAGS.out)
  logging.info("CPU study took %.0f s", time.perf_counter() - t_start)


def gpu_study() -> None:
  """Part 2: deviceless H100 compiles into the JSON / markdown / PNG."""
  missing = cuda_missing()
  if missing:
    print(f"scaling: skipping the H100 compiles: {missing}; set up a CUDA jax venv with: "
          f"{VENV_SETUP}, and run this with /tmp/gpu-aot/bin/python")  # fmt: skip
    return
  mesh_lib.add_gpu_overlap_flags()  # before JAX starts, as in training
  allowed = set(_ints(FLAGS.gpu_devices))
  specs, skipped = [], []
  for item in FLAGS.gpu_models:
    model, _, counts = item.partition(":")
    for n in _ints(counts.split(",")) if counts else sorted(allowed):
      (specs if n in allowed else skipped).append((model, n))
  not_done = [f"{m} at {n}" for m in dict.fromkeys(m for m, _ in specs)
              for n in sorted(allowed) if (m, n) not in specs]  # fmt: skip
  t0 = time.perf_counter()
  compiled = gpu_compile_rows(specs, FLAGS.strategies, FLAGS.gpu_per_device_batch)
  rows = [dict(r, part="gpu") for r in compiled]
  checks = claim_checks(rows, "gpu", "H100 compile")
  notes = (
    [f"gpu: H100 compiles left out by --gpu_models: {', '.join(not_done)}"] if not_done else []
  )
  data = load(paths(FLAGS.out)[1])
  data.setdefault("meta", {})["gpu_header"] = (
    f"- H100 compiles: jax {jax.__version__}, XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`, "
    f"{FLAGS.gpu_per_device_batch} images per GPU, took {time.perf_counter() - t0:.0f} s; "
    f"command: `python -m experiments.scaling {' '.join(sys.argv[1:])}`"
  )
  save(recheck(merge(data, ["gpu"], rows, checks, notes)), FLAGS.out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    process_worker(json.loads(FLAGS.worker))
  elif FLAGS.model_only:
    print(scaling_model.report(FLAGS.preset, FLAGS.model))
    if FLAGS.plot:
      rows = scaling_model.predict_rows(FLAGS.preset, FLAGS.model)
      write_model_figure(rows, FLAGS.preset, FLAGS.plot)
      logging.info("wrote %s", FLAGS.plot)  # stdout ends with the crossover / speedup lines
  elif FLAGS.redraw:
    save(recheck(load(paths(FLAGS.out)[1])), FLAGS.out)
  elif FLAGS.gpu_compile:
    gpu_study()
  else:
    cpu_study()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
