r"""The train step on the GPUs of this machine: images/s, MFU and collective overlap.

  bash benchmarks/gpu.sh            # or:
  python -m experiments.benchmark_gpu [--model=deep_image_16] [--per_device_batch=16,64]
      [--configs='gspmd,data / deferred'] [--steps=20] [--out=benchmarks/gpu_<card>_<date>.md]

For gspmd and, with `parallel.overlap` none and deferred, data, lazy and hybrid
(butterfly), on every local GPU: the Table 2 model in bfloat16 at 64 images per
device (or each `--per_device_batch`), timed over `--steps` steps after two warm-up
steps. A configuration that fails gets a row with its error; the others still run. Columns:

=============  ================================================================
images/s       global batch x steps / wall time of the timed steps
MFU            the model's training FLOPs of one step (3 x forward FLOPs of
               `models.summary`, x global batch) / step time / (devices x the
               card's dense bf16 peak, `gpu_step.PEAK_FLOPS`). Not XLA's cost analysis:
               on GPU it leaves out the cuDNN convolutions (0.3% "MFU" on H200)
overlap        from a `jax.profiler` trace of 3 steps: the fraction of the time
               GPU collective kernels (NCCL) ran that some compute kernel ran
               at the same time on the same GPU
               (`deep_image.analysis.trace.overlap_fraction`)
=============  ================================================================

On one GPU there is nothing to synchronize: the strategies run without
collectives (images/s and MFU still compare their programs), and the overlap
column is empty; the overlap of the collectives needs several GPUs. What they
would overlap is in the deviceless compile (`experiments/compile_gpu.py`).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging

from deep_image.parallel import mesh as mesh_lib
from experiments.gpu_step import CONFIGS, measure
from experiments.markdown import machine_markdown, table

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: importing the module defines no flags."""
  flags.DEFINE_string("model", "deep_image_16", "Model (paper Table 2 by default).")
  flags.DEFINE_integer("image_size", 224, "Training crop side.")
  flags.DEFINE_list("per_device_batch", ["64"], "Images per GPU per step (one row each).")
  flags.DEFINE_list(
    "configs", [], "Configuration labels to run (e.g. 'gspmd,data / deferred'); empty: all."
  )
  flags.DEFINE_integer("steps", 20, "Timed steps per configuration.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "model.dtype.")
  flags.DEFINE_string("out", None, "Also write the markdown report to this file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mesh_lib.add_gpu_overlap_flags()  # before JAX starts its GPU backend
  devices = jax.devices()
  if devices[0].platform != "gpu":
    sys.exit(f"benchmark_gpu needs GPUs; JAX found {devices[0].platform} devices")
  command = " ".join(["python -m experiments.benchmark_gpu"] + sys.argv[1:])
  known = [c[0] for c in CONFIGS]
  unknown = sorted(set(FLAGS.configs) - set(known))
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; choose from {known}")
  chosen = [c for c in CONFIGS if not FLAGS.configs or c[0] in FLAGS.configs]
  batches = [int(b) for b in FLAGS.per_device_batch]
  rows = []
  for per_device_batch in batches:
    for config in chosen:
      try:
        rows.append(
          measure(
            config,
            devices,
            model=FLAGS.model,
            image_size=FLAGS.image_size,
            per_device_batch=per_device_batch,
            steps=FLAGS.steps,
            dtype=FLAGS.dtype,
          )
        )
      except Exception as e:  # noqa: BLE001 (one failed configuration must not lose the rest)
        logging.exception("%s failed", config[0])
        rows.append(
          {
            "configuration": config[0],
            "images/GPU": str(per_device_batch),
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
          }
        )
  columns = list(dict.fromkeys(k for r in rows for k in r))
  n = len(devices)
  parts = [
    "## GPU step benchmark",
    "",
    machine_markdown(command),
    f"- GPUs: {n} x {devices[0].device_kind}",
    "",
    f"`{FLAGS.model}` {FLAGS.image_size}x{FLAGS.image_size}, {FLAGS.dtype}, "
    f"{', '.join(map(str, batches))} images per GPU, {FLAGS.steps} timed steps; collectives: "
    "butterfly (gspmd: XLA's)."
    + ("" if n > 1 else " One GPU: no collectives to overlap (see the module docstring)."),
    "",
    table(columns, [[r.get(k, "") for k in columns] for r in rows]),
  ]
  text = "\n".join(parts)
  print(text, flush=True)
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
