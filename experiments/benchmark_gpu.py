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
               card's dense bf16 peak, `PEAK_FLOPS`). Not XLA's cost analysis:
               on GPU it leaves out the cuDNN convolutions (0.3% "MFU" on H200)
overlap        from a `jax.profiler` trace of 3 steps: the fraction of the time
               GPU collective kernels (NCCL) ran that some compute kernel ran
               at the same time on the same GPU (`overlap_fraction`)
=============  ================================================================

On one GPU there is nothing to synchronize: the strategies run without
collectives (images/s and MFU still compare their programs), and the overlap
column is empty; the overlap of the collectives needs several GPUs. What they
would overlap is in the deviceless compile (`experiments/compile_gpu.py`).
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from deep_image.models import summary
from deep_image.models.vgg import make_spec
from deep_image.parallel import mesh as mesh_lib
from experiments.benchmark_step import make_config, make_strategy
from experiments.markdown import machine_markdown, table

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Flags are defined only when run as a script: tests import this module beside
  experiments.benchmark_step, whose flags share names."""
  flags.DEFINE_string("model", "deep_image_16", "Model (paper Table 2 by default).")
  flags.DEFINE_integer("image_size", 224, "Training crop side.")
  flags.DEFINE_list("per_device_batch", ["64"], "Images per GPU per step (one row each).")
  flags.DEFINE_list(
    "configs", [], "Configuration labels to run (e.g. 'gspmd,data / deferred'); empty: all."
  )
  flags.DEFINE_integer("steps", 20, "Timed steps per configuration.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "model.dtype.")
  flags.DEFINE_string("out", None, "Also write the markdown report to this file.")


# (label, strategy, collective, conv, overlap)
CONFIGS = (("gspmd", "gspmd", "xla", "data", "deferred"),) + tuple(
  (f"{label} / {overlap}", strategy, "butterfly", conv, overlap)
  for label, strategy, conv in (
    ("data", "data", "data"),
    ("lazy", "lazy", "data"),
    ("hybrid(conv=data)", "hybrid", "data"),
  )
  for overlap in ("none", "deferred")
)
# Dense bf16 peak FLOP/s per device, by a substring of `device_kind` (vendor data sheets:
# H100 / H200 SXM 989 TFLOP/s, A100 312 TFLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Kernel names of GPU collectives in a profile.
COLLECTIVE_KERNELS = ("nccl",)


def overlap_fraction(events: list[tuple[str, float, float]]) -> float | None:
  """Of the time collective kernels run, the fraction some compute kernel also runs.

  Args:
    events: (kernel name, start, end) on one device; a name containing one of
      `COLLECTIVE_KERNELS` (case-insensitive) is a collective, anything else compute.
  Returns:
    |union(collective) & union(compute)| / |union(collective)|, or None without
    collective time.
  """

  def union(intervals):
    merged = []
    for start, end in sorted(intervals):
      if merged and start <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], end)
      else:
        merged.append([start, end])
    return merged

  is_collective = [any(k in name.lower() for k in COLLECTIVE_KERNELS) for name, _, _ in events]
  comm = union([(s, e) for (_, s, e), c in zip(events, is_collective, strict=True) if c])
  compute = union([(s, e) for (_, s, e), c in zip(events, is_collective, strict=True) if not c])
  total = sum(e - s for s, e in comm)
  if total <= 0:
    return None
  both, j = 0.0, 0
  for s, e in comm:
    while j < len(compute) and compute[j][1] <= s:
      j += 1
    k = j
    while k < len(compute) and compute[k][0] < e:
      both += min(e, compute[k][1]) - max(s, compute[k][0])
      k += 1
  return both / total


def device_kernel_events(profile_dir: str) -> dict[str, list[tuple[str, float, float]]]:
  """Kernel events per GPU plane ('/device:GPU:i') of the newest trace under `profile_dir`."""
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb trace under {profile_dir}")
  profile = jax.profiler.ProfileData.from_file(paths[-1])
  out = {}
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU:"):
      continue
    events = []
    for line in plane.lines:
      for ev in line.events:
        events.append((ev.name, ev.start_ns, ev.start_ns + ev.duration_ns))
    out[plane.name] = events
  return out


def _peak_flops(kind: str) -> float | None:
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def measure(
  config: tuple[str, str, str, str, str],
  devices,
  *,
  model: str,
  image_size: int,
  per_device_batch: int,
  steps: int,
  dtype: str,
  classes: int = 1000,
) -> dict:
  """One row: time `steps` steps of `config` (a `CONFIGS` entry) on `devices`; with
  several devices, profile 3 more and measure the collectives' overlap (GPU planes only).
  """
  label, strategy_name, collective, conv, overlap = config
  n = len(devices)
  batch = per_device_batch * n
  cfg = make_config(
    model, image_size, batch, strategy_name, collective, conv, classes, overlap=overlap
  )
  cfg.model.dtype = dtype
  strategy = make_strategy(cfg, devices)
  state = strategy.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jax.device_put(
    rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
    strategy.batch_sharding,
  )
  labels = jax.device_put(rng.integers(0, classes, batch).astype(np.int32), strategy.batch_sharding)
  for _ in range(2):  # compile + warm up
    state, metrics = strategy.train_step(state, images, labels)
  jax.block_until_ready(metrics)
  spec = make_spec(model, num_classes=classes, image_size=image_size)
  flops = 3 * summary.total_flops(spec) * batch  # forward + backward (2x forward)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = strategy.train_step(state, images, labels)
  jax.block_until_ready(metrics)
  step = (time.perf_counter() - t0) / steps
  peak = _peak_flops(devices[0].device_kind)
  row = {
    "configuration": label,
    "images/GPU": str(per_device_batch),
    "images/s": f"{batch / step:,.0f}",
    "step ms": f"{step * 1e3:.1f}",
    "ms/image/GPU": f"{step * 1e3 / per_device_batch:.3f}",
    "MFU": f"{flops / step / (n * peak):.1%}" if peak and flops else "",
    "overlap": "",
    "loss": f"{float(metrics['loss']):.3f}",
  }
  if n > 1:
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        for _ in range(3):
          state, metrics = strategy.train_step(state, images, labels)
        jax.block_until_ready(metrics)
      planes = device_kernel_events(trace_dir)
      fractions = [overlap_fraction(events) for events in planes.values()]
    fractions = [f for f in fractions if f is not None]
    # No GPU plane (e.g. CPU devices), or GPUs without collective kernels: left empty.
    row["overlap"] = f"{np.mean(fractions):.0%}" if fractions else ""
  logging.info("%s: %s", label, row)
  return row


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
