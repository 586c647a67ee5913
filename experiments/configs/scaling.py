r"""The 8-conv / 3-FC / 1000-way model of the paper's scaling study (section 3.3).

  python -m experiments.summary --config=experiments/configs/scaling.py

64 images per device ("slices = 64"), so the global batch is 64 x devices.
"""

from experiments.configs import table2


def get_config():
  c = table2.get_config()
  c.model.name = "scaling_8conv_3fc"
  c.train.batch_size = 64 * c.parallel.num_devices
  return c
