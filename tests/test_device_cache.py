"""Device cache (paper 3.1) on 8 simulated devices: fit decision, batches, determinism, resume."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.data import augment, augment_device, data_config, device_cache, sources


class IndexSource:
  """Record i: a flat grey 20 x 20 image of level i and label i (i < 256)."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((20, 20, 3), i, np.uint8), "label": i}


def _sharding(mesh_shape=(8,), names=("data",)):
  return NamedSharding(jax.make_mesh(mesh_shape, names), P("data"))


def _digits_cfg(**overrides):
  cfg = data_config.default_config()
  cfg.source, cfg.image_size, cfg.train_scale = "digits", 32, 32
  cfg.augment.crop_size = 28
  cfg.cache_on_device = True
  cfg.update(overrides)
  return cfg


def test_fits_gives_sharded_deterministic_batches():
  cfg = _digits_cfg()
  src = sources.make_source(cfg, "train")
  build = lambda seed: device_cache.DeviceCache.build(
    src, cfg, _sharding(), global_batch_size=32, seed=seed
  )
  cache = build(0)
  assert cache is not None
  info = cache.info
  assert info["memory_source"] == "data.cache_budget_bytes"  # CPU has no memory_stats.
  assert info["rows"] == 1432 and info["dropped"] == len(src) - 1432
  assert info["bytes_used_per_device"] == 1432 // 8 * (32 * 32 * 3 + 4)
  assert cache.images.shape == (1432, 32, 32, 3) and cache.images.dtype == np.uint8
  images, labels = cache.batch(0)
  assert images.shape == (32, 28, 28, 3) and images.dtype == np.uint8
  assert labels.shape == (32,) and labels.dtype == np.int32
  assert images.sharding.spec[0] == "data" and labels.sharding.spec[0] == "data"
  again = build(0).batch(0)
  np.testing.assert_array_equal(images, again[0])
  np.testing.assert_array_equal(labels, again[1])
  assert not np.array_equal(images, cache.batch(1)[0])
  assert not np.array_equal(images, build(1).batch(0)[0])


def test_plain_crops_read_the_right_rows_and_an_epoch_covers_the_cache():
  cfg = data_config.default_config()
  cfg.train_scale, cfg.cache_on_device = 20, True
  cfg.augment.crop_size = 16
  for name in ("flip", "rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg.augment[name].enabled = False
  mesh_sharding = _sharding((4, 2), ("data", "model"))  # Replicated over 'model'.
  cache = device_cache.DeviceCache.build(
    IndexSource(42), cfg, mesh_sharding, global_batch_size=8, seed=3
  )
  assert cache.info["rows"] == 40 and cache.steps_per_epoch == 5
  seen = []
  for _ in range(cache.steps_per_epoch):
    images, labels = next(cache)
    images, labels = np.asarray(images), np.asarray(labels)
    np.testing.assert_array_equal(
      images, np.broadcast_to(labels[:, None, None, None], images.shape)
    )
    seen += labels.tolist()
  assert len(set(seen)) == 40
  # Resume: the state is the step.
  state = cache.get_state()
  expected = next(cache)
  cache.set_state(state)
  np.testing.assert_array_equal(next(cache)[1], expected[1])


def test_device_sampling_matches_host_sampling():
  cfg = augment.default_config()
  cfg.crop_size = 56
  space = augment.SamplingSpace.from_config(cfg)
  # Uniforms on a 1/1024 grid: exact in float32, so u * size rounds alike on both sides.
  u = np.random.default_rng(0).integers(0, 1024, (64, augment.NUM_UNIFORMS)) / 1024

  class Uniforms:
    def __init__(self, row):
      self.row = row

    def random(self, n):
      assert n == len(self.row)
      return self.row.copy()

  device = augment_device.sample_params(jax.numpy.asarray(u, np.float32), space, (64, 80))
  for i in range(len(u)):
    host = augment.sample_params(Uniforms(u[i]), space, (64, 80), 56).as_dict()
    for field, value in host.items():
      np.testing.assert_array_equal(np.asarray(getattr(device, field))[i], value, err_msg=field)


def test_tiny_budget_returns_none_with_the_reason(caplog):
  cfg = _digits_cfg(cache_budget_bytes=100_000)
  src = sources.make_source(cfg, "train")
  plan = device_cache.plan_cache(len(src), cfg, _sharding())
  assert not plan["fits"] and "data.cache_budget_bytes" in plan["reason"]
  with caplog.at_level(logging.WARNING):
    cache = device_cache.DeviceCache.build(src, cfg, _sharding(), global_batch_size=32, seed=0)
  assert cache is None
  assert "does not fit" in caplog.text and "0.1 MiB free" in caplog.text


def test_off_and_bad_batch():
  cfg = _digits_cfg(cache_on_device=False)
  src = sources.make_source(cfg, "train")
  assert device_cache.DeviceCache.build(src, cfg, _sharding(), global_batch_size=32, seed=0) is None
  cfg.cache_on_device = True
  with pytest.raises(ValueError, match=r"train\.batch_size=12"):
    device_cache.DeviceCache.build(src, cfg, _sharding(), global_batch_size=12, seed=0)


def test_the_training_loop_sizes_the_cache_after_the_state_is_placed(tmp_path, monkeypatch):
  """Fresh and resumed, the loop builds the cache once the train state is on the devices,
  so the free memory it plans with is what the state leaves (paper 3.1). The reading is
  stubbed as memory_stats would give it: a limit minus the bytes of the live arrays."""
  import gc

  from conftest import tiny_config

  from deep_image.models import summary, vgg
  from deep_image.train import train_and_evaluate
  from deep_image.train.checkpoint import Checkpointer

  def in_use():
    """Bytes of live arrays on the fullest device."""
    per_device = {}
    for array in jax.live_arrays():
      for shard in array.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)

  limit, seen = 1 << 30, []

  def free_bytes(data_cfg, sharding):
    seen.append(in_use())
    return limit - seen[-1], "stub: limit - bytes in use"

  monkeypatch.setattr(device_cache, "_free_bytes_per_device", free_bytes)
  gc.collect()
  before = in_use()
  config = lambda steps: tiny_config(  # noqa: E731
    **{
      "data.cache_on_device": True,
      "parallel.strategy": "data",  # every device holds the whole state
      "train.num_steps": steps,
      "train.checkpoint_every": 2,
      "train.eval_every": 0,
    }
  )
  cfg = config(2)
  spec = vgg.make_spec(
    cfg.model.name,
    num_classes=cfg.model.num_classes,
    image_size=cfg.model.image_size,
    in_channels=cfg.model.in_channels,
  )
  # float32 parameters and their momentum, on every device (plus the pending update).
  state_bytes = 2 * 4 * summary.total_parameters(spec)
  workdir = str(tmp_path / "run")
  train_and_evaluate(cfg, workdir)
  assert len(seen) == 1 and seen[0] - before >= state_bytes, (seen, before, state_bytes)
  train_and_evaluate(config(4), workdir)  # resumes from step 2's checkpoint
  assert len(seen) == 2 and seen[1] - before >= state_bytes, (seen, before, state_bytes)
  checkpoints = Checkpointer(workdir, 3, read_only=True)
  try:
    assert checkpoints.meta(4)["input"] == "device cache"  # the cache fitted and was used
  finally:
    checkpoints.close()
