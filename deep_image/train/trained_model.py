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
from deep_image.train.checkpoint_damage import DamagedCheckpoint
from deep_image.train.optimizer import make_optimizer
from deep_image.train.run_config import read_run_config
from deep_image.train.workdir import CHECKPOINTS_DIR

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


def candidate_steps(checkpoints: Checkpointer, checkpoint: str) -> list[int]:
  """The kept steps `checkpoint` may restore, in the order to try them.

  'latest': newest first; 'best': evaluated ones by validation top-1 (the latest first
  when none was evaluated), then the others newest first; a step number: that step.
  ConfigError names what is there when nothing fits.
  """
  kept = sorted(checkpoints.manager.all_steps(), reverse=True)
  if not kept:
    raise ConfigError(f"{checkpoints.directory} holds no complete checkpoint")
  if checkpoint == "latest":
    return kept
  if checkpoint == "best":
    top1 = {s: m["top1"] for s in kept if (m := checkpoints.manager.metrics(s))}
    if not top1:
      logging.warning("%s: no evaluated checkpoint; using the latest", checkpoints.directory)
    evaluated = sorted(top1, key=lambda s: (-top1[s], s))  # ties: the earlier, as best_step
    return evaluated + [s for s in kept if s not in top1]
  if not str(checkpoint).isdigit() or int(checkpoint) not in kept:
    raise ConfigError(
      f"--checkpoint={checkpoint!r}: expected one of {CHECKPOINTS} or a kept step "
      f"({sorted(kept)} in {checkpoints.directory})"
    )
  return [int(checkpoint)]


def resolve_step(checkpoints: Checkpointer, checkpoint: str) -> int:
  """'best' (highest validation top-1; the latest when none was evaluated), 'latest' or a
  step number -> a step that exists (the first of `candidate_steps`)."""
  return candidate_steps(checkpoints, checkpoint)[0]


def load_trained_model(workdir: str, checkpoint: str = "best") -> TrainedModel:
  """Restore the `checkpoint` ('best' | 'latest' | step) of the run in `workdir`.

  Uses every device JAX has (the mesh of the run's `parallel` config); the checkpoint is
  only read, so a run still training in `workdir` is not disturbed. A damaged 'best' or
  'latest' falls back to the next candidate (`candidate_steps`; each damaged one logged in
  one line, nothing moved); a damaged step number is a DamagedCheckpoint (a ConfigError).
  """
  config = read_run_config(workdir)
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)):
    raise ConfigError(f"{workdir!r} has no checkpoints/ folder: the run saved nothing yet")
  mesh = mesh_lib.make_mesh(config.parallel)
  model = make_model(config.model)
  strategy = strategies.make_strategy(config, model, make_optimizer(config.train), mesh)
  checkpoints = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
  try:
    steps = candidate_steps(checkpoints, checkpoint)
    if checkpoint in CHECKPOINTS:
      restored = checkpoints.restore_first_readable(steps, strategy, config)
      if restored is None:
        raise DamagedCheckpoint(
          f"{checkpoints.directory}: no readable checkpoint (steps {', '.join(map(str, steps))} "
          "are damaged)"
        )
      step, state = restored
    else:
      step, state = steps[0], checkpoints.restore(steps[0], strategy, config)
  finally:
    checkpoints.close()
  fallback = f"; step {steps[0]} is damaged" if step != steps[0] else ""
  logging.info("%s: restored step %d (%s%s)", workdir, step, checkpoint, fallback)
  return TrainedModel(
    workdir=workdir,
    step=step,
    config=config,
    model=model,
    params=strategy.full_params(state),
    batch_sharding=strategy.batch_sharding,
  )
