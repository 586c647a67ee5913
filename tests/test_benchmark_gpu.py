"""experiments.benchmark_gpu's library: the overlap measure (deep_image.analysis.trace) on
hand-made kernel timelines, and one row measured for real on CPU devices
(experiments.gpu_step)."""

import jax
import pytest

from deep_image.analysis.trace import overlap_fraction
from experiments.gpu_step import CONFIGS, measure


def test_overlap_is_the_collective_time_shared_with_compute():
  events = [
    ("ncclDevKernel_AllGather_RING", 0.0, 10.0),
    ("fusion.3", 2.0, 5.0),  # 3 of the first collective's 10
    ("convolution.1", 4.0, 12.0),  # 6 more (4..10; 4..5 already counted), 2 after it
    ("ncclDevKernel_ReduceScatter", 20.0, 30.0),  # nothing beside it
  ]
  assert overlap_fraction(events) == pytest.approx(8 / 20)


def test_all_and_nothing():
  hidden = [("nccl_allreduce", 1.0, 2.0), ("gemm", 0.0, 3.0)]
  assert overlap_fraction(hidden) == 1.0
  assert overlap_fraction([("NCCL x", 0.0, 1.0), ("gemm", 1.0, 2.0)]) == 0.0
  assert overlap_fraction([("gemm", 0.0, 1.0)]) is None  # one GPU: no collectives


def test_a_row_measures_a_real_step_and_profiles_it():
  """The whole measurement path on 2 CPU devices (the GPU-only parts leave the overlap empty)."""
  lazy_deferred = next(c for c in CONFIGS if c[0] == "lazy / deferred")
  row = measure(
    lazy_deferred,
    jax.devices()[:2],
    model="vgg_tiny",
    image_size=8,
    per_device_batch=2,
    steps=2,
    dtype="float32",
    classes=10,
  )
  assert row["configuration"] == "lazy / deferred"
  assert float(row["images/s"].replace(",", "")) > 0 and float(row["step ms"]) > 0
  assert 0 < float(row["loss"]) < 10
  assert row["MFU"] == "" and row["overlap"] == ""  # CPU: no peak FLOP/s, no GPU trace
