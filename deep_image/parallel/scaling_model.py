"""The cost model's study of Figure 3: speedup, crossover, the report, comparisons.

What `experiments.scaling` prints and checks, built on `cost_model.predict`:
`speedup` and `crossover` over the paper's device counts (`device_counts`),
`predict_rows` (Figure 3's numbers as dicts), `report` (the `--model_only`
table), and `compare_bytes` / `compare_step` (prediction against a compiled or
measured step). The study's setting is `PAPER_SETUP`: the paper's ImageNet model
(224 px, 1000 classes) with the parallel defaults.
"""

from __future__ import annotations

import dataclasses
import math

from deep_image.parallel.clusters import Cluster, get_cluster
from deep_image.parallel.cost_model import PAPER_SETUP, Prediction, predict

# The strategies of the paper's Figure 3 and the algorithm it describes (3.1).
PAPER_STRATEGIES = ("hybrid", "data")
PAPER_ALGORITHM = "butterfly"
PAPER = {"crossover": 16, "speedup@64": 47.0}  # Minwa, paper section 3.3; shown beside
# Figure 3's axes: the model, 1..64 GPUs, 64 images per GPU (left; the paper's
# slices), global mini-batches (right).
PAPER_MODEL = "scaling_8conv_3fc"
PAPER_MAX_DEVICES = 64
PAPER_BATCH_PER_DEVICE = 64
PAPER_GLOBAL_BATCHES = (256, 512, 1024)


def _best(model_name, cluster, n, b, strategies, algorithm, **kw) -> Prediction:
  """The fastest of `strategies` (ties: the first listed)."""
  return min(
    (predict(model_name, s, algorithm, n, b, cluster, **kw) for s in strategies),
    key=lambda p: p.step_s,
  )


def speedup(
  model_name: str,
  cluster: str | Cluster,
  num_devices: int,
  global_batch: int,
  *,
  strategies: tuple[str, ...] = PAPER_STRATEGIES,
  algorithm: str = PAPER_ALGORITHM,
  **kw,
) -> float:
  """Time per image on one device / on `num_devices` (the faster of `strategies`).

  Both run mini-batch `global_batch` (one device: all of it; G devices:
  global_batch / G each), as in the paper's Figure 3 right.
  """
  if global_batch % num_devices:
    raise ValueError(f"global_batch={global_batch} does not divide over {num_devices} devices")
  one = predict(model_name, "data", algorithm, 1, global_batch, cluster, **kw)
  many = _best(
    model_name, cluster, num_devices, global_batch // num_devices, strategies, algorithm, **kw
  )
  return one.time_per_image_s / many.time_per_image_s


def device_counts(max_devices: int = PAPER_MAX_DEVICES) -> list[int]:
  """1, 2, 4, ..., max_devices (Figure 3's x axis)."""
  return [2**i for i in range(int(math.log2(max_devices)) + 1)]


def crossover(
  model_name: str,
  cluster: str | Cluster,
  batch_per_device: int = PAPER_BATCH_PER_DEVICE,
  *,
  algorithm: str = PAPER_ALGORITHM,
  max_devices: int = PAPER_MAX_DEVICES,
  **kw,
) -> int:
  """The GPU count above which data parallelism beats hybrid (paper: 16).

  Precisely: the largest G in 1, 2, 4, ..., max_devices at which hybrid's step
  (b = batch_per_device images per device, the paper's slices) is no slower
  than data's; so data is strictly faster at every listed count above it. 1
  when data wins from 2 devices on (at 1 they coincide); max_devices when
  hybrid is never slower.
  """
  best = 1
  for g in device_counts(max_devices):
    hybrid = predict(model_name, "hybrid", algorithm, g, batch_per_device, cluster, **kw)
    data = predict(model_name, "data", algorithm, g, batch_per_device, cluster, **kw)
    if hybrid.step_s <= data.step_s * (1 + 1e-9):  # equal up to rounding: not slower
      best = g
  return best


