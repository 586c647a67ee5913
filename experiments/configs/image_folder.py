r"""Your own images: a folder of class subfolders, prepared once, trained like Table 2.

  python -m experiments.prepare --src=/data/mine/train --dst=/data/mine_prepared/train
  python -m experiments.prepare --src=/data/mine/validation \
      --dst=/data/mine_prepared/validation --classes=/data/mine_prepared/train/classes.json
  python -m experiments.train --config=experiments/configs/image_folder.py --workdir=/tmp/mine \
      --config.data.data_dir=/data/mine_prepared --config.model.num_classes=CLASSES

`prepare` checks every file (corrupt, truncated, tiny or huge images are reported and
skipped, never trained on) and writes ArrayRecord shards with classes.json (label id =
position of the folder name). The job is the Table 2 recipe (`table2.py`: 224 crops of
images resized to 256, hybrid strategy, the paper's augmentations); preflight stops with a
one-line error when model.num_classes does not match the prepared classes. `:s512` trains
the high-resolution model of the same architecture.

`tiny` runs here in a minute with nothing to download: the generated scenes written as a
folder of PNGs, then prepared and trained on:

  python -m experiments.export_images --config=experiments/configs/highres.py:tiny \
      --split=train --dst=/tmp/folder/train
  python -m experiments.export_images --config=experiments/configs/highres.py:tiny \
      --split=validation --dst=/tmp/folder/validation
  python -m experiments.prepare --src=/tmp/folder/train --dst=/tmp/folder_prepared/train
  python -m experiments.prepare --src=/tmp/folder/validation \
      --dst=/tmp/folder_prepared/validation --classes=/tmp/folder_prepared/train/classes.json
  python -m experiments.train --config=experiments/configs/image_folder.py:tiny \
      --workdir=/tmp/folder_run
"""

import ml_collections

from experiments.configs import base, table2


def tiny(c: ml_collections.ConfigDict) -> None:
  """`base.tiny_run` on the prepared folder of generated 48 px scenes, in place."""
  base.tiny_run(c)
  c.model.num_classes = 8
  c.model.image_size = c.data.augment.crop_size = 16
  c.data.data_dir = "/tmp/folder_prepared"
  c.data.train_scale = 24
  c.data.num_workers = 0
  c.train.eval_batch_size = 32


VARIANTS: dict[str, base.Variant] = {"s512": table2.s512, "tiny": tiny}


def image_folder() -> ml_collections.ConfigDict:
  """The image-folder job, before variants."""
  c = table2.table2()
  c.data.data_dir = "/data/mine_prepared"
  c.data.splits.validation = "validation"
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The image-folder job; `arg`: comma-separated variants ('s512', 'tiny')."""
  return base.apply_variants(image_folder(), arg, VARIANTS)
