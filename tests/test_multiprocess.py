"""`to_global` and the device cache as one job of 2 processes x 4 CPU devices (jax.distributed).

The test runs this file as 2 subprocesses (the `__main__` worker below), each simulating 4
devices with gloo collectives between them, and compares what they report with the same
computation on the test process's own 8 devices.
"""

import hashlib
import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.data import data_config, device_cache, global_batch

ROWS_PER_PROCESS = 8
CACHE_EXAMPLES = 44  # 40 cached over 8 shards (4 dropped), 5 rows per shard.
CACHE_BATCH = 16  # 2 rows per shard per step: 2 steps per epoch.
CACHE_STEPS = 5  # Crosses two epoch boundaries.


class RecordingSource:
  """Record i: a seeded random uint8 [20, 20, 3] image and label i; remembers what was read."""

  def __init__(self, n: int):
    self.n = n
    self.read: set[int] = set()

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.read.add(int(i))
    image = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    return {"image": image, "label": int(i)}


def _rank_rows(process_id: int, rows: int = ROWS_PER_PROCESS) -> np.ndarray:
  """int32 [rows, 3]: values that name their process and row."""
  return (1000 * process_id + np.arange(rows * 3).reshape(rows, 3)).astype(np.int32)


def cache_batches(mesh: jax.sharding.Mesh) -> dict:
  """Builds a DeviceCache over `mesh` and digests CACHE_STEPS global batches.

  Every process must call this (the batches are gathered to all of them).

  Returns:
    {'info': cache facts, 'steps': [{'images_sha256', 'labels'}], 'read': sorted source
    indices this process decoded}.
  """
  cfg = data_config.default_config()
  cfg.train_scale, cfg.cache_on_device = 20, True
  cfg.augment.crop_size = 16  # Default augmentations stay on: their sampling is compared too.
  source = RecordingSource(CACHE_EXAMPLES)
  cache = device_cache.DeviceCache.build(
    source, cfg, NamedSharding(mesh, P("data")), global_batch_size=CACHE_BATCH, seed=5
  )
  steps = []
  for step in range(CACHE_STEPS):
    images, labels = cache.batch(step)
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    labels = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
    assert images.shape == (CACHE_BATCH, 16, 16, 3) and images.dtype == np.uint8
    steps.append(
      {"images_sha256": hashlib.sha256(images.tobytes()).hexdigest(), "labels": labels.tolist()}
    )
  keys = ("rows", "shards", "bytes_used_per_device", "memory_source", "free_bytes_per_device")
  info = {k: cache.info[k] for k in keys}
  return {"info": info, "steps": steps, "read": sorted(source.read)}


def _worker(process_id: int, port: int, out_dir: str) -> None:
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  out = {"process_count": jax.process_count(), "local_devices": jax.local_device_count()}
  mesh = jax.make_mesh((8,), ("data",))
  out["mesh_processes"] = [d.process_index for d in mesh.devices.flat]

  # to_global: each process passes only its own rows.
  sharding = NamedSharding(mesh, P("data"))
  local = _rank_rows(process_id)
  assembled = global_batch.to_global(local, sharding)
  out["global_shape"] = list(assembled.shape)
  out["global_rows"] = np.asarray(multihost_utils.process_allgather(assembled, tiled=True)).tolist()
  out["global_sum"] = int(jax.jit(lambda x: x.sum())(assembled))
  # Each local device holds the rows of `local` its shard index names: nothing moved.
  out["shards_local"] = all(
    np.array_equal(
      np.asarray(s.data), local[s.index[0].start - process_id * ROWS_PER_PROCESS :][:2]
    )
    for s in assembled.addressable_shards
  )
  # A mesh with a replicated axis: 4 batch shards, 2 of them (4 devices) in each process.
  mesh2 = jax.make_mesh((4, 2), ("data", "model"))
  small = global_batch.to_global(_rank_rows(process_id, 4), NamedSharding(mesh2, P("data")))
  out["replicated_rows"] = np.asarray(multihost_utils.process_allgather(small, tiled=True)).tolist()
  try:
    global_batch.to_global(_rank_rows(process_id, 6), sharding)
    out["bad_rows_error"] = None
  except ValueError as e:
    out["bad_rows_error"] = str(e)

  # Processes that see different free memory agree on the smallest (sizes over 2**31 bytes).
  cfg = data_config.default_config()
  cfg.cache_budget_bytes = (3 + 2 * process_id) << 30
  out["plan_free_bytes"] = device_cache.plan_cache(40, cfg, sharding)["free_bytes_per_device"]
  out["cache"] = cache_batches(mesh)
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(out, f)
  jax.distributed.shutdown()


def test_to_global_and_device_cache_over_two_processes(tmp_path):
  from conftest import run_two_processes

  outs = run_two_processes(__file__, tmp_path)

  expected_rows = np.concatenate([_rank_rows(0), _rank_rows(1)])  # Process order.
  for out in outs:
    assert out["process_count"] == 2 and out["local_devices"] == 4
    assert out["mesh_processes"] == [0] * 4 + [1] * 4
    assert out["global_shape"] == [2 * ROWS_PER_PROCESS, 3]
    np.testing.assert_array_equal(out["global_rows"], expected_rows)
    assert out["global_sum"] == int(expected_rows.sum())
    assert out["shards_local"]
    np.testing.assert_array_equal(
      out["replicated_rows"], np.concatenate([_rank_rows(0, 4), _rank_rows(1, 4)])
    )
    assert out["plan_free_bytes"] == 3 << 30
    assert "host batch of 6 examples does not divide over this process's 4 devices" in (
      out["bad_rows_error"] or ""
    )

  # The device cache: the same global batches as one process with 8 devices.
  reference = cache_batches(jax.make_mesh((8,), ("data",)))
  assert reference["info"]["rows"] == 40 and len(reference["read"]) == 40
  assert (
    reference["info"]["free_bytes_per_device"] == data_config.default_config().cache_budget_bytes
  )
  for out in outs:
    assert out["cache"]["info"] == reference["info"]
    assert out["cache"]["steps"] == reference["steps"]
  assert len({tuple(s["labels"]) for s in reference["steps"]}) == CACHE_STEPS  # Steps differ.
  # Each process decoded only its own half of the cached rows.
  halves = [set(out["cache"]["read"]) for out in outs]
  assert len(halves[0]) == len(halves[1]) == 20 and not halves[0] & halves[1]
  assert halves[0] | halves[1] == set(reference["read"])


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
