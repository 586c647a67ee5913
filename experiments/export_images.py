r"""Write a split of a config's source as an image folder: DST/<class name>/<index>.png.

  python -m experiments.export_images --config=experiments/configs/highres.py:tiny \
      --split=train --dst=/tmp/folder/train [--limit=100]

For looking at a dataset, and for trying the image-folder path (`experiments.prepare`,
`configs/image_folder.py`) without downloading anything: the generated scenes become a
folder of PNGs exactly like a user's own photos. Class folders are named by the source's
class names (made filesystem-safe); PNG keeps the pixels exact.
"""

import os
import re

from absl import app, flags, logging
from PIL import Image

from experiments import cli


def _define_flags() -> None:
  # Defined only when run as a script: tests import this module beside other
  # scripts that define flags of the same names.
  cli.define_config()
  flags.DEFINE_string("split", "train", "Generic split name: train or validation.")
  flags.DEFINE_string("dst", None, "Output folder (created).")
  flags.DEFINE_integer("limit", 0, "Write only the first N records (0: all).")
  flags.mark_flag_as_required("dst")


def folder_name(name: str) -> str:
  """'L/J up' -> 'L-J_up': a class name as one safe path component."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "-")).strip("_") or "class"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from deep_image.data import sources

  source = sources.make_source(flags.FLAGS.config.data, flags.FLAGS.split)
  names = [folder_name(n) for n in source.class_names]
  if len(set(names)) != len(names):
    raise ValueError(f"class names {source.class_names} collide as folder names {names}")
  count = len(source) if flags.FLAGS.limit <= 0 else min(flags.FLAGS.limit, len(source))
  for name in names:
    os.makedirs(os.path.join(flags.FLAGS.dst, name), exist_ok=True)
  for i in range(count):
    record = source[i]
    image = sources.decode_image(record["image"])
    Image.fromarray(image).save(
      os.path.join(flags.FLAGS.dst, names[record["label"]], f"{i:06d}.png")
    )
  logging.info("wrote %d images of %d classes to %s", count, len(names), flags.FLAGS.dst)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
