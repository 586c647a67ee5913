"""TFDS-prepared datasets (imagenet2012, imagenette, cifar10, ...) without TensorFlow.

`tfds.data_source` reads the ArrayRecord files of an already prepared dataset and decodes
images with OpenCV, so records arrive as uint8 [H, W, C] arrays; `decode_image` passes those
through. TFDS's `file_name` / `id` fields are dropped so every source yields the same keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TfdsSource:
  """`source[i]` = {'image': uint8 [H, W, 3], 'label': int}; picklable for Grain workers."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    """Opens split `split` of the prepared TFDS dataset `name` (no download).

    Args:
      name: TFDS name, optionally with config/version ('imagenette/full-size-v2').
      split: TFDS split string ('train', 'validation', 'test', 'train[:10%]', ...).
      data_dir: TFDS data dir; None uses TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    """
    import tensorflow_datasets as tfds  # Heavy import: only when this source is chosen.

    self.name, self.split, self.data_dir = name, split, data_dir
    # download=False: a missing dataset should fail fast here, not start a download on a
    # training host.
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    label = self._source.dataset_info.features["label"]
    self.num_classes: int = label.num_classes
    self.class_names: tuple[str, ...] = tuple(label.names)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return {"image": np.asarray(record["image"]), "label": int(record["label"])}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"
