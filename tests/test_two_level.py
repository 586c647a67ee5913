"""node x local meshes beyond one step: the prefetch window, the mesh split by host,
checkpoints restored between one- and two-axis layouts, and two real processes as nodes."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import PATIENT_COLLECTIVES, TINY_JOB_FLAGS, tiny_config, train_cli

from deep_image.config_error import ConfigError
from deep_image.models.vgg import make_model
from deep_image.parallel import buckets, strategies, validation
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.layer_feed import LayerFeed
from deep_image.train.checkpoint import Checkpointer
from deep_image.train.optimizer import make_optimizer

BATCH = 16
NODE_X_LOCAL = (("node", 2), ("local", 4))


def _feed(sizes, prefetch_mb):
  """A LayerFeed over buckets of `sizes` elements (one device), for its `ahead` rule."""
  bucket_list = tuple(
    buckets.Bucket("replicated", (f"l{i}",), (i,), (s,), 1) for i, s in enumerate(sizes)
  )
  fake = types.SimpleNamespace(
    buckets=bucket_list,
    param_shapes={},
    config=types.SimpleNamespace(parallel=types.SimpleNamespace(prefetch_mb=prefetch_mb)),
  )
  return LayerFeed(fake, [], [], [], None)


def test_prefetch_window_counts_the_bytes_between():
  mib = 2**20 // 4  # elements of one MiB of float32
  feed = _feed([mib, mib, 4 * mib, mib, 150 * mib], prefetch_mb=0)
  assert [feed.ahead(k) for k in range(5)] == [[1], [2], [3], [4], []]  # one bucket ahead
  feed = _feed([mib, mib, 4 * mib, mib, 150 * mib], prefetch_mb=5.5)
  # From bucket 0: 1 always; 2 (1 MiB between < 5.5); 3 (5 MiB between); not 4 (6 MiB).
  assert feed.ahead(0) == [1, 2, 3]
  assert feed.ahead(1) == [2, 3, 4]  # 4, then 5 MiB between: both < 5.5
  assert _feed([mib, mib, mib, mib, 150 * mib], prefetch_mb=5.5).ahead(0) == [1, 2, 3, 4]


@pytest.mark.parametrize(
  "spec,devices,per_host,want",
  [
    ((("data", -1),), 16, 8, (("node", "local"), (2, 8))),  # the default, split by host
    ((("data", -1),), 16, None, (("data",), (16,))),  # one process / CPU: as configured
    ((("data", -1),), 8, 8, (("data",), (8,))),  # one host: no second level
    ((("data", 8), ("model", 2)), 16, 8, (("data", "model"), (8, 2))),  # explicit: kept
    ((("data", 16),), 16, 8, (("data",), (16,))),  # a fixed size: kept
  ],
)
def test_the_default_mesh_splits_by_host(spec, devices, per_host, want):
  assert mesh_lib.resolve_mesh_shape(spec, devices, per_host) == want


@pytest.mark.parametrize(
  "hosts,local,want",
  [
    (["a", "a", "b", "b"], 4, 8),  # 2 processes of 4 GPUs per host
    (["a"] * 8 + ["b"] * 8, 1, 8),  # one process per GPU
    (["a", "b"], 8, 8),  # one process per host
    (["a", "b", "a", "b"], 4, None),  # a host's processes not consecutive: no split
    (["a", "a", "b"], 4, None),  # hosts of different sizes
  ],
)
def test_devices_per_host_groups_processes_by_host(hosts, local, want):
  assert mesh_lib.devices_per_host(hosts, local) == want


def test_mesh_by_host_is_off_on_cpu_and_one_process():
  c = tiny_config()
  assert c.parallel.mesh_by_host
  assert mesh_lib.host_devices(c.parallel) is None  # this CPU process


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("parallel.node_collective", "tree", "parallel.node_collective='tree'"),
    ("parallel.grad_dtype", "float16", "parallel.grad_dtype='float16' must be one of"),
    ("parallel.prefetch_mb", -1.0, "parallel.prefetch_mb=-1.0 must be >= 0"),
    ("parallel.mesh", (("a", 2), ("b", 2), ("c", 2)), "more than two axes larger than 1"),
  ],
)
def test_bad_two_level_fields_are_named(field, value, message):
  c = tiny_config(**{"parallel.strategy": "data", field: value})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validation.validate_parallel_config(c, 8)


def test_hybrid_splits_fc_over_the_devices_of_a_node():
  # vgg_tiny's FC1 has 24 outputs: 16 devices cannot split them, 2 nodes x 8 can not
  # either, but 4 nodes x 4 (4 per node) can.
  c = tiny_config(**{"parallel.strategy": "hybrid", "train.batch_size": 32})
  c.parallel.mesh = (("node", 4), ("local", 4))
  assert validation.validate_parallel_config(c, 16).runnable == ("hybrid",)
  c.parallel.mesh = (("data", 16),)
  with pytest.raises(ConfigError, match="splits FC1's 24 outputs over 16 devices"):
    validation.validate_parallel_config(c, 16)


def _config(strategy, mesh, overlap="deferred"):
  return tiny_config(
    **{
      "model.image_size": 8,
      "data.augment.crop_size": 8,
      "train.batch_size": BATCH,
      "train.warmup_steps": 0,
      "train.learning_rate": 0.05,
      "model.dropout": 0.0,
      "parallel.strategy": strategy,
      "parallel.overlap": overlap,
      "parallel.mesh": mesh,
    }
  )


def _make(config, n):
  mesh = mesh_lib.make_mesh(config.parallel, jax.devices()[:n])
  return strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )


def _run(strategy, state, data):
  losses = []
  for images, labels in data:
    state, metrics = strategy.train_step(
      state,
      jax.device_put(images, strategy.batch_sharding),
      jax.device_put(labels, strategy.batch_sharding),
    )
    losses.append(float(metrics["loss"]))
  return state, losses


class _Input:
  kind = "counting"

  def get_state(self):
    return {"read": 0}

  def set_state(self, state):
    pass

  def start_at(self, step):
    return True


@pytest.mark.parametrize(
  "saved,restored",
  [
    (("hybrid", NODE_X_LOCAL, 8), ("data", (("data", -1),), 4)),  # 2-D -> 1-D
    (("lazy", (("data", -1),), 8), ("hybrid", (("node", 4), ("local", 2)), 8)),  # 1-D -> 2-D
  ],
  ids=str,
)
def test_checkpoints_restore_between_one_and_two_axis_meshes(tmp_path, saved, restored):
  rng = np.random.default_rng(1)
  data = [
    (
      rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8),
      rng.integers(0, 10, BATCH).astype(np.int32),
    )
    for _ in range(3)
  ]
  src_cfg = _config(saved[0], saved[1])
  src = _make(src_cfg, saved[2])
  state, _ = _run(src, src.init(jax.random.key(0)), data[:2])
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(state, _Input(), strategy=src, config=src_cfg)
  ckpt.close()
  dst_cfg = _config(restored[0], restored[1])
  dst = _make(dst_cfg, restored[2])
  back = Checkpointer(str(tmp_path), keep=2).restore(2, dst, dst_cfg, _Input())
  # Each side applies the pending update in its own program: float32 rounding apart.
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8),
    jax.tree.map(np.asarray, dst.full_params(back)),
    jax.tree.map(np.asarray, src.full_params(state)),
  )
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(dst.abstract_state()), strict=True):
    assert got.shape == want.shape and got.sharding.is_equivalent_to(want.sharding, got.ndim)
  _, loss_src = _run(src, state, data[2:])
  _, loss_dst = _run(dst, back, data[2:])
  np.testing.assert_allclose(loss_dst, loss_src, rtol=1e-5)


def test_two_processes_are_two_nodes_of_four(tmp_path):
  """2 processes x 4 devices over gloo, mesh node x local: the node level crosses the
  processes, the local level stays in each; the losses of one process on 8 devices, 1-D."""
  job = (
    "--config.train.num_steps=4",
    "--config.train.log_every=2",
    "--config.train.batch_size=16",
    "--config.train.eval_batch_size=32",
    "--config.parallel.strategy=hybrid",
  )
  env = dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES)
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      "--",
      f"--workdir={tmp_path / 'two'}",
      "--config.parallel.num_devices=8",  # in all: 4 per process
      "--config.parallel.mesh=(('node', 2), ('local', 4))",
      *TINY_JOB_FLAGS,
      *job,
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=400,
  )
  logs = [(tmp_path / "two" / f"process_{i}.log").read_text() for i in range(2)]
  assert run.returncode == 0, run.stderr[-1500:] + logs[0][-1500:] + logs[1][-1500:]
  for log in logs:
    assert "mesh {'node': 2, 'local': 4} on 8 cpu devices" in log
  one = train_cli(tmp_path / "one", "--config.parallel.num_devices=8", *job)
  assert one.returncode == 0, one.stderr[-2000:]

  def losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
      return [r["loss"] for r in map(json.loads, f) if "loss" in r]

  two_losses, one_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
  assert len(one_losses) == 2, one_losses
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
