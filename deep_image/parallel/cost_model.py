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
   parallelism, 1/N of the sharded ones otherwise) / memory bandwidth. On a
   `shared_host` cluster (simulated CPU devices) N devices share the host's
   FLOP/s, memory and copy bandwidth.
2. **Collectives (alpha-beta)**: `collective_cost`, rounds of messages on the
   slowest link each uses (intra-node links, a node's shared inter-node link).
3. **The schedule of one step, per strategy** (each parameter's layout and
   the buckets from `layout_policy`, the functions the strategies call):

   ========  ==================================================================
   data      per bucket: reduce-scatter in backward once its layers are done;
             all-gather: deferred -> at the start of the next step, one bucket
             ahead of its first layer; none -> after backward (exposed)
   lazy      as data, but kernels are gathered before use in either mode
   hybrid    conv (and FC3) buckets as data (or lazy: parallel.conv); FC1/FC2
             split: per micro-batch, all-gather the features [B, F], FC1/FC2,
             reduce-scatter FC2's partial sums [B, H2]; backward the transposes
             (all-gather [B, H2], reduce-scatter [B, F]) -- on the critical path
   gspmd     hybrid-like: with the default mesh XLA splits FC1/FC2 over every
             device (shard_fc) and moves activations the same way; conv
             gradients all-reduced inside the step (no deferred update), with
             XLA's own algorithm (`xla`), one micro-batch
   ========  ==================================================================

   Data-parallel bytes per device are 2 x params x (N-1)/N: flat in N. Hybrid's
   FC bytes are 2 x B x (F + H2) x (N-1)/N: they grow with the global batch.
4. **Overlap.** Two resources per device, a compute stream (in program order)
   and the network (one collective at a time; critical-path activation
   collectives first, else first ready first served), simulated over one
   step: a step is one XLA program, so it ends when its last reduce-scatter
   ends. Step time = compute + exposed communication. On a cluster whose
   collectives do not overlap (`overlaps_comm=False`: XLA:CPU's synchronous
   rendezvous) everything is exposed.

The clusters are data (`clusters.PRESETS`); the study of Figure 3 built on
`predict` (speedup, crossover, the report) is `scaling_model`. One concept over
400 lines: the simulated step (`_Step`), whose tasks the four strategies share.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from deep_image.config_error import ConfigError
from deep_image.models.summary import layer_rows
from deep_image.models.vgg import FC_LAYERS, make_spec
from deep_image.parallel import layout_policy
from deep_image.parallel.clusters import Cluster, get_cluster
from deep_image.parallel.collective_cost import collective_cost
from deep_image.parallel.layout_policy import STRATEGIES
from deep_image.parallel.validation import OVERLAPS

# Memory traffic of one parameter's SGD-with-momentum update (float32): read the
# parameter, its gradient and momentum, write the parameter and momentum.
UPDATE_BYTES_PER_PARAM = 5 * 4


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


# ---------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer with parameters: its name in the parameter tree and per-image costs."""

  name: str  # convs_i | fc1 | fc2 | fc3
  flops: int  # forward, per image
  kernel: int  # elements
  bias: int
  width: int  # output features per image (FC: the activation width)
  fan_in: int  # input features per image (FC1: k k C, the gathered features)


@functools.cache
def model_layers(
  model_name: str,
  image_size: int = PAPER_SETUP.image_size,
  num_classes: int = PAPER_SETUP.num_classes,
  in_channels: int = PAPER_SETUP.in_channels,
) -> tuple[Layer, ...]:
  """The parameter layers of a `vgg.MODELS` model, forward order (from `summary.layer_rows`)."""
  spec = make_spec(
    model_name, num_classes=num_classes, image_size=image_size, in_channels=in_channels
  )
  out, conv, fan_in = [], 0, None
  for row in layer_rows(spec):
    if not row.parameters:
      continue
    width = row.output_shape[-1]
    if row.name.startswith("conv"):
      name, conv = f"convs_{conv}", conv + 1
    else:
      name = row.name
      fan_in = spec.feature_dim if name == "fc1" else out[-1].width
    out.append(Layer(name, row.flops, row.parameters - width, width, width, fan_in or 0))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Predicted cost of one training step on one device (all devices alike).

  Times in seconds; bytes per device per step (sent; a device receives as much).
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
  collectives: int  # reduce-scatters + all-gathers


@dataclasses.dataclass
class _Task:
  name: str
  comm: bool
  seconds: float
  deps: tuple[str, ...]
  priority: int = 1  # comm: 0 before 1 (critical-path activations first)


def _simulate(tasks: list[_Task]) -> float:
  """End of the last task: compute in list order, the network by readiness and priority."""
  end: dict[str, float] = {}
  compute = [t for t in tasks if not t.comm]
  pending = [t for t in tasks if t.comm]
  ci, compute_free, net_free = 0, 0.0, 0.0
  while ci < len(compute) or pending:
    c_start = math.inf
    if ci < len(compute) and all(d in end for d in compute[ci].deps):
      c_start = max([compute_free] + [end[d] for d in compute[ci].deps])
    best, n_start = None, math.inf
    for order, t in enumerate(pending):
      if not all(d in end for d in t.deps):
        continue
      ready = max([0.0] + [end[d] for d in t.deps])
      # Among collectives ready when the network frees up, the critical ones first.
      key = (max(ready, net_free), t.priority if ready <= net_free else 2, order)
      if best is None or key < best[0]:
        best = (key, t)
    if best is not None:
      n_start = best[0][0]
    if c_start == math.inf and n_start == math.inf:
      raise RuntimeError("cost model schedule has a cycle")  # a bug here, not a config
    if c_start <= n_start:
      task = compute[ci]
      end[task.name] = compute_free = c_start + task.seconds
      ci += 1
    else:
      task = best[1]
      end[task.name] = net_free = n_start + task.seconds
      pending.remove(task)
  return max(end.values(), default=0.0)


def _leaves(layers) -> list[tuple[tuple[str, str], int]]:
  """((layer, 'kernel' | 'bias'), elements) of every parameter, as the model's tree names it."""
  return [
    ((x.name, leaf), size)
    for x in layers
    for leaf, size in (("kernel", x.kernel), ("bias", x.bias))
  ]


def plan_buckets(layers, strategy: str, conv: str, n: int, bucket_mb: float, bpv: int):
  """The strategy's buckets (`layout_policy.plan_buckets`, as the strategies plan them)."""
  leaves = _leaves(layers)
  return layout_policy.plan_buckets(
    strategy,
    conv,
    [x.name for x in layers],
    [names for names, _ in leaves],
    [size for _, size in leaves],
    n,
    bucket_mb,
    bpv,
  )


def updated_parameters(layers, strategy: str, conv: str, n: int) -> float:
  """Parameters one device updates per step: its 1/N of the sharded ones (lazy, split),
  all of the replicated ones (data parallelism repeats the whole update on every device).

  The layouts are `layout_policy.RULES`; gspmd's entry is where XLA places the
  weights (it keeps replicated weights replicated, their update too).
  """
  return sum(
    size * layout_policy.stored_fraction(layout_policy.layout_of(strategy, conv, names), n)
    for names, size in _leaves(layers)
  )


def _share(cl: Cluster, n: int) -> Cluster:
  """`cl` as one of `n` devices sees it: the host's rates / n on a shared host."""
  if not cl.shared_host:
    return cl
  return dataclasses.replace(
    cl,
    peak_flops=cl.peak_flops / n,
    memory_bandwidth=cl.memory_bandwidth / n,
    intra_bandwidth=cl.intra_bandwidth / n,
    inter_bandwidth=cl.inter_bandwidth / n,
  )


def predict(
  model_name: str,
  strategy: str,
  algorithm: str,
  num_devices: int,
  batch_per_device: int,
  cluster: str | Cluster,
  setup: StepSetup = PAPER_SETUP,
  **overrides,
) -> Prediction:
  """Predicted step of `strategy` on `num_devices` devices of `cluster`, b images each.

  `algorithm` is parallel.collective; `setup` the rest of the config the step
  depends on, with `overrides` replacing its fields (e.g. image_size=32).
  """
  setup = dataclasses.replace(setup, **overrides)
  cl = get_cluster(cluster)
  if strategy not in STRATEGIES:
    raise ConfigError(
      f"parallel.strategy={strategy!r} is not a known strategy; choose from {STRATEGIES}"
    )
  if setup.overlap not in OVERLAPS:
    raise ConfigError(f"parallel.overlap={setup.overlap!r} must be one of {OVERLAPS}")
  n, b = num_devices, batch_per_device
  if n < 1 or b < 1:
    raise ValueError(f"num_devices={n} and batch_per_device={b} must be >= 1")
  cl = _share(cl, n)
  layers = model_layers(model_name, setup.image_size, setup.num_classes, setup.in_channels)
  if strategy == "gspmd":
    algorithm, micro = "xla", 1  # XLA's own collectives; one pass through the head
  else:
    micro = layout_policy.fc_micro_batches(setup.fc_micro_batches, cl.overlaps_comm, b)
  step = _Step(strategy, algorithm, n, b, cl, layers, setup, micro)
  step.gathers_before_use()
  step.forward()
  if step.head:
    step.fc_head()
  step.backward()
  step.reduce_scatters()
  return step.prediction(model_name)


class _Step:
  """The tasks of one step on one device, appended in program order, and its traffic."""

  def __init__(self, strategy, algorithm, n, b, cl, layers, setup: StepSetup, micro: int):
    self.strategy, self.algorithm, self.n, self.b, self.cl = strategy, algorithm, n, b, cl
    self.layers, self.micro = layers, micro
    self.abytes = cl.bytes_per_value if setup.activation_bytes is None else setup.activation_bytes
    fc_split = layout_policy.fc_split(strategy, setup.conv) and n > 1
    self.head = FC_LAYERS if fc_split else ()
    self.seq = [x for x in layers if x.name not in self.head]  # the layers outside the head
    self.by_name = {x.name: x for x in layers}
    self.order = [x.name for x in layers]
    if n > 1:
      plan = plan_buckets(layers, strategy, setup.conv, n, setup.bucket_mb, cl.bytes_per_value)
    else:
      plan = ()
    # (kind, layers, bytes of the [N, C] buffer) of each bucket.
    self.plan = [(k.kind, k.layers, k.size * n * cl.bytes_per_value) for k in plan]
    # Deferred replicated buckets gather the pending update, lazy buckets their shards.
    self.deferred_update = setup.overlap == "deferred" and strategy != "gspmd"
    self.gather_first = [
      i for i, (kind, _, _) in enumerate(self.plan) if kind == "lazy" or self.deferred_update
    ]
    self.gather_of: dict[str, list[str]] = {}  # layer -> gathers its forward waits for
    self.tasks: list[_Task] = []
    self.totals = {"param": 0.0, "act": 0.0, "rounds": 0, "count": 0}
    self.prev: list[str] = []  # what the next compute task waits for
    self.done_of: dict[str, str] = {}  # layer -> its backward task
    # The optimizer update, memory-bound.
    self.update_s = UPDATE_BYTES_PER_PARAM * updated_parameters(layers, strategy, setup.conv, n)
    self.update_s /= cl.memory_bandwidth

  def _gathers_of(self, *layer_names: str) -> list[str]:
    return [g for name in layer_names for g in self.gather_of.get(name, [])]

  def fwd_s(self, layer, images) -> float:
    return images * layer.flops / self.cl.flops

  def bwd_s(self, layer, images) -> float:  # the first layer computes no input gradient
    return self.fwd_s(layer, images) * (1 if layer is self.layers[0] else 2)

  def compute(self, name: str, seconds: float, deps) -> None:
    self.tasks.append(_Task(name, False, seconds, tuple(deps)))
    self.prev = [name]

  def comm(self, name, kind, nbytes, deps, priority, what) -> None:
    cost = collective_cost(kind, self.algorithm, nbytes, self.n, self.cl)
    self.totals[what] += cost.bytes_sent
    self.totals["rounds"] += cost.rounds
    self.totals["count"] += 1
    self.tasks.append(_Task(name, True, cost.seconds, tuple(deps), priority))

  def gathers_before_use(self) -> None:
    """All-gathers one bucket ahead of use: bucket k + 1 once bucket k's input exists."""
    order, micro = self.order, self.micro
    for pos, i in enumerate(self.gather_first):
      _, blayers, nbytes = self.plan[i]
      deps = []
      if pos >= 2:
        before = order.index(self.plan[self.gather_first[pos - 1]][1][0]) - 1
        if before >= 0:
          head = order[before] in self.head
          deps = [f"fwd:fc12.{micro - 1}" if head else f"fwd:{order[before]}"]
      self.comm(f"ag:{i}", "all_gather", nbytes, deps, 1, "param")
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
    the batch, FC1 / FC2 on 1/N of the columns, FC2's partial sums scattered back; backward
    the transposes."""
    n, b, micro, abytes = self.n, self.b, self.micro, self.abytes
    fc1, fc2, fc3 = (self.by_name[x] for x in self.head)
    parts = [b // micro + (j < b % micro) for j in range(micro)]
    prev = self.prev
    for j, bp in enumerate(parts):
      self.comm(f"ag_feat.{j}", "all_gather", n * bp * fc1.fan_in * abytes, prev[-1:], 0, "act")
      waits = [f"fwd:fc12.{j - 1}"] if j else [*prev, *self._gathers_of("fc1", "fc2")]
      deps = (f"ag_feat.{j}", *waits)
      self.tasks.append(
        _Task(f"fwd:fc12.{j}", False, self.fwd_s(fc1, bp) + self.fwd_s(fc2, bp), deps)
      )
      nbytes = n * bp * fc2.width * abytes
      self.comm(f"rs_y2.{j}", "reduce_scatter", nbytes, [f"fwd:fc12.{j}"], 0, "act")
    for j, bp in enumerate(parts):
      deps = [f"rs_y2.{j}", f"fwd:fc12.{micro - 1}"] + self.gather_of.get("fc3", [])
      if j:
        deps.append(f"fwd:fc3.{j - 1}")
      self.tasks.append(_Task(f"fwd:fc3.{j}", False, self.fwd_s(fc3, bp), tuple(deps)))
    self.prev = [f"fwd:fc3.{micro - 1}"]
    for j, bp in enumerate(parts):
      self.compute(f"bwd:fc3.{j}", self.bwd_s(fc3, bp), self.prev)
    for j, bp in enumerate(parts):
      nbytes = n * bp * fc2.width * abytes
      self.comm(f"ag_dy2.{j}", "all_gather", nbytes, [f"bwd:fc3.{j}"], 0, "act")
    for j, bp in enumerate(parts):
      name = f"bwd:fc12.{j}"
      self.compute(name, self.bwd_s(fc1, bp) + self.bwd_s(fc2, bp), (f"ag_dy2.{j}", *self.prev))
      nbytes = n * bp * fc1.fan_in * abytes
      self.comm(f"rs_dfeat.{j}", "reduce_scatter", nbytes, [name], 0, "act")
    self.prev = self.prev + [f"rs_dfeat.{j}" for j in range(micro)]
    self.done_of["fc3"] = f"bwd:fc3.{micro - 1}"
    # FC2's bias is replicated (`layout_policy`): its bucket waits for the whole head.
    self.done_of["fc1"] = self.done_of["fc2"] = f"bwd:fc12.{micro - 1}"

  def backward(self) -> None:
    for layer in reversed(self.seq):
      name = f"bwd:{layer.name}"
      self.compute(name, self.bwd_s(layer, self.b), self.prev)
      self.done_of[layer.name] = name

  def reduce_scatters(self) -> None:
    """Each bucket's reduce-scatter once backward has passed all its layers (its first);
    none: all-gather + update at the end of the step; gspmd: XLA's all-reduce is the
    reduce-scatter followed at once by the all-gather."""
    last_compute = self.prev[0]
    order, plan = self.order, self.plan
    for i in sorted(range(len(plan)), key=lambda i: -order.index(plan[i][1][0])):
      _, blayers, nbytes = plan[i]
      self.comm(f"rs:{i}", "reduce_scatter", nbytes, [self.done_of[blayers[0]]], 1, "param")
      if i not in self.gather_first:
        deps = [f"rs:{i}"] + ([] if self.strategy == "gspmd" else [last_compute])
        self.comm(f"ag_end:{i}", "all_gather", nbytes, deps, 1, "param")
    if not self.deferred_update:
      comms = tuple(t.name for t in self.tasks if t.comm)
      self.tasks.append(_Task("update", False, self.update_s, comms))

  def prediction(self, model_name: str) -> Prediction:
    """Simulate the tasks (or, without overlap, add them up) into a `Prediction`."""
    cl, tasks, totals = self.cl, self.tasks, self.totals
    compute_s = sum(t.seconds for t in tasks if not t.comm)
    comm_s = sum(t.seconds for t in tasks if t.comm)
    step_s = _simulate(tasks) if cl.overlaps_comm else compute_s + comm_s
    step_s = max(step_s, compute_s)
    global_batch = self.n * self.b
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
      bytes_sent_per_device=totals["param"] + totals["act"],
      param_bytes_sent_per_device=totals["param"],
      activation_bytes_sent_per_device=totals["act"],
      collective_rounds=totals["rounds"],
      collectives=totals["count"],
    )
