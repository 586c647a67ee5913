"""Four ways to run one training step on a mesh; `config.parallel.strategy` picks one.

======== ========================================== ==============================
strategy params and optimizer state                gradient synchronization
======== ========================================== ==============================
gspmd    Flax partition specs (FC1/FC2 split on     XLA's own (jax.jit + GSPMD)
         'model', the rest replicated)
data     replicated                                 per bucket: reduce-scatter in
                                                    backward, all-gather + update
                                                    before the bucket's next use
lazy     1/N of every kernel per device (biases     per bucket: all-gather before
         replicated: 0.01% of the weights)          use, reduce-scatter in
                                                    backward, local-shard update
hybrid   conv as data or lazy (parallel.conv);      conv buckets as data / lazy;
         FC1/FC2 split across all devices           FC activations gathered /
                                                    scattered (fc_block.py)
======== ========================================== ==============================

The shard_map strategies synchronize gradients in buckets of consecutive
layers (`deep_image.parallel.buckets`, `parallel.bucket_mb`): each bucket's
reduce-scatter is issued inside the backward pass as soon as its layers are
done. `parallel.overlap` then says when the rest of the synchronization runs:

=========  ====================================================================
overlap    after backward                       at the start of the next step
=========  ====================================================================
none       all-gather (data) + update, all      -
           buckets
deferred   -                                    per bucket, just before its
                                                first layer: all-gather (data)
                                                + update, then the lazy gather
=========  ====================================================================

With `deferred` the state carries the reduced gradient chunks
(`TrainState.pending`, 1/N of the parameters per device), so the all-gathers
of one step overlap the forward pass of the next. Both give the same SGD step
for step (tests/test_equivalence.py); `full_params` and checkpoints restored
into another layout apply the pending update.

All four compute the same function: a step on N devices with global batch B
equals a step on one device with batch B (tests/test_equivalence.py). Every
device's loss is its *sum* over its b = B/N examples divided by B, so the
gradients of the N device losses add up to the gradient of the global mean.

The shard_map strategies run over a mesh with one axis; collectives come from
`deep_image.parallel.collectives` with `config.parallel.collective` as the
algorithm.

Dropout masks are a function of (config.seed, step, layer, global example
index) only (`vgg.dropout_keep_mask`), so the equality holds with dropout too,
and a resumed run draws the same masks on another device count.
"""

from __future__ import annotations

import abc
import copy
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.config_error import ConfigError
from deep_image.models import losses
from deep_image.models.vgg import MODELS, VGG, conv_layer_names
from deep_image.parallel import buckets, collectives, cost_model, fc_block, layouts
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.train_state import PendingUpdate, TrainState

STRATEGIES = ("gspmd", "data", "lazy", "hybrid")
# parallel.strategy='auto': make_strategy builds the one of STRATEGIES that
# `cost_model.choose_strategy` predicts fastest for the model, batch and mesh.
AUTO = "auto"
STRATEGY_CHOICES = (*STRATEGIES, AUTO)
CONV_MODES = ("data", "lazy")
OVERLAPS = ("none", "deferred")


