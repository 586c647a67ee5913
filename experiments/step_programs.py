"""The step programs the benchmarks compile and time, built from the base config.

`make_config` is experiments/configs/base.py with one program's model, batch and parallel
fields; `make_strategy` lays it out on a one-axis mesh; `random_batch` / `step_runner`
feed it and run it as training does (the state carried and donated from call to call);
`Program` is one program of the scaling study. Shared by experiments.benchmark_step,
benchmark_gpu, compile_gpu and scaling; it reads the config package, so it lives in
experiments/ (nothing in deep_image/ imports experiments/), but it defines no flags.

Importing it imports JAX without starting a backend: a main can still set the host device
count afterwards (`mesh.configure_host_devices`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.optimizer import make_optimizer
from experiments.configs import base, table2

# The paper's (ImageNet's) classes, those of the Table 2 config: the studies' default, and
# what the scaling rows stored before they carried a 'classes' field were compiled with.
PAPER_CLASSES = table2.get_config().model.num_classes


def make_config(
  model, image_size, batch, strategy, collective="xla", conv=None, classes=None, overlap=None
):
  """The base config with the model, batch and parallel strategy of one benchmark program.

  Every other field keeps its base value (experiments/configs/base.py), so the config is a
  complete, trainable one; the training crop follows the model's input side. `conv`,
  `classes` and `overlap` left None keep the base config's.
  """
  c = base.get_config()
  c.model.name, c.model.image_size = model, image_size
  if classes is not None:
    c.model.num_classes = classes
  c.data.augment.crop_size = image_size
  c.data.train_scale = c.data.eval_scale = max(c.data.train_scale, image_size)
  c.train.batch_size = batch
  c.parallel.strategy, c.parallel.collective = strategy, collective
  if conv is not None:
    c.parallel.conv = conv
  if overlap is not None:
    c.parallel.overlap = overlap
  return c


def make_strategy(config, devices):
  """The strategy of `config` on a one-axis mesh over `devices`."""
  mesh = mesh_lib.make_mesh(config.parallel, devices)
  return strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )


def abstract_batch(strategy, config, dtype="uint8"):
  """ShapeDtypeStructs of a global (images [B, S, S, 3], labels [B] int32) batch on the
  strategy's batch sharding (B = train.batch_size, S = model.image_size)."""
  s, b = config.model.image_size, config.train.batch_size
  return (
    jax.ShapeDtypeStruct((b, s, s, 3), np.dtype(dtype), sharding=strategy.batch_sharding),
    jax.ShapeDtypeStruct((b,), np.int32, sharding=strategy.batch_sharding),
  )


def random_batch(strategy, global_batch: int, image_size: int, classes: int):
  """Random (images [B, S, S, 3] uint8, labels [B] int32), global arrays on the strategy's
  batch sharding. Every process draws the same host arrays (numpy seed 0) and contributes
  its own shards, so this works across processes too."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (global_batch, image_size, image_size, 3), dtype=np.uint8)
  labels = rng.integers(0, classes, (global_batch,)).astype(np.int32)

  def put(host):
    return jax.make_array_from_callback(
      host.shape, strategy.batch_sharding, lambda index: host[index]
    )

  return put(images), put(labels)


def step_runner(step, state, images, labels) -> Callable[[], None]:
  """A call that runs `step(state, images, labels) -> (state, metrics)` once and waits for
  it, carrying the (donated) state from call to call as training does.

  `run.loss()` is the last step's loss; `run.release()` drops the state (its memory).
  """
  box = {"state": state}

  def run():
    box["state"], metrics = step(box["state"], images, labels)
    jax.block_until_ready(metrics)
    box["loss"] = metrics["loss"]

  run.loss = lambda: float(box["loss"])
  run.release = box.clear
  return run


@dataclasses.dataclass(frozen=True)
class Program:
  """One step program of the scaling study."""

  model: str
  strategy: str
  algorithm: str
  devices: int
  image_size: int
  global_batch: int
  classes: int = PAPER_CLASSES
  dtype: str = "float32"

  @property
  def label(self) -> str:
    alg = "" if self.strategy == "gspmd" else f" / {self.algorithm}"
    return f"{self.model} {self.strategy}{alg} N={self.devices} B={self.global_batch}"

  def config(self):
    """`make_config` with the program's fields."""
    c = make_config(
      self.model,
      self.image_size,
      self.global_batch,
      self.strategy,
      self.algorithm,
      classes=self.classes,
    )
    c.model.dtype = self.dtype
    return c


def param_bytes(model: str, image_size: int, classes: int) -> tuple[int, int]:
  """(all parameter bytes, FC head parameter bytes) of a model, float32, never allocated."""
  m = make_model(make_config(model, image_size, 1, "gspmd", classes=classes).model)
  shapes = jax.eval_shape(
    lambda: nn.unbox(m.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  )["params"]
  total = fc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    n = math.prod(leaf.shape) * 4
    total += n
    if jax.tree_util.keystr(path).startswith("['fc"):  # fc1, fc2, fc3; the rest: convs_i
      fc += n
  return total, fc
