"""`train_and_evaluate(config, workdir)`: the training loop every script and test calls."""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import logging

from deep_image.data import device_cache, pipeline
from deep_image.data.global_batch import to_global
from deep_image.data.sources import make_source
from deep_image.evaluate.accuracy import evaluate_batches
from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.metrics import MetricsWriter, Progress
from deep_image.train.optimizer import learning_rate_schedule, make_optimizer


def _check_data_config(config) -> None:
  crop = config.data.augment.crop_size
  if config.model.image_size != crop:
    raise ValueError(
      f"model.image_size={config.model.image_size} must equal data.augment.crop_size={crop} "
      "(the network is built for the training crop)"
    )


def _train_batches(config, strategy):
  """Global training batches: (images, labels, augment | None), all sharded on the batch.

  From the device cache when `data.cache_on_device` and the data fit (paper
  3.1), else from the Grain pipeline. Returns (iterator, description).
  """
  if config.data.get("cache_on_device", False):
    cache = device_cache.DeviceCache.build(
      make_source(config.data, "train"),
      config.data,
      strategy.batch_sharding,
      global_batch_size=config.train.batch_size,
      seed=config.seed,
    )
    if cache is not None:
      return ((images, labels, None) for images, labels in cache), "device cache"
  it = pipeline.make_train_iterator(
    config.data,
    global_batch_size=config.train.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  def to_device(batch):
    put = lambda x: to_global(x, strategy.batch_sharding)  # noqa: E731
    augment = jax.tree.map(put, batch["augment"]) if "augment" in batch else None
    return put(batch["image"]), put(batch["label"]), augment

  kind = f"grain ({config.data.num_workers} workers, augment on {config.data.augment_on})"
  return map(to_device, it), kind


def train_and_evaluate(config, workdir: str) -> dict:
  """Train `config.train.num_steps` steps, then evaluate on `data.eval_split`.

  Writes DIR/metrics.jsonl: one record per logged step (step, loss, top1, top5,
  learning_rate, images_per_sec, step_time) and a final record (split, top1,
  top5, step). Returns the final record. Raises FloatingPointError at the
  first logged non-finite loss.
  """
  mesh_lib.maybe_initialize_distributed(config.parallel)
  strategies.validate_parallel_config(config, jax.device_count())
  mesh = mesh_lib.make_mesh(config.parallel)
  logging.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())

  _check_data_config(config)
  model = make_model(config.model)
  strategy = strategies.make_strategy(config, model, make_optimizer(config.train), mesh)
  schedule = learning_rate_schedule(config.train)
  state = strategy.init(jax.random.key(config.seed))
  batches, input_kind = _train_batches(config, strategy)
  logging.info("training input: %s", input_kind)
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
    state, metrics = strategy.train_step(state, *next(batches))
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

  split = config.data.get("eval_split", "validation")
  eval_batches = pipeline.make_eval_iterator(
    config.data,
    global_batch_size=config.train.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    split=split,
  )
  result = evaluate_batches(
    model, strategy.full_params(state), eval_batches, strategy.batch_sharding
  )
  final = {"split": split, "step": num_steps, "top1": result["top1"], "top5": result["top5"]}
  writer.write(final)
  logging.info(
    "%s: top1 %.4f top5 %.4f on %d images", split, final["top1"], final["top5"], result["count"]
  )
  return final
