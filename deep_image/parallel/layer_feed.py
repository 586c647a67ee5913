"""Parameter fetching during the forward pass of the shard_map strategies.

`LayerFeed` hands each layer its parameters when the layer is called (a Flax
method interceptor): there its gradient buckets are prepared (the deferred
update, the lazy all-gather) and pass through their `buckets.sync_point`, so
backward reduce-scatters each bucket as soon as its layers are done.
"""

from __future__ import annotations

import jax

from deep_image.parallel import buckets, layout_policy


class LayerFeed:
  """Inside the differentiated forward pass: each layer's parameters at its first use.

  When a layer whose last bucket is k is called with input x, its buckets and
  the buckets ahead of it (`ahead(k)`: k + 1, and more with parallel.prefetch_mb)
  are prepared (`prepare(k, x)`: the update) and passed through their
  `buckets.sync_point` (lazy buckets: the all-gather), so backward
  reduce-scatters each bucket's gradients there. So the work for bucket k + 1
  can overlap bucket k's layers, and no bucket is gathered before the forward
  pass is that close to it. A 'split' bucket (node x local hybrid) is its split
  leaves as they are, through a sync point that all-reduces their gradients over
  the nodes.
  """

  def __init__(self, strategy, slots, split_ids, split_leaves, prepare):
    """strategy: the `ShardMapStrategy` (its buckets, axis, algorithm, param_shapes)."""
    self._s, self._slots, self._prepare = strategy, slots, prepare
    self._usable = dict(zip(split_ids, split_leaves, strict=True))
    self._parts: dict[int, jax.Array] = {}
    self.new_opt: dict[int, list] = {}
    self._done: set[int] = set()
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
    """The buckets prepared at bucket k's layers: k + 1, and each later bucket j while the
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

  def _ensure(self, k: int, after: jax.Array) -> jax.Array:
    """Prepare bucket k (once), not before `after`; returns `after` through its sync point."""
    if k >= len(self._s.buckets) or k in self._done:
      return after
    self._done.add(k)
    s, bucket = self._s, self._s.buckets[k]
    if bucket.kind == "split":  # updated already (`_update_split`): no fetch, a sync only
      values = tuple(self._usable[i] for i in bucket.leaves)
      usable, after = buckets.sync_point(
        self._slots[k], values, after, s.node_axis, s.node_algorithm, None, s.grad_dtype, True
      )
      self._usable.update(zip(bucket.leaves, usable, strict=True))
      return after
    parts, new_opt = self._prepare(k, after)
    lazy = bucket.kind == "lazy"
    gather_to = s.shapes_of(bucket) if lazy else None
    usable, after = buckets.sync_point(
      self._slots[k], tuple(parts), after, s.axis, s.algorithm, gather_to, s.grad_dtype
    )
    self._usable.update(zip(bucket.leaves, usable, strict=True))
    self._parts.update(zip(bucket.leaves, parts, strict=True))
    if new_opt is not None:
      self.new_opt[k] = new_opt
    return after

  def layer(self, name: str, x: jax.Array) -> tuple[dict, jax.Array]:
    """(the parameters {'kernel', 'bias'} layer `name` computes with, its input x).

    Use the returned x: it carries the sync points' backward ordering.
    """
    ks = self._buckets_of_layer.get(name, [])
    if ks:
      ks = [*ks, *self.ahead(max(ks))]  # this layer's buckets and those ahead
      if not self._done:
        # The model's input: no gradient is needed there, and threading it through
        # the sync points would make backward compute one (a wasted convolution).
        for k in ks:
          self._ensure(k, x)
      else:
        for k in ks:
          x = self._ensure(k, x)
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
    missing = [b for b in range(len(self._s.buckets)) if b not in self._done]
    if missing:
      raise AssertionError(f"buckets {missing} were never used by the forward pass")
    return dict(self._parts)
