"""`train_and_evaluate(config, workdir)`: the training loop every script and test calls."""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import logging

from deep_image.data.digits import load_digits_arrays
from deep_image.data.global_batch import to_global
from deep_image.data.in_memory import InMemoryBatches
from deep_image.evaluate.accuracy import evaluate_arrays
from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.metrics import MetricsWriter, Progress
from deep_image.train.optimizer import learning_rate_schedule, make_optimizer


def _datasets(config):
  """(train batch iterator, eval images, eval labels) for `config.data.source`."""
  if config.data.source != "digits":
    raise ValueError(f"data.source={config.data.source!r}: the train loop reads 'digits' in memory")
  if config.model.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={config.model.image_size} must equal data.image_size="
      f"{config.data.image_size} for the in-memory digits (no cropping)"
    )
  train_x, train_y = load_digits_arrays(config.data.image_size, "train", config.seed)
  test_x, test_y = load_digits_arrays(config.data.image_size, "test", config.seed)
  batches = InMemoryBatches(
    train_x,
    train_y,
    config.train.batch_size,
    config.seed,
    jax.process_index(),
    jax.process_count(),
  )
  return batches, test_x, test_y


def train_and_evaluate(config, workdir: str) -> dict:
  """Train `config.train.num_steps` steps, then evaluate on the held-out split.

  Writes DIR/metrics.jsonl: one record per logged step (step, loss, top1, top5,
  learning_rate, images_per_sec, step_time) and a final record (split, top1,
  top5, step). Returns the final record. Raises FloatingPointError at the
  first logged non-finite loss.
  """
  mesh_lib.maybe_initialize_distributed(config.parallel)
  strategies.validate_parallel_config(config, jax.device_count())
  mesh = mesh_lib.make_mesh(config.parallel)
  logging.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())

  batches, test_x, test_y = _datasets(config)
  model = make_model(config.model)
  strategy = strategies.make_strategy(config, model, make_optimizer(config.train), mesh)
  schedule = learning_rate_schedule(config.train)
  state = strategy.init(jax.random.key(config.seed))
  logging.info(
    "strategy %s, collective %s, %d parameters",
    strategy.name,
    config.parallel.collective,
    sum(math.prod(x.shape) for x in jax.tree.leaves(strategy.param_shapes)),
  )

  writer = MetricsWriter(workdir)
  num_steps, log_every = config.train.num_steps, config.train.log_every
  progress = Progress(num_steps)
  window_start, window_steps = time.perf_counter(), 0
  for step in range(1, num_steps + 1):
    images, labels = next(batches)
    state, metrics = strategy.train_step(
      state,
      to_global(images, strategy.batch_sharding),
      to_global(labels, strategy.batch_sharding),
    )
    window_steps += 1
    if step % log_every == 0 or step == num_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(
          f"loss is {metrics['loss']} at step {step}; lower train.learning_rate "
          f"({config.train.learning_rate}) or check the data"
        )
      elapsed = time.perf_counter() - window_start
      record = {
        "step": step,
        **metrics,
        "learning_rate": float(schedule(step - 1)),
        "images_per_sec": window_steps * config.train.batch_size / elapsed,
        "step_time": elapsed / window_steps,
      }
      writer.write(record)
      progress.log(
        step,
        window_steps / elapsed,
        {k: record[k] for k in ("loss", "top1", "learning_rate", "images_per_sec")},
      )
      window_start, window_steps = time.perf_counter(), 0

  result = evaluate_arrays(
    model,
    strategy.full_params(state),
    test_x,
    test_y,
    config.train.eval_batch_size,
    strategy.batch_sharding,
  )
  final = {"split": "test", "step": num_steps, "top1": result["top1"], "top5": result["top5"]}
  writer.write(final)
  logging.info("test: top1 %.4f top5 %.4f on %d images", final["top1"], final["top5"], len(test_y))
  return final
