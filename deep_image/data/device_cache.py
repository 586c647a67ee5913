"""Training data cached in device memory (paper 3.1: "we also use device memory to cache the
training data if there is free memory space on the device after the model is loaded").

When `config.data.cache_on_device` is set and the decoded dataset, resized to S x S
(S = `data.train_scale`), fits in the devices' free memory, it is stored once as a global
uint8 [N, S, S, 3] array (labels int32 [N]) sharded over the mesh's batch axes, and every
training batch is made on the devices:

  shard k of the batch axes holds rows [k n, (k + 1) n) of a seeded permutation of the
  source (n = N / shards); step t of epoch e takes b = B / shards rows of a per-(seed, e, k)
  permutation of its own rows (a local gather), samples each example's augmentation on the
  device with the host's sampler (`augment_device.sample_params`: the code of
  `augment.params_from_uniforms` on jax.numpy), and crops + augments with
  `augment_device.apply_batch`.

So after the one loading pass no host work and no device-to-device traffic remains: the
step runs under `shard_map`, each device reading only its own rows. Sampling from one's own
shard makes every global batch a stratified sample (b from each shard) instead of a uniform
one; each epoch still visits every cached example exactly once. The state is just the step.

Memory: the bytes needed per device are compared with min over devices of
`memory_stats()['bytes_limit'] - ['bytes_in_use']` (build the cache after the model and
optimizer state are on the devices), or with `data.cache_budget_bytes` where the platform
reports no statistics (CPU); at most `data.cache_memory_fraction` of it is used, leaving the
rest for activations. `plan_cache` reports the decision and `build` logs it.

Non-square images are resized so the shorter side is S and centre-cropped to S x S (the host
pipeline crops from the whole resized image instead).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.data import augment, augment_device, pipeline
from deep_image.data.sources import decode_image


def batch_axes(sharding: NamedSharding) -> tuple[str, ...]:
  """Mesh axes that dimension 0 (the batch) of `sharding` is split over."""
  first = sharding.spec[0] if len(sharding.spec) else None
  if first is None:
    return ()
  return (first,) if isinstance(first, str) else tuple(first)


def _num_shards(sharding: NamedSharding) -> int:
  return math.prod(sharding.mesh.shape[a] for a in batch_axes(sharding))


def _free_bytes_per_device(data_cfg: Any, sharding: NamedSharding) -> tuple[int, str]:
  """(min free bytes over this job's devices, where the number came from)."""
  free = []
  for device in sharding.addressable_devices:
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
      free = None
      break
    free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
  if free is None:
    value, where = int(data_cfg.cache_budget_bytes), "data.cache_budget_bytes"
  else:
    value, where = min(free), "device.memory_stats()"
  if jax.process_count() > 1:
    # Every process must take the same decision, or they would build different programs.
    # Without jax_enable_x64 the gather is int32, which wraps byte counts of 2 GiB and more:
    # send the value as two int32 halves (value = high * 2**31 + low) and rebuild it.
    halves = np.asarray(divmod(value, 1 << 31), np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64).reshape(-1, 2)
    value = int(np.min(gathered[:, 0] * (1 << 31) + gathered[:, 1]))
  return value, where


def plan_cache(num_examples: int, data_cfg: Any, sharding: NamedSharding) -> dict:
  """Whether the S x S dataset fits in free device memory, and the bytes it takes.

  Args:
    num_examples: N, records in the training source.
    data_cfg: `config.data` (train_scale, cache_budget_bytes, cache_memory_fraction).
    sharding: NamedSharding of a batch, dimension 0 over the batch axes.

  Returns:
    {'fits': bool, 'reason': str, 'rows': cached examples (N rounded down to a multiple of
    the batch shards), 'dropped', 'shards', 'scale', 'bytes_total', 'bytes_per_device',
    'free_bytes_per_device', 'allowed_bytes_per_device', 'memory_source'}.
  """
  scale = int(data_cfg.train_scale)
  shards = _num_shards(sharding)
  rows = num_examples - num_examples % shards
  # Devices of other mesh axes (e.g. 'model') hold a replica of their batch shard's rows.
  per_device = rows // shards * (scale * scale * 3 + 4)
  free, source = _free_bytes_per_device(data_cfg, sharding)
  allowed = int(free * float(data_cfg.cache_memory_fraction))
  fits = rows > 0 and per_device <= allowed
  mib = lambda x: f"{x / 2**20:.1f} MiB"
  reason = (
    f"{rows} images of {scale}x{scale}x3 uint8 need {mib(per_device)} per device over "
    f"{shards} batch shards; {source} leaves {mib(free)} free, of which "
    f"data.cache_memory_fraction allows {mib(allowed)}"
  )
  return {
    "fits": bool(fits),
    "reason": reason,
    "rows": rows,
    "dropped": num_examples - rows,
    "shards": shards,
    "scale": scale,
    "bytes_total": rows * (scale * scale * 3 + 4),
    "bytes_per_device": per_device,
    "free_bytes_per_device": free,
    "allowed_bytes_per_device": allowed,
    "memory_source": source,
  }


def _square(record: dict, scale: int) -> np.ndarray:
  """uint8 [S, S, 3]: decoded, shorter side resized to S, centre-cropped."""
  image = pipeline.resize_shorter_side(decode_image(record["image"], min_side=scale), scale)
  h, w = image.shape[:2]
  y0, x0 = (h - scale) // 2, (w - scale) // 2
  return image[y0 : y0 + scale, x0 : x0 + scale]


@dataclasses.dataclass
class DeviceCache:
  """A cached training set and the on-device batch function; iterate or call `batch(step)`.

  Attributes:
    images: uint8 [N, S, S, 3], sharded over the batch axes on dimension 0.
    labels: int32 [N], sharded likewise.
    info: `plan_cache`'s dict (bytes used, where the free-memory figure came from).
    step: the next step `__next__` returns; the whole iterator state.
  """

  images: jax.Array
  labels: jax.Array
  info: dict
  global_batch_size: int
  steps_per_epoch: int
  seed: int
  _batch_fn: Any
  step: int = 0

  @classmethod
  def build(
    cls,
    source: Any,
    data_cfg: Any,
    sharding: NamedSharding,
    *,
    global_batch_size: int,
    seed: int,
    sampling_space: Any = None,  # data_cfg.augment's SamplingSpace, if built already
  ) -> DeviceCache | None:
    """Decodes `source` onto the devices if it fits; None (reason logged) if it does not.

    Args:
      source: random-access training source (`sources.make_source(data_cfg, 'train')`).
      data_cfg: `config.data` (cache_on_device, train_scale, augment, cache_* fields).
      sharding: NamedSharding of a batch (the strategy's batch sharding).
      global_batch_size: B, examples per step over all devices.
      seed: permutation and augmentation seed.

    Returns:
      a DeviceCache, or None when `data.cache_on_device` is off or the data does not fit
      (then use `pipeline.make_train_iterator`).
    """
    if not data_cfg.cache_on_device:
      logging.info("device cache: off (data.cache_on_device=False)")
      return None
    info = plan_cache(len(source), data_cfg, sharding)
    if not info["fits"]:
      logging.warning("device cache: does not fit, using the host pipeline: %s", info["reason"])
      return None
    shards, rows, scale = info["shards"], info["rows"], info["scale"]
    if global_batch_size % shards:
      raise ValueError(
        f"train.batch_size={global_batch_size} does not divide over the {shards} batch shards"
      )
    local_batch, local_rows = global_batch_size // shards, rows // shards
    if local_batch > local_rows:
      raise ValueError(
        f"train.batch_size={global_batch_size} needs {local_batch} examples per shard; the "
        f"cache holds {local_rows}"
      )
    order = np.random.default_rng([int(seed), 0xCAC4E]).permutation(len(source))[:rows]
    decoded: dict[tuple[int, int], np.ndarray] = {}
    threads = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def image_rows(index: tuple) -> np.ndarray:
      # Devices of non-batch axes ask for the same rows: decode each block once.
      start, stop, _ = index[0].indices(rows)
      if (start, stop) not in decoded:
        records = [source[int(i)] for i in order[start:stop]]
        decoded[start, stop] = np.stack(list(threads.map(lambda r: _square(r, scale), records)))
      return decoded[start, stop]

    with threads:
      images = jax.make_array_from_callback((rows, scale, scale, 3), sharding, image_rows)
    labels = jax.make_array_from_callback(
      (rows,),
      NamedSharding(sharding.mesh, P(sharding.spec[0])),
      lambda index: np.asarray([source[int(i)]["label"] for i in order[index[0]]], np.int32),
    )
    info["bytes_used_per_device"] = max(s.data.nbytes for s in images.addressable_shards) + max(
      s.data.nbytes for s in labels.addressable_shards
    )
    logging.info(
      "device cache: %d examples on device, %.1f MiB per device (%s)",
      rows,
      info["bytes_used_per_device"] / 2**20,
      info["reason"],
    )
    space = sampling_space or augment.SamplingSpace.from_config(data_cfg.augment)
    steps_per_epoch = local_rows // local_batch
    batch_fn = _make_batch_fn(sharding, space, scale, local_batch, steps_per_epoch)
    return cls(images, labels, info, global_batch_size, steps_per_epoch, int(seed), batch_fn)

  def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
    """The batch of `step`: (images uint8 [B, c, c, 3], labels int32 [B]), batch-sharded."""
    # Host scalars, not jnp ones: a jnp scalar lives on device 0 and would be copied from
    # there to every device at each step, queued behind device 0's work.
    return self._batch_fn(self.images, self.labels, np.int32(step), np.uint32(self.seed))

  def __iter__(self):
    return self

  def __next__(self) -> tuple[jax.Array, jax.Array]:
    out = self.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


@functools.lru_cache(maxsize=8)
def _make_batch_fn(sharding, space, scale, local_batch, steps_per_epoch):
  """jit(shard_map) of one step's batch; each device reads only its own cached rows.

  Cached, and the seed is an argument, so caches of one shape share one compiled program.
  """
  axes = batch_axes(sharding)
  spec = P(axes if len(axes) != 1 else axes[0])
  num_uniforms = augment.NUM_UNIFORMS

  def local(images, labels, step, seed):
    # images uint8 [n, S, S, 3] and labels int32 [n]: this shard's rows.
    shard = jax.lax.axis_index(axes) if axes else 0
    key = jax.random.fold_in(jax.random.key(seed), shard)
    epoch, position = step // steps_per_epoch, step % steps_per_epoch
    order = jax.random.permutation(jax.random.fold_in(key, epoch), images.shape[0])
    rows = jax.lax.dynamic_slice(order, (position * local_batch,), (local_batch,))
    u = jax.random.uniform(
      jax.random.fold_in(jax.random.fold_in(key, 1 << 30), step), (local_batch, num_uniforms)
    )
    params = augment_device.sample_params(u, space, (scale, scale))
    return augment_device.apply_batch(images[rows], params), labels[rows]

  mapped = jax.shard_map(
    local, mesh=sharding.mesh, in_specs=(spec, spec, P(), P()), out_specs=(spec, spec)
  )
  return jax.jit(mapped)
