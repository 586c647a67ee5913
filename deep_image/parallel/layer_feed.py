"""Parameter fetching during the forward pass of the shard_map strategies.

`LayerFeed` hands each layer its parameters when the layer is called (a Flax
method interceptor). Two things happen for each gradient bucket, at two places:

==========  ===========================================  ==========================
step        what                                         where (bucket k's layers)
==========  ===========================================  ==========================
fetch       the deferred update (`prepare`: all-gather   at the layers of bucket
            of the pending gradient chunks + the         j < k with `ahead(j)` ∋ k:
            update); lazy buckets: the all-gather of     parallel.prefetch_mb ahead
            the stored shards
sync point  `buckets.sync_point`: identity forward;      at the layers of bucket
            backward reduce-scatters the bucket's        k - 1: one bucket ahead
            gradients before the gradient of that
            layer's input
==========  ===========================================  ==========================

So a large bucket's forward transfer can start several buckets early (it has their
compute to hide behind), while its backward reduce-scatter stays pinned one bucket
from its layers: it overlaps the next bucket's backward instead of drifting to the
end of the backward pass.
"""

from __future__ import annotations

import jax

from deep_image.parallel import buckets, layout_policy


class LayerFeed:
  """Inside the differentiated forward pass: each layer's parameters at its first use.

  When a layer whose last bucket is k is called with input x, its buckets and
  those `ahead(k)` are fetched, not before x exists (`prepare(k, x)`: the update;
  lazy buckets: the all-gather), and its buckets and bucket k + 1 pass through
  their `buckets.sync_point` with x, so backward reduce-scatters each bucket's
  gradients before x's gradient. A 'split' bucket (node x local hybrid) is its
  split leaves as they are, through a sync point that all-reduces their gradients
  over the nodes.
  """

  def __init__(self, strategy, slots, split_ids, split_leaves, prepare):
    """strategy: the `ShardMapStrategy` (its buckets, axis, algorithm, param_shapes)."""
    self._s, self._slots, self._prepare = strategy, slots, prepare
    self._usable = dict(zip(split_ids, split_leaves, strict=True))
    self._parts: dict[int, jax.Array] = {}
    self.new_opt: dict[int, list] = {}
    self._fetched: dict[int, tuple] = {}  # bucket -> its leaves, fetched
    self._synced: set[int] = set()
    self._buckets_of_layer: dict[str, list[int]] = {}
    for k, bucket in enumerate(strategy.buckets):
      for layer in bucket.layers:
        self._buckets_of_layer.setdefault(layer, []).append(k)
    self._leaves_of_layer: dict[str, list[tuple[int, str]]] = {}
    for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(strategy.param_shapes)):
      names = layout_policy.path_names(path)
      self._leaves_of_layer.setdefault(names[0], []).append((i, names[-1]))
    self._busy = False
    self._prefetch_bytes = strategy.config.parallel.prefetch_mb * 2**20

  def ahead(self, k: int) -> list[int]:
    """The buckets fetched at bucket k's layers: k + 1, and each later bucket j while the
    buckets between (k+1 .. j-1) hold less than parallel.prefetch_mb MiB of parameters.

    Far enough ahead that a large bucket's transfer (FC1's 616 MB under data) has the
    compute of several buckets to hide behind, not one; 0 MiB: one bucket ahead.
    """
    out, between = [], 0.0
    for j in range(k + 1, len(self._s.buckets)):
      if out and between >= self._prefetch_bytes:
        break
      out.append(j)
      between += self._s.buckets[j].elements * 4
    return out

  def _fetch(self, k: int, after: jax.Array) -> None:
    """Fetch bucket k (once), not before `after`: its deferred update; lazy: the gather."""
    if k >= len(self._s.buckets) or k in self._fetched:
      return
    s, bucket = self._s, self._s.buckets[k]
    if bucket.kind == "split":  # updated already (`_update_split`): nothing to fetch
      self._fetched[k] = tuple(self._usable[i] for i in bucket.leaves)
      return
    parts, new_opt = self._prepare(k, after)
    values = tuple(parts)
    if bucket.kind == "lazy":  # forward only: the stored shards are not differentiated
      values = tuple(buckets.gather(list(parts), s.shapes_of(bucket), s.axis, s.algorithm))
    self._fetched[k] = values
    self._parts.update(zip(bucket.leaves, parts, strict=True))
    if new_opt is not None:
      self.new_opt[k] = new_opt

  def _sync(self, k: int, after: jax.Array) -> jax.Array:
    """Bucket k (fetched) through its sync point (once); returns `after` through it."""
    if k >= len(self._s.buckets) or k in self._synced:
      return after
    self._synced.add(k)
    s, bucket = self._s, self._s.buckets[k]
    split = bucket.kind == "split"  # an all-reduce over the nodes; else over all devices
    usable, after = buckets.sync_point(
      self._slots[k],
      self._fetched[k],
      after,
      s.node_axis if split else s.axis,
      s.node_algorithm if split else s.algorithm,
      s.grad_dtype,
      split,
    )
    self._usable.update(zip(bucket.leaves, usable, strict=True))
    return after

  def layer(self, name: str, x: jax.Array) -> tuple[dict, jax.Array]:
    """(the parameters {'kernel', 'bias'} layer `name` computes with, its input x).

    Use the returned x: it carries the sync points' backward ordering.
    """
    ks = self._buckets_of_layer.get(name, [])
    if ks:
      last = max(ks)
      for k in [*ks, *self.ahead(last)]:
        self._fetch(k, x)
      synced = [*ks, last + 1]  # this layer's buckets and the next one
      if not self._synced:
        # The model's input: no gradient is needed there, and threading it through
        # the sync points would make backward compute one (a wasted convolution).
        for k in synced:
          self._sync(k, x)
      else:
        for k in synced:
          x = self._sync(k, x)
    return {key: self._usable[i] for i, key in self._leaves_of_layer[name]}, x

  def intercept(self, next_fun, args, kwargs, context):
    """Flax method interceptor: a parameterised layer runs with `layer(...)`'s parameters."""
    name = context.module.name
    if self._busy or context.method_name != "__call__" or name not in self._leaves_of_layer:
      return next_fun(*args, **kwargs)
    params, x = self.layer(name, args[0])
    self._busy = True  # the layer's own __call__ below is not intercepted again
    try:
      return context.module.clone(parent=None).apply({"params": params}, x, *args[1:], **kwargs)
    finally:
      self._busy = False

  def new_parts(self) -> dict[int, jax.Array]:
    """Leaf index -> its stored part as the forward pass used it (after the update)."""
    missing = [b for b in range(len(self._s.buckets)) if b not in self._synced]
    if missing:
      raise AssertionError(f"buckets {missing} were never used by the forward pass")
    return dict(self._parts)
