r"""Write a split of a config's source as an image folder: DST/<class name>/<index>.png.

  python -m experiments.export_images --config=experiments/configs/highres.py:tiny \
      --split=train --dst=/tmp/folder/train [--limit=100]

For looking at a dataset, and for trying the image-folder path (`experiments.prepare`,
`configs/image_folder.py`) without downloading anything: the generated scenes become a
folder of PNGs exactly like a user's own photos. Class folders are named by the source's
class names (made filesystem-safe); PNG keeps the pixels exact
(`deep_image/data/image_folder_export.py`).
"""

from absl import app, flags, logging

from experiments import cli


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module defines no flags.
  cli.define_config()
  flags.DEFINE_string("split", "train", "Generic split name: train or validation.")
  flags.DEFINE_string("dst", None, "Output folder (created).")
  flags.DEFINE_integer("limit", 0, "Write only the first N records (0: all).")
  flags.mark_flag_as_required("dst")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from deep_image.data import sources
  from deep_image.data.image_folder_export import export_image_folder

  source = sources.make_source(flags.FLAGS.config.data, flags.FLAGS.split)
  count, names = export_image_folder(source, flags.FLAGS.dst, flags.FLAGS.limit)
  logging.info("wrote %d images of %d classes to %s", count, len(names), flags.FLAGS.dst)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
