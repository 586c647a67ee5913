"""The overlap measure of experiments.benchmark_gpu, on hand-made kernel timelines."""

import pytest

from experiments.benchmark_gpu import overlap_fraction


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
