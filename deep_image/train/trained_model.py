"""A trained model restored from its workdir, for evaluation, ensembles and prediction.

  trained = load_trained_model("/tmp/run", checkpoint="best")
  trained.model.apply({"params": trained.params}, images)

The run's own config (`WORKDIR/config.json`) rebuilds the model, the mesh and the
strategy; the checkpoint is restored through the strategy (any device count: another
layout is converted as on resume) and its parameters gathered in the model's layout.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from absl import logging
from jax.sharding import NamedSharding

from deep_image.config_error import ConfigError
from deep_image.evaluate.accuracy import Evaluator
from deep_image.models.vgg import VGG, make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.checkpoint import Checkpointer
from deep_image.train.optimizer import make_optimizer
from deep_image.train.run_config import read_run_config

CHECKPOINTS = ("best", "latest")


@dataclasses.dataclass
class TrainedModel:
  """workdir, the restored `step`, the run's `config`, its `model` and `params` (the model's
  layout, on the mesh), and `batch_sharding` (NamedSharding of a global [B, ...] batch)."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  model: VGG
  params: object
  batch_sharding: NamedSharding

  def evaluator(self, global_batch_size: int | None = None) -> Evaluator:
    """An `Evaluator` of this model on the run's data config, batched over its mesh;
    `global_batch_size` defaults to the run's `train.eval_batch_size`."""
    batch = self.config.train.eval_batch_size if global_batch_size is None else global_batch_size
    return Evaluator(self.model, self.config.data, self.batch_sharding, batch)


def resolve_step(checkpoints: Checkpointer, checkpoint: str) -> int:
  """'best' (highest validation top-1; the latest when none was evaluated), 'latest' or a
  step number -> a step that exists. ConfigError names what is there otherwise."""
  latest = checkpoints.latest_step()
  if latest is None:
    raise ConfigError(f"{checkpoints.directory} holds no complete checkpoint")
  if checkpoint == "latest":
    return latest
  if checkpoint == "best":
    best = checkpoints.best_step()
    if best is None:
      logging.warning("%s: no evaluated checkpoint; using the latest", checkpoints.directory)
    return latest if best is None else best
  kept = checkpoints.manager.all_steps()
  if not str(checkpoint).isdigit() or int(checkpoint) not in kept:
    raise ConfigError(
      f"--checkpoint={checkpoint!r}: expected one of {CHECKPOINTS} or a kept step "
      f"({sorted(kept)} in {checkpoints.directory})"
    )
  return int(checkpoint)


def load_trained_model(workdir: str, checkpoint: str = "best") -> TrainedModel:
  """Restore the `checkpoint` ('best' | 'latest' | step) of the run in `workdir`.

  Uses every device JAX has (the mesh of the run's `parallel` config); the checkpoint is
  only read, so a run still training in `workdir` is not disturbed.
  """
  config = read_run_config(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ConfigError(f"{workdir!r} has no checkpoints/ folder: the run saved nothing yet")
  mesh = mesh_lib.make_mesh(config.parallel)
  model = make_model(config.model)
  strategy = strategies.make_strategy(config, model, make_optimizer(config.train), mesh)
  checkpoints = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
  try:
    step = resolve_step(checkpoints, checkpoint)
    state = checkpoints.restore(step, strategy, config)
  finally:
    checkpoints.close()
  logging.info("%s: restored step %d (%s)", workdir, step, checkpoint)
  return TrainedModel(
    workdir=workdir,
    step=step,
    config=config,
    model=model,
    params=strategy.full_params(state),
    batch_sharding=strategy.batch_sharding,
  )
