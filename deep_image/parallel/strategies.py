"""Four ways to run one training step on a mesh; `config.parallel.strategy` picks one.

======== ========================================== ==============================
strategy params and optimizer state                gradient synchronization
======== ========================================== ==============================
gspmd    Flax partition specs (FC1/FC2 split on     XLA's own (jax.jit + GSPMD)
         'model', the rest replicated)
data     replicated                                 one reduce-scatter + all-gather
                                                    of all gradients after backward
lazy     1/N of every kernel per device (biases     each kernel all-gathered just
         replicated: 0.01% of the weights)          before use; its gradient
                                                    reduce-scattered as backward
                                                    reaches it; local-shard update
hybrid   conv as data or lazy (parallel.conv);      FC activations gathered /
         FC1/FC2 split across all devices           scattered (fc_block.py)
======== ========================================== ==============================

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
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.config_error import ConfigError
from deep_image.models import losses
from deep_image.models.vgg import MODELS, VGG
from deep_image.parallel import collectives, fc_block, layouts
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.train_state import TrainState

STRATEGIES = ("gspmd", "data", "lazy", "hybrid")
CONV_MODES = ("data", "lazy")


def validate_parallel_config(config, num_devices: int) -> None:
  """Raise ValueError naming the config field for a setup that cannot run.

  Runs before anything is compiled: unknown strategy / algorithm / conv mode,
  a mesh larger than the devices, a batch that does not divide over them, FC
  widths that do not split over them.
  """
  par = config.parallel
  if par.strategy not in STRATEGIES:
    raise ConfigError(
      f"parallel.strategy={par.strategy!r} is not a known strategy; choose from {STRATEGIES}"
    )
  collectives.resolve_algorithm(par.collective, 2)
  if par.strategy == "hybrid" and par.conv not in CONV_MODES:
    raise ConfigError(f"parallel.conv={par.conv!r} must be one of {CONV_MODES}")
  names, sizes = mesh_lib.resolve_mesh_shape(par.mesh, num_devices)
  n = math.prod(sizes)
  if par.strategy != "gspmd" and sum(s > 1 for s in sizes) > 1:
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
      return TrainState(jnp.zeros((), jnp.int32), stored, self.tx.init(stored))

    return jax.jit(initial_state, out_shardings=self.state_shardings())(full)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    s = self.model.spec
    return (s.image_size, s.image_size, s.in_channels)

  def _abstract_state_shapes(self) -> TrainState:
    """ShapeDtypeStructs of the state leaves."""
    stored = self._stored_param_shapes()
    opt = jax.eval_shape(self.tx.init, stored)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), stored, opt)

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
    return TrainState(self.replicated, param_shardings, opt)

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
    """The parameter tree in the model's own layout."""

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
    """
    param_layouts, n = self._param_layouts(), self.mesh.size

    def lay_out(full: TrainState) -> TrainState:
      def stored(x, layout):
        return layouts.to_stored(x, layout, n)

      params = jax.tree.map(stored, full.params, param_layouts)
      opt_state = optax.tree_map_params(self.tx, stored, full.opt_state, param_layouts)
      return TrainState(full.step, params, opt_state)

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

  `layout_of(path, shape)` gives each parameter's `layouts.Layout`; the step
  (1) turns stored parts into usable weights (gathering LAZY ones), (2) runs
  the forward pass (the model, or conv + `fc_block` when FC weights are split),
  (3) all-reduces the gradients of REPLICATED parameters as one flat buffer
  (reduce-scatter + all-gather: butterfly synchronization), and (4) updates
  each device's stored part.
  """

  def __init__(self, config, model, tx, mesh, name: str, layout_of: Callable, preprocess=None):
    super().__init__(config, model, tx, mesh, preprocess)
    self.name = name
    (self.axis,) = [a for a in mesh.axis_names if mesh.shape[a] > 1] or [mesh.axis_names[0]]
    self.n = mesh.shape[self.axis]
    self.algorithm = config.parallel.collective
    self.layouts = jax.tree_util.tree_map_with_path(
      lambda path, x: layout_of(_path_names(path), x.shape), self.param_shapes
    )
    self.tensor_parallel_fc = any(
      lo.kind == "split" for lo in jax.tree.leaves(self.layouts, is_leaf=_is_layout)
    )
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
    return jax.tree.map(
      lambda lo, x: NamedSharding(self.mesh, layouts.stored_spec(lo, len(x.shape), self.axis)),
      self.layouts,
      self._stored_param_shapes(),
      is_leaf=_is_layout,
    )

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

  def full_params(self, state: TrainState):
    if self._to_full is None:  # built once: a fresh lambda per call would recompile
      self._to_full = jax.jit(
        lambda p: jax.tree.map(
          lambda lo, x, shape: layouts.to_full(x, lo, shape.shape),
          self.layouts,
          p,
          self.param_shapes,
          is_leaf=_is_layout,
        ),
        out_shardings=self._full_param_shardings(),
      )
    return self._to_full(state.params)

  # --- the step ------------------------------------------------------------
  def _forward(self, params, images, dropout_key, example_ids):
    """Per-device forward on the local batch; returns logits [b, classes].

    example_ids [b]: the global batch indices of the local rows (dropout masks).
    """
    model, rate = self.model, self.model.dropout_rate
    if not self.tensor_parallel_fc:
      return model.apply(
        {"params": params}, images, train=True, dropout_key=dropout_key, example_ids=example_ids
      )
    feats = model.apply({"params": params}, images, method=VGG.features)
    return fc_block.tensor_parallel_head(
      {k: params[k] for k in ("fc1", "fc2", "fc3")},
      feats,
      axis=self.axis,
      algorithm=self.algorithm,
      dtype=model.dtype,
      dropout_rate=rate,
      dropout_key=dropout_key,
    )

  def _sync_replicated(self, grads):
    """All-reduce (sum) the gradients of REPLICATED parameters as one flat buffer."""
    leaves, treedef = jax.tree.flatten(grads)
    is_rep = [lo.kind == "replicated" for lo in jax.tree.leaves(self.layouts, is_leaf=_is_layout)]
    rep = [g for g, r in zip(leaves, is_rep, strict=True) if r]
    if not rep or self.n == 1:
      return grads
    flat, unravel = ravel_pytree(rep)
    synced = iter(unravel(collectives.all_reduce(flat, self.axis, algorithm=self.algorithm)))
    return jax.tree.unflatten(
      treedef, [next(synced) if r else g for g, r in zip(leaves, is_rep, strict=True)]
    )

  def _global_norm(self, tree) -> jax.Array:
    """L2 norm of the full (model-layout) tree from this device's stored parts.

    LAZY and split leaves hold disjoint parts (lazy padding is zero): their
    squares are summed over the axis; replicated leaves are counted once.
    """
    kinds = [lo.kind for lo in jax.tree.leaves(self.layouts, is_leaf=_is_layout)]
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    local = sum((sq for sq, k in zip(squares, kinds, strict=True) if k == "replicated"), 0.0)
    parts = sum((sq for sq, k in zip(squares, kinds, strict=True) if k != "replicated"), 0.0)
    return jnp.sqrt(local + lax.psum(parts, self.axis))

  def _build_train_step(self):
    tx, batch, axis = self.tx, self.global_batch, self.axis
    dropout_key = self.dropout_key

    def local_step(state: TrainState, images, labels):
      step_key = jax.random.fold_in(dropout_key, state.step)
      b = images.shape[0]
      example_ids = lax.axis_index(axis) * b + jnp.arange(b)

      def loss_fn(stored):
        params = jax.tree.map(
          lambda lo, x, shape: layouts.local_for_use(x, lo, shape.shape, axis, self.algorithm),
          self.layouts,
          stored,
          self.param_shapes,
          is_leaf=_is_layout,
        )
        logits = self._forward(params, images, step_key, example_ids)
        loss_sum, sums = losses.loss_and_counts(logits, labels)
        return loss_sum / batch, sums

      grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
      grads = self._sync_replicated(grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      # Metrics are a few scalars: the builtin psum is fine here.
      metrics = self._metrics(
        lax.psum(sums, axis),
        grad_norm=self._global_norm(grads),
        param_norm=self._global_norm(params),
        update_norm=self._global_norm(updates),
      )
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

  Biases are 0.01% of the weights: sharding them would save nothing, while
  gathering each one separately would double the lazy update's collectives
  (on CPU each is a synchronous rendezvous). Their gradients join the one flat
  all-reduce of the replicated parameters instead.
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

  preprocess(images, augment) -> images runs inside the jitted step when
  `train_step` is given augmentation parameters (data.augment_on='device'),
  e.g. `lambda im, aug: augment_device.augment_batch({"image": im, "augment": aug}, crop)`.
  """
  validate_parallel_config(config, mesh.size)
  name = config.parallel.strategy
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
