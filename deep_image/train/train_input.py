"""The training loop's input: global batches from the device cache or the Grain pipeline.

`TrainInput` yields (images, labels, augment | None) as global arrays sharded
like the strategy's batch, and has the `get_state` / `set_state` a checkpoint
stores, so a resumed run reads exactly the batches the killed one would have.
"""

from __future__ import annotations

import jax

from deep_image.data import device_cache, pipeline
from deep_image.data.global_batch import to_global


class TrainInput:
  """Iterator of global training batches; `kind` says where they come from.

  From the device cache when `data.cache_on_device` and the data fit (paper
  3.1), else from the Grain pipeline (`data.num_workers` worker processes).

  Yields:
    images: uint8 [B, c, c, 3] (or [B, S, S, 3] with `data.augment_on='device'`),
    labels: int32 [B],
    augment: None, or the sampled parameters {field: [B] / [B, 3]} of
      `augment_on='device'`;
    all sharded like `batch_sharding` (split over every device along B).
  """

  def __init__(self, config, batch_sharding, source, sampling_space=None):
    """`source`: the opened training split; `sampling_space`: `data.augment`'s
    `SamplingSpace` (preflight's `Plan` has both; None: built from the config)."""
    self.batch_sharding = batch_sharding
    self._config, self._source, self._space = config, source, sampling_space
    self._cache = None
    if config.data.cache_on_device:
      self._cache = device_cache.DeviceCache.build(
        source,
        config.data,
        batch_sharding,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        sampling_space=sampling_space,
      )
    if self._cache is not None:
      self.kind = "device cache"
      self._grain = None
    else:
      self.kind = f"grain ({config.data.num_workers} workers, augment on {config.data.augment_on})"
      self._grain = self._grain_iterator(0)

  def _grain_iterator(self, start_batch: int):
    # Positions in a saved Grain state count from here (`get_state` records it).
    self._start_batch = start_batch
    config = self._config
    return pipeline.make_train_iterator(
      config.data,
      global_batch_size=config.train.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      source=self._source,
      start_batch=start_batch,
      sampling_space=self._space,
    )

  def __iter__(self):
    return self

  def __next__(self):
    if self._cache is not None:
      images, labels = next(self._cache)
      return images, labels, None
    batch = next(self._grain)
    put = lambda x: to_global(x, self.batch_sharding)  # noqa: E731
    augment = jax.tree.map(put, batch["augment"]) if "augment" in batch else None
    return put(batch["image"]), put(batch["label"]), augment

  def get_state(self) -> dict:
    """The position after the batches read so far (JSON-able)."""
    if self._cache is not None:
      return self._cache.get_state()
    return {"start_batch": self._start_batch, "grain": self._grain.get_state()}

  def set_state(self, state: dict) -> None:
    if self._cache is not None:
      self._cache.set_state(state)
      return
    if "grain" not in state:  # written before start_at existed: Grain's own state
      state = {"start_batch": 0, "grain": state}
    if state["start_batch"] != self._start_batch:
      self._replace_grain(state["start_batch"])
    self._grain.set_state(state["grain"])

  def _replace_grain(self, start_batch: int) -> None:
    if hasattr(self._grain, "close"):
      self._grain.close()
    self._grain = self._grain_iterator(start_batch)

  def start_at(self, step: int) -> bool:
    """Position the input at global batch `step`, whatever wrote the checkpoint.

    Returns whether the stream is the same on any device count: True for Grain (a
    function of (seed, epoch, global position) only, on any number of processes and
    workers); False for the device cache, whose batches are drawn per device shard, so
    it resumes exactly only on as many devices as before (the caller knows).
    """
    if self._cache is not None:
      self._cache.set_state({"step": int(step)})
      return False
    self._replace_grain(int(step))
    return True
