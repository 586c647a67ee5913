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
         FC1/FC2 split across all devices (node x   FC activations gathered /
         local: across the devices of a node, the   scattered (fc_block.py); node
         nodes data parallel)                       x local: FC shards all-reduced
                                                    over the nodes per bucket
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

Modules: `strategy_base` (the interface, gspmd), `shard_map_strategy` (data,
lazy, hybrid) with `layer_feed`, the layouts of `layout_policy`, the checks of
`validation`. This module is the factory: `make_strategy`, and
`choose_strategy` for parallel.strategy='auto'.

The shard_map strategies run over a mesh with one axis, or two (node x local,
outer first): then every all-device collective runs level by level (inside a
node on the whole buffer, across nodes on 1/L of it) and hybrid splits FC1/FC2
over the devices of a node only. Collectives come from
`deep_image.parallel.collectives`, `config.parallel.collective` the algorithm
(inside a node) and `parallel.node_collective` across nodes ('': the same).

Dropout masks are a function of (config.seed, step, layer, global example
index) only (`vgg.dropout_keep_mask`), so the equality holds with dropout too,
and a resumed run draws the same masks on another device count.
"""

from __future__ import annotations

import copy

import optax
from absl import logging
from jax.sharding import Mesh

from deep_image.config_error import ConfigError
from deep_image.models.vgg import VGG
from deep_image.parallel import planner
from deep_image.parallel.clusters import cluster_for_mesh
from deep_image.parallel.layout_policy import STRATEGIES
from deep_image.parallel.shard_map_strategy import ShardMapStrategy
from deep_image.parallel.strategy_base import GSPMDStrategy, Preprocess, Strategy
from deep_image.parallel.validation import AUTO, ParallelPlan, validate_parallel_config


def make_strategy(
  config,
  model: VGG,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  preprocess: Preprocess | None = None,
  plan: ParallelPlan | None = None,
) -> Strategy:
  """The strategy named by `config.parallel.strategy` on `mesh`.

  plan: what `validation.validate_parallel_config(config, num_devices)` returned
  for this config and this mesh's axes (e.g. by preflight); None: validate here,
  against `mesh`'s own axes.
  Either way the config is validated once.

  'auto' builds the strategy `choose_strategy` predicts fastest among
  `plan.runnable` (logged with the predicted step times); the strategy gets a
  copy of `config` with that name in `parallel.strategy`.

  preprocess(images, augment) -> images runs inside the jitted step when
  `train_step` is given augmentation parameters (data.augment_on='device'),
  e.g. `lambda im, aug: augment_device.augment_batch({"image": im, "augment": aug}, crop)`.
  """
  if plan is None:
    # Against the mesh as built (e.g. split by host, `mesh.by_host`), not as configured.
    checked = copy.deepcopy(config)
    checked.parallel.mesh = tuple(mesh.shape.items())
    plan = validate_parallel_config(checked, mesh.size)
  elif plan.axis_sizes != dict(mesh.shape) or plan.strategy != config.parallel.strategy:
    raise ValueError(
      f"plan for {plan.strategy!r} on mesh axes {plan.axis_sizes} given for "
      f"parallel.strategy={config.parallel.strategy!r} on mesh axes {dict(mesh.shape)}"
    )
  name = config.parallel.strategy
  if name == AUTO:
    name, reason = choose_strategy(config, mesh, plan.runnable)
    logging.info("parallel.strategy='auto' -> %r: %s", name, reason)
    config = copy.deepcopy(config)
    config.parallel.strategy = name
  if name == "gspmd":
    return GSPMDStrategy(config, model, tx, mesh, preprocess)
  return ShardMapStrategy(config, model, tx, mesh, name, preprocess)


def choose_strategy(config, mesh, runnable: tuple[str, ...] | None = None) -> tuple[str, str]:
  """The strategy the cost model ranks first for `config` on `mesh`, and why.

  Candidates are `runnable`: the strategies `validate_parallel_config` accepts
  for this config and mesh (e.g. hybrid only when FC1's width divides over the
  devices of its split); None: validate here. Each is predicted on the mesh at
  hand (its axis sizes, the configured collective and node_collective; gspmd
  with XLA's) and ranked as `experiments.plan` ranks setups (`planner.rank_key`).
  Returns (name, one-line reason with every candidate's predicted step time).
  """
  if runnable is None:
    auto = copy.deepcopy(config)
    auto.parallel.strategy = AUTO
    runnable = validate_parallel_config(auto, mesh.size).runnable
  par, n = config.parallel, mesh.size
  if not runnable:
    raise ConfigError(f"parallel.strategy='auto': no strategy can run this config on {n} devices")
  cl = cluster_for_mesh(mesh)
  levels = tuple(mesh.shape[a] for a in mesh.axis_names if mesh.shape[a] > 1) or (n,)
  batch = config.train.batch_size // n
  rows = [
    planner.predict_row(
      config,
      cl,
      planner.Setup(
        name, levels, "xla" if name == "gspmd" else par.collective, par.node_collective
      ),
    )
    for name in runnable
  ]
  rows.sort(key=planner.rank_key)
  rejected = [s for s in STRATEGIES if s not in runnable]
  reason = (
    f"cost model ({cl.name} preset, {n} devices as {'x'.join(map(str, levels))}, {batch} "
    f"images each, {par.collective}): predicted step "
    + ", ".join(f"{r.setup.strategy} {r.step_s * 1e3:.3g} ms" for r in rows)
    + (f"; not runnable here: {', '.join(rejected)}" if rejected else "")
  )
  return rows[0].setup.strategy, reason
