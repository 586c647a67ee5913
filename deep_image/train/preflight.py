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
room for one checkpoint of the    --workdir
state (`check_room_for_checkpoint`,
once the strategy has its shapes)
================================  ============================================

`preflight` returns a `Plan`: what it built while checking (the opened
sources, the sampling space, the learning-rate schedule), which the loop and
its input use instead of building them again (`make_strategy` takes the
validated parallel setup and does not validate again).

Where a module owns a check (strategies, optimizer, augmentation) it raises
ConfigError itself and this module calls it; genuine bugs are never turned
into ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import jax
import numpy as np
import optax

from deep_image.config_error import ConfigError
from deep_image.data import augment, pipeline
from deep_image.data.sources import make_source
from deep_image.models.vgg import MODELS
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import validation
from deep_image.train import workdir as workdir_layout
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


@dataclasses.dataclass(frozen=True)
class Plan:
  """What preflight built while checking a config, for the run to use as it is.

  Attributes:
    train_source, eval_source: the opened sources of the training split and of
      `data.eval_split` (random access, `len`, `num_classes`).
    sampling_space: the augmentation's `SamplingSpace` (`data.augment`).
    schedule: the learning-rate schedule, step -> rate (`train.*`).
    parallel: the validated parallel setup, for `strategies.make_strategy(plan=...)`.
  """

  train_source: object
  eval_source: object
  sampling_space: augment.SamplingSpace
  schedule: optax.Schedule
  parallel: validation.ParallelPlan


def preflight(config, workdir: str, num_devices: int, process_count: int | None = None) -> Plan:
  """Run every check; returns the `Plan` of what was built doing so.

  Raises:
    ConfigError: the first failed check, naming the field and value.
  """
  process_count = jax.process_count() if process_count is None else process_count
  _check_counts(config.train)
  _check_model_and_crop(config)
  # The owners' own checks (they raise ConfigError), run here before anything compiles.
  parallel = validation.validate_parallel_config(
    config, num_devices, mesh_lib.host_devices(config.parallel)
  )
  schedule = learning_rate_schedule(config.train)
  sampling_space = augment.SamplingSpace.from_config(config.data.augment)
  _check_eval_batch(config, num_devices, process_count)
  _check_workdir(workdir)
  train_source, eval_source = _check_data(config, process_count)
  return Plan(train_source, eval_source, sampling_space, schedule, parallel)


# What a checkpoint holds beside its arrays (Orbax's OCDBT manifests and metadata, the meta
# JSON with the config, the input state): 56-81 KB measured for vgg_tiny's 8-device
# checkpoints (data / lazy / hybrid: 108-134 KB on disk for 52 KB of arrays), rounded up.
CHECKPOINT_OVERHEAD_BYTES = 1 << 20


def checkpoint_bytes(abstract_state) -> int:
  """Bytes of one checkpoint: the state's leaves (global shapes) at their dtypes, plus
  CHECKPOINT_OVERHEAD_BYTES."""
  arrays = sum(
    math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state)
  )
  return arrays + CHECKPOINT_OVERHEAD_BYTES


def check_room_for_checkpoint(workdir: str, abstract_state) -> None:
  """ConfigError when WORKDIR's file system cannot hold one more checkpoint of the state.

  `abstract_state`: the strategy's `abstract_state()` (shapes and dtypes only). Run once
  the strategy is built, before anything is written: a new save is complete before the
  one it replaces is deleted, so a resumed run needs the room too.
  """
  need = checkpoint_bytes(abstract_state)
  free = workdir_layout.free_bytes(workdir)
  if free < need:
    raise ConfigError(
      f"--workdir={workdir!r} has {free} bytes free on its device, fewer than the {need} "
      "bytes of one checkpoint of this run's train state"
    )
