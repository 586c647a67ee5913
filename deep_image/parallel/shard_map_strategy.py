"""The data, lazy and hybrid strategies: one explicit shard_map program over the mesh.

The mesh has one axis of N devices, or two, node x local (outer first, N = Nn L):
then every all-device collective runs level by level (`collectives` "Levels":
inside nodes on the whole buffer, across nodes on 1/L of it) and hybrid splits
FC1/FC2 over `local` only, its nodes data parallel (FC shards all-reduced over
`node` in 'split' buckets).

Each parameter's layout comes from `layout_policy` (replicated, lazy, split);
gradients are synchronized in buckets (`buckets`), each layer's parameters are
fetched where it runs (`layer_feed`), split FC weights run through
`fc_block`. The step is built from named pieces (`_build_train_step`).

One concept over 400 lines: the stored layout of the state and the step that
updates it are one program (the deferred update of a bucket runs where the
forward pass fetches it), so they change together.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.models import losses
from deep_image.models.vgg import FC_LAYERS, VGG, layer_names
from deep_image.parallel import buckets, fc_block, layout_policy, layouts
from deep_image.parallel.layer_feed import LayerFeed
from deep_image.parallel.strategy_base import Strategy, apply_pending, update_where_valid
from deep_image.parallel.train_state import PendingUpdate, TrainState


class ShardMapStrategy(Strategy):
  """data / lazy / hybrid: an explicit shard_map program over one mesh axis or node x local.

  `layout_policy` gives each parameter's `layouts.Layout`. One step:

  1. (deferred) split parameters take their pending update (no communication);
  2. forward: the model, or conv + `fc_block` when FC weights are split. Each
     layer gets its parameters at its call (`LayerFeed`), where its buckets
     and those ahead (`LayerFeed.ahead`, parallel.prefetch_mb) are prepared:
     (deferred) all-gather of a replicated bucket's pending chunks and the
     update of the bucket's leaves; (lazy buckets) one all-gather of the
     stored shards;
  3. backward: each bucket's `buckets.sync_point` reduce-scatters its
     gradients as soon as backward has passed its layers; split parameters'
     gradients are complete on their devices (one axis) or all-reduced over
     the nodes in their 'split' bucket (node x local);
  4. (none) all-gather + update every bucket now (`_apply_pending_local`);
     (deferred) keep the reduced chunks as `TrainState.pending`.
  """

  def __init__(self, config, model, tx, mesh, name: str, preprocess=None):
    super().__init__(config, model, tx, mesh, preprocess)
    self.name = name
    par = config.parallel
    # The levels: the axes larger than 1, outer first; `axis` is what all-device
    # collectives, the batch and 1/N layouts run over (a tuple: level by level).
    self.axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or (mesh.axis_names[0],)
    self.axis = self.axes if len(self.axes) > 1 else self.axes[0]
    self.n = mesh.size
    # Split (tensor-parallel) leaves are split over the innermost axis; their shards
    # are data parallel over the outer one (none on a one-axis mesh).
    self.tensor_axis = self.axes[-1]
    self.node_axis = self.axes[0] if len(self.axes) > 1 else None
    self.tensor_n = mesh.shape[self.tensor_axis]
    node_algorithm = par.node_collective or par.collective
    self.algorithm = (node_algorithm, par.collective) if self.node_axis else par.collective
    self.node_algorithm = node_algorithm
    self.tensor_algorithm = par.collective
    self.grad_dtype = par.grad_dtype
    # One device has no traffic for the deferred update to hide, and deferring costs it
    # a separate pass of the step metrics over every parameter (8% of a Table 2 step on
    # one H200, BENCHMARKS.md): it runs the `none` schedule, the same SGD.
    self.deferred = par.overlap == "deferred" and self.n > 1
    self.layouts = layout_policy.param_layouts(name, par.conv, self.param_shapes)
    # Where the reduced gradient of each parameter lives between steps: 1/N per device.
    self.pending_layouts = jax.tree.map(
      lambda lo: layouts.LAZY if lo.kind == "replicated" else lo, self.layouts, is_leaf=_is_layout
    )
    self._treedef = jax.tree.structure(self.param_shapes)
    paths_shapes = jax.tree_util.tree_leaves_with_path(self.param_shapes)
    self._leaf_shapes = [x.shape for _, x in paths_shapes]
    self._leaf_layouts = jax.tree.leaves(self.layouts, is_leaf=_is_layout)
    self.buckets = layout_policy.plan_buckets(
      name,
      par.conv,
      layer_names(model.spec),
      [layout_policy.path_names(p) for p, _ in paths_shapes],
      [math.prod(shape) for shape in self._leaf_shapes],
      tuple(mesh.shape[a] for a in self.axes),
      par.bucket_mb,
    )
    self.tensor_parallel_fc = any(lo.kind == "split" for lo in self._leaf_layouts)
    self.overlapping_collectives = mesh.devices.flat[0].platform == "gpu"
    self._to_full = None

  # --- layout of the state -------------------------------------------------
  def _spec(self, layout: layouts.Layout, ndim: int) -> P:
    """PartitionSpec of a stored array: split over the tensor axis, 1/N over all levels."""
    return layouts.stored_spec(
      layout, ndim, self.tensor_axis if layout.kind == "split" else self.axis
    )

  def local_shape(self, i: int) -> tuple[int, ...]:
    """The shape of leaf i's part on one device, inside shard_map (split: its shard)."""
    shape, lo = self._leaf_shapes[i], self._leaf_layouts[i]
    if lo.kind != "split":
      return shape
    return tuple(d // self.tensor_n if k == lo.dim else d for k, d in enumerate(shape))

  def _stored_param_shapes(self):
    return jax.tree.map(
      lambda lo, x: jax.ShapeDtypeStruct(layouts.stored_shape(lo, x.shape, self.n), x.dtype),
      self.layouts,
      self.param_shapes,
      is_leaf=_is_layout,
    )

  def _stored_param_shardings(self):
    # stored_spec depends on the stored rank: a lazy leaf is 1-D.
    return jax.tree.map(
      lambda lo, x: NamedSharding(self.mesh, self._spec(lo, len(x.shape))),
      self.layouts,
      self._stored_param_shapes(),
      is_leaf=_is_layout,
    )

  def _no_pending(self) -> PendingUpdate | None:
    if not self.deferred:
      return None
    grads = jax.tree.map(
      lambda lo, x: jnp.zeros(layouts.stored_shape(lo, x.shape, self.n), x.dtype),
      self.pending_layouts,
      self.param_shapes,
      is_leaf=_is_layout,
    )
    return PendingUpdate(grads, jnp.zeros((), bool))

  def _pending_shardings(self) -> PendingUpdate | None:
    if not self.deferred:
      return None
    grads = jax.tree.map(
      lambda lo, x: NamedSharding(
        self.mesh, self._spec(lo, len(layouts.stored_shape(lo, x.shape, self.n)))
      ),
      self.pending_layouts,
      self.param_shapes,
      is_leaf=_is_layout,
    )
    return PendingUpdate(grads, self.replicated)

  def _full_param_shardings(self):
    """Model-layout parameters: split ones as stored, the rest replicated."""
    return jax.tree.map(
      lambda lo, x: NamedSharding(
        self.mesh, self._spec(lo, len(x.shape)) if lo.kind == "split" else P()
      ),
      self.layouts,
      self.param_shapes,
      is_leaf=_is_layout,
    )

  def _to_stored(self, full_params):
    return jax.tree.map(
      lambda lo, x: layouts.to_stored(x, lo, self.n), self.layouts, full_params, is_leaf=_is_layout
    )

  def _param_layouts(self):
    return self.layouts

  def _model_layout(self, state: TrainState) -> TrainState:
    """Stored layout -> the model's (traced inside jit; global arrays)."""

    def full(x, lo, shape):
      return layouts.to_full(x, lo, shape.shape)

    params = jax.tree.map(full, state.params, self.layouts, self.param_shapes, is_leaf=_is_layout)
    opt_state = optax.tree_map_params(
      self.tx, full, state.opt_state, self.layouts, self.param_shapes
    )
    pending = state.pending
    if pending is not None:
      grads = jax.tree.map(
        full,
        pending.grads,
        self.pending_layouts,
        self.param_shapes,
        is_leaf=_is_layout,
      )
      pending = PendingUpdate(grads, pending.valid)
    return TrainState(state.step, params, opt_state, pending)

  def full_params(self, state: TrainState):
    """The weights after `state.step` steps (a pending update applied), model layout."""
    if self._to_full is None:  # built once: a fresh lambda per call would recompile
      self._to_full = jax.jit(
        lambda s: apply_pending(self.tx, self._model_layout(s)).params,
        out_shardings=self._full_param_shardings(),
      )
    return self._to_full(state)

  # --- the step ------------------------------------------------------------
  def _forward(self, feed: "LayerFeed", images, dropout_key, example_ids):
    """Per-device forward on the local batch; returns logits [b, classes].

    Each layer takes its parameters from `feed` when it is called (a Flax method
    interceptor), so a bucket is prepared where its first layer runs.
    example_ids [b]: the global batch indices of the local rows (dropout masks).
    """
    model, rate = self.model, self.model.dropout_rate
    with nn.intercept_methods(feed.intercept):
      if not self.tensor_parallel_fc:
        return model.apply(
          {"params": {}}, images, train=True, dropout_key=dropout_key, example_ids=example_ids
        )
      feats = model.apply({"params": {}}, images, method=VGG.features)
    fc = {}
    for k in FC_LAYERS:
      fc[k], feats = feed.layer(k, feats)
    return fc_block.tensor_parallel_head(
      fc,
      feats,
      axis=self.tensor_axis,
      algorithm=self.tensor_algorithm,
      batch_axes=self.axis,
      dtype=model.dtype,
      dropout_rate=rate,
      dropout_key=dropout_key,
      micro_batches=layout_policy.fc_micro_batches(
        self.config.parallel.fc_micro_batches, self.overlapping_collectives, feats.shape[0]
      ),
    )

  def _apply_pending_local(self, params, opt_state, pending: PendingUpdate):
    """Inside shard_map, at the end of an overlap='none' step: one optimizer update of the
    stored parts with the step's reduced gradients.

    Replicated parameters need their whole gradient: one all-gather per bucket of
    chunks. Lazy and split parts update with their own part of the gradient.
    """
    grads = jax.tree.leaves(pending.grads)
    for bucket in self.buckets:
      if bucket.kind == "replicated":
        full = buckets.gather(
          [grads[i] for i in bucket.leaves],
          self.shapes_of(bucket),
          self.axis,
          self.algorithm,
          self.grad_dtype,
        )
        for i, g in zip(bucket.leaves, full, strict=True):
          grads[i] = g
    return update_where_valid(
      self.tx, jax.tree.unflatten(self._treedef, grads), opt_state, params, pending.valid
    )

  def _norms(self, params, opt_state, grads) -> dict:
    """grad_norm, param_norm (after the update) and update_norm of the full model.

    Computed on this device's 1/N part of everything (replicated parameters cut to
    their chunk, split shards on a node x local mesh to their chunk over the nodes):
    the update of the parts is the part of the update (elementwise optimizer), and
    the parts are disjoint, so one psum of squares gives each norm.
    """

    def part(x, lo):
      if lo.kind == "replicated":
        return buckets.chunk_of(x, self.axis)
      if lo.kind == "split" and self.node_axis:
        return buckets.chunk_of(x, self.node_axis)
      return x

    params = jax.tree.map(part, params, self.layouts)
    opt_state = optax.tree_map_params(self.tx, part, opt_state, self.layouts)
    # Pending gradients are 1/N already, but for split shards (whole on each node).
    grads = jax.tree.map(
      lambda g, lo: part(g, lo) if lo.kind == "split" else g, grads, self.layouts
    )
    updates, _ = self.tx.update(grads, opt_state, params)
    parts = (grads, optax.apply_updates(params, updates), updates)
    squares = [
      sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t)) for t in parts
    ]
    grad_norm, param_norm, update_norm = jnp.sqrt(lax.psum(jnp.stack(squares), self.axis))
    return dict(grad_norm=grad_norm, param_norm=param_norm, update_norm=update_norm)

  def _update_some(self, leaf_ids, grads, params, opt_state, valid):
    """The optimizer update of the leaves `leaf_ids` only (their gradients `grads`).

    One `tx.update` over the whole tree, the other leaves given their own values
    as gradients: XLA drops what is not used, so the program updates just these
    leaves, and each bucket's update can run where the bucket is needed.
    Returns (their new stored parts, the new optimizer state's flat leaves).
    """
    full = jax.tree.leaves(params)
    for i, g in zip(leaf_ids, grads, strict=True):
      full[i] = g
    new_params, new_opt = update_where_valid(
      self.tx, jax.tree.unflatten(self._treedef, full), opt_state, params, valid
    )
    new_leaves = jax.tree.leaves(new_params)
    return [new_leaves[i] for i in leaf_ids], jax.tree.leaves(new_opt)

  def shapes_of(self, bucket: buckets.Bucket) -> tuple:
    """The full shapes of a bucket's leaves."""
    return tuple(self._leaf_shapes[i] for i in bucket.leaves)

  def _opt_owners(self) -> list[int]:
    """For each flat optimizer-state leaf, the index of its parameter leaf (-1: none)."""
    index_tree = jax.tree.unflatten(self._treedef, list(range(len(self._leaf_shapes))))
    owners = optax.tree_map_params(
      self.tx,
      lambda _, i: i,
      jax.eval_shape(self.tx.init, self._stored_param_shapes()),
      index_tree,
      transform_non_params=lambda _: -1,
    )
    return jax.tree.leaves(owners)

  # --- the step, in pieces: each runs inside shard_map on this device's parts -----
  @property
  def _split_ids(self) -> list[int]:
    """Leaf indices of the split parameters (in no bucket: nothing to synchronize)."""
    return [i for i, lo in enumerate(self._leaf_layouts) if lo.kind == "split"]

  def _update_split(self, stored, params, opt_state, pending):
    """(deferred) The split leaves after their pending update, and the optimizer leaves.

    Their reduced gradients are complete on their devices: nothing to gather.
    Returns (split leaves, {group of the split leaves: flat optimizer leaves} or {}).
    """
    split_ids = self._split_ids
    split_leaves = [stored[i] for i in split_ids]
    if pending is None or not split_ids:
      return split_leaves, {}
    chunks = jax.tree.leaves(pending.grads)
    split_leaves, opt_flat = self._update_some(
      split_ids, [chunks[i] for i in split_ids], params, opt_state, pending.valid
    )
    return split_leaves, {len(self.buckets): opt_flat}

  def _prepare_bucket(self, k: int, after: jax.Array, params, opt_state, pending):
    """Bucket k's stored parts after the update, and the optimizer leaves; starts after `after`."""
    bucket = self.buckets[k]
    stored = jax.tree.leaves(params)
    parts = [stored[i] for i in bucket.leaves]
    chunks = None if pending is None else jax.tree.leaves(pending.grads)
    grads = None if pending is None else [chunks[i] for i in bucket.leaves]
    # Not before the activation `after` exists: the bucket is fetched one bucket
    # ahead of its use, not all at the start of the step (overlap, and memory).
    parts, grads, _ = lax.optimization_barrier((parts, grads, after))
    new_opt_k = None
    if pending is not None:
      if bucket.kind == "replicated":  # the all-gather half of the synchronization
        grads = buckets.gather(
          grads, self.shapes_of(bucket), self.axis, self.algorithm, self.grad_dtype
        )
      parts, new_opt_k = self._update_some(bucket.leaves, grads, params, opt_state, pending.valid)
    return parts, new_opt_k

  def _forward_backward(self, state: TrainState, images, labels, split_leaves):
    """Loss, gradients and the parameters the forward pass used.

    Returns (bucket slot gradients [C] each: this device's chunks of the summed
    gradients; split leaves' gradients; metric sums; leaf index -> stored part
    after the update; bucket -> flat optimizer leaves after its update).
    """
    step_key = jax.random.fold_in(self.dropout_key, state.step)
    b = images.shape[0]
    example_ids = lax.axis_index(self.axis) * b + jnp.arange(b)

    def prepare(k, after):
      return self._prepare_bucket(k, after, state.params, state.opt_state, state.pending)

    def loss_fn(slots, split_leaves):
      feed = LayerFeed(self, slots, self._split_ids, split_leaves, prepare)
      logits = self._forward(feed, images, step_key, example_ids)
      loss_sum, sums = losses.loss_and_counts(logits, labels)
      return loss_sum / self.global_batch, (sums, feed.new_parts(), feed.new_opt)

    slots = [jnp.zeros((bucket.size,), jnp.float32) for bucket in self.buckets]
    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (slot_grads, split_grads), (sums, new_parts, bucket_opt) = grad_fn(slots, split_leaves)
    return slot_grads, split_grads, sums, new_parts, bucket_opt

  def _updated_state(self, opt_state, new_parts, new_opt, split_leaves):
    """(deferred) The params and optimizer state after the update the forward pass used.

    new_parts: leaf index -> stored part (buckets'); new_opt: group (bucket index,
    or len(buckets) for the split leaves) -> the flat optimizer leaves its update gave.
    """
    for i, x in zip(self._split_ids, split_leaves, strict=True):
      new_parts[i] = x
    params = jax.tree.unflatten(
      self._treedef, [new_parts[i] for i in range(len(self._leaf_shapes))]
    )
    group_of = {i: g for g, bucket in enumerate(self.buckets) for i in bucket.leaves}
    group_of.update({i: len(self.buckets) for i in self._split_ids})
    opt_flat = [
      new_opt[group_of[owner] if owner >= 0 else next(iter(new_opt))][k]
      for k, owner in enumerate(self._opt_owners())
    ]
    return params, jax.tree.unflatten(jax.tree.structure(opt_state), opt_flat)

  def _reduced_gradients(self, slot_grads, split_grads) -> PendingUpdate:
    """The step's synchronized gradients in the pending layout (1/N of replicated ones).

    Split leaves: their shard's gradient, from the backward pass (one axis) or from
    their 'split' bucket's all-reduce over the nodes (node x local).
    """
    grads = [None] * len(self._leaf_shapes)
    for i, g in zip(self._split_ids, split_grads, strict=True):
      grads[i] = g
    for bucket, g in zip(self.buckets, slot_grads, strict=True):
      for i, part in zip(bucket.leaves, buckets.split_chunks(g, bucket.chunks), strict=True):
        grads[i] = part.reshape(self.local_shape(i)) if bucket.kind == "split" else part
    return PendingUpdate(jax.tree.unflatten(self._treedef, grads), jnp.ones((), bool))

  def _local_step(self, state: TrainState, images, labels):
    """One step on this device's batch [b, ...] and parts -> (state, metrics)."""
    params, opt_state, pending = state.params, state.opt_state, state.pending
    split_leaves, new_opt = self._update_split(jax.tree.leaves(params), params, opt_state, pending)
    slot_grads, split_grads, sums, new_parts, bucket_opt = self._forward_backward(
      state, images, labels, split_leaves
    )
    if pending is not None:
      params, opt_state = self._updated_state(
        opt_state, new_parts, {**new_opt, **bucket_opt}, split_leaves
      )
    new_pending = self._reduced_gradients(slot_grads, split_grads)
    # Metrics are a few scalars: the builtin psum is fine here.
    metrics = self._metrics(
      lax.psum(sums, self.axis), **self._norms(params, opt_state, new_pending.grads)
    )
    if self.deferred:
      return TrainState(state.step + 1, params, opt_state, new_pending), metrics
    params, opt_state = self._apply_pending_local(params, opt_state, new_pending)
    return TrainState(state.step + 1, params, opt_state), metrics

  def _build_train_step(self):
    """`_local_step` under shard_map (batch split over all levels), jitted, donating the state."""
    shardings = self.state_shardings()
    specs = jax.tree.map(lambda s: s.spec, shardings)
    batch_spec = P(self.axis)
    mapped = jax.shard_map(
      self._local_step,
      mesh=self.mesh,
      in_specs=(specs, batch_spec, batch_spec),
      out_specs=(specs, P()),
      check_vma=False,
    )

    def step(state: TrainState, images, labels, augment):
      return mapped(state, self._images_for_step(images, augment), labels)

    return jax.jit(
      step,
      in_shardings=(shardings,) + (self.batch_sharding,) * 3,
      out_shardings=(shardings, self.replicated),
      donate_argnums=0,
    )


def _is_layout(x) -> bool:
  return isinstance(x, layouts.Layout)
