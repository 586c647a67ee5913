"""Everything that would stop a run later, checked before the first step.

`preflight(config, workdir, num_devices)` raises `ConfigError` with one line
naming the field (or flag) and its value, so a week-long job does not die in
its first evaluation or at its first checkpoint:

================================  ============================================
check                             field
================================  ============================================
strategy, collective, mesh,       parallel.*, train.batch_size
batch over the devices, FC split
learning-rate schedule            train.warmup_steps, lr_batch_reference
augmentation probabilities,       data.augment.*
lens distortion kinds
training crop == model input,     model.image_size, data.augment.crop_size,
crop <= train / eval scale,       data.train_scale, data.eval_scale,
where augmentation runs           data.augment_on
evaluation batch over the         train.eval_batch_size
processes and devices
step counts and intervals         train.num_steps, log_every, eval_every,
                                  checkpoint_every, keep_checkpoints
training and evaluation data      data.source, data.data_dir, data.eval_split
exist and are prepared; the       (the sources are opened here and handed
labels fit the classifier          to the loop), model.num_classes
at least one batch per process    train.batch_size
the workdir is writable           --workdir
================================  ============================================

Where a module owns a check (strategies, optimizer, augmentation) it raises
ConfigError itself and this module calls it; genuine bugs are never turned
into ConfigError.
"""

from __future__ import annotations

import os
import tempfile

import jax

from deep_image.config_error import ConfigError
from deep_image.data import augment, pipeline
from deep_image.data.sources import make_source
from deep_image.models.vgg import MODELS
from deep_image.parallel import strategies
from deep_image.train.optimizer import learning_rate_schedule


def _check_model_and_crop(config) -> None:
  model, data = config.model, config.data
  if model.name not in MODELS:
    raise ConfigError(
      f"model.name={model.name!r} is not a known model; choose from {tuple(MODELS)}"
    )
  if model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype={model.dtype!r} must be 'float32' or 'bfloat16'")
  crop = data.augment.crop_size
  if model.image_size != crop:
    raise ConfigError(
      f"model.image_size={model.image_size} must equal data.augment.crop_size={crop} "
      "(the network is built for the training crop)"
    )
  for field in ("train_scale", "eval_scale"):
    pipeline.check_crop_fits(data, field)
  pipeline.check_augment_on(data)


def _check_counts(train) -> None:
  positive = ("num_steps", "log_every", "eval_batch_size", "keep_checkpoints")
  for field in positive:
    if train[field] <= 0:
      raise ConfigError(f"train.{field}={train[field]} must be positive")
  for field in ("eval_every", "checkpoint_every"):
    if train[field] < 0:
      raise ConfigError(f"train.{field}={train[field]} must be >= 0 (0: only at the end)")


def _check_eval_batch(config, num_devices: int, process_count: int) -> None:
  eval_batch = config.train.eval_batch_size
  if eval_batch % process_count or eval_batch % num_devices:
    raise ConfigError(
      f"train.eval_batch_size={eval_batch} does not divide over the {num_devices} devices "
      f"({process_count} processes); choose a multiple of {num_devices}"
    )


def _open_source(data_cfg, split: str, field: str):
  try:
    return make_source(data_cfg, split)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(
      f"{field}: cannot open the {split!r} split of data.source={data_cfg.source!r}"
      f"{f' in data.data_dir={data_cfg.data_dir!r}' if data_cfg.data_dir else ''}: {e}"
    ) from None


def _check_data(config, process_count: int):
  data = config.data
  train = _open_source(data, "train", "data.data_dir")
  evaluation = _open_source(data, data.eval_split, f"data.eval_split={data.eval_split!r}")
  for split, source in (("train", train), (data.eval_split, evaluation)):
    if len(source) == 0:
      raise ConfigError(f"data.eval_split / data.data_dir: the {split!r} split is empty")
    if source.num_classes > config.model.num_classes:
      raise ConfigError(
        f"model.num_classes={config.model.num_classes} is smaller than the "
        f"{source.num_classes} classes of the {split!r} split of data.source={data.source!r}"
      )
  per_process = len(train) // process_count
  if per_process < config.train.batch_size // process_count:
    raise ConfigError(
      f"train.batch_size={config.train.batch_size}: the training split has {len(train)} "
      f"examples, {per_process} per process, fewer than one batch"
    )
  return train, evaluation


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r} is not writable: {e.strerror or e}") from None


def preflight(config, workdir: str, num_devices: int, process_count: int | None = None):
  """Run every check; returns the opened (train, eval) sources for the loop to use.

  Raises:
    ConfigError: the first failed check, naming the field and value.
  """
  process_count = jax.process_count() if process_count is None else process_count
  _check_counts(config.train)
  _check_model_and_crop(config)
  # The owners' own checks (they raise ConfigError), run here before anything compiles.
  strategies.validate_parallel_config(config, num_devices)
  learning_rate_schedule(config.train)
  augment.SamplingSpace.from_config(config.data.augment)
  _check_eval_batch(config, num_devices, process_count)
  _check_workdir(workdir)
  return _check_data(config, process_count)