def validate_parallel_config(config, num_devices: int) -> None:
  """Raise ValueError naming the config field for a setup that cannot run.

  Runs before anything is compiled: unknown strategy / algorithm / conv mode,
  a mesh larger than the devices, a batch that does not divide over them, FC
  widths that do not split over them. For 'auto' the checks every strategy
  shares; `make_strategy` then picks among the strategies that pass in full.
  """
  par = config.parallel
  if par.strategy not in STRATEGY_CHOICES:
    raise ConfigError(
      f"parallel.strategy={par.strategy!r} is not a known strategy; choose from {STRATEGY_CHOICES}"
    )
  collectives.resolve_algorithm(par.collective, 2)
  if par.strategy in ("hybrid", AUTO) and par.conv not in CONV_MODES:
    raise ConfigError(f"parallel.conv={par.conv!r} must be one of {CONV_MODES}")
  if par.overlap not in OVERLAPS:
    raise ConfigError(f"parallel.overlap={par.overlap!r} must be one of {OVERLAPS}")
  if not (isinstance(par.fc_micro_batches, int) and par.fc_micro_batches >= 0):
    raise ConfigError(
      f"parallel.fc_micro_batches={par.fc_micro_batches!r} must be an int >= 0 (0: auto)"
    )
  if not par.bucket_mb >= 0:
    raise ConfigError(f"parallel.bucket_mb={par.bucket_mb!r} must be >= 0 (0: a bucket per layer)")
  names, sizes = mesh_lib.resolve_mesh_shape(par.mesh, num_devices)
  n = math.prod(sizes)
  if par.strategy not in ("gspmd", AUTO) and sum(s > 1 for s in sizes) > 1:
    raise ConfigError(
      f"parallel.strategy={par.strategy!r} runs over one mesh axis, but parallel.mesh="
      f"{tuple(par.mesh)} has several axes larger than 1"
    )
  batch = config.train.batch_size
  if batch <= 0 or batch % n:
    raise ConfigError(
      f"train.batch_size={batch} does not divide over the {n} devices of parallel.mesh="
      f"{dict(zip(names, sizes, strict=True))}"
    )
  split_over = _fc_split_devices(par, dict(zip(names, sizes, strict=True)))
  h1 = MODELS[config.model.name]["fc"][0] if config.model.name in MODELS else None
  if h1 is not None and split_over > 1 and h1 % split_over:
    raise ConfigError(
      f"parallel.strategy={par.strategy!r} splits FC1's {h1} outputs over {split_over} "
      f"devices; model.name={config.model.name!r} needs a device count that divides {h1} "
      f"(or, for gspmd, parallel.shard_fc=False)"
    )


def _fc_split_devices(par, axis_sizes: dict[str, int]) -> int:
  """Over how many devices the FC1/FC2 weights are split (1: not split)."""
  if par.strategy == "hybrid":
    return math.prod(axis_sizes.values())
  if par.strategy != "gspmd" or not par.shard_fc:
    return 1
  model_axes = par.model_axes or tuple(axis_sizes)
  model_axes = (model_axes,) if isinstance(model_axes, str) else model_axes
  return math.prod(axis_sizes[a] for a in model_axes)


def _batch_axis(mesh: Mesh) -> tuple[str, ...]:
  return tuple(mesh.axis_names)


# preprocess(images, augment) -> images: runs inside the jitted step on the
# batch-sharded arrays, e.g. the data pipeline's crop + augmentation on device.
Preprocess = Callable[[jax.Array, dict], jax.Array]


