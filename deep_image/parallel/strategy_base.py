"""The strategy interface and its simplest implementation, gspmd.

`Strategy` is what the training loop, checkpoints and tools use: `init`,
`train_step`, `full_params`, `state_shardings`, `state_from_model_layout`.
`GSPMDStrategy` is jax.jit with the Flax partition specs' NamedShardings; XLA
inserts the collectives. The shard_map strategies are in `shard_map_strategy`;
`strategies.make_strategy` builds either.
"""

from __future__ import annotations

import abc
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.models import losses
from deep_image.models.vgg import VGG
from deep_image.parallel import layouts
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.train_state import PendingUpdate, TrainState


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


def update_where_valid(tx, grads, opt_state, params, valid):
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
  params, opt_state = update_where_valid(
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
