"""SGD with momentum, weight decay, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import jax
import optax

from deep_image.config_error import ConfigError


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to the peak rate, then cosine decay to 0.

  With peak p, W = min(train.warmup_steps, train.num_steps) and T = max(train.num_steps,
  W + 1), the rate of (0-based) step t is

    lr(t) = p * t / W                                    for t < W,
    lr(t) = p * (1 + cos(pi * (t - W) / (T - W))) / 2    for t >= W,

  so warmup_steps = 0 trains at the peak from the first step. The peak scales linearly with
  the global batch (Goyal et al. 2017) when `train.lr_batch_reference` > 0:
  p = learning_rate * batch_size / lr_batch_reference; with 0, p = learning_rate.

  Raises:
    ConfigError naming the field when learning_rate is not positive (a negative rate
    climbs the loss until it is no longer finite; 0 trains nothing) or warmup_steps or
    lr_batch_reference is negative.
  """
  if not train_cfg.learning_rate > 0:  # also NaN
    raise ConfigError(f"train.learning_rate={train_cfg.learning_rate} must be > 0")
  if train_cfg.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps={train_cfg.warmup_steps} must be >= 0")
  if train_cfg.lr_batch_reference < 0:
    raise ConfigError(
      f"train.lr_batch_reference={train_cfg.lr_batch_reference} must be >= 0 (0: no scaling)"
    )
  peak = train_cfg.learning_rate
  if train_cfg.lr_batch_reference:
    peak = peak * train_cfg.batch_size / train_cfg.lr_batch_reference
  warmup = min(train_cfg.warmup_steps, train_cfg.num_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(train_cfg.num_steps, warmup + 1),
    end_value=0.0,
  )


def _decay_mask(params):
  """Weight decay on kernels only; biases are not decayed."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], "key", None) == "kernel", params
  )


def make_optimizer(
  train_cfg, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
  """optax SGD with momentum `train.momentum` and L2 weight decay on kernels.

  One update is trace <- momentum * trace + grad + weight_decay * kernel (biases: no decay
  term), param <- param - lr(step) * trace. The state is the momentum trace (a tree like the
  parameters, in their stored layout and sharding) and the step count of the schedule.

  Every transformation is elementwise, so updating a 1/N shard of a
  parameter (the lazy strategy) gives exactly the shard of the full update.
  """
  return optax.chain(
    optax.add_decayed_weights(train_cfg.weight_decay, mask=_decay_mask),
    optax.sgd(schedule or learning_rate_schedule(train_cfg), momentum=train_cfg.momentum),
  )
