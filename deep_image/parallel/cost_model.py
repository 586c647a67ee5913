"""An analytic model of a training step: compute, collectives, overlap -> time, speedup.

Paper section 3.3 (Figure 3) measures how the strategies scale on Minwa. This
module predicts the same from first principles, so it can be checked against
the paper and against what `experiments.scaling` measures and compiles:

1. **Compute.** Per-layer forward FLOPs from `summary.layer_rows` (a
   multiply-add is 2); backward is twice forward (input and weight gradients),
   but the first layer needs no input gradient (once forward). Every strategy
   computes b = B / N images' worth of every layer per device (the hybrid FC
   layers compute all B rows of 1/N of the columns: the same FLOPs). Time =
   FLOPs / (peak x utilisation); element-wise work (ReLU, pooling) is left in
   the utilisation. The optimizer update is memory-bound: 20 bytes per
   parameter the device updates (`updated_parameters`: all of them under data
   parallelism, 1/N of the lazy ones, 1/L of the split ones) / memory bandwidth. On a
   `shared_host` cluster (simulated CPU devices) N devices share the host's
   FLOP/s, memory and copy bandwidth.
2. **Collectives (alpha-beta)**: `collective_cost`, rounds of messages on the
   slowest link each uses (a device's intra-node link; its NIC, shared with
   the devices attached to the same NIC that cross in the same round).
3. **The mesh** (`mesh`: axis sizes, outer first; (N,) is one axis). On a
   node x local mesh (Nn x L, node-major ranks) every all-device collective is
   hierarchical, each level on its own link (`collective_cost.mesh_cost`):

   ==================  ======================================================
   collective          levels (algorithm: parallel.collective inside a node,
                       parallel.node_collective, or the same, across)
   ==================  ======================================================
   bucket of N         reduce-scatter over local on the whole S, then over
   devices             node on S / L (each of the node's L devices through
                       its own NIC at once); all-gather the reverse
   hybrid activations  over local only: L devices, the node's L b rows
   'split' bucket      hybrid's FC1 / FC2 shards (1/L each): all-reduce
                       (reduce-scatter + all-gather) over node, Nn devices
   ==================  ======================================================

   Gradient buffers (bucket reduce-scatters, 'split' all-reduces, the
   all-gathers of reduced chunks of replicated buckets) travel in
   `parallel.grad_dtype` (2 bytes for bfloat16); lazy parameter all-gathers
   in the parameters' 4, activations in the model's dtype.
4. **The schedule of one step, per strategy** (each parameter's layout and
   the buckets from `layout_policy`, the functions the strategies call):

   ========  ==================================================================
   data      per bucket: reduce-scatter in backward once its layers are done;
             all-gather: deferred -> at the start of the next step, ahead of
             its first layer (`prefetch_mb`); none -> after backward (exposed)
   lazy      as data, but kernels are gathered before use in either mode
   hybrid    conv (and FC3) buckets as data (or lazy: parallel.conv); FC1/FC2
             split: per micro-batch, all-gather the features [B, F], FC1/FC2,
             reduce-scatter FC2's partial sums [B, H2]; backward the transposes
             (all-gather [B, H2], reduce-scatter [B, F]) -- on the critical path;
             on node x local: B = the node's rows, and the 'split' buckets'
             all-reduces over node once the head's backward is done
   gspmd     hybrid-like: with the default mesh XLA splits FC1/FC2 over every
             device (shard_fc) and moves activations the same way; conv
             gradients all-reduced inside the step (no deferred update), with
             XLA's own algorithm (`xla`), one micro-batch; modelled on one axis
   ========  ==================================================================

   Prefetch (`parallel.prefetch_mb`, `layer_feed.LayerFeed.ahead`): a layer
   whose last bucket is k prepares its buckets, k + 1 and each later j while
   the buckets k+1 .. j-1 hold less than prefetch_mb MiB of parameters (0: one
   bucket ahead); bucket j's gather is issued at the input of the first layer
   that prepares it.

   Data-parallel bytes per device are 2 x params x (N-1)/N: flat in N. Hybrid's
   FC bytes are 2 x B x (F + H2) x (N-1)/N: they grow with the global batch.
5. **Overlap.** Two resources per device, a compute stream (in program order)
   and the network (one collective at a time; critical-path activation
   collectives first, else first ready first served), simulated over one
   step: a step is one XLA program, so it ends when its last reduce-scatter
   ends. Step time = compute + exposed communication. A two-level collective
   is one network task (its levels run one after the other). On a cluster whose
   collectives do not overlap (`overlaps_comm=False`: XLA:CPU's synchronous
   rendezvous) everything is exposed.

The clusters are data (`clusters.PRESETS`); the study of Figure 3 built on
`predict` (speedup, crossover, the report) is `scaling_model`; the bytes that
cross nodes, for a config, `cross_node_bytes` (what `experiments.compile_gpu`'s
cross_host lines read from the compiled program); the model's layers and what
a device holds, `model_layout`; the two-resource schedule the tasks run on,
`step_schedule`. One concept over 500 lines: the
simulated step (`_Step`), whose tasks the four strategies share.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from deep_image.config_error import ConfigError
from deep_image.models.vgg import FC_LAYERS
from deep_image.parallel import layout_policy
from deep_image.parallel.clusters import Cluster, get_cluster
from deep_image.parallel.collective_cost import CollectiveCost, level_cost, mesh_cost
from deep_image.parallel.collectives import check_algorithm
from deep_image.parallel.layout_policy import STRATEGIES
from deep_image.parallel.model_layout import (
  mesh_levels,
  model_layers,
  plan_buckets,
  tensor_devices,
  updated_parameters,
)
from deep_image.parallel.step_schedule import Task, simulate
from deep_image.parallel.validation import OVERLAPS

# Memory traffic of one parameter's SGD-with-momentum update (float32): read the
# parameter, its gradient and momentum, write the parameter and momentum.
UPDATE_BYTES_PER_PARAM = 5 * 4
# parallel.grad_dtype -> bytes of a gradient value on the wire.
GRAD_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """What a step's cost depends on besides strategy, algorithm, devices and batch.

  Each field is the config field of its name (`from_config`); `activation_bytes`
  is per FC activation value (None: the cluster's bytes_per_value; 2 for a
  bfloat16 model).
  """

  image_size: int  # model.image_size
  num_classes: int  # model.num_classes
  in_channels: int  # model.in_channels
  overlap: str  # parallel.overlap
  conv: str  # parallel.conv
  bucket_mb: float  # parallel.bucket_mb
  fc_micro_batches: int  # parallel.fc_micro_batches (0: auto, `layout_policy.fc_micro_batches`)
  activation_bytes: int | None = None
  node_collective: str = ""  # parallel.node_collective ('': parallel.collective)
  prefetch_mb: float = 0.0  # parallel.prefetch_mb
  grad_dtype: str = "float32"  # parallel.grad_dtype

  @classmethod
  def from_config(cls, config) -> StepSetup:
    m, par = config.model, config.parallel
    return cls(
      image_size=m.image_size,
      num_classes=m.num_classes,
      in_channels=m.in_channels,
      overlap=par.overlap,
      conv=par.conv,
      bucket_mb=par.bucket_mb,
      fc_micro_batches=par.fc_micro_batches,
      activation_bytes=2 if m.dtype == "bfloat16" else None,
      node_collective=par.node_collective,
      prefetch_mb=par.prefetch_mb,
      grad_dtype=par.grad_dtype,
    )


# The paper's ImageNet setting (224 px crops, 1000 classes, RGB) with the parallel
# defaults of experiments/configs/base.py: what `predict` assumes unless told.
PAPER_SETUP = StepSetup(
  image_size=224,
  num_classes=1000,
  in_channels=3,
  overlap="deferred",
  conv="data",
  bucket_mb=25.0,
  fc_micro_batches=0,
)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Predicted cost of one training step on one device (all devices alike).

  Times in seconds; bytes per device per step (sent; a device receives as much),
  `bytes_across_per_device` of them to a device on another node (averaged over
  the devices: on a flat ring only a node's last device crosses), the rest inside.
  """

  model: str
  strategy: str
  algorithm: str
  num_devices: int
  batch_per_device: int
  cluster: str
  compute_s: float  # compute stream, busy time (layers and the optimizer update)
  update_s: float  # of it, the optimizer update
  comm_s: float  # network, busy time (every collective, overlapped or not)
  exposed_comm_s: float  # step_s - compute_s
  step_s: float
  images_per_s: float  # the whole mesh
  time_per_image_s: float  # step_s / global batch
  bytes_sent_per_device: float
  param_bytes_sent_per_device: float  # gradients and weights (buckets)
  activation_bytes_sent_per_device: float  # hybrid / gspmd FC activations
  collective_rounds: int  # point-to-point rounds (ring / butterfly messages), all collectives
  collectives: int  # reduce-scatters + all-gathers (an all-reduce counts 2)
  mesh: tuple[int, ...] = ()  # axis sizes, outer first ((N,): one axis)
  node_algorithm: str = ""  # the algorithm of the node level (2-D meshes)
  bytes_across_per_device: float = 0.0  # mean over the devices
  bytes_inside_per_device: float = 0.0
  bytes_across_max_per_device: float = 0.0  # the device that sends the most across
  # (what, seconds) of the exposed communication, largest first (`step_schedule`'s
  # charges: what the compute stream waited for, and the step's tail).
  exposed: tuple[tuple[str, float], ...] = ()