class Strategy(abc.ABC):
  """Common interface.

  Attributes:
    mesh: the device mesh.
    batch_sharding: NamedSharding of a global [B, ...] batch (split over all
      devices along B).
  Methods:
    init(rng) -> TrainState in this strategy's layout.
    train_step(state, images [B, c, c, C] uint8 or float32, labels [B] int32,
      augment=None) -> (state, metrics): jitted, donates `state`; all batch
      arrays sharded like `batch_sharding`. With `augment` (the sampled
      parameters of `data.augment_on='device'`), images are [B, S, S, C] and
      `preprocess(images, augment)` crops + augments them inside the step.
      metrics: float32 scalars 'loss' (mean over B), 'top1', 'top5'
      (fractions of B), and the global L2 norms 'grad_norm' (the synchronized
      gradient of the mean loss), 'param_norm' (after the update),
      'update_norm' (the applied update): the same numbers for every strategy
      and device count.
    full_params(state) -> the parameter tree in the model's own layout
      (global arrays), e.g. for evaluation, checkpoints and tests.
  """

  name: str

  def __init__(
    self,
    config,
    model: VGG,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    preprocess: Preprocess | None = None,
  ):
    self.config = config
    self.preprocess = preprocess
    self.model = model
    self.tx = tx
    self.mesh = mesh
    self.batch_sharding = NamedSharding(mesh, P(_batch_axis(mesh)))
    self.replicated = NamedSharding(mesh, P())
    self.global_batch = config.train.batch_size
    self.dropout_key = jax.random.key(config.seed + 1)
    sample = jnp.zeros((1,) + self.input_shape)
    self._boxed_shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
    self.param_shapes = nn.unbox(self._boxed_shapes)
    self.logical_shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(self._boxed_shapes), mesh, mesh_lib.logical_rules(config.parallel, mesh)
    )
    self._train_step = None
    self._model_state = None

  def init(self, rng: jax.Array) -> TrainState:
    """A fresh state in this strategy's layout.

    The weights are drawn by one replicated program, the same on any mesh, so
    every strategy and device count starts from the same weights for the same
    seed; one more jitted function lays them out and creates the optimizer
    state. Non-partitionable threefry: its init compiles ~4x faster on CPU,
    and replication makes partitionability moot.
    """
    with jax.threefry_partitionable(False):
      full = _full_params_init(self.model, self.input_shape, self.replicated)(rng)

    def initial_state(full_params):
      stored = self._to_stored(full_params)
      return TrainState(jnp.zeros((), jnp.int32), stored, self.tx.init(stored), self._no_pending())

    return jax.jit(initial_state, out_shardings=self.state_shardings())(full)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    s = self.model.spec
    return (s.image_size, s.image_size, s.in_channels)

  def _abstract_state_shapes(self) -> TrainState:
    """ShapeDtypeStructs of the state leaves."""
    stored = self._stored_param_shapes()
    opt = jax.eval_shape(self.tx.init, stored)
    return TrainState(
      jax.ShapeDtypeStruct((), jnp.int32), stored, opt, jax.eval_shape(self._no_pending)
    )

  def state_shardings(self) -> TrainState:
    """NamedShardings of every state leaf; optimizer state laid out like the params."""
    param_shardings = self._stored_param_shardings()
    opt = optax.tree_map_params(
      self.tx,
      lambda _, sharding: sharding,
      jax.eval_shape(self.tx.init, self._stored_param_shapes()),
      param_shardings,
      transform_non_params=lambda _: self.replicated,
    )
    return TrainState(self.replicated, param_shardings, opt, self._pending_shardings())

  def _no_pending(self) -> PendingUpdate | None:
    """The `TrainState.pending` of a state with nothing to apply (None: never deferred)."""
    return None

  def _pending_shardings(self) -> PendingUpdate | None:
    return None

  def train_step(
    self, state: TrainState, images: jax.Array, labels: jax.Array, augment: dict | None = None
  ):
    if self._train_step is None:
      self._train_step = self._build_train_step()
    return self._train_step(state, images, labels, augment)

  def _images_for_step(self, images: jax.Array, augment: dict | None) -> jax.Array:
    """Inside the jitted step: `preprocess(images, augment)` when the batch carries parameters.

    With `data.augment_on='device'` images arrive uncropped ([B, S, S, 3]) with their
    sampled augmentation parameters; the per-example resampling shards over the batch
    with no communication.
    """
    if augment is None:
      return images
    if self.preprocess is None:
      raise ValueError(
        "train_step got augmentation parameters (data.augment_on='device') but the "
        "strategy has no preprocess function: pass make_strategy(..., preprocess=...)"
      )
    return self.preprocess(images, augment)

  def _metrics(self, sums: dict, **norms) -> dict:
    """Step metrics: summed loss / counts as fractions of the global batch; norms as they are."""
    return {**{k: v / self.global_batch for k, v in sums.items()}, **norms}

  def lower_train_step(self, state_abstract, images_abstract, labels_abstract):
    """jax.stages.Lowered of one step (for compile-only memory and cost analysis)."""
    if self._train_step is None:
      self._train_step = self._build_train_step()
    return self._train_step.lower(state_abstract, images_abstract, labels_abstract, None)

  @abc.abstractmethod
  def _to_stored(self, full_params):
    """Model-layout parameters -> this strategy's stored layout (traced inside jit)."""

  @abc.abstractmethod
  def _stored_param_shapes(self):
    """ShapeDtypeStructs of the parameters in this strategy's stored layout."""

  @abc.abstractmethod
  def _stored_param_shardings(self):
    """NamedShardings of the stored parameters."""

  @abc.abstractmethod
  def full_params(self, state: TrainState):
    """The weights after `state.step` steps (a pending update applied), model layout."""

  def model_state(self, state: TrainState) -> TrainState:
    """The whole state in the model's layout, a pending update applied (tools and tests).

    Every device then holds the full optimizer state: for evaluation use `full_params`.
    """
    if self._model_state is None:  # built once: a fresh lambda per call would recompile
      self._model_state = jax.jit(lambda s: apply_pending(self.tx, self._model_layout(s)))
    return self._model_state(state)

  def _model_layout(self, state: TrainState) -> TrainState:
    """Stored layout -> the model's (traced inside jit; global arrays)."""
    return state

  @abc.abstractmethod
  def _build_train_step(self):
    """The jitted step (state, images, labels) -> (state, metric sums)."""

  @abc.abstractmethod
  def _param_layouts(self):
    """A `layouts.Layout` per parameter (the params tree with Layout leaves)."""

  def state_from_model_layout(self, state: TrainState) -> TrainState:
    """A state whose params and optimizer state are in the model's layout -> this strategy's.

    What restoring a checkpoint written by another strategy or device count
    needs (`deep_image.train.checkpoint`): every parameter, and every
    optimizer leaf shaped like one (momentum), is laid out as `init` would lay
    it out, by one jitted program with this strategy's state shardings.
    A pending update (`TrainState.pending`, its gradients in the model's layout)
    is applied first.
    """
    param_layouts, n = self._param_layouts(), self.mesh.size

    def lay_out(full: TrainState) -> TrainState:
      full = apply_pending(self.tx, full)

      def stored(x, layout):
        return layouts.to_stored(x, layout, n)

      params = jax.tree.map(stored, full.params, param_layouts)
      opt_state = optax.tree_map_params(self.tx, stored, full.opt_state, param_layouts)
      return TrainState(full.step, params, opt_state, self._no_pending())

    return jax.jit(lay_out, out_shardings=self.state_shardings())(state)

  def abstract_state(self):
    """ShapeDtypeStructs (with shardings) of the state, without allocating it."""
    return jax.tree.map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      self._abstract_state_shapes(),
      self.state_shardings(),
    )


