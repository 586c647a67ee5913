r"""The paper's Table 2 model on ImageNet-size input (224 crops, 1000 classes).

  python -m experiments.summary --config=experiments/configs/table2.py
  python -m experiments.train --config=experiments/configs/table2.py --workdir=/tmp/t2 \
      --config.data.data_dir=/data/imagenet_array_record
  python -m experiments.train --config=experiments/configs/table2.py:s512 --workdir=/tmp/t2_512 \
      --config.data.data_dir=/data/imagenet_array_record
  python -m experiments.train --config=experiments/configs/table2.py:tiny --workdir=/tmp/t2tiny
  python -m experiments.ensemble --workdirs=/tmp/t2,/tmp/t2_512 --protocol=dense+flip \
      --out=/tmp/t2_fused.json
  python -m experiments.sweep --config=experiments/configs/table2.py --sweep=train_scale \
      --workdir=/tmp/t2scales --config.data.data_dir=/data/imagenet_array_record

13 conv layers (64,64 | 128,128 | 256x3 | 512x3 | 512x3), FC 6144-6144-1000:
212,761,384 parameters (212.7M, the paper's figure). Trains with the hybrid
strategy (conv data parallel, FC1/FC2 split over all devices), with the paper's
augmentations on 224 crops of images resized to 256, on ImageNet prepared by
`experiments.prepare` into data_dir/train and data_dir/val:

  python -m experiments.prepare --src=/data/ILSVRC/train --dst=/data/imagenet_array_record/train
  python -m experiments.prepare --src=/data/ILSVRC/val --dst=/data/imagenet_array_record/val \
      --labels=/data/LOC_val_solution.csv --classes=/data/imagenet_array_record/train/classes.json

The default trains at scale 256, `s512` at 512 (the paper's two models, section 4.2; same
224 crops); each is tested at its own scale (data.eval_scale 0 follows train_scale) and
`experiments.ensemble` fuses them.

Variants: `s512`; `tiny` keeps the job's shape (hybrid, flips, dropout 0.5, batch-scaled learning
rate) but runs vgg_tiny for 12 steps on the generated high-resolution source (8 classes of
small objects in 64 px scenes, nothing to download): about a minute on a CPU.

Sweeps: `train_scale`, the paper's two training scales (section 4.2): the config's
data.train_scale and twice it (256 and 512; 36 and 72 under `tiny`); data.eval_scale stays 0,
so each is evaluated at its own training scale.
"""

import ml_collections

from experiments.configs import base


def tiny(c: ml_collections.ConfigDict) -> None:
  """The `tiny` variant, in place: `base.tiny_run` on generated 64 px scenes."""
  base.tiny_run(c)
  c.model.num_classes = 8
  c.model.image_size = c.data.augment.crop_size = 32
  c.data.source = "highres"
  c.data.data_dir = ""
  c.data.splits.validation = "validation"
  c.data.highres.image_size = 64
  c.data.highres.num_classes = 8
  c.data.highres.classes = "mirror_shapes"  # flips are on: classes a flip keeps
  c.data.highres.object_size = (6, 10)
  c.data.highres.num_train_examples = 256
  c.data.highres.num_eval_examples = 64
  c.data.train_scale = 36
  c.data.num_workers = 0
  c.train.eval_batch_size = 32


def s512(c: ml_collections.ConfigDict) -> None:
  """The high-resolution model, in place: train (and test) at scale 512, same crops."""
  c.data.train_scale = 512


VARIANTS: dict[str, base.Variant] = {"s512": s512, "tiny": tiny}


def table2() -> ml_collections.ConfigDict:
  """The Table 2 job, before variants."""
  c = base.get_config()
  c.model.name = "deep_image_16"
  c.model.num_classes = 1000
  c.model.image_size = 224
  c.model.dropout = 0.5
  c.data.source = "array_record"
  c.data.data_dir = "/data/imagenet_array_record"
  c.data.splits.validation = "val"
  c.data.train_scale = 256  # eval_scale 0 follows it
  c.data.augment.crop_size = 224
  c.data.augment.flip.enabled = True
  c.data.num_workers = 8
  c.train.batch_size = 256
  c.train.learning_rate = 0.01  # the paper's, per 256 images
  c.train.lr_batch_reference = 256
  c.train.num_steps = 370_000
  c.train.warmup_steps = 5_000
  c.train.log_every = 100
  # eval_every, checkpoint_every: base's (5,000 and 1,000 steps).
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The Table 2 job; `arg`: comma-separated variants ('s512', 'tiny')."""
  return base.apply_variants(table2(), arg, VARIANTS)


def sweep_train_scale(config: ml_collections.ConfigDict) -> list[dict[str, object]]:
  """The config's training scale S and 2S, each evaluated at its own scale."""
  s = int(config.data.train_scale)
  return [{"data.train_scale": v} for v in (s, 2 * s)]
