"""Softmax cross-entropy and top-k counts, as sums so that shards add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def loss_and_counts(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """Summed loss and correct counts over a (local) batch.

  Args:
    logits: [b, classes] float32.
    labels: [b] int32.
  Returns:
    (sum of softmax cross-entropy over the b examples, {'loss', 'top1', 'top5'}
    sums), all float32 scalars. Callers divide by the *global* batch size, so
    the sums of N devices give the same numbers as one device.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  counts = topk_correct(logits, labels)
  return ce.sum(), {"loss": ce.sum(), **counts}


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict:
  """Number of examples whose label is the top-1 / among the top-5 scores; ties count against.

  The label's rank is the number of OTHER classes scoring >= the label's score, and the label
  is correct at k when rank < k. So a class tied with the label takes the place ahead of it:
  a two-way tie for first is not a top-1 hit, a tie for fifth place is not a top-5 hit. This
  is the pessimistic reading; counting ties in the label's favour inflated top-5 by ~0.4
  points on bfloat16 logits of 1000 classes, where ties are common. A NaN score (the label's
  or another class's) also counts against the label.

  Args:
    logits: [b, classes] float (any sharding of b).
    labels: int32 [b], in [0, classes).
    mask: bool [b], True for examples to count (False: padding); None counts all.
  Returns:
    {'top1', 'top5'}: float32 scalar counts over the b examples.
  """
  label_score = jnp.take_along_axis(logits, labels[:, None], axis=1)
  others = jnp.arange(logits.shape[1])[None, :] != labels[:, None]
  # `~(x < label)` rather than `x >= label`: an unordered (NaN) comparison beats the label.
  rank = (~(logits < label_score) & others).sum(axis=1)
  valid = jnp.ones_like(labels, bool) if mask is None else mask
  return {
    "top1": ((rank < 1) & valid).sum().astype(jnp.float32),
    "top5": ((rank < 5) & valid).sum().astype(jnp.float32),
  }