class GSPMDStrategy(Strategy):
  """jax.jit with NamedShardings from the Flax partition specs; XLA inserts collectives."""

  name = "gspmd"

  def _to_stored(self, full_params):
    return full_params

  def _stored_param_shapes(self):
    return self.param_shapes

  def _param_layouts(self):
    # Full arrays; the out_shardings of a jit put FC1/FC2's parts on their devices.
    return jax.tree.map(lambda _: layouts.REPLICATED, self.param_shapes)

  def _stored_param_shardings(self):
    return self.logical_shardings

  def full_params(self, state: TrainState):
    return state.params

  def _build_train_step(self):
    model, tx, batch = self.model, self.tx, self.global_batch
    dropout_key = self.dropout_key

    def step(state: TrainState, images, labels, augment):
      images = self._images_for_step(images, augment)

      def loss_fn(params):
        logits = model.apply(
          {"params": params},
          images,
          train=True,
          dropout_key=jax.random.fold_in(dropout_key, state.step),
          example_ids=jnp.arange(batch),
        )
        loss_sum, sums = losses.loss_and_counts(logits, labels)
        return loss_sum / batch, sums

      grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = self._metrics(
        sums,
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates),
      )
      return TrainState(state.step + 1, params, opt_state), metrics

    shardings = self.state_shardings()
    return jax.jit(
      step,
      in_shardings=(shardings,) + (self.batch_sharding,) * 3,
      out_shardings=(shardings, self.replicated),
      donate_argnums=0,
    )


