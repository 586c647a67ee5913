"""`config.data`: every field the data code reads, with its default, in one place.

The experiment configs start from `default_config()` (`experiments/configs/base.py`), so this
module and what it imports (the sources' and the augmentations' own field lists) import
neither JAX nor Grain: a config file stays cheap to load and runs in any process.
"""

from __future__ import annotations

import ml_collections

from deep_image.data import augment, sources


def default_config() -> ml_collections.ConfigDict:
  """Every `config.data` field the data code reads: the source's (`sources.default_config`,
  documented in `deep_image/data/sources.py`), the pipeline's and the device cache's.

  Fields beyond the source's:
    train_scale: S, training images are resized so their shorter side is S (256, 512, ...;
      paper 4.2 trains one model per scale) before the random crop.
    eval_scale: shorter side of evaluation images before the centre crop / dense evaluation;
      0 (the default): the train scale, so a model is tested at the scale it learned
      (`pipeline.eval_scale(data_cfg)` resolves it).
    num_workers: Grain worker processes (`mp_prefetch`); 0 runs the pipeline in-process.
    worker_buffer_size: batches each worker prepares ahead.
    augment_on: 'host' (workers crop and augment) or 'device' (workers only decode and
      resize; `augment_device.augment_batch` crops and augments inside the jitted step).
    augment: `augment.default_config()`; `augment.crop_size` is the training crop c and the
      evaluation centre crop.
    cache_on_device: keep the decoded S x S dataset in device memory when it fits
      (`device_cache`, paper 3.1).
    cache_budget_bytes: per-device free memory assumed where the device reports none
      (`memory_stats()` is None on CPU).
    cache_memory_fraction: share of a device's free memory the cache may take; the rest is
      left for activations.
  """
  cfg = sources.default_config()
  cfg.train_scale = 256
  cfg.eval_scale = 0
  cfg.num_workers = 0
  cfg.worker_buffer_size = 2
  cfg.augment_on = "host"
  cfg.augment = augment.default_config()
  cfg.cache_on_device = False
  cfg.cache_budget_bytes = 2 * 1024**3
  cfg.cache_memory_fraction = 0.5
  return cfg
