"""The central test: a step on N devices equals the same step on one device.

For every strategy and collective algorithm, a few SGD steps on N simulated
devices with global batch B give the same losses and the same parameters as
the plain single-device program with batch B. Tolerance: float32 reductions
in another order, |diff| <= 1e-5 + 1e-4 |value| (seen: ~2e-7).
"""

import functools

import jax
import numpy as np
import pytest

from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.optimizer import make_optimizer
from experiments.configs import base

BATCH = 24  # divides over 1, 2, 3, 4, 6 and 8 devices
STEPS = 2
ALGORITHMS = ("butterfly", "ring", "direct", "xla")
# (strategy, conv mode of hybrid)
SHARD_MAP = [("data", "data"), ("lazy", "data"), ("hybrid", "data"), ("hybrid", "lazy")]


def tiny_config(strategy="gspmd", collective="xla", conv="data"):
  c = base.get_config()
  c.model.name, c.model.image_size = "vgg_tiny", 8
  c.train.batch_size, c.train.num_steps, c.train.warmup_steps = BATCH, 10, 1
  c.train.learning_rate = 0.1
  c.parallel.strategy, c.parallel.collective, c.parallel.conv = strategy, collective, conv
  return c


def _batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    yield (
      rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8),
      rng.integers(0, 10, BATCH).astype(np.int32),
    )


def run_steps(config, n):
  """(losses per step, final params as numpy) of STEPS steps on the first n devices."""
  mesh = mesh_lib.make_mesh(config.parallel, jax.devices()[:n])
  strategy = strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )
  state = strategy.init(jax.random.key(0))
  losses = []
  for images, labels in _batches():
    state, metrics = strategy.train_step(
      state,
      jax.device_put(images, strategy.batch_sharding),
      jax.device_put(labels, strategy.batch_sharding),
    )
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), jax.tree.map(np.asarray, strategy.full_params(state))


@functools.cache
def reference():
  return run_steps(tiny_config(), 1)


def assert_same_as_reference(losses, params):
  ref_losses, ref_params = reference()
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for path, got in jax.tree_util.tree_leaves_with_path(params):
    want = functools.reduce(lambda t, k: t[k.key], path, ref_params)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(path))


CASES = (
  [("gspmd", "xla", "data", n) for n in (2, 4, 8)]
  + [(s, a, conv, 8) for s, conv in SHARD_MAP for a in ALGORITHMS]
  + [(s, a, conv, n) for s, conv in SHARD_MAP for a in ("butterfly", "xla") for n in (2, 4)]
  + [(s, "butterfly", conv, 1) for s, conv in SHARD_MAP]
  + [(s, a, conv, 6) for s, conv in SHARD_MAP for a in ("ring", "direct")]
)


@pytest.mark.parametrize("strategy,collective,conv,n", CASES)
def test_n_devices_equal_one_device(strategy, collective, conv, n):
  losses, params = run_steps(tiny_config(strategy, collective, conv), n)
  assert_same_as_reference(losses, params)


def test_losses_actually_change():
  """Guards the test above against comparing constants."""
  losses, _ = reference()
  assert abs(losses[1] - losses[0]) > 1e-3


def test_initialisation_does_not_depend_on_layout():
  def initial(strategy, n):
    c = tiny_config(strategy, "butterfly")
    mesh = mesh_lib.make_mesh(c.parallel, jax.devices()[:n])
    s = strategies.make_strategy(c, make_model(c.model), make_optimizer(c.train), mesh)
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
    strategies.validate_parallel_config(c, 8)


def test_hybrid_rejects_fc_width_that_does_not_split():
  c = tiny_config("hybrid", "ring")
  c.train.batch_size = 40  # divides over 5 devices; FC1's 24 outputs do not
  with pytest.raises(ValueError, match="splits FC1's 24 outputs over 5 devices"):
    strategies.validate_parallel_config(c, 5)
