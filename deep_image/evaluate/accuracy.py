"""Scores and top-1 / top-5 accuracy of a model under test protocols (paper section 5).

`Evaluator(model, data_cfg, sharding, global_batch_size)` runs views of a split through the
model, batched over every device of the mesh:

  view          forward pass                            per-example score [N, classes]
  center@S      centre crop of the image resized to S   the logits
  dense@S       FC layers as convolutions over the      log of the score map's softmax
                centre S x S square                     posteriors averaged over positions
  +flip         the same on the mirrored image          (the same)

Every score is a log-posterior up to a constant, so `fuse` treats views and models alike:
the log of their averaged softmax posteriors. A single view keeps its own scores (the
logits of a centre crop), so the centre-crop protocol counts exactly what the training
loop's evaluation counts: it is the same code. Top-k counts ties against the label
(`losses.topk_correct`).

Scores live on the host, one float32 [N, classes] array per view (ImageNet's validation
split: 200 MB a view), gathered from every process, so all processes hold all of them.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from deep_image.data import pipeline
from deep_image.data.global_batch import to_global
from deep_image.evaluate.protocol import Protocol, View, views_of
from deep_image.models import losses

# How often a long pass logs its progress line.
_PROGRESS_SECONDS = 30.0


def posteriors(scores: np.ndarray) -> np.ndarray:
  """Softmax over the last axis, in float64: scores [..., classes] -> probabilities."""
  shifted = np.asarray(scores, np.float64)
  shifted = shifted - shifted.max(axis=-1, keepdims=True)
  probabilities = np.exp(shifted)
  return probabilities / probabilities.sum(axis=-1, keepdims=True)


def fuse(scores: list[np.ndarray]) -> np.ndarray:
  """Scores of several views or models -> the log of their mean softmax posterior.

  Args:
    scores: float32 [N, classes] arrays (logits or log-posteriors).
  Returns:
    float32 [N, classes]; one array is returned unchanged (its ranking, ties included).
  """
  if len(scores) == 1:
    return scores[0]
  with np.errstate(divide="ignore"):  # a posterior of 0 is a score of -inf: ranked last
    return np.log(posteriors(np.stack(scores)).mean(axis=0)).astype(np.float32)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> dict:
  """{'top1', 'top5': fractions, 'count'} of scores [N, classes] against labels int [N]."""
  if len(labels) == 0:
    raise ValueError("the evaluation split is empty")
  hits = jax.device_get(losses.topk_correct(jnp.asarray(scores), jnp.asarray(labels, jnp.int32)))
  count = int(len(labels))
  return {"top1": float(hits["top1"]) / count, "top5": float(hits["top5"]) / count, "count": count}


@dataclasses.dataclass
class Evaluation:
  """What `Evaluator.run` measured.

  results: protocol name -> {'top1', 'top5', 'count'}.
  scores: protocol name -> float32 [N, classes], example i = source record i.
  labels: int32 [N].
  """

  results: dict[str, dict]
  scores: dict[str, np.ndarray]
  labels: np.ndarray


class Evaluator:
  """Scores splits under test protocols; its compiled passes are reused across calls.

  Args:
    model: a `VGG` (or anything with `apply(variables, images, dense=...)`).
    data_cfg: `config.data` (source, eval split names, crop_size, workers).
    sharding: NamedSharding of a global [B, ...] batch over the mesh.
    global_batch_size: examples per pass step over all processes (`train.eval_batch_size`).
  """

  def __init__(self, model, data_cfg, sharding: NamedSharding, global_batch_size: int):
    self.model, self.data_cfg, self.sharding = model, data_cfg, sharding
    self.global_batch_size = int(global_batch_size)
    self._passes: dict[tuple[str, bool], object] = {}

  def _forward(self, kind: str, flip: bool):
    key = (kind, flip)
    if key not in self._passes:
      model, dense = self.model, kind == "dense"

      def forward(params, images, index, label, mask):
        if flip:
          images = images[:, :, ::-1]
        out = model.apply({"params": params}, images, dense=dense)
        if dense:  # [B, h, w, classes] -> mean posterior over the map's positions
          out = jnp.log(jax.nn.softmax(out, axis=-1).mean(axis=(1, 2)))
        return out.astype(jnp.float32), index, label, mask

      self._passes[key] = jax.jit(forward)
    return self._passes[key]

  def view_scores(self, params, view: View, *, split: str, source=None):
    """One pass of `view` over `split`: (scores float32 [N, classes], labels int32 [N])."""
    batches = pipeline.make_eval_iterator(
      self.data_cfg,
      global_batch_size=self.global_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      mode="center" if view.kind == "center" else "square",
      scale=view.scale,
      split=split,
      source=source,
    )
    forward = self._forward(view.kind, view.flip)
    rows: list[tuple[np.ndarray, ...]] = []
    pending = None
    start = last_log = time.perf_counter()
    for i, batch in enumerate(batches):
      arrays = [to_global(batch[k], self.sharding) for k in ("image", "index", "label", "mask")]
      out = forward(params, *arrays)  # dispatched: the host decodes the next batch meanwhile
      if pending is not None:
        rows.append(multihost_utils.process_allgather(pending, tiled=True))
      pending = out
      now = time.perf_counter()
      if now - last_log > _PROGRESS_SECONDS:
        last_log = now
        logging.info(
          "eval %s on %s: %d batches, %.0f images/s",
          view.name,
          split,
          i + 1,
          (i + 1) * self.global_batch_size / (now - start),
        )
    if pending is None:
      raise ValueError(f"the evaluation split {split!r} is empty")
    rows.append(multihost_utils.process_allgather(pending, tiled=True))
    scores, index, label, mask = (np.concatenate(parts) for parts in zip(*rows, strict=True))
    real = np.asarray(mask, bool)
    n = int(real.sum())
    order = np.asarray(index)[real]
    seen = np.bincount(order, minlength=n)
    if len(seen) != n or not np.all(seen == 1):
      raise AssertionError(
        f"eval pass {view.name}: {int(np.sum(seen == 0))} of {n} records missing, "
        f"{int(np.sum(seen > 1))} seen twice"
      )
    out_scores = np.empty((n, scores.shape[1]), np.float32)
    out_labels = np.empty(n, np.int32)
    out_scores[order], out_labels[order] = scores[real], label[real]
    return out_scores, out_labels

  def run(self, params, protocols: list[Protocol], *, split: str, source=None) -> Evaluation:
    """Every view the protocols need, once each, then each protocol's fusion and accuracy."""
    view_scores, labels = {}, None
    for view in views_of(protocols):
      start = time.perf_counter()
      view_scores[view], view_labels = self.view_scores(params, view, split=split, source=source)
      labels = view_labels if labels is None else labels
      logging.info(
        "eval pass %s on %s: %d images in %.1fs",
        view.name,
        split,
        len(view_labels),
        time.perf_counter() - start,
      )
    scores = {p.name: fuse([view_scores[v] for v in p.views]) for p in protocols}
    results = {name: accuracy(s, labels) for name, s in scores.items()}
    return Evaluation(results=results, scores=scores, labels=labels)
