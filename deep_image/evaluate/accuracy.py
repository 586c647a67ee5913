"""Top-1 / top-5 accuracy of a model over an in-memory split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from deep_image.data.global_batch import to_global
from deep_image.train import losses


def evaluate_arrays(
  model,
  params,
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  sharding: NamedSharding,
) -> dict:
  """Accuracy over every example (the last batch is padded, padding not counted).

  Args:
    model: a `VGG`; params: its parameter tree (any sharding).
    images: [N, H, W, C] uint8 or float32 at the training crop; labels [N] int32.
    batch_size: global eval batch; must divide over the devices of `sharding`.
    sharding: NamedSharding of a [B, ...] batch.
  Returns:
    {'top1', 'top5', 'count'}: fractions of N and N.
  """
  apply = jax.jit(model.apply)
  totals = {"top1": 0.0, "top5": 0.0}
  n = len(labels)
  for start in range(0, n, batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    real = len(y)
    if real < batch_size:  # pad to the compiled shape; the padding is cut before counting
      x = np.concatenate([x, np.zeros((batch_size - real,) + x.shape[1:], x.dtype)])
    logits = apply({"params": params}, to_global(x, sharding))
    c = losses.topk_correct(logits[:real], jnp.asarray(y))
    for k in totals:
      totals[k] += float(c[k])
  return {"top1": totals["top1"] / n, "top5": totals["top5"] / n, "count": n}
