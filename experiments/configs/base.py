r"""Base config: every field the code reads, with its default (the digits job).

  python -m experiments.train --config=experiments/configs/base.py --workdir=/tmp/base
  python -m experiments.train --config=experiments/configs/base.py:tiny --workdir=/tmp/tiny

Every experiment config starts here and changes values only, so every field below exists
in every config and `--config.FIELD=VALUE` works on any of them. Library code reads the
fields directly (`config.data.data_dir`), with no defaults of its own. The data fields
come from `deep_image.data.data_config.default_config()` (the source's, the pipeline's and
the augmentations'), the one place they are defined; this file sets the digits job's
values. `get_config(arg)`: `arg` is a comma-separated list of variants applied in order
(`--config=FILE:tiny`); `tiny` shrinks the job to seconds on a CPU (vgg_tiny, 16 px
crops, batch 32, 12 steps). An unknown variant raises ConfigError naming the known ones.

Fields (tests/test_configs.py checks that this table lists every field, and its defaults):

field                                   default          meaning
seed                                    0                run seed: weights, data order, dropout
model.name                              'vgg_small'      a key of deep_image.models.vgg.MODELS
model.num_classes                       10               classifier outputs
model.image_size                        32               training crop side (= crop_size)
model.in_channels                       3                input channels
model.dropout                           0.0              dropout rate after FC1 and FC2
model.dtype                             'float32'        compute, 'float32' | 'bfloat16'
data.source                             'digits'         digits | tfds | array_record | highres
data.splits.train                       'train'          the source's name of the train split
data.splits.validation                  'validation'     ... of 'validation' ('val', 'test')
data.seed                               0                the dataset's (digits split, highres)
data.name                               ''               tfds: dataset name ('imagenet2012')
data.data_dir                           ''               array_record: prepare's --dst root
data.verify_checksums                   False            array_record: sha256 shards on open
data.image_size                         32               digits: side the 8x8 digits go to
data.highres.image_size                 512              highres: scene side
data.highres.num_classes                8                highres: classes, 2..12
data.highres.num_train_examples         10000            highres: train split size
data.highres.num_eval_examples          1000             highres: validation split size
data.highres.object_size                (12, 20)         highres: object side range, px
data.highres.num_objects                (2, 4)           highres: class objects per scene
data.highres.num_distractors            (2, 4)           highres: distractors per scene
data.highres.classes                    'shapes'         highres: or 'mirror_shapes', 'gratings'
data.eval_split                         'validation'     split of the periodic and final eval
data.train_scale                        36               S: train images' shorter side
data.eval_scale                         0                eval shorter side (0: train_scale)
data.num_workers                        0                Grain worker processes (0: in-process)
data.worker_buffer_size                 2                batches each worker prepares ahead
data.augment_on                         'host'           'host' | 'device' (in the jitted step)
data.cache_on_device                    False            S x S train set in device memory
data.cache_budget_bytes                 2147483648       cache: free bytes where none reported
data.cache_memory_fraction              0.5              cache: share of free device memory
data.augment.crop_size                  32               c: random train / centre eval crop
data.augment.crop.enabled               True             random crop offset (else centre)
data.augment.flip.enabled               False            horizontal flips (off: digits)
data.augment.flip.probability           0.5              chance per image
data.augment.rotation.enabled           True             rotation
data.augment.rotation.probability       0.5              chance per image
data.augment.rotation.max_degrees       10               angle bound (grid: +-1..10 degrees)
data.augment.lens_distortion.enabled    True             lens distortion
data.augment.lens_distortion.probability 0.5             chance per image
data.augment.lens_distortion.kinds      ('barrel', 'pincushion', 'stretch_h', 'stretch_v')  kinds
data.augment.lens_distortion.max_degree 25               degree bound (grid 1..65)
data.augment.vignetting.enabled         True             vignetting
data.augment.vignetting.probability     0.5              chance per image
data.augment.vignetting.min_radius      0.0              radius bounds (0 centre, 1 corner)
data.augment.vignetting.max_radius      0.975            ...
data.augment.vignetting.min_strength    0.02             strength bounds (grid 0.02..0.98)
data.augment.vignetting.max_strength    0.5              ...
data.augment.color_cast.enabled         True             colour casting
data.augment.color_cast.probability     0.5              chance per image
data.augment.color_cast.channel_probability 0.5          chance each channel is shifted
data.augment.color_cast.max_shift       20               shift bound (grid -20..20)
parallel.strategy                       'hybrid'         'gspmd'|'data'|'lazy'|'hybrid'|'auto'
parallel.collective                     'butterfly'      'butterfly' | 'ring' | 'direct' | 'xla'
parallel.node_collective                ''               across nodes ('': as collective)
parallel.conv                           'data'           hybrid: conv layers 'data' | 'lazy'
parallel.overlap                        'deferred'       'none' | 'deferred' (1 device: as none)
parallel.bucket_mb                      25.0             MiB of gradients per bucket (0: per layer)
parallel.fc_micro_batches               0                hybrid FC head in parts (0: GPU 2, else 1)
parallel.prefetch_mb                    128.0            fetch buckets this many MiB ahead (0: one)
parallel.grad_dtype                     'float32'        gradient dtype: 'float32'|'bfloat16'
parallel.mesh                           (('data', -1),)  (axis, size) pairs; one -1; node x local
parallel.mesh_by_host                   True             GPU processes: the default by host
parallel.model_axes                     ()               gspmd: mesh axes of the split FC dim
parallel.shard_fc                       True             gspmd: split FC1/FC2 (else replicate)
parallel.num_devices                    8                CPU-only: host devices to simulate
parallel.distributed                    'off'            'off' | 'auto' | 'explicit' (multi-host)
parallel.coordinator_address            ''               explicit: 'host:port' of process 0
parallel.num_processes                  1                explicit: processes in the job
parallel.process_id                     0                explicit: this process, 0..N-1
parallel.heartbeat_timeout_s            100              multi-host: s without heartbeats = dead
parallel.init_timeout_s                 300              multi-host: s to wait for all processes
parallel.shutdown_timeout_s             300              multi-host: s at exit to wait for peers
train.num_steps                         600              optimizer steps
train.batch_size                        64               global batch (all devices)
train.learning_rate                     0.01             peak rate (warmup, then cosine to 0)
train.lr_batch_reference                0                >0: peak x batch_size / this
train.warmup_steps                      50               linear warmup steps
train.momentum                          0.9              SGD momentum
train.weight_decay                      0.0005           L2 on kernels
train.log_every                         50               steps per metrics.jsonl record
train.eval_every                        5000             eval every N steps (0: at the end only)
train.eval_batch_size                   128              global eval batch
train.checkpoint_every                  1000             checkpoint every N steps (0: end only)
train.keep_checkpoints                  3                latest checkpoints kept (+ best top-1)

`model.image_size` must equal `data.augment.crop_size`; `data.seed` is separate from
`seed` so that a new run seed keeps the same dataset (digits' train/test split, highres
scenes). `parallel.model_axes` empty means every mesh axis. The end of a run always
evaluates and checkpoints. Source fields: `deep_image/data/sources.py`; pipeline fields:
`deep_image/data/data_config.py`; augmentation grids: `deep_image/data/augment.py`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import ml_collections

from deep_image.config_error import ConfigError
from deep_image.data import data_config

Variant = Callable[[ml_collections.ConfigDict], None]


def _job() -> ml_collections.ConfigDict:
  """The digits job: every field, with the values of the table above."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "vgg_small"
  c.model.num_classes = 10
  c.model.image_size = 32
  c.model.in_channels = 3
  c.model.dropout = 0.0
  c.model.dtype = "float32"

  # The data code's fields and defaults (source, pipeline, augmentations, device cache);
  # below, only the values of the digits job.
  c.data = data_config.default_config()
  c.data.source = "digits"
  c.data.image_size = 32
  c.data.eval_split = "validation"
  # Digits: upsampled to 32, resized to 36, random 32 crops (+-2 px shifts).
  c.data.train_scale = 36  # eval_scale 0 follows it
  c.data.augment.crop_size = 32
  c.data.augment.flip.enabled = False  # a mirrored 2 or 5 is not the same digit
  # Milder than the ImageNet defaults: a 32 px digit survives less distortion.
  c.data.augment.lens_distortion.max_degree = 25
  c.data.augment.vignetting.max_strength = 0.5

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "hybrid"
  c.parallel.collective = "butterfly"
  c.parallel.node_collective = ""
  c.parallel.conv = "data"
  c.parallel.overlap = "deferred"
  c.parallel.bucket_mb = 25.0
  c.parallel.fc_micro_batches = 0
  # 128 MiB ahead, not one bucket: the cost model's h100 plan at 64 GPUs x 64 images puts
  # lazy on one axis from 49.6x (one bucket: FC1's 616 MB gather exposed) to 58.9x at 64 MiB,
  # hybrid 8x8 from 60.4x to 61.1x at 128 (no setup slower); the price is at most 128 MiB
  # plus one bucket of gathered weights / gradients held earlier (BENCHMARKS.md).
  c.parallel.prefetch_mb = 128.0
  c.parallel.grad_dtype = "float32"
  c.parallel.mesh = (("data", -1),)
  c.parallel.mesh_by_host = True
  c.parallel.model_axes = ()
  c.parallel.shard_fc = True
  c.parallel.num_devices = 8
  c.parallel.distributed = "off"
  c.parallel.coordinator_address = ""
  c.parallel.num_processes = 1
  c.parallel.process_id = 0
  c.parallel.heartbeat_timeout_s = 100
  c.parallel.init_timeout_s = 300
  c.parallel.shutdown_timeout_s = 300

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 600
  c.train.batch_size = 64
  c.train.learning_rate = 0.01
  c.train.lr_batch_reference = 0
  c.train.warmup_steps = 50
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.log_every = 50
  c.train.eval_every = 5000
  c.train.eval_batch_size = 128
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  return c


