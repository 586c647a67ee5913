r"""Checks an image folder and writes it as ArrayRecord shards (deep_image.data.prepare).

ImageNet, train then validation (validation reuses train's class ids):

  python -m experiments.prepare --src=/data/imagenet/train --dst=/data/prepared/train \
      --num_workers=16
  python -m experiments.prepare --src=/data/imagenet/val --labels=/data/LOC_val_solution.csv \
      --classes=/data/prepared/train/classes.json --dst=/data/prepared/validation

Then train with `config.data.source='array_record'`, `config.data.data_dir='/data/prepared'`.
Ends with a one-line summary; DST/prepare_report.json lists every converted and skipped file.
"""

import os

from absl import app, flags, logging

from deep_image.data import image_check, prepare

_SRC = flags.DEFINE_string("src", None, "Image folder: SRC/<class>/<image>, or flat + --labels.")
_DST = flags.DEFINE_string("dst", None, "Output folder for shards, manifest and report.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shard count; 0: about 256 MiB per shard.")
_LABELS = flags.DEFINE_string("labels", None, "File mapping file name -> class (flat SRC).")
_CLASSES = flags.DEFINE_string("classes", None, "classes.json fixing label ids (e.g. train's).")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
  "max_image_pixels", image_check.DEFAULT_MAX_IMAGE_PIXELS, "Decompression-bomb guard (w * h)."
)
_MIN_SIDE = flags.DEFINE_integer("min_side", image_check.DEFAULT_MIN_SIDE, "Skip smaller images.")
_JPEG_QUALITY = flags.DEFINE_integer(
  "jpeg_quality", image_check.DEFAULT_JPEG_QUALITY, "Quality of re-encoded JPEGs."
)
_NUM_WORKERS = flags.DEFINE_integer(
  "num_workers", os.cpu_count() or 1, "Processes decoding files; output does not depend on it."
)
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    result = prepare.prepare(
      _SRC.value,
      _DST.value,
      num_shards=_NUM_SHARDS.value,
      labels=_LABELS.value,
      classes=_CLASSES.value,
      max_image_pixels=_MAX_IMAGE_PIXELS.value,
      min_side=_MIN_SIDE.value,
      jpeg_quality=_JPEG_QUALITY.value,
      num_workers=_NUM_WORKERS.value,
    )
  except (OSError, ValueError) as e:
    # Bad inputs are the user's to fix: one clear line, no traceback.
    raise SystemExit(f"prepare: error: {e}") from e
  print(result.summary)


if __name__ == "__main__":
  app.run(main)