class ShardMapStrategy(Strategy):
  """data / lazy / hybrid: an explicit shard_map program over one mesh axis.

  `layout_of(path, shape)` gives each parameter's `layouts.Layout`. One step:

  1. (deferred) split parameters take their pending update (no communication);
  2. forward: the model, or conv + `fc_block` when FC weights are split. Each
     layer gets its parameters at its call (`_LayerFeed`), where its buckets
     and the next one are prepared: (deferred) all-gather of a replicated
     bucket's pending chunks and the update of the bucket's leaves; (lazy
     buckets) one all-gather of the stored shards;
  3. backward: each bucket's `buckets.sync_point` reduce-scatters its
     gradients as soon as backward has passed its layers; split parameters'
     gradients are complete on their devices;
  4. (none) all-gather + update every bucket now (`_apply_pending_local`);
     (deferred) keep the reduced chunks as `TrainState.pending`.
  """

  def __init__(self, config, model, tx, mesh, name: str, layout_of: Callable, preprocess=None):
    super().__init__(config, model, tx, mesh, preprocess)
    self.name = name
    (self.axis,) = [a for a in mesh.axis_names if mesh.shape[a] > 1] or [mesh.axis_names[0]]
    self.n = mesh.shape[self.axis]
    par = config.parallel
    self.algorithm = par.collective
    # One device has no traffic for the deferred update to hide, and deferring costs it
    # a separate pass of the step metrics over every parameter (8% of a Table 2 step on
    # one H200, BENCHMARKS.md): it runs the `none` schedule, the same SGD.
    self.deferred = par.overlap == "deferred" and self.n > 1
    self.layouts = jax.tree_util.tree_map_with_path(
      lambda path, x: layout_of(_path_names(path), x.shape), self.param_shapes
    )
    # Where the reduced gradient of each parameter lives between steps: 1/N per device.
    self.pending_layouts = jax.tree.map(
      lambda lo: layouts.LAZY if lo.kind == "replicated" else lo, self.layouts, is_leaf=_is_layout
    )
    self._treedef = jax.tree.structure(self.param_shapes)
    paths_shapes = jax.tree_util.tree_leaves_with_path(self.param_shapes)
    self._leaf_shapes = [x.shape for _, x in paths_shapes]
    self._leaf_layouts = jax.tree.leaves(self.layouts, is_leaf=_is_layout)
    self.buckets = buckets.plan(
      [*conv_layer_names(model.spec), "fc1", "fc2", "fc3"],
      [_path_names(p)[0] for p, _ in paths_shapes],
      self._leaf_layouts,
      [math.prod(shape) for shape in self._leaf_shapes],
      self.n,
      par.bucket_mb * 2**20,
    )
    self.tensor_parallel_fc = any(lo.kind == "split" for lo in self._leaf_layouts)
    # 0 (auto): 2 parts on GPUs, where one part's collectives hide behind the other's
    # products; 1 elsewhere: on CPU every collective is a synchronous rendezvous, so
    # twice the collectives only cost (BENCHMARKS.md, "Gradient pipeline").
    gpu = mesh.devices.flat[0].platform == "gpu"
    self.fc_micro_batches = par.fc_micro_batches or (2 if gpu else 1)
    self._to_full = None

  # --- layout of the state -------------------------------------------------
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
      lambda lo, x: NamedSharding(self.mesh, layouts.stored_spec(lo, len(x.shape), self.axis)),
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
        self.mesh,
        layouts.stored_spec(lo, len(layouts.stored_shape(lo, x.shape, self.n)), self.axis),
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
        self.mesh,
        layouts.stored_spec(lo, len(x.shape), self.axis) if lo.kind == "split" else P(),
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
  def _forward(self, feed: "_LayerFeed", images, dropout_key, example_ids):
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
    for k in ("fc1", "fc2", "fc3"):
      fc[k], feats = feed.layer(k, feats)
    parts = self.fc_micro_batches
    return fc_block.tensor_parallel_head(
      fc,
      feats,
      axis=self.axis,
      algorithm=self.algorithm,
      dtype=model.dtype,
      dropout_rate=rate,
      dropout_key=dropout_key,
      # A local batch the parts do not divide (e.g. 3 images per device) runs whole.
      micro_batches=parts if feats.shape[0] % parts == 0 else 1,
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
          [grads[i] for i in bucket.leaves], self._shapes_of(bucket), self.axis, self.algorithm
        )
        for i, g in zip(bucket.leaves, full, strict=True):
          grads[i] = g
    return _apply_updates(
      self.tx, jax.tree.unflatten(self._treedef, grads), opt_state, params, pending.valid
    )

  def _norms(self, params, opt_state, grads) -> dict:
    """grad_norm, param_norm (after the update) and update_norm of the full model.

    Computed on this device's 1/N part of everything (replicated parameters cut to
    their chunk): the update of the parts is the part of the update (elementwise
    optimizer), and the parts are disjoint, so one psum of squares gives each norm.
    """
    axis = self.axis

    def part(x, lo):
      return buckets.chunk_of(x, axis) if lo.kind == "replicated" else x

    params = jax.tree.map(part, params, self.layouts)
    opt_state = optax.tree_map_params(self.tx, part, opt_state, self.layouts)
    updates, _ = self.tx.update(grads, opt_state, params)
    parts = (grads, optax.apply_updates(params, updates), updates)
    squares = [
      sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t)) for t in parts
    ]
    grad_norm, param_norm, update_norm = jnp.sqrt(lax.psum(jnp.stack(squares), axis))
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
    new_params, new_opt = _apply_updates(
      self.tx, jax.tree.unflatten(self._treedef, full), opt_state, params, valid
    )
    new_leaves = jax.tree.leaves(new_params)
    return [new_leaves[i] for i in leaf_ids], jax.tree.leaves(new_opt)

  def _shapes_of(self, bucket: buckets.Bucket) -> tuple:
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

  def _build_train_step(self):
    batch, axis, algorithm = self.global_batch, self.axis, self.algorithm
    dropout_key = self.dropout_key
    split_ids = [i for i, lo in enumerate(self._leaf_layouts) if lo.kind == "split"]
    opt_owners = self._opt_owners()
    group_of = {i: g for g, bucket in enumerate(self.buckets) for i in bucket.leaves}
    group_of.update({i: len(self.buckets) for i in split_ids})

    def local_step(state: TrainState, images, labels):
      step_key = jax.random.fold_in(dropout_key, state.step)
      b = images.shape[0]
      example_ids = lax.axis_index(axis) * b + jnp.arange(b)
      params, opt_state, pending = state.params, state.opt_state, state.pending
      stored = jax.tree.leaves(params)
      chunks = None if pending is None else jax.tree.leaves(pending.grads)
      split_leaves = [stored[i] for i in split_ids]
      new_opt = {}  # group -> flat optimizer leaves after its update
      if pending is not None and split_ids:  # complete on their devices: nothing to gather
        split_leaves, new_opt[len(self.buckets)] = self._update_some(
          split_ids, [chunks[i] for i in split_ids], params, opt_state, pending.valid
        )

      def prepare(k: int, after: jax.Array):
        """Bucket k's stored parts after the update, and the optimizer leaves; starts after
        `after`."""
        bucket = self.buckets[k]
        parts = [stored[i] for i in bucket.leaves]
        grads = None if pending is None else [chunks[i] for i in bucket.leaves]
        # Not before the activation `after` exists: the bucket is fetched one bucket
        # ahead of its use, not all at the start of the step (overlap, and memory).
        parts, grads, _ = lax.optimization_barrier((parts, grads, after))
        new_opt_k = None
        if pending is not None:
          if bucket.kind == "replicated":  # the all-gather half of the synchronization
            grads = buckets.gather(grads, self._shapes_of(bucket), axis, algorithm)
          parts, new_opt_k = self._update_some(
            bucket.leaves, grads, params, opt_state, pending.valid
          )
        return parts, new_opt_k

      def loss_fn(slots, split_leaves):
        feed = _LayerFeed(self, slots, split_ids, split_leaves, prepare)
        logits = self._forward(feed, images, step_key, example_ids)
        loss_sum, sums = losses.loss_and_counts(logits, labels)
        return loss_sum / batch, (sums, feed.new_parts(), feed.new_opt)

      slots = [jnp.zeros((bucket.size,), jnp.float32) for bucket in self.buckets]
      grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
      (slot_grads, split_grads), (sums, new_parts, bucket_opt) = grad_fn(slots, split_leaves)
      if pending is not None:  # the state after the update the forward pass used
        new_opt.update(bucket_opt)
        for i, x in zip(split_ids, split_leaves, strict=True):
          new_parts[i] = x
        params = jax.tree.unflatten(self._treedef, [new_parts[i] for i in range(len(stored))])
        opt_flat = [
          new_opt[group_of[owner] if owner >= 0 else next(iter(new_opt))][k]
          for k, owner in enumerate(opt_owners)
        ]
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), opt_flat)
      grads = [None] * len(stored)
      for bucket, g in zip(self.buckets, slot_grads, strict=True):
        for i, part in zip(bucket.leaves, buckets.split_chunks(g, bucket.chunks), strict=True):
          grads[i] = part
      for i, g in zip(split_ids, split_grads, strict=True):
        grads[i] = g
      new_pending = PendingUpdate(jax.tree.unflatten(self._treedef, grads), jnp.ones((), bool))
      # Metrics are a few scalars: the builtin psum is fine here.
      metrics = self._metrics(
        lax.psum(sums, axis), **self._norms(params, opt_state, new_pending.grads)
      )
      if self.deferred:
        return TrainState(state.step + 1, params, opt_state, new_pending), metrics
      params, opt_state = self._apply_pending_local(params, opt_state, new_pending)
      return TrainState(state.step + 1, params, opt_state), metrics

    shardings = self.state_shardings()
    specs = jax.tree.map(lambda s: s.spec, shardings)
    batch_spec = P(axis)
    mapped = jax.shard_map(
      local_step,
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


class _LayerFeed:
  """Inside the differentiated forward pass: each layer's parameters at its first use.

  When a layer whose last bucket is k is called with input x, its buckets and
  bucket k + 1 are prepared (`prepare(k, x)`: the update) and passed through
  their `buckets.sync_point` (lazy buckets: the all-gather), so backward
  reduce-scatters each bucket's gradients there. So the work for bucket k + 1
  can overlap bucket k's layers, and no bucket is gathered before the forward
  pass is one bucket away from it.
  """

  def __init__(self, strategy: ShardMapStrategy, slots, split_ids, split_leaves, prepare):
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
      names = _path_names(path)
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
    gather_to = self._s._shapes_of(bucket) if lazy else None
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


def _apply_updates(tx, grads, opt_state, params, valid):
  """One optimizer step; where `valid` is False, params and optimizer state unchanged.

  The select is elementwise and fuses into the update; it is how the first step of a
  deferred run, which has no pending gradient yet, skips the update.
  """
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)

  def keep(new, old):
    return jnp.where(valid, new, old)

  return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)


