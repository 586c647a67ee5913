"""Trained models tested together: each run's scores under one protocol, and their fusion
by averaging softmax posteriors (paper section 4.2).

Each model is restored read-only from its workdir (`trained_model.load_trained_model`)
and tested under the protocol text (`deep_image/evaluate/protocol.py`); without
'@scales' each at its own eval scale, so a 256 and a 512 model are each tested at their
scale. `evaluate_models` is what `ensemble` (a split of a dataset: the command line
`experiments.ensemble`) and `predict` (one image: `experiments.predict`) share. Models
must predict the same classes; an ensemble also tests on the same images (source and
split).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from deep_image.config_error import ConfigError
from deep_image.data import pipeline, sources
from deep_image.evaluate.accuracy import accuracy, fuse, posteriors
from deep_image.evaluate.protocol import parse_protocol
from deep_image.train.trained_model import load_trained_model


@dataclasses.dataclass(frozen=True)
class ModelEvaluation:
  """One run's test under one protocol.

  scores: float32 [N, classes] log-posteriors (up to a constant) in source order, on
    the host; labels: int [N]; results: {top1, top5, count}.
  """

  workdir: str
  step: int
  protocol: str  # the protocol's name at this model's scale, e.g. 'dense+flip@256'
  scores: np.ndarray
  labels: np.ndarray
  results: dict


def evaluate_models(
  workdirs: list[str],
  configs: list,
  protocol_text: str,
  checkpoint: str,
  split: str,
  *,
  source=None,
  global_batch_size: int | None = None,
) -> list[ModelEvaluation]:
  """Each run of `workdirs` (configs: their `config.json`s) tested under `protocol_text`.

  Args:
    checkpoint: 'best', 'latest' or a step number, for every run.
    source: test these records instead of the runs' `split` (e.g. one image).
    global_batch_size: the evaluation batch (default: each run's train.eval_batch_size).

  Raises:
    ConfigError: two runs that predict different numbers of classes.
  """
  evaluations = []
  for workdir, config in zip(workdirs, configs, strict=True):
    protocol = parse_protocol(protocol_text, pipeline.eval_scale(config.data))
    trained = load_trained_model(workdir, checkpoint)
    evaluation = trained.evaluator(global_batch_size=global_batch_size).run(
      trained.params, [protocol], split=split, source=source
    )
    scores = evaluation.scores[protocol.name]
    if evaluations and scores.shape != evaluations[0].scores.shape:
      raise ConfigError(
        f"{workdir} predicts {scores.shape[1]} classes, "
        f"{workdirs[0]} {evaluations[0].scores.shape[1]}: models of an ensemble share their "
        "classes"
      )
    evaluations.append(
      ModelEvaluation(
        workdir=workdir,
        step=trained.step,
        protocol=protocol.name,
        scores=scores,
        labels=evaluation.labels,
        results=evaluation.results[protocol.name],
      )
    )
  return evaluations


def ensemble(workdirs: list[str], configs: list, protocol_text: str, checkpoint: str, split: str):
  """Each model's and the fused result on `split` (default: the first run's eval split).

  Returns:
    ({workdir: {top1, top5, count, step, protocol}}, fused {top1, top5, count}).

  Raises:
    ConfigError: runs that test on other images, or predict other classes.
  """
  split = split or configs[0].data.eval_split
  eval_sets = [repr(sources.make_source(c.data, split)) for c in configs]
  for workdir, eval_set in zip(workdirs[1:], eval_sets[1:], strict=True):
    if eval_set != eval_sets[0]:
      raise ConfigError(
        f"{workdirs[0]} tests on {eval_sets[0]} but {workdir} on {eval_set}: an ensemble "
        "needs the same eval images"
      )
  evaluations = evaluate_models(workdirs, configs, protocol_text, checkpoint, split)
  models = {e.workdir: {**e.results, "step": e.step, "protocol": e.protocol} for e in evaluations}
  fused = accuracy(fuse([e.scores for e in evaluations]), evaluations[-1].labels)
  return models, fused


def predict(workdirs: list[str], configs: list, image, protocol_text: str, checkpoint: str):
  """Each model's and the fused posteriors of one image, and the class names.

  Args:
    image: a one-record source (`deep_image.data.one_image.OneImage`).
  Returns:
    ({column name: posteriors float64 [classes]}, class names): one column per model,
    '<workdir> (<protocol>)', and 'fused' for several; the names of the first run's
    dataset, or the class ids where it has none (or is no longer on this host).
  """
  # One image, padded to one row per device.
  evaluations = evaluate_models(
    workdirs, configs, protocol_text, checkpoint, "-", source=image,
    global_batch_size=jax.device_count(),
  )  # fmt: skip
  columns = {f"{e.workdir} ({e.protocol})": posteriors(e.scores[0]) for e in evaluations}
  if len(evaluations) > 1:
    columns["fused"] = posteriors(fuse([e.scores for e in evaluations])[0])
  try:
    names = sources.make_source(configs[0].data, configs[0].data.eval_split).class_names
  except (AttributeError, OSError, ValueError) as e:  # e.g. a dataset no longer on this host
    logging.warning("no class names (%s): showing class ids", e)
    names = None
  names = list(names) if names else [str(i) for i in range(evaluations[0].scores.shape[1])]
  return columns, names