def tiny_run(c: ml_collections.ConfigDict) -> None:
  """The run every config's `tiny` variant shares, in place: vgg_tiny, 12 steps of batch 32
  (2 of warmup), a metrics record every 4 steps, an eval and a checkpoint every 8.

  Seconds on a CPU: tests, smoke runs and sweeps of the machinery, not of accuracy. Each
  file's `tiny` adds its data (crop, scale, source) to this.
  """
  c.model.name = "vgg_tiny"
  c.train.num_steps = 12
  c.train.warmup_steps = 2
  c.train.batch_size = 32
  c.train.log_every = 4
  c.train.eval_every = c.train.checkpoint_every = 8


def tiny(c: ml_collections.ConfigDict) -> None:
  """The `tiny` variant of a digits config, in place: `tiny_run` on 16 px crops."""
  tiny_run(c)
  c.model.image_size = c.data.augment.crop_size = 16
  c.data.image_size = 16
  c.data.train_scale = 18


VARIANTS: dict[str, Variant] = {"tiny": tiny}


def apply_variants(
  c: ml_collections.ConfigDict, arg: str | None, variants: Mapping[str, Variant]
) -> ml_collections.ConfigDict:
  """Applies the comma-separated variant names of `arg` (the text after ':' in
  `--config=FILE:arg`) in order, each a function that edits `c` in place; returns `c`.

  Raises:
    ConfigError: a name that `variants` does not define (naming it and the known ones).
  """
  for name in (n.strip() for n in (arg or "").split(",")):
    if not name:
      continue
    if name not in variants:
      raise ConfigError(f"unknown config variant {name!r}: this file defines {sorted(variants)}")
    variants[name](c)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base config (the digits job); `arg`: comma-separated variants ('tiny')."""
  return apply_variants(_job(), arg, VARIANTS)
