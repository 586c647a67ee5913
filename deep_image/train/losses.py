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
  """Number of examples whose label is the top-1 / among the top-5 scores.

  logits [b, classes], labels [b], mask bool [b] (None: all count). A label is
  in the top k when fewer than k classes score strictly higher (ties count in
  the label's favour).
  """
  label_score = jnp.take_along_axis(logits, labels[:, None], axis=1)
  rank = (logits > label_score).sum(axis=1)
  valid = jnp.ones_like(labels, bool) if mask is None else mask
  return {
    "top1": ((rank < 1) & valid).sum().astype(jnp.float32),
    "top5": ((rank < 5) & valid).sum().astype(jnp.float32),
  }
