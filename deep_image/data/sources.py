"""Picks a random-access data source from the config, and decodes images from any of them.

Every source is Grain-compatible (`__len__`, `__getitem__`, picklable, a stable `__repr__`),
has `num_classes` and `class_names` (one string per label), and yields dicts with at least:

  'image': encoded bytes (ArrayRecord) or uint8 [H, W, 3] (TFDS, digits, highres)
  'label': int in [0, num_classes)

so the pipeline calls `decode_image(record['image'])` without asking which source it has.

Config fields (`config.data`; every default lives in `default_config` below):
  source                'digits' | 'tfds' | 'array_record' | 'highres'
  splits.train, splits.validation
                        the source's name for each generic split, e.g. splits.validation='test'
                        for TFDS cifar10, 'val' for an ImageNet `prepare` output; another split
                        name passes through unchanged
  seed                  the dataset's own seed (digits' train/test split, highres scenes),
                        separate from the run's `config.seed` so a new run seed keeps the data
  name                  tfds: dataset name, e.g. 'imagenet2012'
  data_dir              tfds: TFDS data dir ('' = TFDS's default); array_record: the root of
                        `prepare` outputs, split `s` read from data_dir/splits.s
  verify_checksums      array_record: sha256 of every shard against the manifest on open
  image_size            digits: side the 8x8 digits are upsampled to
  highres.*             highres: image_size, num_classes, num_train_examples,
                        num_eval_examples, object_size, num_objects, num_distractors,
                        classes
                        (see `deep_image.data.highres.render_scene`)
"""

from __future__ import annotations

import io
import math
import os

import ml_collections
import numpy as np
import simplejpeg
from PIL import Image

SOURCES = ("tfds", "array_record", "digits", "highres")


def default_config() -> ml_collections.ConfigDict:
  """The source fields of `config.data` with their defaults (the module docstring says what
  each one means); `data_config.default_config()` adds the pipeline's fields to these."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "digits"
  cfg.splits = ml_collections.ConfigDict({"train": "train", "validation": "validation"})
  cfg.seed = 0
  cfg.name = ""
  cfg.data_dir = ""
  cfg.verify_checksums = False
  cfg.image_size = 32
  cfg.highres = ml_collections.ConfigDict(
    {
      "image_size": 512,
      "num_classes": 8,
      "num_train_examples": 10_000,
      "num_eval_examples": 1_000,
      "object_size": (12, 20),
      "num_objects": (2, 4),
      "num_distractors": (2, 4),
      "classes": "shapes",
    }
  )
  return cfg


def _split_name(data_cfg: ml_collections.ConfigDict, split: str) -> str:
  return data_cfg.splits[split] if split in data_cfg.splits else split


def make_source(data_cfg: ml_collections.ConfigDict, split: str):
  """Builds the source that `data_cfg.source` names.

  Args:
    data_cfg: `config.data` (every field of `default_config` present).
    split: generic split name, e.g. 'train' or 'validation'; mapped through
      `data_cfg.splits`.

  Returns:
    a random-access source with `num_classes`; records as in the module docstring.

  Raises:
    ValueError: unknown source or missing required field.
  """
  kind = data_cfg.source
  name = _split_name(data_cfg, split)
  seed = int(data_cfg.seed)
  if kind == "tfds":
    from deep_image.data.tfds_source import TfdsSource

    if not data_cfg.name:
      raise ValueError("data.source='tfds' needs data.name, e.g. 'imagenet2012'")
    return TfdsSource(data_cfg.name, name, data_cfg.data_dir or None)
  if kind == "array_record":
    from deep_image.data.array_record_source import ArrayRecordSource

    if not data_cfg.data_dir:
      raise ValueError("data.source='array_record' needs data.data_dir (prepare's --dst root)")
    return ArrayRecordSource(os.path.join(data_cfg.data_dir, name), bool(data_cfg.verify_checksums))
  if kind == "digits":
    from deep_image.data.digits import DigitsSource

    return DigitsSource(int(data_cfg.image_size), name, seed)
  if kind == "highres":
    from deep_image.data.highres import HighResSource

    hr = data_cfg.highres
    return HighResSource(
      split=name,
      num_examples=int(hr.num_train_examples if name == "train" else hr.num_eval_examples),
      image_size=int(hr.image_size),
      num_classes=int(hr.num_classes),
      seed=seed,
      object_size=tuple(hr.object_size),
      num_objects=tuple(hr.num_objects),
      num_distractors=tuple(hr.num_distractors),
      classes=str(hr.classes),
    )
  raise ValueError(f"data.source={kind!r}: expected one of {SOURCES}")


# JPEG's start-of-image marker: such bytes go to libjpeg-turbo through simplejpeg.
_JPEG_MAGIC = b"\xff\xd8"


def _decode_jpeg(image: bytes, min_side: int | None) -> np.ndarray | None:
  """RGB uint8 [H, W, 3] via simplejpeg (libjpeg-turbo), or None where Pillow should decode.

  simplejpeg decodes straight into a numpy array, 1.3-1.5x faster than Pillow on the same
  libjpeg-turbo with the same pixels (BENCHMARKS.md, input decoders). It only gets YCbCr and
  grey JPEGs: CMYK / YCCK ones need Pillow's (Adobe) colour conversion, and a broken file is
  left to Pillow to report.
  """
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(image)
    if colorspace not in ("YCbCr", "Gray"):
      return None
    if min_side is None:
      return simplejpeg.decode_jpeg(image, colorspace="RGB")
    scale = min_side / min(width, height)
    # The smallest DCT scale (M/8) at least this large keeps the shorter side >= min_side.
    return simplejpeg.decode_jpeg(
      image,
      colorspace="RGB",
      min_height=math.ceil(height * scale),
      min_width=math.ceil(width * scale),
    )
  except ValueError:
    return None


def decode_image(image: bytes | np.ndarray, min_side: int | None = None) -> np.ndarray:
  """Decodes a record's image to RGB.

  Args:
    image: encoded bytes (JPEG, PNG, ...) or an already decoded uint8 [H, W], [H, W, 1],
      [H, W, 3] or [H, W, 4] array (passed through, converted to 3 channels).
    min_side: if set, a JPEG may be decoded at a reduced DCT scale (M/8, M = 1..7) as long
      as its shorter side stays >= min_side: several times faster when the pipeline will
      resize a large photo down to a small train scale anyway.

  Returns:
    uint8 [H, W, 3] RGB. JPEGs are decoded by simplejpeg (libjpeg-turbo), other formats and
    JPEGs it rejects by Pillow.
  """
  array = None
  if isinstance(image, np.ndarray):
    array = image
  elif image[:2] == _JPEG_MAGIC:
    array = _decode_jpeg(bytes(image), min_side)
  if array is None:
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