def apply_pending(tx, state: TrainState) -> TrainState:
  """A state in the model's layout with its pending update applied (traced inside jit).

  The optimizer is elementwise, so applying it to full arrays gives what the
  next step would apply to its parts.
  """
  if state.pending is None:
    return state
  params, opt_state = _apply_updates(
    tx, state.pending.grads, state.opt_state, state.params, state.pending.valid
  )
  return TrainState(state.step, params, opt_state)


@functools.lru_cache(maxsize=8)
def _full_params_init(model: VGG, input_shape: tuple[int, ...], sharding: NamedSharding):
  """jitted rng -> the model's parameters (placed by `sharding`).

  One jitted function per (model, input, sharding), so strategies on the same
  mesh share one compilation (tests build dozens of strategies of one model).
  """

  def init(rng):
    return nn.unbox(model.init(rng, jnp.zeros((1,) + input_shape))["params"])

  return jax.jit(init, out_shardings=sharding)


def _is_layout(x) -> bool:
  return isinstance(x, layouts.Layout)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _replicated_layout(names, shape) -> layouts.Layout:
  return layouts.REPLICATED


def _lazy_layout(names, shape) -> layouts.Layout:
  """Kernels lazy; biases replicated.

  Biases are 0.01% of the weights: sharding them saves nothing. They form
  replicated buckets of their own (`buckets.plan` buckets each kind apart), so
  a kernel's bucket buffer is the kernel alone when it is large (FC1's 616 MB):
  concatenating a bias into it would cost two copies of the kernel per step.
  """
  return layouts.LAZY if names[-1] == "kernel" else layouts.REPLICATED


