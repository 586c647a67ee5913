"""One row of `experiments.benchmark_gpu`: a configuration's train step timed on this
machine's devices, its MFU, and (several devices) the collectives' overlap from a trace.

The configurations (`CONFIGS`) and the dense bf16 peaks the MFU divides by
(`PEAK_FLOPS`) live here; the trace analysis is `deep_image.analysis.trace`.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np
from absl import logging

from deep_image.analysis.trace import device_kernel_events, overlap_fraction
from deep_image.models import summary
from deep_image.models.vgg import make_spec
from deep_image.parallel.validation import OVERLAPS
from experiments.step_programs import PAPER_CLASSES, make_config, make_strategy, random_batch

# (label, strategy, collective, conv, overlap)
CONFIGS = (("gspmd", "gspmd", "xla", "data", "deferred"),) + tuple(
  (f"{label} / {overlap}", strategy, "butterfly", conv, overlap)
  for label, strategy, conv in (
    ("data", "data", "data"),
    ("lazy", "lazy", "data"),
    ("hybrid(conv=data)", "hybrid", "data"),
  )
  for overlap in OVERLAPS
)


# Dense bf16 peak FLOP/s per device, by a substring of `device_kind` (vendor data sheets:
# H100 / H200 SXM 989 TFLOP/s, A100 312 TFLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
  classes: int = PAPER_CLASSES,
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
  images, labels = random_batch(strategy, batch, image_size, classes)
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
