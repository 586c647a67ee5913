r"""Default job: a small VGG on scikit-learn's digits, 8 simulated devices, hybrid strategy.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/digits

Digits are upsampled to 32x32 RGB; the model is `vgg_small` (3 conv stages of
16/32/64 filters, FC 256-256-10) trained with the hybrid strategy (conv data
parallel, FC1/FC2 split over the 8 devices) and butterfly collectives.
Reaches >= 97% test top-1 in a few minutes on a 2-core CPU.
"""

from experiments.configs import base


def get_config():
  return base.get_config()
