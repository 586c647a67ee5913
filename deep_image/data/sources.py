"""Picks a random-access data source from the config, and decodes images from any of them.

Every source is Grain-compatible (`__len__`, `__getitem__`, picklable, a stable `__repr__`),
has `num_classes`, and yields dicts with at least:

  'image': encoded bytes (ArrayRecord) or uint8 [H, W, 3] (TFDS, digits, highres)
  'label': int in [0, num_classes)

so the pipeline calls `decode_image(record['image'])` without asking which source it has.

Config fields (`data_cfg`, an ml_collections.ConfigDict or anything with `.get`):
  source        'tfds' | 'array_record' | 'digits' | 'highres'
  splits        optional {generic split: source split}, e.g. {'validation': 'test'} for
                cifar10; splits not listed pass through unchanged
  seed          int, default 0 (digits split, highres scenes)
  tfds:         name (e.g. 'imagenet2012'), data_dir (default: TFDS's)
  array_record: data_dir; split `s` is read from data_dir/s (a `prepare` output folder),
                verify_checksums (default False)
  digits:       image_size (default 32)
  highres:      image_size (default 512), num_classes (8), num_train_examples (10000),
                num_eval_examples (1000), object_size ((12, 20)), num_objects ((2, 4)),
                num_distractors ((2, 4))
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

SOURCES = ("tfds", "array_record", "digits", "highres")


def _field(data_cfg: Any, name: str, default: Any = None) -> Any:
  # ConfigDict and dict both have .get; a missing required field is reported by the caller.
  return data_cfg.get(name, default)


def _split_name(data_cfg: Any, split: str) -> str:
  splits = _field(data_cfg, "splits") or {}
  return splits.get(split, split)


def make_source(data_cfg: Any, split: str):
  """Builds the source that `data_cfg.source` names.

  Args:
    data_cfg: data config (fields in the module docstring).
    split: generic split name, e.g. 'train' or 'validation'; mapped through
      `data_cfg.splits`.

  Returns:
    a random-access source with `num_classes`; records as in the module docstring.

  Raises:
    ValueError: unknown source or missing required field.
  """
  kind = _field(data_cfg, "source")
  name = _split_name(data_cfg, split)
  seed = int(_field(data_cfg, "seed", 0))
  if kind == "tfds":
    from deep_image.data.tfds_source import TfdsSource

    if not _field(data_cfg, "name"):
      raise ValueError("data.source='tfds' needs data.name, e.g. 'imagenet2012'")
    return TfdsSource(data_cfg.name, name, _field(data_cfg, "data_dir"))
  if kind == "array_record":
    from deep_image.data.array_record_source import ArrayRecordSource

    if not _field(data_cfg, "data_dir"):
      raise ValueError("data.source='array_record' needs data.data_dir (prepare's --dst root)")
    return ArrayRecordSource(
      os.path.join(data_cfg.data_dir, name), bool(_field(data_cfg, "verify_checksums", False))
    )
  if kind == "digits":
    from deep_image.data.digits import DigitsSource

    return DigitsSource(int(_field(data_cfg, "image_size", 32)), name, seed)
  if kind == "highres":
    from deep_image.data.highres import HighResSource

    size_field = "num_train_examples" if name == "train" else "num_eval_examples"
    return HighResSource(
      split=name,
      num_examples=int(_field(data_cfg, size_field, 10_000 if name == "train" else 1_000)),
      image_size=int(_field(data_cfg, "image_size", 512)),
      num_classes=int(_field(data_cfg, "num_classes", 8)),
      seed=seed,
      object_size=tuple(_field(data_cfg, "object_size", (12, 20))),
      num_objects=tuple(_field(data_cfg, "num_objects", (2, 4))),
      num_distractors=tuple(_field(data_cfg, "num_distractors", (2, 4))),
    )
  raise ValueError(f"data.source={kind!r}: expected one of {SOURCES}")


def decode_image(image: bytes | np.ndarray, min_side: int | None = None) -> np.ndarray:
  """Decodes a record's image to RGB.

  Args:
    image: encoded bytes (JPEG, PNG, ...) or an already decoded uint8 [H, W], [H, W, 1],
      [H, W, 3] or [H, W, 4] array (passed through, converted to 3 channels).
    min_side: if set, a JPEG may be decoded at a reduced DCT scale (1/2, 1/4, 1/8) as long
      as its shorter side stays >= min_side: several times faster when the pipeline will
      resize a large photo down to a small train scale anyway.

  Returns:
    uint8 [H, W, 3] RGB.
  """
  if isinstance(image, np.ndarray):
    array = image
  else:
    with Image.open(io.BytesIO(image)) as img:
      if min_side is not None and img.format == "JPEG":
        width, height = img.size
        scale = min_side / min(width, height)
        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
      array = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
  if array.dtype != np.uint8:
    raise ValueError(f"decode_image: expected uint8 pixels, got {array.dtype}")
  if array.ndim == 2:
    array = array[..., None]
  channels = array.shape[-1]
  if channels == 1:
    return np.repeat(array, 3, axis=-1)
  if channels == 4:
    return np.ascontiguousarray(array[..., :3])
  if channels != 3:
    raise ValueError(f"decode_image: expected 1, 3 or 4 channels, got shape {array.shape}")
  return array
