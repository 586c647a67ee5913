"""Seeded, resumable global batches from in-memory arrays (the digits job).

The train loop reads batches through the iterator protocol plus
`get_state()` / `set_state()`; a Grain `DatasetIterator` offers the same, so
it plugs in at the same place (`deep_image.data.sources` picks the source).
"""

from __future__ import annotations

import numpy as np


class InMemoryBatches:
  """Endless epochs of shuffled batches.

  Epoch e is a permutation drawn from `np.random.default_rng((seed, e))`; the
  last incomplete batch of an epoch is dropped so every batch has `batch_size`
  examples. This process yields rows [process_index::process_count] of each
  global batch, so multi-process runs split every batch without overlap.

  Yields:
    (images [b, H, W, C] uint8, labels [b] int32), b = batch_size / process_count.
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size > len(labels):
      raise ValueError(f"train.batch_size={batch_size} exceeds the {len(labels)} training examples")
    if batch_size % process_count:
      raise ValueError(
        f"train.batch_size={batch_size} does not divide over {process_count} processes"
      )
    self.images, self.labels = images, labels
    self.batch_size, self.seed = batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.batches_per_epoch = len(labels) // batch_size
    self._epoch, self._position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self.seed, epoch)).permutation(len(self.labels))

  def __iter__(self):
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    if self._position == self.batches_per_epoch:
      self._epoch, self._position = self._epoch + 1, 0
      self._order = self._permutation(self._epoch)
    start = self._position * self.batch_size
    rows = self._order[start : start + self.batch_size][self.process_index :: self.process_count]
    self._position += 1
    return self.images[rows], self.labels[rows]

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "position": self._position}

  def set_state(self, state: dict) -> None:
    self._epoch, self._position = int(state["epoch"]), int(state["position"])
    self._order = self._permutation(self._epoch)
