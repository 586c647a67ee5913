"""Each strategy's defining claim, read off its state and its program.

The equivalence tests show every strategy computes the same numbers; they pass
just as well when a strategy stores or moves more than it claims. Here:

* layouts, from the initialised state's `addressable_shards` (and the same
  shapes from `abstract_state()`): `lazy` stores every kernel and its momentum
  trace as exactly 1/N of the zero-padded flat array per device, biases
  replicated;
  `data` replicates everything; the pending update of `overlap='deferred'`
  holds 1/N of every gradient per device; `hybrid` splits FC1's kernel by
  columns and FC2's by rows, 1/N per device; `gspmd` splits FC1/FC2 per the
  logical-axis rules.
* traffic, from the compiled step's collective ops: `hybrid` moves
  activations (bytes that grow with the batch) and far fewer bytes than the FC
  weight gradients `data` all-reduces.
* overlap, from the lowered (StableHLO) step in program order: every bucket's
  reduce-scatter is issued inside backward, before its last convolution; with
  `overlap='deferred'` the parameter / gradient all-gathers of later buckets
  come after the first forward convolution (each bucket is fetched one bucket
  ahead of its use, an `optimization_barrier` on the activation: XLA:CPU
  expands barriers before it schedules, so the compiled CPU order says nothing
  here; the GPU compile keeps them, see experiments/compile_gpu.py).
* precision: with model.dtype='bfloat16' every convolution and matmul of the
  step takes bf16 operands. Read from the lowered (StableHLO) program: XLA:CPU
  itself rewrites bf16 convolutions and dots to f32 when it compiles, a
  backend detail that would hide what the program asks for.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deep_image.models.vgg import VGG, VGGSpec, make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.optimizer import make_optimizer
from experiments.configs import base


def _config(strategy, conv="data", dtype="float32", batch=8, collective="butterfly"):
  c = base.get_config()
  c.model.name, c.model.image_size, c.model.dtype = "vgg_tiny", 8, dtype
  c.train.batch_size, c.train.warmup_steps = batch, 0
  c.parallel.strategy, c.parallel.collective, c.parallel.conv = strategy, collective, conv
  return c


def _strategy(config, n, model=None):
  mesh = mesh_lib.make_mesh(config.parallel, jax.devices()[:n])
  model = model or make_model(config.model)
  return strategies.make_strategy(config, model, make_optimizer(config.train), mesh)


def _stored(strategy, n):
  """(params, momentum trace, full params), initialised; the same trees in every layout."""
  state = strategy.init(jax.random.key(0))
  # The abstract state (what memory analyses compile against) has the same shards.
  for real, abstract in zip(
    jax.tree.leaves(state), jax.tree.leaves(strategy.abstract_state()), strict=True
  ):
    assert real.shape == abstract.shape
    assert abstract.sharding.shard_shape(abstract.shape) == real.addressable_shards[0].data.shape
  trace = optax.tree_utils.tree_get(state.opt_state, "trace")
  return state.params, trace, jax.tree.map(np.asarray, strategy.full_params(state))


def _leaves(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_replicated(x, full_shape, what):
  shards = x.addressable_shards
  assert x.shape == tuple(full_shape), what
  assert all(s.data.shape == tuple(full_shape) for s in shards), what


def assert_split(x, n, full_shape, dim, what):
  """x is the full array, device r holding slice r of `dim` (1/N of it)."""
  assert x.shape == tuple(full_shape), what
  width = full_shape[dim] // n
  assert width * n == full_shape[dim], what
  want = tuple(width if i == dim else d for i, d in enumerate(full_shape))
  shards = x.addressable_shards
  assert len(shards) == n and all(s.data.shape == want for s in shards), (
    what,
    shards[0].data.shape,
  )
  assert sorted(s.index[dim].start or 0 for s in shards) == [r * width for r in range(n)], what


def assert_lazy(x, n, full, what):
  """x is the flat, zero-padded [N c] array; device r holds elements [r c, (r+1) c)."""
  size = full.size
  c = math.ceil(size / n)
  assert x.shape == (n * c,), (what, x.shape)
  shards = x.addressable_shards
  assert len(shards) == n and all(s.data.shape == (c,) for s in shards), (
    what,
    shards[0].data.shape,
  )
  flat = np.pad(full.reshape(-1), (0, n * c - size))
  for s in shards:
    start = s.index[0].start or 0
    np.testing.assert_array_equal(np.asarray(s.data), flat[start : start + c], err_msg=what)


@pytest.mark.parametrize(
  "strategy,conv,n", [("lazy", "data", 8), ("lazy", "data", 6), ("hybrid", "lazy", 4)]
)
def test_lazy_stores_every_kernel_and_its_momentum_as_one_nth(strategy, conv, n):
  s = _strategy(_config(strategy, conv, batch=24), n)
  params, trace, full = _stored(s, n)
  params, trace, full = _leaves(params), _leaves(trace), _leaves(full)
  lazy_layers = [k for k in params if "kernel" in k and (strategy == "lazy" or "convs" in k)]
  assert len(lazy_layers) == (5 if strategy == "lazy" else 2)
  for key in lazy_layers:
    assert_lazy(params[key], n, full[key], f"params{key}")
    assert_lazy(trace[key], n, np.zeros_like(full[key]), f"momentum{key}")
  for key in (k for k in params if "bias" in k and (strategy == "lazy" or "convs" in k)):
    assert_replicated(params[key], full[key].shape, key)
    assert_replicated(trace[key], full[key].shape, key)


@pytest.mark.parametrize("strategy,conv", [("data", "data"), ("lazy", "data"), ("hybrid", "data")])
def test_pending_update_holds_one_nth_of_every_gradient(strategy, conv):
  """overlap='deferred': what a step leaves for the next is 1/N of the gradients per device."""
  n = 8
  config = _config(strategy, conv, batch=8)
  s = _strategy(config, n)
  state = s.init(jax.random.key(0))
  images = jax.device_put(np.zeros((8, 8, 8, 3), np.uint8), s.batch_sharding)
  labels = jax.device_put(np.zeros(8, np.int32), s.batch_sharding)
  state, _ = s.train_step(state, images, labels)
  assert bool(state.pending.valid)
  full = _leaves(s.param_shapes)
  for key, g in _leaves(state.pending.grads).items():
    size = math.prod(full[key].shape)
    per_device = g.addressable_shards[0].data.size
    assert per_device <= math.ceil(size / n), (key, per_device, size)
  none = _config(strategy, conv, batch=8)
  none.parallel.overlap = "none"
  assert _strategy(none, n).init(jax.random.key(0)).pending is None
  # One device has nothing to overlap: 'deferred' runs the 'none' schedule there.
  assert _strategy(config, 1).init(jax.random.key(0)).pending is None


def test_data_replicates_everything():
  n = 8
  params, trace, full = _stored(_strategy(_config("data"), n), n)
  for tree in (params, trace):
    for key, x in _leaves(tree).items():
      assert_replicated(x, _leaves(full)[key].shape, key)


@pytest.mark.parametrize("strategy", ["hybrid", "gspmd"])
def test_fc1_split_by_columns_and_fc2_by_rows(strategy):
  """hybrid: its layouts; gspmd: the logical-axis rules ('model' -> every mesh axis)."""
  n = 8
  params, trace, full = _stored(_strategy(_config(strategy), n), n)
  full = _leaves(full)
  split = {"['fc1']['kernel']": 1, "['fc1']['bias']": 0, "['fc2']['kernel']": 0}
  for name, tree in (("params", params), ("momentum", trace)):
    for key, x in _leaves(tree).items():
      if key in split:
        assert_split(x, n, full[key].shape, split[key], f"{name}{key}")
      else:  # convs, FC2's bias (added after the sum over devices), FC3
        assert_replicated(x, full[key].shape, f"{name}{key}")


# --- traffic -----------------------------------------------------------------

_COLLECTIVE = re.compile(
  r"= (\(.*?\)|\S+) (collective-permute|all-gather|reduce-scatter|all-reduce|all-to-all)\("
)
_ARRAY = re.compile(r"(pred|bf16|f16|f32|f64|s8|u8|s32|u32|s64|u64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}


def collective_bytes(hlo: str) -> int:
  """Bytes produced by the collective ops of a compiled per-device program.

  With the hand-written algorithms every transfer is a collective-permute, so
  this is what each device sends per step (plus the few scalars of the
  metrics' all-reduce).
  """
  total, found = 0, 0
  for result, _ in _COLLECTIVE.findall(hlo):
    for dtype, dims in _ARRAY.findall(result):
      total += _BYTES.get(dtype, 8) * math.prod(int(d) for d in dims.split(",") if d)
    found += 1
  assert found, "no collective op in the compiled program"
  return total


# Tiny convs, wide FC: the FC weights (F H1 + H1 H2 = 73,728) dwarf the
# activations hybrid moves per example (F + H2 = 288).
_WIDE_FC = VGGSpec(stages=((4,), (8,)), fc=(256, 256), num_classes=10, image_size=8)


def _compiled_step_text(
  strategy, batch, n=8, model=None, dtype="float32", compiled=True, **parallel
):
  c = _config(strategy, dtype=dtype, batch=batch)
  c.parallel.update(parallel)
  s = _strategy(c, n, model)
  images = jax.ShapeDtypeStruct((batch, 8, 8, 3), jnp.uint8, sharding=s.batch_sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=s.batch_sharding)
  lowered = s.lower_train_step(s.abstract_state(), images, labels)
  return lowered.compile().as_text() if compiled else lowered.as_text()


def test_hybrid_moves_activations_not_fc_weight_gradients():
  n, f, h1, h2 = 8, _WIDE_FC.feature_dim, *_WIDE_FC.fc
  model = VGG(_WIDE_FC)
  # An all-reduce (reduce-scatter + all-gather) sends 2 (N-1)/N of its buffer.
  all_reduce = lambda elements: 2 * (n - 1) / n * 4 * elements  # noqa: E731
  fc_weight_grads = all_reduce(f * h1 + h1 * h2)
  hybrid = {b: collective_bytes(_compiled_step_text("hybrid", b, n, model)) for b in (8, 32)}
  data = collective_bytes(_compiled_step_text("data", 8, n, model))
  # Per example: features gathered and their gradient scattered back (F each
  # way), FC2's partial sums scattered and their gradient gathered (H2 each way).
  per_example = all_reduce(f + h2)
  assert hybrid[32] - hybrid[8] == pytest.approx(24 * per_example, rel=0.01), hybrid
  assert hybrid[8] < fc_weight_grads / 10, (hybrid, fc_weight_grads)
  assert data >= fc_weight_grads, (data, fc_weight_grads)


# --- overlap -----------------------------------------------------------------

_PROGRAM_OP = re.compile(r"= \"?stablehlo\.(convolution|all_gather|reduce_scatter)")


def _program_order(strategy, overlap, conv="data", prefetch_mb=0.0):
  """(convolutions and collectives of the lowered step in program order, the number of
  buckets per kind). Algorithm xla: all_gather / reduce_scatter are the gradient
  pipeline's; a bucket per layer and kind. prefetch_mb: 0, one bucket ahead."""
  text = _compiled_step_text(
    strategy,
    8,
    compiled=False,
    collective="xla",
    conv=conv,
    overlap=overlap,
    bucket_mb=0,
    prefetch_mb=prefetch_mb,
  )
  c = _config(strategy, conv=conv, batch=8)
  c.parallel.bucket_mb = 0
  kinds = [b.kind for b in _strategy(c, 8).buckets]
  return _PROGRAM_OP.findall(text), {k: kinds.count(k) for k in ("replicated", "lazy")}


@pytest.mark.parametrize("prefetch_mb", [0.0, 1.0])
@pytest.mark.parametrize("overlap", ["none", "deferred"])
@pytest.mark.parametrize("strategy", ["data", "lazy"])
def test_gradients_are_reduce_scattered_during_backward(strategy, overlap, prefetch_mb):
  """Also when every bucket is fetched at the first layer (prefetch_mb above vgg_tiny's
  size): the reduce-scatters stay pinned one bucket from their layers."""
  ops, buckets = _program_order(strategy, overlap, prefetch_mb=prefetch_mb)
  convs = [i for i, op in enumerate(ops) if op == "convolution"]
  scatters = [i for i, op in enumerate(ops) if op == "reduce_scatter"]
  # vgg_tiny: 2 conv layers; data: 5 buckets (one per layer), lazy: 5 of kernels and 5
  # of biases. Backward has 3 convolutions (conv 1's input gradient, two kernel
  # gradients) after the 2 forward ones. (The lowered program may repeat a
  # reduce-scatter; XLA keeps one of each.)
  assert buckets == (
    {"replicated": 5, "lazy": 0} if strategy == "data" else {"replicated": 5, "lazy": 5}
  ), buckets
  assert len(convs) == 5 and len(scatters) >= sum(buckets.values()), ops
  # The FC and conv-1 buckets' reduce-scatters come before conv 0's kernel gradient.
  assert scatters[0] < convs[2] and sum(i < convs[-1] for i in scatters) >= 3, ops


@pytest.mark.parametrize("strategy", ["data", "lazy"])
def test_deferred_fetches_buckets_during_the_forward_pass(strategy):
  deferred, buckets = _program_order(strategy, "deferred")
  first_conv = deferred.index("convolution")
  gathers = [i for i, op in enumerate(deferred) if op == "all_gather"]
  # One per bucket: the update's (replicated) or the weights' (lazy).
  assert len(gathers) == sum(buckets.values()), deferred
  assert sum(i > first_conv for i in gathers) >= 3, deferred
  # parallel.prefetch_mb larger than the model: every fetch before the first convolution.
  prefetched, _ = _program_order(strategy, "deferred", prefetch_mb=1.0)
  gathers = [i for i, op in enumerate(prefetched) if op == "all_gather"]
  assert len(gathers) == sum(buckets.values()), prefetched
  assert all(i < prefetched.index("convolution") for i in gathers), prefetched
  # The contrast: without overlap, data's all-gathers all follow the backward pass.
  if strategy == "data":
    none, _ = _program_order(strategy, "none")
    last_conv = len(none) - 1 - none[::-1].index("convolution")
    assert all(i > last_conv for i, op in enumerate(none) if op == "all_gather"), none


# --- precision ---------------------------------------------------------------

_COMPUTE = re.compile(
  r"stablehlo\.(convolution|dot_general)\b.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)"
)


@pytest.mark.parametrize("strategy", ["gspmd", "hybrid"])
def test_bfloat16_convolutions_and_matmuls_run_in_bfloat16(strategy):
  """hybrid covers the tensor-parallel head (fc_block), gspmd the model's own head."""
  kinds = {}
  for dtype in ("bfloat16", "float32"):
    ops = _COMPUTE.findall(_compiled_step_text(strategy, 8, dtype=dtype, compiled=False))
    kinds[dtype] = {(op, a, b) for op, a, b in ops}
    # Forward and backward of 2 convs and 3 FC layers.
    assert sum(op == "convolution" for op, *_ in ops) >= 5, dtype
    assert sum(op == "dot_general" for op, *_ in ops) >= 8, dtype
  assert kinds["bfloat16"] == {("convolution", "bf16", "bf16"), ("dot_general", "bf16", "bf16")}
  assert kinds["float32"] == {("convolution", "f32", "f32"), ("dot_general", "f32", "f32")}


# --- GPU flags -----------------------------------------------------------------


def test_gpu_overlap_flags_are_added_once_and_never_override_the_user():
  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --foo=1"}
  mesh_lib.add_gpu_overlap_flags(env)
  mesh_lib.add_gpu_overlap_flags(env)  # idempotent
  flags = env["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags  # the user's value stays
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
  for flag in mesh_lib.GPU_OVERLAP_FLAGS[1:]:
    assert flags.count(flag) == 1, (flag, flags)
  empty = {}
  mesh_lib.add_gpu_overlap_flags(empty)
  assert empty["XLA_FLAGS"].split() == list(mesh_lib.GPU_OVERLAP_FLAGS)