def predict_rows(
  preset: str | Cluster,
  model: str = PAPER_MODEL,
  *,
  max_devices: int = PAPER_MAX_DEVICES,
  batch_per_device: int = PAPER_BATCH_PER_DEVICE,
  global_batches: tuple[int, ...] = PAPER_GLOBAL_BATCHES,
  algorithms: tuple[str, ...] = (PAPER_ALGORITHM,),
  strategies: tuple[str, ...] = PAPER_STRATEGIES,
  **kw,
) -> list[dict]:
  """Figure 3's numbers as dicts, for plots and tables.

  figure='left': per strategy, algorithm and G, `batch_per_device` images per
  device (time per image, step, speedup over one device at the same b,
  efficiency, bytes per device). figure='right': per global batch and G, the
  faster of `strategies` (speedup as `speedup`).
  """
  rows = []
  for algorithm in algorithms:
    one = predict(model, "data", algorithm, 1, batch_per_device, preset, **kw)
    for strategy in strategies:
      for g in device_counts(max_devices):
        p = predict(model, strategy, algorithm, g, batch_per_device, preset, **kw)
        s = one.time_per_image_s / p.time_per_image_s
        rows.append(
          dict(
            figure="left",
            **dataclasses.asdict(p),
            global_batch=g * batch_per_device,
            speedup=s,
            efficiency=s / g,
          )
        )
    for batch in global_batches:
      one = predict(model, "data", algorithm, 1, batch, preset, **kw)
      for g in device_counts(max_devices):
        if batch % g:
          continue
        p = _best(model, preset, g, batch // g, strategies, algorithm, **kw)
        s = one.time_per_image_s / p.time_per_image_s
        rows.append(
          dict(
            figure="right", **dataclasses.asdict(p), global_batch=batch, speedup=s, efficiency=s / g
          )
        )
  return rows


def _utilisation_for(model: str, cl: Cluster, target: float) -> float | None:
  """The utilisation at which speedup@64 would equal `target` (bisection), None if none in range."""

  def f(u):
    return speedup(model, dataclasses.replace(cl, utilisation=u), 64, 1024) - target

  lo, hi = 0.05, 1.0
  if f(lo) * f(hi) > 0:
    return None
  for _ in range(30):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
  return (lo + hi) / 2


def report(preset: str, model: str = PAPER_MODEL) -> str:
  """What `python -m experiments.scaling --model_only --preset=PRESET` prints.

  A table per GPU count 1..64: time per image and speedup of hybrid and data
  with 64 images per GPU (Figure 3 left), the speedup at global batches
  256 / 512 / 1024 (Figure 3 right, the faster strategy), then the same two
  numbers with ring collectives and over a range of utilisations, and the
  paper's numbers for Minwa; the LAST two lines are exactly
  `crossover: G` and `speedup@64: X.Xx` (butterfly, the paper's algorithm).
  """
  cl = get_cluster(preset)
  gpus = device_counts(PAPER_MAX_DEVICES)
  b = PAPER_BATCH_PER_DEVICE
  one = predict(model, "data", PAPER_ALGORITHM, 1, b, cl)
  lines = [
    f"cost model: {model} on {cl.name} ({cl.description})",
    f"  {cl.peak_flops / 1e12:.2f} TFLOP/s peak x {cl.utilisation:.2f} utilisation per device; "
    f"links {cl.intra_bandwidth / 1e9:.1f} GB/s in a node, {cl.nic_bandwidth / 1e9:.1f} GB/s "
    f"per NIC between nodes ({cl.devices_per_nic} GPU(s) per NIC); {PAPER_ALGORITHM} on one "
    f"axis, overlap {PAPER_SETUP.overlap}, {PAPER_SETUP.image_size} px",
    f"  one device: {one.step_s / b * 1e3:.3g} ms per image "
    f"({(one.compute_s - one.update_s) / b * cl.flops / 1e9:.1f} GFLOP forward + backward, "
    f"+ the update {one.update_s * 1e3:.3g} ms a step)",
    "",
    f"{'GPUs':>4} | {'ms/image (slices=64)':^21} | {'speedup (slices=64)':^19} | "
    f"{'GB sent / GPU / step':^20} | speedup, mini-batch",
    f"{'':>4} | {'hybrid':>10} {'data':>10} | {'hybrid':>9} {'data':>9} | "
    f"{'hybrid':>9} {'data':>10} | " + " ".join(f"{g:>6}" for g in PAPER_GLOBAL_BATCHES),
  ]
  for g in gpus:
    h = predict(model, "hybrid", PAPER_ALGORITHM, g, b, cl)
    d = predict(model, "data", PAPER_ALGORITHM, g, b, cl)
    right = [
      f"{speedup(model, cl, g, batch):6.1f}" if batch % g == 0 else f"{'-':>6}"
      for batch in PAPER_GLOBAL_BATCHES
    ]
    lines.append(
      f"{g:>4} | {h.time_per_image_s * 1e3:>10.4g} {d.time_per_image_s * 1e3:>10.4g} | "
      f"{one.time_per_image_s / h.time_per_image_s:>9.1f} "
      f"{one.time_per_image_s / d.time_per_image_s:>9.1f} | "
      f"{h.bytes_sent_per_device / 1e9:>9.3f} {d.bytes_sent_per_device / 1e9:>10.3f} | "
      + " ".join(right)
    )
  cross = crossover(model, cl)
  s64 = speedup(model, cl, 64, 1024)
  lines += [
    "",
    f"with ring collectives instead: crossover {crossover(model, cl, algorithm='ring')}, "
    f"speedup@64 {speedup(model, cl, 64, 1024, algorithm='ring'):.1f}x",
    "utilisation sensitivity (butterfly): "
    + "; ".join(
      f"{u:.1f}: crossover {crossover(model, dataclasses.replace(cl, utilisation=u))}, "
      f"speedup@64 {speedup(model, dataclasses.replace(cl, utilisation=u), 64, 1024):.1f}x"
      for u in (0.3, 0.5, 0.7)
    ),
  ]
  if cl.name == "minwa":
    u = _utilisation_for(model, cl, PAPER["speedup@64"])
    lines += [
      f"paper (section 3.3, Minwa): crossover {PAPER['crossover']}, "
      f"speedup@64 {PAPER['speedup@64']:.0f}x",
      "utilisation that would give the paper's 47x: "
      + (f"{u:.2f}" if u is not None else "none in 0.05-1.0"),
    ]
  lines += [f"crossover: {cross}", f"speedup@64: {s64:.1f}x"]
  return "\n".join(lines)


def compare_bytes(
  model_name: str,
  strategy: str,
  algorithm: str,
  num_devices: int,
  batch_per_device: int,
  measured_bytes_per_device: float,
  *,
  cluster: str | Cluster = "h100",
  **kw,
) -> float:
  """(predicted - measured) / measured bytes sent per device per step.

  `measured_bytes_per_device`: e.g. the collective bytes of one device read
  from the compiled program (`experiments.scaling`). `kw` as `predict`'s
  (image_size, activation_bytes, fc_micro_batches, ...).
  """
  if measured_bytes_per_device <= 0:
    raise ValueError(f"measured_bytes_per_device={measured_bytes_per_device} must be > 0")
  p = predict(model_name, strategy, algorithm, num_devices, batch_per_device, cluster, **kw)
  return (p.bytes_sent_per_device - measured_bytes_per_device) / measured_bytes_per_device


def compare_step(
  model_name: str,
  strategy: str,
  algorithm: str,
  num_devices: int,
  batch_per_device: int,
  measured_step_s: float,
  *,
  cluster: str | Cluster = "cpu",
  **kw,
) -> float:
  """(predicted - measured) / measured step time; arguments as `compare_bytes`."""
  if measured_step_s <= 0:
    raise ValueError(f"measured_step_s={measured_step_s} must be > 0")
  p = predict(model_name, strategy, algorithm, num_devices, batch_per_device, cluster, **kw)
  return (p.step_s - measured_step_s) / measured_step_s
