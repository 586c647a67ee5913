"""Base config shared by every experiment; variant files override a few fields.

Fields (all overridable with --config.FIELD=VALUE):
  seed                   weights, data order and dropout all derive from it.
  model.name             a key of deep_image.models.vgg.MODELS.
  model.num_classes, model.image_size (training crop side), model.dropout,
  model.dtype            'float32' or 'bfloat16' compute (params stay float32).
  data.source            'digits' | 'tfds' | 'array_record' | 'highres'
                         (deep_image/data/sources.py documents each one's fields).
  data.image_size        digits: side the 8x8 digits are upsampled to.
  data.eval_split        split of the final evaluation ('validation').
  data.train_scale, data.eval_scale, data.num_workers, data.augment_on,
  data.augment.*, data.cache_on_device, ...: the Grain pipeline and device
                         cache (deep_image/data/pipeline.py:default_config);
                         data.augment.crop_size must equal model.image_size.
  parallel.strategy      'gspmd' | 'data' | 'lazy' | 'hybrid'.
  parallel.collective    'butterfly' | 'ring' | 'direct' | 'xla'.
  parallel.conv          hybrid only: conv layers 'data' or 'lazy'.
  parallel.mesh          ((axis, size), ...), one size may be -1 (the rest).
  parallel.num_devices   on a CPU-only machine without XLA_FLAGS, how many
                         host devices to simulate.
  parallel.distributed   'off' | 'auto' | 'explicit' (multi-host).
  train.num_steps, train.batch_size (global), train.learning_rate (peak),
  train.warmup_steps, train.momentum, train.weight_decay, train.log_every,
  train.eval_batch_size.
"""

import ml_collections

from deep_image.data import pipeline


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "vgg_small"
  c.model.num_classes = 10
  c.model.image_size = 32
  c.model.in_channels = 3
  c.model.dropout = 0.0
  c.model.dtype = "float32"

  c.data = pipeline.default_config()
  c.data.source = "digits"
  c.data.image_size = 32
  c.data.eval_split = "validation"
  # Digits: upsampled to 32, resized to 36, random 32 crops (+-2 px shifts).
  c.data.train_scale = c.data.eval_scale = 36
  c.data.augment.crop_size = 32
  c.data.augment.flip.enabled = False  # a mirrored 2 or 5 is not the same digit
  # Milder than the ImageNet defaults: a 32 px digit survives less distortion.
  c.data.augment.lens_distortion.max_degree = 25
  c.data.augment.vignetting.max_strength = 0.5

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "hybrid"
  c.parallel.collective = "butterfly"
  c.parallel.conv = "data"
  c.parallel.mesh = (("data", -1),)
  c.parallel.shard_fc = True
  c.parallel.num_devices = 8
  c.parallel.distributed = "off"
  c.parallel.coordinator_address = ""
  c.parallel.num_processes = 1
  c.parallel.process_id = 0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 600
  c.train.batch_size = 64
  c.train.learning_rate = 0.01
  c.train.lr_batch_reference = 0
  c.train.warmup_steps = 50
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.log_every = 50
  c.train.eval_batch_size = 128
  return c
