"""Checkpointer: cross-layout restore, field checks, what is kept, the input position."""

import functools

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_config

from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.checkpoint import Checkpointer, IncompatibleCheckpoint
from deep_image.train.optimizer import make_optimizer

BATCH = 16


class CountingInput:
  """A stand-in training input whose state is how many batches were read."""

  kind = "counting"

  def __init__(self):
    self.read = 0

  def get_state(self):
    return {"read": self.read}

  def set_state(self, state):
    self.read = state["read"]

  def start_at(self, step):
    """`TrainInput.start_at`: positioned at a global step (a stream like Grain's)."""
    self.started_at = step
    return True


def config_for(strategy, **overrides):
  return tiny_config(
    **{
      "model.image_size": 8,
      "data.augment.crop_size": 8,
      "train.batch_size": BATCH,
      "train.warmup_steps": 0,
      "train.learning_rate": 0.05,
      "model.dropout": 0.0,
      "parallel.strategy": strategy,
      "parallel.collective": "butterfly",
      **overrides,
    }
  )


def make(config, n):
  mesh = mesh_lib.make_mesh(config.parallel, jax.devices()[:n])
  return strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )


def batches(k):
  rng = np.random.default_rng(1)
  return [
    (
      rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8),
      rng.integers(0, 10, BATCH).astype(np.int32),
    )
    for _ in range(k)
  ]


def run(strategy, state, data):
  losses = []
  for images, labels in data:
    state, metrics = strategy.train_step(
      state,
      jax.device_put(images, strategy.batch_sharding),
      jax.device_put(labels, strategy.batch_sharding),
    )
    losses.append(float(metrics["loss"]))
  return state, losses


def momentum(strategy, state):
  """The momentum trace in the model's layout, as numpy."""
  trace = optax.tree_utils.tree_get(state.opt_state, "trace")
  full = jax.tree.map(
    lambda t, shape: np.asarray(t).reshape(-1)[: np.prod(shape.shape)].reshape(shape.shape),
    trace,
    strategy.param_shapes,
  )
  return full


@pytest.mark.parametrize(
  "saved,restored,overlap",
  [
    (("lazy", 8), ("gspmd", 4), "deferred"),
    (("hybrid", 4), ("lazy", 2), "deferred"),
    (("lazy", 8), ("gspmd", 4), "none"),
  ],
  ids=str,
)
def test_restore_onto_another_strategy_and_device_count(tmp_path, saved, restored, overlap):
  # overlap='none': the checkpoint holds the parameters and momentum themselves, and the
  # restore only lays them out anew: bit for bit. overlap='deferred': it holds them before
  # the last update plus that update's gradient, and each side applies the update in its
  # own layout (another compiled program: another fusion and summation order), so they
  # agree to float32 rounding (a few ulps; 9.3e-10 was seen), not bit for bit.
  if overlap == "none":
    same = np.testing.assert_array_equal
  else:
    same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-8)
  data = batches(3)
  src_cfg = config_for(saved[0], **{"parallel.overlap": overlap})
  src = make(src_cfg, saved[1])
  state, _ = run(src, src.init(jax.random.key(0)), data[:2])
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(state, CountingInput(), strategy=src, config=src_cfg)
  ckpt.close()

  dst_cfg = config_for(restored[0], **{"parallel.overlap": overlap})
  dst = make(dst_cfg, restored[1])
  back = Checkpointer(str(tmp_path), keep=2).restore(2, dst, dst_cfg, CountingInput())
  assert int(back.step) == 2
  jax.tree.map(
    same,
    jax.tree.map(np.asarray, dst.full_params(back)),
    jax.tree.map(np.asarray, src.full_params(state)),
  )
  # The saved pending update (overlap='deferred') is applied to the momentum too.
  want = src.model_state(state)
  assert want.pending is None and (state.pending is None) == (overlap == "none")
  jax.tree.map(same, momentum(dst, back), momentum(src, want))
  # Restored in the new strategy's own layout, and it trains on from there as the old one.
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(dst.abstract_state()), strict=True):
    assert got.shape == want.shape and got.sharding.is_equivalent_to(want.sharding, got.ndim)
  _, loss_src = run(src, state, data[2:])
  _, loss_dst = run(dst, back, data[2:])
  np.testing.assert_allclose(loss_dst, loss_src, rtol=1e-5)


def test_a_different_model_field_is_named(tmp_path):
  cfg = config_for("data")
  s = make(cfg, 2)
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(s.init(jax.random.key(0)), CountingInput(), strategy=s, config=cfg)
  ckpt.close()
  other = config_for("data", **{"train.momentum": 0.5})
  with pytest.raises(
    IncompatibleCheckpoint, match=r"train.momentum=0.9, but the config says train.momentum=0.5"
  ):
    Checkpointer(str(tmp_path), keep=1).restore(0, make(other, 2), other, CountingInput())


def test_keeps_the_latest_and_the_best(tmp_path):
  cfg = config_for("data")
  s = make(cfg, 1)
  state = s.init(jax.random.key(0))
  ckpt = Checkpointer(str(tmp_path), keep=2)
  top1 = {1: 0.5, 2: 0.9, 3: 0.3, 4: None, 5: None}
  for step, acc in top1.items():
    state = state.replace(step=jax.numpy.int32(step))
    metrics = None if acc is None else {"top1": acc, "top5": 1.0}
    ckpt.save(state, CountingInput(), strategy=s, config=cfg, metrics=metrics)
    ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 4, 5]
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
  ckpt.close()
  # A restarted run still knows (and keeps) the best one.
  again = Checkpointer(str(tmp_path), keep=2)
  assert again.best_step() == 2
  for step in (6, 7):
    state = state.replace(step=jax.numpy.int32(step))
    again.save(state, CountingInput(), strategy=s, config=cfg)
    again.wait()
  assert again.manager.all_steps() == [2, 6, 7]
  again.close()


def test_the_input_position_is_restored(tmp_path):
  cfg = config_for("data")
  s = make(cfg, 1)
  source = CountingInput()
  source.read = 7
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(s.init(jax.random.key(0)), source, strategy=s, config=cfg)
  ckpt.close()
  fresh = CountingInput()
  Checkpointer(str(tmp_path), keep=1).restore(0, s, cfg, fresh)
  assert fresh.read == 7
  assert not hasattr(fresh, "started_at")
  # Another input kind (or process / worker count): the saved per-process state is not
  # forced onto it; it is positioned at the saved step instead.
  other = CountingInput()
  other.kind = "device cache"
  Checkpointer(str(tmp_path), keep=1).restore(0, s, cfg, other)
  assert other.read == 0 and other.started_at == 0


def test_the_optimizer_state_is_laid_out_like_the_parameters(tmp_path):
  cfg = config_for("lazy")
  s = make(cfg, 4)
  state = s.init(jax.random.key(0))
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(state, CountingInput(), strategy=s, config=cfg)
  ckpt.close()
  back = Checkpointer(str(tmp_path), keep=1).restore(0, s, cfg, CountingInput())
  trace = optax.tree_utils.tree_get(back.opt_state, "trace")
  for leaf, param in zip(jax.tree.leaves(trace), jax.tree.leaves(back.params), strict=True):
    assert leaf.sharding == param.sharding
