"""The central test: N devices train exactly like one device, with dropout.

For every strategy and collective algorithm, STEPS steps of SGD with momentum
on N simulated devices with global batch B give, after EACH step, the same
metrics (loss, top-1/5, grad/param/update norms) and the same parameters as
the single-device program with batch B. The learning rate is non-zero from
the first step (`warmup_steps=0`) and dropout is on, so a pipeline that
applies gradients a step late, or draws dropout masks per device, fails here
(the guards below check that the compared quantities do move step to step,
and that dropout changes them).

The shard_map strategies run with `parallel.overlap='deferred'` (the default:
each step applies the previous step's update, `full_params` applies the
pending one) and with 'none', over buckets of one to three layers
(`BUCKET_MB`), so every bucket boundary and both schedules are compared.

Tolerances:
  float32:  |diff| <= 1e-5 + 1e-4 |value| (reductions in another order; seen ~2e-6).
  bfloat16: params and losses |diff| <= 3e-2 + 3e-2 |value|, norms the same;
            top-1/5 are not compared (a bf16 near-tie may flip one example).
            Reductions of bf16 activation gradients (e.g. conv biases) in
            another order already differ by ~1e-3 after one step and ~1.5e-2
            after three on vgg_tiny with lr 0.1, as much as bf16 differs from
            float32; a one-step shift of the trajectory moves parameters by
            more than 3e-2 + 3e-2 |value| (checked below).
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deep_image.models import losses
from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies, validation
from deep_image.parallel.mesh import PATIENT_COLLECTIVES
from deep_image.train.optimizer import make_optimizer
from experiments.configs import base

BATCH = 24  # divides over 1, 2, 3, 4, 6 and 8 devices
STEPS = 3
DROPOUT = 0.3
LEARNING_RATE = 0.1
# vgg_tiny's layers hold 0.4-3.2 KB of parameters: 3 KB buckets group up to three.
BUCKET_MB = 0.003
ALGORITHMS = ("butterfly", "ring", "direct", "xla")
# (strategy, conv mode of hybrid)
SHARD_MAP = [("data", "data"), ("lazy", "data"), ("hybrid", "data"), ("hybrid", "lazy")]
METRICS = ("loss", "top1", "top5", "grad_norm", "param_norm", "update_norm")
# (rtol, atol, metrics compared)
FLOAT32_TOL = (1e-4, 1e-5, METRICS)
BFLOAT16_TOL = (3e-2, 3e-2, ("loss", "grad_norm", "param_norm", "update_norm"))


def tiny_config(
  strategy="gspmd",
  collective="xla",
  conv="data",
  dtype="float32",
  dropout=DROPOUT,
  overlap="deferred",
  bucket_mb=BUCKET_MB,
):
  c = base.get_config()
  c.model.name, c.model.image_size = "vgg_tiny", 8
  c.model.dropout, c.model.dtype = dropout, dtype
  c.train.batch_size, c.train.num_steps, c.train.warmup_steps = BATCH, 10, 0
  c.train.learning_rate = LEARNING_RATE
  c.parallel.strategy, c.parallel.collective, c.parallel.conv = strategy, collective, conv
  c.parallel.overlap, c.parallel.bucket_mb = overlap, bucket_mb
  return c


def _batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    yield (
      rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8),
      rng.integers(0, 10, BATCH).astype(np.int32),
    )


def _make(config, n):
  mesh = mesh_lib.make_mesh(config.parallel, jax.devices()[:n])
  return strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )


def run_steps(config, n):
  """STEPS steps on the first n devices.

  Returns (initial params, [(metrics, params after the step) per step]), all
  numpy, params in the model's own layout.
  """
  strategy = _make(config, n)
  state = strategy.init(jax.random.key(0))
  initial = jax.tree.map(np.asarray, strategy.full_params(state))
  trajectory = []
  for images, labels in _batches():
    state, metrics = strategy.train_step(
      state,
      jax.device_put(images, strategy.batch_sharding),
      jax.device_put(labels, strategy.batch_sharding),
    )
    params = jax.tree.map(np.asarray, strategy.full_params(state))
    trajectory.append(({k: float(v) for k, v in metrics.items()}, params))
  return initial, trajectory


@functools.cache
def reference(dtype="float32", dropout=DROPOUT):
  return run_steps(tiny_config(dtype=dtype, dropout=dropout), 1)


def assert_step_close(got, want, tol, what=""):
  """One step's (metrics, params) against another's, within tol = (rtol, atol, metrics)."""
  rtol, atol, names = tol
  (got_metrics, got_params), (want_metrics, want_params) = got, want
  for name in names:
    np.testing.assert_allclose(
      got_metrics[name], want_metrics[name], rtol=rtol, atol=atol, err_msg=f"{what} {name}"
    )
  assert jax.tree.structure(got_params) == jax.tree.structure(want_params)
  for path, g in jax.tree_util.tree_leaves_with_path(got_params):
    w = functools.reduce(lambda t, k: t[k.key], path, want_params)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


def assert_same_trajectory(got, want, tol):
  (got_init, got_steps), (want_init, want_steps) = got, want
  jax.tree.map(np.testing.assert_array_equal, got_init, want_init)
  assert len(got_steps) == len(want_steps) == STEPS
  for t, (g, w) in enumerate(zip(got_steps, want_steps, strict=True)):
    assert_step_close(g, w, tol, what=f"after step {t + 1}:")


CASES = (
  [("gspmd", "xla", "data", n) for n in (2, 4, 8)]
  + [(s, a, conv, 8) for s, conv in SHARD_MAP for a in ALGORITHMS]
  + [(s, a, conv, n) for s, conv in SHARD_MAP for a in ("butterfly", "xla") for n in (2, 4)]
  + [(s, "butterfly", conv, 1) for s, conv in SHARD_MAP]
  + [(s, a, conv, 6) for s, conv in SHARD_MAP for a in ("butterfly", "ring", "direct")]
)


@pytest.mark.parametrize("strategy,collective,conv,n", CASES)
def test_n_devices_train_like_one_device(strategy, collective, conv, n):
  got = run_steps(tiny_config(strategy, collective, conv), n)
  assert_same_trajectory(got, reference(), FLOAT32_TOL)


# overlap='none' (the whole update inside the step) and one bucket per layer.
NONE_CASES = [(s, a, conv, 8) for s, conv in SHARD_MAP for a in ("butterfly", "xla")] + [
  (s, "ring", conv, 6) for s, conv in SHARD_MAP[:2]
]


@pytest.mark.parametrize("strategy,collective,conv,n", NONE_CASES)
def test_without_overlap_n_devices_train_like_one_device(strategy, collective, conv, n):
  got = run_steps(tiny_config(strategy, collective, conv, overlap="none"), n)
  assert_same_trajectory(got, reference(), FLOAT32_TOL)


@pytest.mark.parametrize("overlap", ["none", "deferred"])
@pytest.mark.parametrize("strategy,conv", [("data", "data"), ("lazy", "data"), ("hybrid", "lazy")])
def test_one_bucket_per_layer_trains_like_one_device(strategy, conv, overlap):
  got = run_steps(tiny_config(strategy, "butterfly", conv, overlap=overlap, bucket_mb=0), 4)
  assert_same_trajectory(got, reference(), FLOAT32_TOL)


@pytest.mark.parametrize("conv,n,parts", [("data", 4, 2), ("lazy", 2, 3)])
def test_the_hybrid_head_in_micro_batches_trains_like_one_device(conv, n, parts):
  """parallel.fc_micro_batches (auto: 1 on CPU, 2 on GPUs) set explicitly: same SGD, same
  dropout masks, whatever the parts."""
  config = tiny_config("hybrid", "butterfly", conv)
  config.parallel.fc_micro_batches = parts  # the local batch: 6 (n=4) or 12 (n=2)
  got = run_steps(config, n)
  assert_same_trajectory(got, reference(), FLOAT32_TOL)


@pytest.mark.parametrize("strategy,conv", [("data", "data"), ("lazy", "data"), ("hybrid", "data")])
def test_deferred_state_holds_the_weights_one_update_behind(strategy, conv):
  """Guards the deferral itself: after step t the stored weights are those after t - 1
  steps and the update of step t is pending; `full_params` applies it."""
  initial, steps = reference()
  strategy_ = _make(tiny_config(strategy, "butterfly", conv), 8)
  state = strategy_.init(jax.random.key(0))
  assert not bool(state.pending.valid)
  for t, (images, labels) in enumerate(_batches()):
    state, _ = strategy_.train_step(
      state,
      jax.device_put(images, strategy_.batch_sharding),
      jax.device_put(labels, strategy_.batch_sharding),
    )
    assert bool(state.pending.valid)
    stored = strategy_.model_state(
      state.replace(pending=state.pending.replace(valid=jnp.zeros((), bool)))
    )
    before = initial if t == 0 else steps[t - 1][1]
    jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
      jax.tree.map(np.asarray, stored.params),
      before,
    )


BF16_CASES = [
  ("gspmd", "xla", "data", 8),
  ("lazy", "butterfly", "data", 8),
  ("hybrid", "ring", "lazy", 4),
]


@pytest.mark.parametrize("strategy,collective,conv,n", BF16_CASES)
def test_bfloat16_n_devices_train_like_one_device(strategy, collective, conv, n):
  got = run_steps(tiny_config(strategy, collective, conv, dtype="bfloat16"), n)
  assert_same_trajectory(got, reference("bfloat16"), BFLOAT16_TOL)


def two_level(config, shape, node_collective=""):
  """`config` on a node x local mesh of shape (nodes, devices per node)."""
  config.parallel.mesh = (("node", shape[0]), ("local", shape[1]))
  config.parallel.node_collective = node_collective
  return config


# (strategy, conv, (nodes, local), collective, node_collective)
TWO_LEVEL_CASES = (
  [(s, conv, (2, 4), "butterfly", "") for s, conv in SHARD_MAP]
  + [(s, conv, (4, 2), "ring", "") for s, conv in SHARD_MAP]
  + [(s, conv, (3, 2), "xla", "") for s, conv in (("data", "data"), ("hybrid", "lazy"))]
  + [("hybrid", "data", (2, 4), "ring", "butterfly")]
)


@pytest.mark.parametrize("strategy,conv,shape,collective,node_collective", TWO_LEVEL_CASES, ids=str)
def test_node_x_local_mesh_trains_like_one_device(
  strategy, conv, shape, collective, node_collective
):
  """Hierarchical collectives, hybrid's FC split inside a node, its shards all-reduced
  across nodes: the same SGD step for step, with dropout."""
  config = two_level(tiny_config(strategy, collective, conv), shape, node_collective)
  got = run_steps(config, shape[0] * shape[1])
  assert_same_trajectory(got, reference(), FLOAT32_TOL)


@pytest.mark.parametrize(
  "strategy,conv,shape", [("data", "data", (2, 4)), ("hybrid", "lazy", (4, 2))]
)
def test_node_x_local_mesh_without_overlap_trains_like_one_device(strategy, conv, shape):
  config = two_level(tiny_config(strategy, "butterfly", conv, overlap="none"), shape)
  assert_same_trajectory(run_steps(config, 8), reference(), FLOAT32_TOL)


@pytest.mark.parametrize("strategy,conv,mesh", [("hybrid", "data", (2, 4))])
def test_prefetching_several_buckets_ahead_trains_like_one_device(strategy, conv, mesh):
  """parallel.prefetch_mb larger than the model: every bucket is prepared at the first
  layer (`LayerFeed.ahead`); only the schedule changes."""
  config = tiny_config(strategy, "butterfly", conv)
  config.parallel.prefetch_mb = 1.0  # vgg_tiny's buckets hold 3 KB
  if len(mesh) == 2:
    two_level(config, mesh)
  assert_same_trajectory(run_steps(config, 8), reference(), FLOAT32_TOL)


# parallel.grad_dtype='bfloat16': each device's gradient is rounded to bf16 (8 bits of
# mantissa, 2^-9 relative) before it is summed. After three steps at lr 0.1 parameters
# differ from the float32 run by up to 1.15e-2 and loss / norms by up to 5e-4 relative
# (seen on vgg_tiny, data 2x4, lazy 8, hybrid 2x4 and 8): params |diff| <= 2e-2 + 2e-2
# |value|, metrics 2e-3 relative.
GRAD_BF16_TOL = (2e-2, 2e-2, ("loss", "grad_norm", "param_norm", "update_norm"))
GRAD_BF16_METRICS_RTOL = 2e-3


@pytest.mark.parametrize(
  "strategy,conv,mesh",
  [("data", "data", (2, 4)), ("hybrid", "lazy", (2, 4))],
)
def test_bfloat16_gradient_collectives_train_like_one_device(strategy, conv, mesh):
  config = tiny_config(strategy, "butterfly", conv)
  config.parallel.grad_dtype = "bfloat16"
  if len(mesh) == 2:
    two_level(config, mesh)
  got = run_steps(config, 8)
  assert_same_trajectory(got, reference(), GRAD_BF16_TOL)
  for (metrics, _), (want, _) in zip(got[1], reference()[1], strict=True):
    for name in GRAD_BF16_TOL[2]:
      np.testing.assert_allclose(metrics[name], want[name], rtol=GRAD_BF16_METRICS_RTOL)
  # The gradients did travel in bfloat16: not within the float32 tolerance.
  with pytest.raises(AssertionError):
    assert_same_trajectory(got, reference(), FLOAT32_TOL)


def check_twelve_devices():
  """12 devices as 3 nodes x 4 (run by a process with 12 devices)."""
  for strategy, conv in (("data", "data"), ("hybrid", "lazy")):
    config = two_level(tiny_config(strategy, "butterfly", conv), (3, 4))
    assert_same_trajectory(run_steps(config, 12), reference(), FLOAT32_TOL)
    print(f"{strategy}/{conv} ok on 3 x 4", flush=True)


def test_twelve_devices_as_three_nodes_of_four():
  """In one subprocess: the device count is fixed when JAX starts (conftest gives 8)."""
  tests = pathlib.Path(__file__).resolve().parent
  env = dict(
    os.environ,
    XLA_FLAGS=f"{PATIENT_COLLECTIVES} --xla_force_host_platform_device_count=12",
    PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]),
  )
  done = subprocess.run(
    [sys.executable, "-c", "import test_equivalence as t; t.check_twelve_devices()"],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split("\n")[:-1] == ["data/data ok on 3 x 4", "hybrid/lazy ok on 3 x 4"]


@pytest.mark.parametrize("dtype,tol", [("float32", FLOAT32_TOL), ("bfloat16", BFLOAT16_TOL)])
def test_one_step_late_does_not_pass(dtype, tol):
  """Guards the tests above: every step changes what they compare beyond the tolerance.

  A program whose trajectory lags by one step (gradients applied late, or the
  first update lost to a zero learning rate) is compared against a shifted one
  here, and must fail.
  """
  initial, steps = reference(dtype)
  rtol, atol, _ = tol
  params = [initial] + [p for _, p in steps]  # params[t]: after t steps
  for t in range(STEPS):  # step 1 too: the learning rate is not zero at the start
    with pytest.raises(AssertionError):
      jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol),
        params[t],
        params[t + 1],
      )
  for t in range(1, STEPS):
    with pytest.raises(AssertionError):
      np.testing.assert_allclose(steps[t][0]["loss"], steps[t - 1][0]["loss"], rtol, atol)


def test_dropout_changes_the_training():
  """Guards the tests above: dropout is on and matters (masks are compared, not skipped)."""
  _, with_dropout = reference()
  _, without = reference(dropout=0.0)
  first_loss = with_dropout[0][0]["loss"], without[0][0]["loss"]
  assert abs(first_loss[0] - first_loss[1]) > 1e-2, first_loss  # same weights, other masks
  with pytest.raises(AssertionError):
    assert_step_close(with_dropout[-1], without[-1], FLOAT32_TOL)


def test_step_norms_measure_the_gradient_the_weights_and_the_update():
  """grad_norm of the mean loss (same dropout masks), param_norm after, update_norm applied."""
  initial, steps = reference()
  config = tiny_config()
  strategy = _make(config, 1)
  images, labels = next(_batches())

  def mean_loss(params):
    logits = strategy.model.apply(
      {"params": params},
      jnp.asarray(images),
      train=True,
      dropout_key=jax.random.fold_in(strategy.dropout_key, 0),
      example_ids=jnp.arange(BATCH),
    )
    return losses.loss_and_counts(logits, jnp.asarray(labels))[0] / BATCH

  grads = jax.jit(jax.grad(mean_loss))(initial)
  norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))  # noqa: E731
  np.testing.assert_allclose(steps[0][0]["grad_norm"], norm(grads), rtol=1e-5)
  np.testing.assert_allclose(steps[0][0]["loss"], float(mean_loss(initial)), rtol=1e-5)
  previous = initial
  for metrics, params in steps:
    np.testing.assert_allclose(metrics["param_norm"], norm(params), rtol=1e-5)
    update = jax.tree.map(np.subtract, params, previous)
    np.testing.assert_allclose(metrics["update_norm"], norm(update), rtol=1e-4)
    previous = params


def test_initialisation_does_not_depend_on_layout():
  def initial(strategy, n):
    s = _make(tiny_config(strategy, "butterfly"), n)
    return jax.tree.map(np.asarray, s.full_params(s.init(jax.random.key(3))))

  want = initial("gspmd", 1)
  for strategy, n in (("gspmd", 8), ("lazy", 8), ("hybrid", 4)):
    jax.tree.map(np.testing.assert_array_equal, initial(strategy, n), want)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("parallel.strategy", "pipeline", "parallel.strategy='pipeline'"),
    ("parallel.collective", "tree", "parallel.collective='tree'"),
    ("parallel.conv", "model", "parallel.conv='model'"),
    ("train.batch_size", 20, "train.batch_size=20 does not divide over the 8 devices"),
    ("parallel.mesh", (("data", 16),), "needs 16 devices but only 8"),
    ("parallel.mesh", (("data", 3), ("x", -1)), "8 devices do not divide by 3"),
  ],
)
def test_bad_configs_fail_before_compiling(field, value, message):
  c = tiny_config("hybrid", "butterfly")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validation.validate_parallel_config(c, 8)


def test_hybrid_rejects_fc_width_that_does_not_split():
  c = tiny_config("hybrid", "ring")
  c.train.batch_size = 40  # divides over 5 devices; FC1's 24 outputs do not
  with pytest.raises(ValueError, match="splits FC1's 24 outputs over 5 devices"):
    validation.validate_parallel_config(c, 5)


def test_device_augmentation_without_preprocess_is_a_clear_error():
  strategy = _make(tiny_config("data", "xla"), 2)
  state = strategy.init(jax.random.key(0))
  images = jax.device_put(np.zeros((BATCH, 8, 8, 3), np.uint8), strategy.batch_sharding)
  labels = jax.device_put(np.zeros(BATCH, np.int32), strategy.batch_sharding)
  with pytest.raises(ValueError, match="no preprocess function"):
    strategy.train_step(state, images, labels, {"shift": labels})