def _share(cl: Cluster, n: int) -> Cluster:
  """`cl` as one of `n` devices sees it: the host's rates / n on a shared host."""
  if not cl.shared_host:
    return cl
  return dataclasses.replace(
    cl,
    peak_flops=cl.peak_flops / n,
    memory_bandwidth=cl.memory_bandwidth / n,
    intra_bandwidth=cl.intra_bandwidth / n,
    nic_bandwidth=cl.nic_bandwidth / n,
  )


def predict(
  model_name: str,
  strategy: str,
  algorithm: str,
  num_devices: int,
  batch_per_device: int,
  cluster: str | Cluster,
  setup: StepSetup = PAPER_SETUP,
  *,
  mesh: tuple[int, ...] | None = None,
  **overrides,
) -> Prediction:
  """Predicted step of `strategy` on `num_devices` devices of `cluster`, b images each.

  `algorithm` is parallel.collective (on a node x local mesh: the local level's;
  `setup.node_collective` the node level's); `mesh` the axis sizes, outer first,
  node-major (None: one axis of num_devices); `setup` the rest of the config the
  step depends on, with `overrides` replacing its fields (e.g. image_size=32).
  gspmd is modelled on one axis whatever the mesh (XLA's own collectives).
  """
  setup = dataclasses.replace(setup, **overrides)
  cl = get_cluster(cluster)
  if strategy not in STRATEGIES:
    raise ConfigError(
      f"parallel.strategy={strategy!r} is not a known strategy; choose from {STRATEGIES}"
    )
  if setup.overlap not in OVERLAPS:
    raise ConfigError(f"parallel.overlap={setup.overlap!r} must be one of {OVERLAPS}")
  if setup.grad_dtype not in GRAD_BYTES:
    raise ConfigError(
      f"parallel.grad_dtype={setup.grad_dtype!r} must be one of {tuple(GRAD_BYTES)}"
    )
  if setup.node_collective:
    check_algorithm(setup.node_collective)
  n, b = num_devices, batch_per_device
  if n < 1 or b < 1:
    raise ValueError(f"num_devices={n} and batch_per_device={b} must be >= 1")
  levels = mesh_levels(n if mesh is None else mesh)
  if math.prod(levels) != n:
    raise ValueError(f"mesh={mesh} does not have num_devices={n} devices")
  cl = _share(cl, n)
  layers = model_layers(model_name, setup.image_size, setup.num_classes, setup.in_channels)
  if strategy == "gspmd":
    algorithm, micro, levels = "xla", 1, (n,)  # XLA's own collectives; one pass through the head
    setup = dataclasses.replace(setup, node_collective="")
  else:
    micro = layout_policy.fc_micro_batches(setup.fc_micro_batches, cl.overlaps_comm, b)
  step = _Step(strategy, algorithm, levels, b, cl, layers, setup, micro)
  step.gathers_before_use()
  step.forward()
  if step.head:
    step.fc_head()
  step.backward()
  step.reduce_scatters()
  return step.prediction(model_name)


