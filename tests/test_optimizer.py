"""Learning-rate schedule, weight-decay mask and optimizer state (deep_image/train/optimizer.py).

Schedule values are checked against the closed form written out here independently of
optax; the update rule is checked on real vgg_tiny parameters with hand-chosen gradients.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import train_cli

from deep_image.config_error import ConfigError
from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train import optimizer
from experiments.configs import base


def _train_cfg(**overrides):
  cfg = base.get_config().train
  cfg.num_steps, cfg.warmup_steps, cfg.learning_rate = 100, 10, 0.4
  cfg.batch_size, cfg.lr_batch_reference = 64, 0
  cfg.momentum, cfg.weight_decay = 0.9, 5e-4
  cfg.update(overrides)
  return cfg


def _closed_form(t, peak, warmup, total):
  if t < warmup:
    return peak * t / warmup
  return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize(
  "step, expected",
  [
    (0, 0.0),  # warmup starts at 0
    (5, 0.2),  # half way up
    (9, 0.36),  # last warmup step
    (10, 0.4),  # end of warmup: the peak
    (55, 0.2),  # half way down the cosine
    (99, 0.4 * 0.5 * (1 + math.cos(math.pi * 89 / 90))),  # last trained step, still > 0
    (100, 0.0),
  ],
)
def test_schedule_values(step, expected):
  schedule = optimizer.learning_rate_schedule(_train_cfg())
  assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
  assert expected == pytest.approx(_closed_form(step, 0.4, 10, 100), abs=1e-12)


def test_schedule_follows_closed_form_everywhere():
  schedule = optimizer.learning_rate_schedule(_train_cfg())
  got = np.asarray(jax.vmap(schedule)(jnp.arange(100)))
  want = [_closed_form(t, 0.4, 10, 100) for t in range(100)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(got[1:10] > got[:9]) and np.all(got[11:] < got[10:-1])


def test_no_warmup_trains_at_the_peak_from_step_0():
  schedule = optimizer.learning_rate_schedule(_train_cfg(warmup_steps=0))
  assert float(schedule(0)) == pytest.approx(0.4, rel=1e-6)
  assert float(schedule(50)) == pytest.approx(0.2, rel=1e-5)
  # And the optimizer really uses it: the first update with zero decay is -peak * grad.
  cfg = _train_cfg(warmup_steps=0, weight_decay=0.0)
  tx = optimizer.make_optimizer(cfg)
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, -0.4, rtol=1e-6)


def test_warmup_longer_than_training_is_clipped():
  schedule = optimizer.learning_rate_schedule(_train_cfg(num_steps=8, warmup_steps=20))
  np.testing.assert_allclose(
    [float(schedule(t)) for t in range(9)], [0.4 * t / 8 for t in range(9)], rtol=1e-6
  )


def test_batch_scaling():
  # 64 / 256 of 0.4: the peak is 0.1, reached at the end of warmup.
  schedule = optimizer.learning_rate_schedule(_train_cfg(lr_batch_reference=256))
  assert float(schedule(10)) == pytest.approx(0.1, rel=1e-6)
  assert float(schedule(5)) == pytest.approx(0.05, rel=1e-6)
  scaled_up = optimizer.learning_rate_schedule(_train_cfg(batch_size=512, lr_batch_reference=256))
  assert float(scaled_up(10)) == pytest.approx(0.8, rel=1e-6)
  # 0 means no scaling, whatever the batch.
  plain = optimizer.learning_rate_schedule(_train_cfg(batch_size=512))
  assert float(plain(10)) == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize(
  "field, value",
  [("warmup_steps", -1), ("lr_batch_reference", -256), ("learning_rate", -1), ("learning_rate", 0)],
)
def test_bad_schedule_fields_are_named(field, value):
  with pytest.raises(ConfigError, match=f"train.{field}={value}"):
    optimizer.learning_rate_schedule(_train_cfg(**{field: value}))


def test_a_negative_learning_rate_stops_the_run_before_step_1(tmp_path):
  # It used to train, the loss climbing until it was no longer finite.
  done = train_cli(tmp_path, "--config.train.learning_rate=-1")
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert (
    done.stderr.strip().splitlines()[-1] == "config error: train.learning_rate=-1.0 must be > 0"
  )
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def _tiny_params():
  """vgg_tiny's parameter tree, filled with random values (biases too: decaying them shows)."""
  cfg = base.get_config().model
  cfg.name, cfg.image_size = "vgg_tiny", 8
  model = make_model(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), nn.unbox(shapes["params"])
  )


