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
  bucket k + 1 are prepared (`prepare(k, x)`: the update) and passed through
  their `buckets.sync_point` (lazy buckets: the all-gather), so backward
  reduce-scatters each bucket's gradients there. So the work for bucket k + 1
  can overlap bucket k's layers, and no bucket is gathered before the forward
  pass is one bucket away from it.
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

  def _ensure(self, k: int, after: jax.Array) -> jax.Array:
    """Prepare bucket k (once), not before `after`; returns `after` through its sync point."""
    if k >= len(self._s.buckets) or k in self._done:
      return after
    self._done.add(k)
    bucket = self._s.buckets[k]
    parts, new_opt = self._prepare(k, after)
    lazy = bucket.kind == "lazy"
    gather_to = self._s.shapes_of(bucket) if lazy else None
    usable, after = buckets.sync_point(
      self._slots[k], tuple(parts), after, self._s.axis, self._s.algorithm, gather_to
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
      ks = [*ks, max(ks) + 1]  # this layer's buckets and the next one
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