@dataclasses.dataclass(frozen=True)
class NodeBytes:
  """Bytes per device per step sent to devices on other nodes (hosts), the mean over the
  devices and the device that sends the most, and the mean sent inside its node."""

  mean: float
  max: float
  inside: float


def cross_node_bytes(config, num_devices: int, hosts: int, cluster: str | Cluster = "h100"):
  """`NodeBytes` of `config`'s step on `num_devices` devices over `hosts` hosts, as the
  cost model predicts: what `experiments.compile_gpu`'s `cross_host_mib_per_gpu` lines
  (`analysis.cross_host`, the max) read from the compiled program.

  Read from the config: model (name, image_size, num_classes, in_channels, dtype: the
  activation bytes), train.batch_size (global), parallel.strategy, collective,
  node_collective, mesh (its -1 resolved against num_devices), conv, overlap,
  bucket_mb, fc_micro_batches, prefetch_mb, grad_dtype. The cluster preset's links
  with devices_per_node = num_devices / hosts, ranks node-major (host h holds
  devices h D .. h D + D - 1). Exact for the hand-written algorithms; for
  'xla' the bytes are those of the algorithm it is modelled as (the faster of
  ring and butterfly), where compile_gpu assumes a ring in group order.
  """
  if hosts < 1 or num_devices % hosts:
    raise ValueError(f"hosts={hosts} must divide num_devices={num_devices}")
  from deep_image.parallel import mesh as mesh_lib  # the config's mesh spec

  par = config.parallel
  _, sizes = mesh_lib.resolve_mesh_shape(par.mesh, num_devices)
  per_node = num_devices // hosts
  cl = get_cluster(cluster)
  cl = dataclasses.replace(
    cl,
    devices_per_node=per_node,
    num_nodes=hosts,
    devices_per_nic=min(cl.devices_per_nic, per_node),
  )
  setup = StepSetup.from_config(config)
  batch = config.train.batch_size // num_devices
  p = predict(
    config.model.name, par.strategy, par.collective, num_devices, batch, cl, setup, mesh=sizes
  )
  return NodeBytes(
    p.bytes_across_per_device, p.bytes_across_max_per_device, p.bytes_inside_per_device
  )


