"""Top-1 / top-5 accuracy of a model over a stream of padded eval batches."""

from __future__ import annotations

from typing import Iterable

import jax
from jax.sharding import NamedSharding

from deep_image.data.global_batch import to_global
from deep_image.models import losses


def evaluate_batches(model, params, batches: Iterable[dict], sharding: NamedSharding) -> dict:
  """Accuracy over every real example of `batches`.

  Args:
    model: a `VGG`; params: its parameter tree (any sharding).
    batches: host-local dicts {'image': uint8 [b, c, c, 3], 'label': int32 [b],
      'mask': bool [b]} (`pipeline.make_eval_iterator`); masked-out rows are
      padding and are not counted.
    sharding: NamedSharding of a global [B, ...] batch.
  Returns:
    {'top1', 'top5'}: fractions of the real examples, and 'count': their number.
  """

  @jax.jit
  def correct(params, images, labels, mask):
    hits = losses.topk_correct(model.apply({"params": params}, images), labels, mask)
    return hits, mask.sum()

  totals = {"top1": 0.0, "top5": 0.0, "count": 0}
  for batch in batches:
    hits, count = correct(
      params, *(to_global(batch[k], sharding) for k in ("image", "label", "mask"))
    )
    for k in ("top1", "top5"):
      totals[k] += float(hits[k])
    totals["count"] += int(count)
  if totals["count"] == 0:
    raise ValueError("the evaluation split is empty")
  return {
    "top1": totals["top1"] / totals["count"],
    "top5": totals["top5"] / totals["count"],
    "count": totals["count"],
  }
