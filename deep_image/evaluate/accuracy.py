"""Scores and top-1 / top-5 accuracy of a model under test protocols (paper section 5).

`Evaluator(model, data_cfg, sharding, global_batch_size)` runs views of a split through the
model, batched over every device of the mesh:

  view            forward pass                            per-example score [N, classes]
  center@S        centre crop of the image resized to S   the logits
  dense@S         FC layers as convolutions over the      log of the score map's softmax
                  whole image resized to S (any aspect)   posteriors averaged over all its
                                                          positions
  dense_square@S  the same over its centre S x S square   (the same)
  +flip           the same on the mirrored image          (the same)

Every score is a log-posterior up to a constant, so `fuse` treats views and models alike:
the log of their averaged softmax posteriors. A single view keeps its own scores (the
logits of a centre crop), so the centre-crop protocol counts exactly what the training
loop's evaluation counts: it is the same code. Top-k counts ties against the label
(`losses.topk_correct`).

Whole images (dense views, after OverFeat) have many shapes, and a compiled program takes
one. Batches are grouped by shape: the pipeline resizes each image to shorter side S and
cuts the longer side, centred, to S plus a multiple of the model's stride g = 2^pools
(`pipeline.whole_image_shape`: fewer than g pixels, and with S a multiple of g no score-map
position, since a side of L pixels has floor(L / g) - k + 1 positions either way); a header
read of every record (`pipeline.record_shapes`, each process its share, gathered, once per
split and source) fixes the plan (`pipeline.whole_image_plan`): each shape's records fill
whole global batches, the last padded with repeats (mask False), on every process alike.
Every position of every map is real image, so the mean over all positions is the mean of
the image's own map (batch rows never interact), and padding rows are dropped as for the
centre crop. The alternative, padding each batch to its largest shape with a mask over the
score-map positions the padding produced, costs:

  per dense view, S=256, g=32 (VGG-16)   grouped by shape (this)    padded + position mask
  programs compiled                      one per snapped shape:     one per rounded batch
                                         2 for 4:3 + 3:4 photos,    shape (h, w): up to the
                                         <= 1 + 2 (A-1) S / g for   square of the grouped
                                         aspects up to A (17 at     count
                                         A=2, 33 at A=3; 65 at S=512)
  pixels computed per real pixel         1 (+ <= B-1 padding rows   1.25 (4:3 with 3:4 in
                                         per shape and pass)        a batch), 1.5 (3:2 with
                                                                    2:3), 1.75 (16:9 / 9:16)
  scores vs the image alone              identical                  positions whose receptive
                                                                    field (VGG-16's FC1: 404
                                                                    px, 90 beyond its 224 px
                                                                    window) reaches padding
                                                                    see it through SAME
                                                                    convolutions: counted,
                                                                    they are not the image's
                                                                    own scores; dropped,
                                                                    real positions are lost
                                                                    (exact only with masks
                                                                    inside every conv layer)
  extra host work                        one header read a record   the same (the batch's
                                         (no decode), cached        largest shape must be
                                                                    agreed on by processes)

A split therefore compiles one program per distinct shape of `WholeImagePlan.shapes` for
each dense view (scale, flip: a flipped view is its own program), 1 for square images
(where dense and dense_square are the same view), and one per centre or dense_square view.
jit keeps them: the same view again (another protocol, other parameters) compiles nothing.

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
from deep_image.data.sources import make_source
from deep_image.evaluate.protocol import Protocol, View, views_of
from deep_image.models import losses

# How often a long pass logs its progress line.
_PROGRESS_SECONDS = 30.0
# The eval iterator's mode for each view kind (`protocol.KINDS`).
_MODES = {"center": "center", "dense": "whole", "dense_square": "square"}


def model_grid(model) -> int:
  """The model's stride in pixels (2^pools) from its `spec`; ValueError without one."""
  spec = getattr(model, "spec", None)
  if spec is None:
    raise ValueError(
      f"{type(model).__name__} has no VGGSpec: pass Evaluator(grid=...), its stride in pixels"
    )
  return spec.image_size // spec.feature_map_size


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
    grid: the model's stride in pixels, to which whole images are snapped; None: from
      `model.spec` (`model_grid`), read at the first dense view.
  """

  def __init__(
    self,
    model,
    data_cfg,
    sharding: NamedSharding,
    global_batch_size: int,
    grid: int | None = None,
  ):
    self.model, self.data_cfg, self.sharding = model, data_cfg, sharding
    self.global_batch_size = int(global_batch_size)
    self.grid = grid
    self._passes: dict[tuple[bool, bool], object] = {}
    self._source_shapes: dict[tuple[str, str], np.ndarray] = {}

  def source_shape(self, split: str, src) -> np.ndarray:
    """int32 [N, 2] (H, W) of every record of `src`: each process reads its share, gathered.

    Cached per (split, repr(src)): the views of a protocol grid read the headers once.
    """
    key = (split, repr(src))
    if key not in self._source_shapes:
      p, count, n = jax.process_index(), jax.process_count(), len(src)
      local = pipeline.record_shapes(
        self.data_cfg, source=src, process_index=p, process_count=count
      )
      if count == 1:
        shapes = local
      else:  # shares [p::count] differ in length by one: pad to one shape to gather
        rows = -(-n // count)
        padded = np.full((rows, 2), -1, np.int32)
        padded[: len(local)] = local
        gathered = np.asarray(multihost_utils.process_allgather(padded))  # [count, rows, 2]
        shapes = np.empty((n, 2), np.int32)
        for q in range(count):
          shapes[q::count] = gathered[q, : len(range(q, n, count))]
      self._source_shapes[key] = shapes
    return self._source_shapes[key]

  def _forward(self, dense: bool, flip: bool):
    # One jitted function per (dense, flip): jit compiles it once per input shape.
    key = (dense, flip)
    if key not in self._passes:
      model = self.model

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
    mode = _MODES[view.kind]
    whole = {}
    if mode == "whole":
      source = make_source(self.data_cfg, split) if source is None else source
      grid = model_grid(self.model) if self.grid is None else int(self.grid)
      whole = {"grid": grid, "source_shape": self.source_shape(split, source)}
    batches = pipeline.make_eval_iterator(
      self.data_cfg,
      global_batch_size=self.global_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      mode=mode,
      scale=view.scale,
      split=split,
      source=source,
      **whole,
    )
    forward = self._forward(view.kind != "center", view.flip)
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