def _hybrid_layout(conv_layout: Callable):
  def layout_of(names, shape):
    layer, kind = names[0], names[-1]
    if layer == "fc1":
      return layouts.split(len(shape) - 1)  # output columns (kernel dim 1, bias dim 0)
    if layer == "fc2" and kind == "kernel":
      return layouts.split(0)  # input rows
    if layer in ("fc2", "fc3"):
      return layouts.REPLICATED
    return conv_layout(names, shape)

  return layout_of


def make_strategy(
  config,
  model: VGG,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  preprocess: Preprocess | None = None,
) -> Strategy:
  """The strategy named by `config.parallel.strategy` on `mesh` (validated first).

  'auto' builds the strategy `cost_model.choose_strategy` predicts fastest for
  this config on this mesh (logged with the predicted step times); the strategy
  gets a copy of `config` with that name in `parallel.strategy`.

  preprocess(images, augment) -> images runs inside the jitted step when
  `train_step` is given augmentation parameters (data.augment_on='device'),
  e.g. `lambda im, aug: augment_device.augment_batch({"image": im, "augment": aug}, crop)`.
  """
  validate_parallel_config(config, mesh.size)
  name = config.parallel.strategy
  if name == AUTO:
    name, reason = cost_model.choose_strategy(config, mesh)
    logging.info("parallel.strategy='auto' -> %r: %s", name, reason)
    config = copy.deepcopy(config)
    config.parallel.strategy = name
  if name == "gspmd":
    return GSPMDStrategy(config, model, tx, mesh, preprocess)
  if name == "data":
    layout_of = _replicated_layout
  elif name == "lazy":
    layout_of = _lazy_layout
  else:
    layout_of = _hybrid_layout(
      _lazy_layout if config.parallel.conv == "lazy" else _replicated_layout
    )
  return ShardMapStrategy(config, model, tx, mesh, name, layout_of, preprocess)