class _Step:
  """The tasks of one step on one device, appended in program order, and its traffic."""

  def __init__(self, strategy, algorithm, levels, b, cl, layers, setup: StepSetup, micro: int):
    self.strategy, self.algorithm, self.b, self.cl = strategy, algorithm, b, cl
    self.levels, self.n = levels, math.prod(levels)
    n = self.n
    # One algorithm per level, outer first: the node level's may differ.
    self.node_algorithm = setup.node_collective or algorithm
    self.algorithms = ((self.node_algorithm,) if len(levels) > 1 else ()) + (algorithm,)
    self.algorithms = self.algorithms[-len(levels) :]
    self.layers, self.micro = layers, micro
    self.abytes = cl.bytes_per_value if setup.activation_bytes is None else setup.activation_bytes
    self.gbytes = GRAD_BYTES[setup.grad_dtype]
    self.tp = tensor_devices(strategy, setup.conv, levels)  # devices of the FC split
    self.head = FC_LAYERS if self.tp > 1 else ()
    self.seq = [x for x in layers if x.name not in self.head]  # the layers outside the head
    self.by_name = {x.name: x for x in layers}
    self.order = [x.name for x in layers]
    if n > 1:
      plan = plan_buckets(layers, strategy, setup.conv, levels, setup.bucket_mb, cl.bytes_per_value)
    else:
      plan = ()
    # (kind, layers, elements of the whole buffer: N C, or C for a 'split' all-reduce).
    self.plan = [(k.kind, k.layers, k.size * (1 if k.kind == "split" else n)) for k in plan]
    # Deferred replicated buckets gather the pending update, lazy buckets their shards.
    self.deferred_update = setup.overlap == "deferred" and strategy != "gspmd"
    self.gather_first = [
      i
      for i, (kind, _, _) in enumerate(self.plan)
      if kind == "lazy" or (kind == "replicated" and self.deferred_update)
    ]
    self.prefetch_bytes = setup.prefetch_mb * 2**20
    self.gather_of: dict[str, list[str]] = {}  # layer -> gathers its forward waits for
    self.tasks: list[Task] = []
    self.totals = {"param": 0.0, "act": 0.0, "across": 0.0, "rounds": 0, "count": 0}
    self.across_by_device = 0.0  # [N] bytes each device sends across nodes (once any does)
    self.prev: list[str] = []  # what the next compute task waits for
    self.done_of: dict[str, str] = {}  # layer -> its backward task
    # The optimizer update, memory-bound.
    self.update_s = UPDATE_BYTES_PER_PARAM * updated_parameters(
      layers, strategy, setup.conv, levels
    )
    self.update_s /= cl.memory_bandwidth

  def _gathers_of(self, *layer_names: str) -> list[str]:
    return [g for name in layer_names for g in self.gather_of.get(name, [])]

  def fwd_s(self, layer, images) -> float:
    return images * layer.flops / self.cl.flops

  def bwd_s(self, layer, images) -> float:  # the first layer computes no input gradient
    return self.fwd_s(layer, images) * (1 if layer is self.layers[0] else 2)

  def compute(self, name: str, seconds: float, deps) -> None:
    self.tasks.append(Task(name, False, seconds, tuple(deps)))
    self.prev = [name]

  def comm(self, name, cost: CollectiveCost, deps, priority, what) -> None:
    self.totals[what] += cost.bytes_sent
    self.totals["across"] += cost.bytes_across
    if cost.across_by_device is not None:
      self.across_by_device = self.across_by_device + cost.across_by_device
    self.totals["rounds"] += cost.rounds
    self.totals["count"] += 1
    self.tasks.append(Task(name, True, cost.seconds, tuple(deps), priority))

  def all_devices(self, kind: str, nbytes: float) -> CollectiveCost:
    """A collective over every device: level by level on a node x local mesh."""
    return mesh_cost(kind, self.algorithms, nbytes, self.levels, self.cl)

  def local(self, kind: str, nbytes: float) -> CollectiveCost:
    """A collective over the innermost axis (hybrid's activations: the FC split's devices)."""
    axis = len(self.levels) - 1
    return level_cost(kind, self.algorithms[axis], nbytes, self.levels, axis, self.cl)

  def bucket(self, kind: str, i: int) -> CollectiveCost:
    """Bucket i's reduce-scatter or all-gather (a 'split' bucket: all-reduce's half)."""
    bkind, _, elements = self.plan[i]
    if bkind == "split":  # the shards' all-reduce across nodes
      return level_cost(kind, self.algorithms[0], elements * self.gbytes, self.levels, 0, self.cl)
    # Gradients (and the reduced chunks of replicated buckets) in grad_dtype; lazy
    # all-gathers move the stored parameters.
    grad = kind == "reduce_scatter" or bkind == "replicated"
    return self.all_devices(kind, elements * (self.gbytes if grad else self.cl.bytes_per_value))

  def _ahead(self, k: int) -> list[int]:
    """The buckets prepared at bucket k's layers (`layer_feed.LayerFeed.ahead`): k + 1,
    and each later j while the buckets k+1 .. j-1 hold less than prefetch_mb MiB."""
    out, between = [], 0.0
    for j in range(k + 1, len(self.plan)):
      if out and between >= self.prefetch_bytes:
        break
      out.append(j)
      between += self.plan[j][2] * 4  # LayerFeed counts float32 parameters
    return out

  def _prepared_at(self) -> dict[int, str]:
    """Bucket -> the layer at whose input the forward pass prepares it (LayerFeed.layer:
    a layer's own buckets and those `_ahead` of its last)."""
    of_layer: dict[str, list[int]] = {}
    for k, (_, blayers, _) in enumerate(self.plan):
      for layer in blayers:
        of_layer.setdefault(layer, []).append(k)
    at: dict[int, str] = {}
    for layer in self.order:
      ks = of_layer.get(layer, [])
      for k in [*ks, *self._ahead(max(ks))] if ks else []:
        at.setdefault(k, layer)
    return at

  def gathers_before_use(self) -> None:
    """All-gathers ahead of use: bucket k + 1 (and, with prefetch_mb, later ones) once
    bucket k's input exists."""
    order, micro = self.order, self.micro
    at = self._prepared_at()
    for i in self.gather_first:
      _, blayers, _ = self.plan[i]
      deps = []
      before = order.index(at[i]) - 1
      if before >= 0:
        head = order[before] in self.head
        deps = [f"fwd:fc12.{micro - 1}" if head else f"fwd:{order[before]}"]
      self.comm(f"ag:{i}", self.bucket("all_gather", i), deps, 1, "param")
      self.gather_of.setdefault(blayers[0], []).append(f"ag:{i}")

  def forward(self) -> None:
    """(deferred) the update first, bucket by bucket before the forward pass (one task);
    then the layers outside the head."""
    if self.deferred_update:
      self.compute("update", self.update_s, ())
    for layer in self.seq:
      deps = self.prev + self.gather_of.get(layer.name, [])
      self.compute(f"fwd:{layer.name}", self.fwd_s(layer, self.b), deps)

  def fc_head(self) -> None:
    """The FC head in `micro` parts of the local batch (fc_block): features gathered over
    the batch of the split's L devices (all N on one axis), FC1 / FC2 on 1/L of the
    columns, FC2's partial sums scattered back; backward the transposes."""
    tp, b, micro, abytes = self.tp, self.b, self.micro, self.abytes
    fc1, fc2, fc3 = (self.by_name[x] for x in self.head)
    parts = [b // micro + (j < b % micro) for j in range(micro)]
    prev = self.prev
    for j, bp in enumerate(parts):
      cost = self.local("all_gather", tp * bp * fc1.fan_in * abytes)
      self.comm(f"ag_feat.{j}", cost, prev[-1:], 0, "act")
      waits = [f"fwd:fc12.{j - 1}"] if j else [*prev, *self._gathers_of("fc1", "fc2")]
      deps = (f"ag_feat.{j}", *waits)
      self.tasks.append(
        Task(f"fwd:fc12.{j}", False, self.fwd_s(fc1, bp) + self.fwd_s(fc2, bp), deps)
      )
      cost = self.local("reduce_scatter", tp * bp * fc2.width * abytes)
      self.comm(f"rs_y2.{j}", cost, [f"fwd:fc12.{j}"], 0, "act")
    for j, bp in enumerate(parts):
      deps = [f"rs_y2.{j}", f"fwd:fc12.{micro - 1}"] + self.gather_of.get("fc3", [])
      if j:
        deps.append(f"fwd:fc3.{j - 1}")
      self.tasks.append(Task(f"fwd:fc3.{j}", False, self.fwd_s(fc3, bp), tuple(deps)))
    self.prev = [f"fwd:fc3.{micro - 1}"]
    for j, bp in enumerate(parts):
      self.compute(f"bwd:fc3.{j}", self.bwd_s(fc3, bp), self.prev)
    for j, bp in enumerate(parts):
      cost = self.local("all_gather", tp * bp * fc2.width * abytes)
      self.comm(f"ag_dy2.{j}", cost, [f"bwd:fc3.{j}"], 0, "act")
    for j, bp in enumerate(parts):
      name = f"bwd:fc12.{j}"
      self.compute(name, self.bwd_s(fc1, bp) + self.bwd_s(fc2, bp), (f"ag_dy2.{j}", *self.prev))
      cost = self.local("reduce_scatter", tp * bp * fc1.fan_in * abytes)
      self.comm(f"rs_dfeat.{j}", cost, [name], 0, "act")
    self.prev = self.prev + [f"rs_dfeat.{j}" for j in range(micro)]
    self.done_of["fc3"] = f"bwd:fc3.{micro - 1}"
    # FC2's bias is replicated (`layout_policy`): its bucket waits for the whole head;
    # so do the 'split' buckets of FC1 / FC2's shards on a node x local mesh.
    self.done_of["fc1"] = self.done_of["fc2"] = f"bwd:fc12.{micro - 1}"

  def backward(self) -> None:
    for layer in reversed(self.seq):
      name = f"bwd:{layer.name}"
      self.compute(name, self.bwd_s(layer, self.b), self.prev)
      self.done_of[layer.name] = name

  def reduce_scatters(self) -> None:
    """Each bucket's reduce-scatter once backward has passed all its layers (its first);
    'split' buckets: the all-reduce's all-gather at once; none: all-gather + update at
    the end of the step; gspmd: XLA's all-reduce is the reduce-scatter followed at once
    by the all-gather."""
    last_compute = self.prev[0]
    order, plan = self.order, self.plan
    for i in sorted(range(len(plan)), key=lambda i: -order.index(plan[i][1][0])):
      bkind, blayers, _ = plan[i]
      done = self.done_of[blayers[0]]
      self.comm(f"rs:{i}", self.bucket("reduce_scatter", i), [done], 1, "param")
      if i not in self.gather_first:
        at_once = self.strategy == "gspmd" or bkind == "split"
        deps = [f"rs:{i}"] + ([] if at_once else [last_compute])
        self.comm(f"ag_end:{i}", self.bucket("all_gather", i), deps, 1, "param")
    if not self.deferred_update:
      comms = tuple(t.name for t in self.tasks if t.comm)
      self.tasks.append(Task("update", False, self.update_s, comms))

  def prediction(self, model_name: str) -> Prediction:
    """Simulate the tasks (or, without overlap, add them up) into a `Prediction`."""
    cl, tasks, totals = self.cl, self.tasks, self.totals
    compute_s = sum(t.seconds for t in tasks if not t.comm)
    comm_s = sum(t.seconds for t in tasks if t.comm)
    if cl.overlaps_comm:
      schedule = simulate(tasks)
      step_s, charged = max(schedule.end, compute_s), schedule.exposed
    else:
      step_s, charged = compute_s + comm_s, {t.name: t.seconds for t in tasks if t.comm}
    exposed: dict[str, float] = {}
    for name, seconds in charged.items():
      what = self.describe(name)
      exposed[what] = exposed.get(what, 0.0) + seconds
    global_batch = self.n * self.b
    sent = totals["param"] + totals["act"]
    return Prediction(
      model=model_name,
      strategy=self.strategy,
      algorithm=self.algorithm,
      num_devices=self.n,
      batch_per_device=self.b,
      cluster=cl.name,
      compute_s=compute_s,
      update_s=self.update_s,
      comm_s=comm_s,
      exposed_comm_s=step_s - compute_s,
      step_s=step_s,
      images_per_s=global_batch / step_s,
      time_per_image_s=step_s / global_batch,
      bytes_sent_per_device=sent,
      param_bytes_sent_per_device=totals["param"],
      activation_bytes_sent_per_device=totals["act"],
      collective_rounds=totals["rounds"],
      collectives=totals["count"],
      mesh=self.levels,
      node_algorithm=self.node_algorithm if len(self.levels) > 1 else "",
      bytes_across_per_device=totals["across"],
      bytes_inside_per_device=sent - totals["across"],
      bytes_across_max_per_device=float(np.max(self.across_by_device)),
      exposed=tuple(sorted(exposed.items(), key=lambda kv: -kv[1])),
    )

  # The FC head's collectives by task name (micro-batch parts add up).
  _HEAD = {
    "ag_feat": "FC1 input all-gather",
    "rs_y2": "FC2 partial sums reduce-scatter",
    "ag_dy2": "FC2 output gradient all-gather",
    "rs_dfeat": "FC1 input gradient reduce-scatter",
  }

  def describe(self, name: str) -> str:
    """A collective task's name (ag:3, rs_y2.1, ...) in words, e.g. 'all-gather of fc1
    (lazy, 616 MB)'."""
    if "." in name:
      return self._HEAD[name.split(".")[0]]
    what, i = name.split(":")
    kind, layers, elements = self.plan[int(i)]
    span = layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"
    op = "reduce-scatter" if what == "rs" else "all-gather"
    if kind == "split":
      op = f"all-reduce ({op} half) over node"
    bytes_ = self.bucket("reduce_scatter" if what == "rs" else "all_gather", int(i)).bytes_sent
    return f"{op} of {span} ({kind}, {bytes_ / 1e6:.3g} MB sent)"
