r"""The paper's Table 2 model on ImageNet-size input (224 crops, 1000 classes).

  python -m experiments.summary --config=experiments/configs/table2.py
  python -m experiments.train --config=experiments/configs/table2.py --workdir=/tmp/t2

13 conv layers (64,64 | 128,128 | 256x3 | 512x3 | 512x3), FC 6144-6144-1000:
212,761,384 parameters (212.7M, the paper's figure). Trains with the hybrid
strategy (conv data parallel, FC1/FC2 split over all devices), on ImageNet
prepared by `experiments.prepare` (set --config.data.data_dir), with the
paper's augmentations on 224 crops of images resized to 256 (set
--config.data.train_scale=512 for the high-resolution model).
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.name = "deep_image_16"
  c.model.num_classes = 1000
  c.model.image_size = 224
  c.model.dropout = 0.5
  c.data.source = "array_record"
  c.data.data_dir = "/data/imagenet_array_record"
  c.data.train_scale = c.data.eval_scale = 256
  c.data.augment.crop_size = 224
  c.data.augment.flip.enabled = True
  c.data.num_workers = 8
  c.train.batch_size = 256
  c.train.learning_rate = 0.01
  c.train.lr_batch_reference = 256
  c.train.num_steps = 370_000
  c.train.warmup_steps = 5_000
  c.train.log_every = 100
  return c