def test_weight_decay_moves_kernels_only_by_lr_wd_param():
  cfg = _train_cfg(warmup_steps=0, learning_rate=0.5, weight_decay=0.01)
  tx = optimizer.make_optimizer(cfg)
  params = _tiny_params()
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  kinds = set()
  for path, old in jax.tree_util.tree_leaves_with_path(params):
    name = path[-1].key
    kinds.add(name)
    # The update itself (new - old would lose digits to cancellation in float32).
    update = np.asarray(_get(updates, path))
    if name == "kernel":
      np.testing.assert_allclose(update, -0.5 * 0.01 * np.asarray(old), rtol=1e-5)
      assert not np.array_equal(_get(new, path), old)
    else:
      assert name == "bias"
      np.testing.assert_array_equal(_get(new, path), old)
  assert kinds == {"kernel", "bias"}


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_momentum_update_rule():
  # Two steps with gradient g: trace1 = g + wd p0, trace2 = 0.9 trace1 + g + wd p1.
  cfg = _train_cfg(warmup_steps=0, num_steps=4, learning_rate=0.1, weight_decay=0.01)
  tx = optimizer.make_optimizer(cfg)
  lr = [float(optimizer.learning_rate_schedule(cfg)(t)) for t in range(2)]
  p0 = {"fc": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 2.0)}}
  g = jax.tree.map(lambda p: jnp.full_like(p, 0.5), p0)
  state = tx.init(p0)
  u1, state = tx.update(g, state, p0)
  p1 = optax.apply_updates(p0, u1)
  u2, state = tx.update(g, state, p1)
  for name, wd in (("kernel", 0.01), ("bias", 0.0)):
    trace1 = 0.5 + wd * 2.0
    np.testing.assert_allclose(u1["fc"][name], -lr[0] * trace1, rtol=1e-6)
    q1 = 2.0 - lr[0] * trace1
    np.testing.assert_allclose(u2["fc"][name], -lr[1] * (0.9 * trace1 + 0.5 + wd * q1), rtol=1e-6)


def test_state_is_one_momentum_trace_like_the_params_and_a_step_count():
  cfg = _train_cfg()
  tx = optimizer.make_optimizer(cfg)
  params = _tiny_params()
  state = tx.init(params)
  traces = optax.tree_utils.tree_get_all_with_path(state, "trace")
  assert len(traces) == 1
  trace = traces[0][1]
  assert jax.tree.structure(trace) == jax.tree.structure(params)
  for t, p in zip(jax.tree.leaves(trace), jax.tree.leaves(params), strict=True):
    assert t.shape == p.shape and t.dtype == p.dtype
    np.testing.assert_array_equal(t, 0.0)
  # Besides the trace, only the schedule's step count: no per-parameter state to shard.
  params_size = sum(p.size for p in jax.tree.leaves(params))
  assert sum(np.size(x) for x in jax.tree.leaves(state)) == params_size + 1
  count = optax.tree_utils.tree_get(state, "count")
  assert int(count) == 0
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(optax.tree_utils.tree_get(state, "count")) == 1


@pytest.mark.parametrize("strategy", ["gspmd", "data", "lazy", "hybrid"])
def test_decay_mask_on_every_strategys_stored_layout(strategy):
  # The mask reads parameter paths: every strategy must store kernels under 'kernel'.
  c = base.get_config()
  c.model.name, c.model.image_size = "vgg_tiny", 8
  c.train.batch_size, c.parallel.strategy = 8, strategy
  mesh = mesh_lib.make_mesh(c.parallel, jax.devices())
  s = strategies.make_strategy(c, make_model(c.model), optimizer.make_optimizer(c.train), mesh)
  shapes = s._stored_param_shapes()
  mask = optimizer._decay_mask(shapes)
  names = {
    jax.tree_util.keystr(path): decayed
    for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
  }
  assert sum(names.values()) == len(names) // 2 > 0
  for name, decayed in names.items():
    assert decayed == name.endswith("['kernel']"), name
  # The optimizer state mirrors the stored layout too.
  opt = jax.eval_shape(s.tx.init, shapes)
  trace = optax.tree_utils.tree_get(opt, "trace")
  assert jax.tree.structure(trace) == jax.tree.structure(shapes)
  assert [t.shape for t in jax.tree.leaves(trace)] == [p.shape for p in jax.tree.leaves(shapes)]
