r"""The 8-conv / 3-FC / 1000-way model of the paper's scaling study (section 3.3).

  python -m experiments.summary --config=experiments/configs/scaling.py
  python -m experiments.train --config=experiments/configs/scaling.py --workdir=/tmp/scaling \
      --config.data.data_dir=/data/imagenet_array_record
  python -m experiments.train --config=experiments/configs/scaling.py:tiny --workdir=/tmp/st

64 images per device ("slices = 64"), so the global batch is 64 x devices; data and
training otherwise as table2.py. Variants: `tiny` is table2.py's `tiny` (vgg_tiny on
generated 64 px scenes, 12 steps) with 4 images per device. Sweeps: table2.py's
`train_scale`.
"""

import ml_collections

from experiments.configs import base, table2

sweep_train_scale = table2.sweep_train_scale


def tiny(c: ml_collections.ConfigDict) -> None:
  """table2's `tiny`, 4 images per device."""
  table2.tiny(c)
  c.train.batch_size = c.parallel.get_ref("num_devices") * 4


VARIANTS: dict[str, base.Variant] = {"tiny": tiny}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The scaling-study job; `arg`: comma-separated variants ('tiny')."""
  c = table2.table2()
  c.model.name = "scaling_8conv_3fc"
  # A reference, not a number: `--config.parallel.num_devices=16` (applied after this
  # function) then gives 64 x 16; `--config.train.batch_size=...` still sets it outright.
  c.train.batch_size = c.parallel.get_ref("num_devices") * 64
  return base.apply_variants(c, arg, VARIANTS)
