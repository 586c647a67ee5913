"""SGD with momentum, weight decay, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to `train.learning_rate` over `train.warmup_steps`, then cosine to 0.

  The peak rate scales linearly with the global batch (Goyal et al. 2017) when
  `train.lr_batch_reference` > 0: lr = learning_rate * batch_size / reference.
  """
  peak = train_cfg.learning_rate
  if train_cfg.get("lr_batch_reference", 0):
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


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """optax SGD with momentum `train.momentum` (0.9) and L2 weight decay on kernels.

  Every transformation is elementwise, so updating a 1/N shard of a
  parameter (the lazy strategy) gives exactly the shard of the full update.
  """
  return optax.chain(
    optax.add_decayed_weights(train_cfg.weight_decay, mask=_decay_mask),
    optax.sgd(learning_rate_schedule(train_cfg), momentum=train_cfg.momentum),
  )
