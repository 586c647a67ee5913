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
2. **Collectives (alpha-beta).** A reduce-scatter or all-gather of a buffer of
   S bytes over N devices (chunk c = S / N) runs as rounds in which every device
   sends one message to one partner:

   =========  ===============================  ==============================
   algorithm  rounds                           message of each round
   =========  ===============================  ==============================
   butterfly  log2 N, partner r ^ d            d c (reduce-scatter: d = N/2..1,
                                               all-gather: d = 1..N/2)
   ring       N - 1, partner r + 1             c
   direct     N - 1, partner r + s (s = 1..)   c
   xla        the faster of ring / butterfly   (NCCL picks ring or tree)
   =========  ===============================  ==============================

   Device r sits on node r // devices_per_node (ranks node-major, as
   `jax.devices()` orders them). A round takes alpha + m / bandwidth on the
   slowest link it uses: inside a node the device's own link (PCIe, NVLink);
   between nodes the node's inter-node link, *shared* by all of the node's
   devices that send across it in that round (m x senders / bandwidth). So a
   butterfly round with d >= devices_per_node puts all 4 of a Minwa node's GPUs
   on its one InfiniBand link at once, where a ring crosses with one message
   per node per round. Butterfly on a non-power of two runs as ring (as
   `collectives.resolve_algorithm` does). Every algorithm sends (N-1) c bytes
   per device per collective.
3. **The schedule of one step, per strategy** (buckets from `buckets.plan`,
   as the strategies build them):

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

Speedup(G) = time per image on one device / time per image on G devices;
efficiency = speedup / G. `report` prints Figure 3's numbers for a preset.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

from absl import logging

from deep_image.config_error import ConfigError
from deep_image.models.summary import layer_rows
from deep_image.models.vgg import make_spec
from deep_image.parallel import buckets, layouts
from deep_image.parallel.collectives import ALGORITHMS

# strategies.STRATEGIES, which cannot be imported here: strategies imports this module.
STRATEGIES = ("gspmd", "data", "lazy", "hybrid")
# The strategies of the paper's Figure 3 and the algorithm it describes (3.1).
PAPER_STRATEGIES = ("hybrid", "data")
PAPER_ALGORITHM = "butterfly"
PAPER = {"crossover": 16, "speedup@64": 47.0}  # Minwa, paper section 3.3; shown beside


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Compute and link rates of a cluster of identical nodes.

  Attributes:
    name: for reports.
    description: one line for reports.
    devices_per_node: accelerators per node (ranks node-major).
    num_nodes: nodes available (the largest device count is their product).
    peak_flops: peak FLOP/s of one device at the precision of the convolutions.
    utilisation: fraction of peak that a VGG layer reaches (see the presets).
    intra_bandwidth: bytes/s one device sends to another of its node (per direction).
    intra_latency: seconds per message inside a node.
    inter_bandwidth: bytes/s of a node's inter-node links together, per
      direction, shared by the node's devices that send across it at once.
    inter_latency: seconds per message between nodes.
    bytes_per_value: bytes of a parameter / gradient value (4: float32).
    overlaps_comm: whether collectives run concurrently with compute.
    memory_bandwidth: bytes/s of one device's memory; the optimizer update is
      bound by it (`UPDATE_BYTES_PER_PARAM`).
    shared_host: the devices share one host's compute, memory and copies
      (simulated XLA:CPU devices): each rate above is the host's, divided by
      the devices of the step.
  """

  name: str
  description: str
  devices_per_node: int
  num_nodes: int
  peak_flops: float
  utilisation: float
  intra_bandwidth: float
  intra_latency: float
  inter_bandwidth: float
  inter_latency: float
  bytes_per_value: int = 4
  overlaps_comm: bool = True
  memory_bandwidth: float = math.inf
  shared_host: bool = False

  @property
  def flops(self) -> float:
    """Sustained FLOP/s of one device."""
    return self.peak_flops * self.utilisation

  @property
  def max_devices(self) -> int:
    return self.devices_per_node * self.num_nodes


PRESETS: dict[str, Cluster] = {
  # Paper section 2: 36 nodes, each 4 Tesla K40m and one FDR InfiniBand adapter.
  "minwa": Cluster(
    name="minwa",
    description="36 nodes x 4 Tesla K40m, PCIe in a node, one 56 Gb/s FDR InfiniBand per node",
    devices_per_node=4,
    num_nodes=36,
    # Paper: 4.29 TFLOP/s single precision per GPU (2880 cores x 2 x 745 MHz).
    peak_flops=4.29e12,
    # Assumed, not measured: the 2014 GEMM-based convolutions (cuDNN v1,
    # cuda-convnet2, Caffe) ran large 3x3 layers at roughly half of a Kepler's
    # peak; whole training steps (pooling, ReLU, the update, data movement)
    # less. 0.5 is the middle of the 30-70% range; `report` prints how the
    # predictions move over that range instead of tuning it to the paper.
    utilisation=0.5,
    # PCIe 3.0 x16: 15.75 GB/s raw; ~10 GB/s is what a K40's copies reach.
    intra_bandwidth=10e9,
    # A CUDA copy / MPI message between GPUs of a node: ~10 us of overhead.
    intra_latency=10e-6,
    # FDR 4x: 56 Gb/s signalling x 64/66 encoding = 6.8 GB/s; MPI (MVAPICH2)
    # point-to-point reaches ~6 GB/s. One adapter per node, shared by 4 GPUs.
    inter_bandwidth=6.0e9,
    # GPUDirect RDMA MPI latency, a few us; round up for the CUDA side.
    inter_latency=10e-6,
    # K40m data sheet: 288 GB/s GDDR5.
    memory_bandwidth=288e9,
  ),
  # A modern cluster: DGX/HGX H100 SXM nodes.
  "h100": Cluster(
    name="h100",
    description="nodes of 8 H100 SXM, NVLink 4 in a node, 8 x 400 Gb/s InfiniBand per node",
    devices_per_node=8,
    num_nodes=8,
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (tensor cores).
    peak_flops=989e12,
    # Measured: the 8-conv training step in bf16 on one H200 (the H100's tensor-core
    # peak, 1.4x its memory bandwidth) took 11.3 ms for 64 images; less its update
    # (207M parameters x 20 B / 4.8 TB/s = 0.9 ms) that is 28% of 989 TFLOP/s
    # (benchmarks/gpu_NVIDIA_H200_2026-11-26.md; whole-step MFU 15% at 16 images,
    # 30% at 128: the model's one utilisation is right at 64 and optimistic below).
    utilisation=0.28,
    # NVLink 4: 900 GB/s per GPU both ways, 450 GB/s per direction via NVSwitch.
    intra_bandwidth=450e9,
    intra_latency=5e-6,
    # One 400 Gb/s NDR NIC per GPU: 8 x 50 GB/s per node.
    inter_bandwidth=8 * 50e9,
    inter_latency=5e-6,
    # Parameters and gradients are float32 here (model.dtype sets the compute dtype).
    bytes_per_value=4,
    # H100 SXM data sheet: 3.35 TB/s HBM3.
    memory_bandwidth=3.35e12,
  ),
  # The simulated host devices of the tests (`experiments.scaling`'s measured
  # rows): one host whose cores, memory and copies all N devices share; every
  # collective a synchronous rendezvous (DESIGN.md), so nothing overlaps.
  "cpu": Cluster(
    name="cpu",
    description="N simulated XLA:CPU devices sharing one 2-core host",
    devices_per_node=1024,
    num_nodes=1,
    # 2 AVX2 cores x 2 FMA units x 8 float32 lanes x 2 FLOP x ~2.5 GHz.
    peak_flops=160e9,
    # Calibrated, the one fitted number of this preset: gspmd, 8-conv at 32 px,
    # 4 images per device on 8 devices ran at 18 GFLOP/s of model FLOPs, update
    # and copies included (benchmarks/scaling_2026-11-26.md): small
    # convolutions, 8 device threads on 2 cores. The other measured rows are
    # predictions (BENCHMARKS.md).
    utilisation=0.11,
    # memcpy between buffers of one process on a shared VM (~10 GB/s).
    intra_bandwidth=10e9,
    # A rendezvous of the device threads on a loaded 2-core host.
    intra_latency=50e-6,
    inter_bandwidth=10e9,
    inter_latency=50e-6,
    overlaps_comm=False,
    memory_bandwidth=10e9,
    shared_host=True,
  ),
}

# Memory traffic of one parameter's SGD-with-momentum update (float32): read the
# parameter, its gradient and momentum, write the parameter and momentum.
UPDATE_BYTES_PER_PARAM = 5 * 4


def get_cluster(cluster: str | Cluster) -> Cluster:
  """A preset by name, or `cluster` itself; ValueError naming the presets otherwise."""
  if isinstance(cluster, Cluster):
    return cluster
  if cluster not in PRESETS:
    raise ValueError(f"preset={cluster!r} is not a known cluster; choose from {sorted(PRESETS)}")
  return PRESETS[cluster]


# ---------------------------------------------------------------- collectives


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
  """One reduce-scatter or all-gather, as seen by one device."""

  seconds: float
  bytes_sent: float  # per device
  rounds: int
  algorithm: str  # the one that runs (butterfly off a power of two: ring)


def _rounds(kind: str, algorithm: str, n: int) -> list[tuple[int, str, int]]:
  """(chunks per message, 'xor' | 'shift', distance) of each round."""
  if algorithm == "butterfly":
    ds = [2**i for i in range(int(math.log2(n)))]
    ds = ds[::-1] if kind == "reduce_scatter" else ds
    return [(d, "xor", d) for d in ds]
  if algorithm == "ring":
    return [(1, "shift", 1)] * (n - 1)
  return [(1, "shift", s) for s in range(1, n)]  # direct


@functools.cache
def _crossing(n: int, per_node: int, how: str, dist: int) -> tuple[int, bool]:
  """(most senders of one node whose partner is on another node, whether any stays inside)."""
  nodes = -(-n // per_node)
  out, into, inside = [0] * nodes, [0] * nodes, False
  for j in range(n):
    p = j ^ dist if how == "xor" else (j + dist) % n
    if j // per_node == p // per_node:
      inside = True
    else:
      out[j // per_node] += 1
      into[p // per_node] += 1
  return max(max(out), max(into)), inside


def round_seconds(message_bytes: float, n: int, how: str, dist: int, cluster: Cluster) -> float:
  """alpha + bytes / bandwidth of one round, on the slowest link it uses."""
  cross, inside = _crossing(n, cluster.devices_per_node, how, dist)
  t = 0.0
  if cross:
    t = cluster.inter_latency + message_bytes * cross / cluster.inter_bandwidth
  if inside:
    t = max(t, cluster.intra_latency + message_bytes / cluster.intra_bandwidth)
  return t


def collective_cost(
  kind: str, algorithm: str, buffer_bytes: float, n: int, cluster: str | Cluster
) -> CollectiveCost:
  """Reduce-scatter ([N c] -> [c]) or all-gather ([c] -> [N c]) of `buffer_bytes` = N c bytes."""
  if kind not in ("reduce_scatter", "all_gather"):
    raise ValueError(f"kind={kind!r} must be 'reduce_scatter' or 'all_gather'")
  if algorithm not in ALGORITHMS:
    raise ConfigError(
      f"parallel.collective={algorithm!r} is not a known algorithm; choose from {ALGORITHMS}"
    )
  cluster = get_cluster(cluster)
  if n <= 1:
    return CollectiveCost(0.0, 0.0, 0, algorithm)
  power_of_two = n & (n - 1) == 0
  if algorithm == "xla":
    options = [collective_cost(kind, "ring", buffer_bytes, n, cluster)]
    if power_of_two:
      options.append(collective_cost(kind, "butterfly", buffer_bytes, n, cluster))
    return min(options, key=lambda c: c.seconds)
  if algorithm == "butterfly" and not power_of_two:
    algorithm = "ring"
  c = buffer_bytes / n
  seconds, sent, rounds = 0.0, 0.0, 0
  for chunks, how, dist in _rounds(kind, algorithm, n):
    seconds += round_seconds(chunks * c, n, how, dist, cluster)
    sent += chunks * c
    rounds += 1
  return CollectiveCost(seconds, sent, rounds, algorithm)


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
  model_name: str, image_size: int = 224, num_classes: int = 1000, in_channels: int = 3
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


def _plan_buckets(layers, strategy: str, conv: str, n: int, bucket_mb: float, bpv: int):
  """`buckets.plan` for the strategy's layouts: [(kind, layers, bytes of the [N, C] buffer)]."""
  fc_split = strategy in ("hybrid", "gspmd")
  conv_lazy = strategy == "lazy" or (strategy == "hybrid" and conv == "lazy")
  leaf_layers, leaf_layouts, leaf_sizes = [], [], []
  for layer in layers:
    if fc_split and layer.name in ("fc1", "fc2"):
      continue  # split: gradients complete on their devices, no collective
    lazy_kernel = conv_lazy and (strategy == "lazy" or layer.name.startswith("convs"))
    for size, layout in (
      (layer.kernel, layouts.LAZY if lazy_kernel else layouts.REPLICATED),
      (layer.bias, layouts.REPLICATED),
    ):
      leaf_layers.append(layer.name)
      leaf_layouts.append(layout)
      leaf_sizes.append(size)
  plan = buckets.plan(
    [x.name for x in layers], leaf_layers, leaf_layouts, leaf_sizes, n, bucket_mb * 2**20, bpv
  )
  return [(b.kind, b.layers, sum(b.chunks) * n * bpv) for b in plan]


def updated_parameters(layers, strategy: str, conv: str, n: int) -> float:
  """Parameters one device updates per step: its 1/N of the sharded ones, all of the
  replicated ones (data parallelism repeats the whole update on every device).

  ========  ======================================================
  data      every parameter
  lazy      kernels / N (sharded), biases (replicated)
  hybrid    FC1 / FC2 / N (split); conv (/ N for conv kernels under
            parallel.conv='lazy') and FC3 whole
  gspmd     as hybrid with conv='data' (XLA keeps replicated weights
            replicated, their update too)
  ========  ======================================================
  """
  total = 0.0
  for layer in layers:
    if n > 1 and strategy in ("hybrid", "gspmd") and layer.name in ("fc1", "fc2"):
      total += (layer.kernel + layer.bias) / n
    elif n > 1 and (
      strategy == "lazy"
      or (strategy == "hybrid" and conv == "lazy" and layer.name.startswith("convs"))
    ):
      total += layer.kernel / n + layer.bias
    else:
      total += layer.kernel + layer.bias
  return total


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
  image_size: int = 224,
  overlap: str = "deferred",
  *,
  num_classes: int = 1000,
  in_channels: int = 3,
  conv: str = "data",
  bucket_mb: float = 25.0,
  fc_micro_batches: int = 0,
  activation_bytes: int | None = None,
) -> Prediction:
  """Predicted step of `strategy` on `num_devices` devices of `cluster`, b images each.

  Args mirror the config: parallel.collective (`algorithm`), parallel.overlap,
  parallel.conv, parallel.bucket_mb, parallel.fc_micro_batches (0: 2 on a
  cluster that overlaps communication, else 1, as the strategies choose);
  `activation_bytes` per FC activation value (None: the cluster's
  bytes_per_value; 2 for a bfloat16 model).
  """
  cl = get_cluster(cluster)
  if strategy not in STRATEGIES:
    raise ConfigError(
      f"parallel.strategy={strategy!r} is not a known strategy; choose from {STRATEGIES}"
    )
  if overlap not in ("none", "deferred"):
    raise ConfigError(f"parallel.overlap={overlap!r} must be 'none' or 'deferred'")
  n, b = num_devices, batch_per_device
  if n < 1 or b < 1:
    raise ValueError(f"num_devices={n} and batch_per_device={b} must be >= 1")
  cl = _share(cl, n)
  layers = model_layers(model_name, image_size, num_classes, in_channels)
  bpv = cl.bytes_per_value
  abytes = bpv if activation_bytes is None else activation_bytes
  if strategy == "gspmd":
    algorithm, micro = "xla", 1  # XLA's own collectives; one pass through the head
  else:
    micro = fc_micro_batches or (2 if cl.overlaps_comm else 1)
  micro = max(1, min(micro, b))
  fc_split = strategy in ("hybrid", "gspmd") and n > 1
  head = ("fc1", "fc2", "fc3") if fc_split else ()
  seq = [x for x in layers if x.name not in head]
  by_name = {x.name: x for x in layers}
  rate = cl.flops

  def fwd_s(layer, images):
    return images * layer.flops / rate

  def bwd_s(layer, images):  # the first layer computes no input gradient
    return fwd_s(layer, images) * (1 if layer is layers[0] else 2)

  plan = _plan_buckets(layers, strategy, conv, n, bucket_mb, bpv) if n > 1 else []
  tasks: list[_Task] = []
  totals = {"param": 0.0, "act": 0.0, "rounds": 0, "count": 0}

  def comm(name, kind, nbytes, deps, priority, what):
    cost = collective_cost(kind, algorithm, nbytes, n, cl)
    totals[what] += cost.bytes_sent
    totals["rounds"] += cost.rounds
    totals["count"] += 1
    tasks.append(_Task(name, True, cost.seconds, tuple(deps), priority))

  # Gathers before use (deferred replicated buckets: the pending update; lazy
  # buckets: the shards), one bucket ahead: bucket k + 1 once bucket k's input exists.
  gather_first = [
    i
    for i, (kind, _, _) in enumerate(plan)
    if kind == "lazy" or (overlap == "deferred" and strategy != "gspmd")
  ]
  order = [x.name for x in layers]
  gather_of: dict[str, list[str]] = {}  # layer -> gathers its forward waits for
  for pos, i in enumerate(gather_first):
    kind, blayers, nbytes = plan[i]
    deps = []
    if pos >= 2:
      before = order.index(plan[gather_first[pos - 1]][1][0]) - 1
      if before >= 0:
        deps = [f"fwd:fc12.{micro - 1}" if order[before] in head else f"fwd:{order[before]}"]
    comm(f"ag:{i}", "all_gather", nbytes, deps, 1, "param")
    gather_of.setdefault(blayers[0], []).append(f"ag:{i}")

  # The optimizer update, memory-bound: deferred applies it bucket by bucket before
  # the forward pass (modelled as one task first), none after the last all-gather.
  update_s = UPDATE_BYTES_PER_PARAM * updated_parameters(layers, strategy, conv, n)
  update_s /= cl.memory_bandwidth
  deferred_update = overlap == "deferred" and strategy != "gspmd"
  prev: list[str] = []
  if deferred_update:
    tasks.append(_Task("update", False, update_s, ()))
    prev = ["update"]
  for layer in seq:
    name = f"fwd:{layer.name}"
    tasks.append(_Task(name, False, fwd_s(layer, b), tuple(prev + gather_of.get(layer.name, []))))
    prev = [name]
  if head:
    # FC head in `micro` parts of the local batch (fc_block): features gathered over
    # the batch, FC1 / FC2 on 1/N of the columns, FC2's partial sums scattered back.
    fc1, fc2, fc3 = (by_name[x] for x in head)
    parts = [b // micro + (j < b % micro) for j in range(micro)]
    for j, bp in enumerate(parts):
      comm(f"ag_feat.{j}", "all_gather", n * bp * fc1.fan_in * abytes, prev[-1:], 0, "act")
      tasks.append(
        _Task(
          f"fwd:fc12.{j}",
          False,
          fwd_s(fc1, bp) + fwd_s(fc2, bp),
          (f"ag_feat.{j}", *([f"fwd:fc12.{j - 1}"] if j else prev)),
        )
      )
      comm(f"rs_y2.{j}", "reduce_scatter", n * bp * fc2.width * abytes, [f"fwd:fc12.{j}"], 0, "act")
    for j, bp in enumerate(parts):
      deps = [f"rs_y2.{j}", f"fwd:fc12.{micro - 1}"] + gather_of.get("fc3", [])
      if j:
        deps.append(f"fwd:fc3.{j - 1}")
      tasks.append(_Task(f"fwd:fc3.{j}", False, fwd_s(fc3, bp), tuple(deps)))
    prev = [f"fwd:fc3.{micro - 1}"]
    for j, bp in enumerate(parts):
      tasks.append(_Task(f"bwd:fc3.{j}", False, bwd_s(fc3, bp), tuple(prev)))
      prev = [f"bwd:fc3.{j}"]
    for j, bp in enumerate(parts):
      comm(f"ag_dy2.{j}", "all_gather", n * bp * fc2.width * abytes, [f"bwd:fc3.{j}"], 0, "act")
    for j, bp in enumerate(parts):
      name = f"bwd:fc12.{j}"
      tasks.append(_Task(name, False, bwd_s(fc1, bp) + bwd_s(fc2, bp), (f"ag_dy2.{j}", *prev)))
      prev = [name]
      comm(f"rs_dfeat.{j}", "reduce_scatter", n * bp * fc1.fan_in * abytes, [name], 0, "act")
    prev = prev + [f"rs_dfeat.{j}" for j in range(micro)]
  done_of = {"fc3": f"bwd:fc3.{micro - 1}"} if head else {}
  for layer in reversed(seq):
    name = f"bwd:{layer.name}"
    tasks.append(_Task(name, False, bwd_s(layer, b), tuple(prev)))
    prev = [name]
    done_of[layer.name] = name
  last_compute = prev[0]
  # Reduce-scatter each bucket once backward has passed all its layers (its first).
  for i in sorted(range(len(plan)), key=lambda i: -order.index(plan[i][1][0])):
    kind, blayers, nbytes = plan[i]
    comm(f"rs:{i}", "reduce_scatter", nbytes, [done_of[blayers[0]]], 1, "param")
    if i not in gather_first:
      # none: all-gather + update at the end of the step; gspmd: XLA's all-reduce
      # is the reduce-scatter followed at once by the all-gather.
      deps = [f"rs:{i}"] + ([] if strategy == "gspmd" else [last_compute])
      comm(f"ag_end:{i}", "all_gather", nbytes, deps, 1, "param")

  if not deferred_update:
    tasks.append(_Task("update", False, update_s, tuple(t.name for t in tasks if t.comm)))
  compute_s = sum(t.seconds for t in tasks if not t.comm)
  comm_s = sum(t.seconds for t in tasks if t.comm)
  step_s = _simulate(tasks) if cl.overlaps_comm else compute_s + comm_s
  step_s = max(step_s, compute_s)
  global_batch = n * b
  return Prediction(
    model=model_name,
    strategy=strategy,
    algorithm=algorithm,
    num_devices=n,
    batch_per_device=b,
    cluster=cl.name,
    compute_s=compute_s,
    update_s=update_s,
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


# ---------------------------------------------------------------- Figure 3


def _best(model_name, cluster, n, b, strategies, algorithm, **kw) -> Prediction:
  """The fastest of `strategies` (ties: the first listed)."""
  return min(
    (predict(model_name, s, algorithm, n, b, cluster, **kw) for s in strategies),
    key=lambda p: p.step_s,
  )


def speedup(
  model_name: str,
  cluster: str | Cluster,
  num_devices: int,
  global_batch: int,
  *,
  strategies: tuple[str, ...] = PAPER_STRATEGIES,
  algorithm: str = PAPER_ALGORITHM,
  **kw,
) -> float:
  """Time per image on one device / on `num_devices` (the faster of `strategies`).

  Both run mini-batch `global_batch` (one device: all of it; G devices:
  global_batch / G each), as in the paper's Figure 3 right.
  """
  if global_batch % num_devices:
    raise ValueError(f"global_batch={global_batch} does not divide over {num_devices} devices")
  one = predict(model_name, "data", algorithm, 1, global_batch, cluster, **kw)
  many = _best(
    model_name, cluster, num_devices, global_batch // num_devices, strategies, algorithm, **kw
  )
  return one.time_per_image_s / many.time_per_image_s


def device_counts(max_devices: int = 64) -> list[int]:
  """1, 2, 4, ..., max_devices (Figure 3's x axis)."""
  return [2**i for i in range(int(math.log2(max_devices)) + 1)]


def crossover(
  model_name: str,
  cluster: str | Cluster,
  batch_per_device: int = 64,
  *,
  algorithm: str = PAPER_ALGORITHM,
  max_devices: int = 64,
  **kw,
) -> int:
  """The GPU count above which data parallelism beats hybrid (paper: 16).

  Precisely: the largest G in 1, 2, 4, ..., max_devices at which hybrid's step
  (b = batch_per_device images per device, the paper's slices) is no slower
  than data's; so data is strictly faster at every listed count above it. 1
  when data wins from 2 devices on (at 1 they coincide); max_devices when
  hybrid is never slower.
  """
  best = 1
  for g in device_counts(max_devices):
    hybrid = predict(model_name, "hybrid", algorithm, g, batch_per_device, cluster, **kw)
    data = predict(model_name, "data", algorithm, g, batch_per_device, cluster, **kw)
    if hybrid.step_s <= data.step_s * (1 + 1e-9):  # equal up to rounding: not slower
      best = g
  return best


def predict_rows(
  preset: str | Cluster,
  model: str = "scaling_8conv_3fc",
  *,
  max_devices: int = 64,
  batch_per_device: int = 64,
  global_batches: tuple[int, ...] = (256, 512, 1024),
  algorithms: tuple[str, ...] = (PAPER_ALGORITHM,),
  strategies: tuple[str, ...] = PAPER_STRATEGIES,
  **kw,
) -> list[dict]:
  """Figure 3's numbers as dicts, for plots and tables.

  figure='left': per strategy, algorithm and G, `batch_per_device` images per
  device (time per image, step, speedup over one device at the same b,
  efficiency, bytes per device). figure='right': per global batch and G, the
  faster of `strategies` (speedup as `speedup`).
  """
  rows = []
  for algorithm in algorithms:
    one = predict(model, "data", algorithm, 1, batch_per_device, preset, **kw)
    for strategy in strategies:
      for g in device_counts(max_devices):
        p = predict(model, strategy, algorithm, g, batch_per_device, preset, **kw)
        s = one.time_per_image_s / p.time_per_image_s
        rows.append(
          dict(
            figure="left",
            **dataclasses.asdict(p),
            global_batch=g * batch_per_device,
            speedup=s,
            efficiency=s / g,
          )
        )
    for batch in global_batches:
      one = predict(model, "data", algorithm, 1, batch, preset, **kw)
      for g in device_counts(max_devices):
        if batch % g:
          continue
        p = _best(model, preset, g, batch // g, strategies, algorithm, **kw)
        s = one.time_per_image_s / p.time_per_image_s
        rows.append(
          dict(
            figure="right", **dataclasses.asdict(p), global_batch=batch, speedup=s, efficiency=s / g
          )
        )
  return rows


def _utilisation_for(model: str, cl: Cluster, target: float) -> float | None:
  """The utilisation at which speedup@64 would equal `target` (bisection), None if none in range."""

  def f(u):
    return speedup(model, dataclasses.replace(cl, utilisation=u), 64, 1024) - target

  lo, hi = 0.05, 1.0
  if f(lo) * f(hi) > 0:
    return None
  for _ in range(30):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
  return (lo + hi) / 2


def report(preset: str, model: str = "scaling_8conv_3fc") -> str:
  """What `python -m experiments.scaling --model_only --preset=PRESET` prints.

  A table per GPU count 1..64: time per image and speedup of hybrid and data
  with 64 images per GPU (Figure 3 left), the speedup at global batches
  256 / 512 / 1024 (Figure 3 right, the faster strategy), then the same two
  numbers with ring collectives and over a range of utilisations, and the
  paper's numbers for Minwa; the LAST two lines are exactly
  `crossover: G` and `speedup@64: X.Xx` (butterfly, the paper's algorithm).
  """
  cl = get_cluster(preset)
  gpus = device_counts(64)
  b = 64
  one = predict(model, "data", PAPER_ALGORITHM, 1, b, cl)
  lines = [
    f"cost model: {model} on {cl.name} ({cl.description})",
    f"  {cl.peak_flops / 1e12:.2f} TFLOP/s peak x {cl.utilisation:.2f} utilisation per device; "
    f"links {cl.intra_bandwidth / 1e9:.1f} GB/s in a node, {cl.inter_bandwidth / 1e9:.1f} GB/s "
    f"per node between nodes; {PAPER_ALGORITHM}, overlap deferred, 224 px",
    f"  one device: {one.step_s / b * 1e3:.3g} ms per image "
    f"({(one.compute_s - one.update_s) / b * cl.flops / 1e9:.1f} GFLOP forward + backward, "
    f"+ the update {one.update_s * 1e3:.3g} ms a step)",
    "",
    f"{'GPUs':>4} | {'ms/image (slices=64)':^21} | {'speedup (slices=64)':^19} | "
    f"{'GB sent / GPU / step':^20} | speedup, mini-batch",
    f"{'':>4} | {'hybrid':>10} {'data':>10} | {'hybrid':>9} {'data':>9} | "
    f"{'hybrid':>9} {'data':>10} | {'256':>6} {'512':>6} {'1024':>6}",
  ]
  for g in gpus:
    h = predict(model, "hybrid", PAPER_ALGORITHM, g, b, cl)
    d = predict(model, "data", PAPER_ALGORITHM, g, b, cl)
    right = [
      f"{speedup(model, cl, g, batch):6.1f}" if batch % g == 0 else f"{'-':>6}"
      for batch in (256, 512, 1024)
    ]
    lines.append(
      f"{g:>4} | {h.time_per_image_s * 1e3:>10.4g} {d.time_per_image_s * 1e3:>10.4g} | "
      f"{one.time_per_image_s / h.time_per_image_s:>9.1f} "
      f"{one.time_per_image_s / d.time_per_image_s:>9.1f} | "
      f"{h.bytes_sent_per_device / 1e9:>9.3f} {d.bytes_sent_per_device / 1e9:>10.3f} | "
      + " ".join(right)
    )
  cross = crossover(model, cl)
  s64 = speedup(model, cl, 64, 1024)
  lines += [
    "",
    f"with ring collectives instead: crossover {crossover(model, cl, algorithm='ring')}, "
    f"speedup@64 {speedup(model, cl, 64, 1024, algorithm='ring'):.1f}x",
    "utilisation sensitivity (butterfly): "
    + "; ".join(
      f"{u:.1f}: crossover {crossover(model, dataclasses.replace(cl, utilisation=u))}, "
      f"speedup@64 {speedup(model, dataclasses.replace(cl, utilisation=u), 64, 1024):.1f}x"
      for u in (0.3, 0.5, 0.7)
    ),
  ]
  if cl.name == "minwa":
    u = _utilisation_for(model, cl, PAPER["speedup@64"])
    lines += [
      f"paper (section 3.3, Minwa): crossover {PAPER['crossover']}, "
      f"speedup@64 {PAPER['speedup@64']:.0f}x",
      "utilisation that would give the paper's 47x: "
      + (f"{u:.2f}" if u is not None else "none in 0.05-1.0"),
    ]
  lines += [f"crossover: {cross}", f"speedup@64: {s64:.1f}x"]
  return "\n".join(lines)


def compare_bytes(
  model_name: str,
  strategy: str,
  algorithm: str,
  num_devices: int,
  batch_per_device: int,
  measured_bytes_per_device: float,
  *,
  cluster: str | Cluster = "h100",
  **kw,
) -> float:
  """(predicted - measured) / measured bytes sent per device per step.

  `measured_bytes_per_device`: e.g. the collective bytes of one device read
  from the compiled program (`experiments.scaling`). `kw` as `predict`'s
  (image_size, activation_bytes, fc_micro_batches, ...).
  """
  if measured_bytes_per_device <= 0:
    raise ValueError(f"measured_bytes_per_device={measured_bytes_per_device} must be > 0")
  p = predict(model_name, strategy, algorithm, num_devices, batch_per_device, cluster, **kw)
  return (p.bytes_sent_per_device - measured_bytes_per_device) / measured_bytes_per_device


def compare_step(
  model_name: str,
  strategy: str,
  algorithm: str,
  num_devices: int,
  batch_per_device: int,
  measured_step_s: float,
  *,
  cluster: str | Cluster = "cpu",
  **kw,
) -> float:
  """(predicted - measured) / measured step time; arguments as `compare_bytes`."""
  if measured_step_s <= 0:
    raise ValueError(f"measured_step_s={measured_step_s} must be > 0")
  p = predict(model_name, strategy, algorithm, num_devices, batch_per_device, cluster, **kw)
  return (p.step_s - measured_step_s) / measured_step_s


# ---------------------------------------------------------------- parallel.strategy='auto'


def cluster_for_mesh(mesh) -> Cluster:
  """The preset for the mesh's devices: cpu -> 'cpu', H100 -> 'h100', other -> 'h100' (logged).

  A multi-host mesh is taken as nodes of its per-host device count.
  """
  device = mesh.devices.flat[0]
  platform, kind = device.platform, getattr(device, "device_kind", "")
  if platform == "cpu":
    preset = PRESETS["cpu"]
  else:
    preset = PRESETS["h100"]
    if "H100" not in kind:
      logging.info(
        "cost model: no preset for %s device %r; predicting with the 'h100' preset",
        platform,
        kind,
      )
  hosts = len({d.process_index for d in mesh.devices.flat})
  per_node = max(1, mesh.size // hosts) if hosts > 1 else preset.devices_per_node
  return dataclasses.replace(preset, devices_per_node=per_node)


def choose_strategy(config, mesh) -> tuple[str, str]:
  """The strategy the cost model predicts fastest for `config` on `mesh`, and why.

  Candidates are the strategies `strategies.validate_parallel_config` accepts
  for this config and mesh (e.g. hybrid only when FC1's width divides over the
  devices, the shard_map strategies only on a one-axis mesh). Returns
  (name, one-line reason with every candidate's predicted step time).
  """
  from deep_image.parallel import strategies as strategies_lib  # it imports this module

  par, n = config.parallel, mesh.size
  cl = cluster_for_mesh(mesh)
  batch = config.train.batch_size // n
  kw = dict(
    image_size=config.model.image_size,
    num_classes=config.model.num_classes,
    in_channels=config.model.in_channels,
    overlap=par.overlap,
    conv=par.conv,
    bucket_mb=par.bucket_mb,
    fc_micro_batches=par.fc_micro_batches,
    activation_bytes=2 if config.model.dtype == "bfloat16" else cl.bytes_per_value,
  )
  times, rejected = {}, []
  for name in STRATEGIES:
    candidate = copy.deepcopy(config)
    candidate.parallel.strategy = name
    try:
      strategies_lib.validate_parallel_config(candidate, n)
    except ConfigError:
      rejected.append(name)
      continue
    p = predict(config.model.name, name, par.collective, n, batch, cl, **kw)
    times[name] = p.step_s
  if not times:
    raise ConfigError(f"parallel.strategy='auto': no strategy can run this config on {n} devices")
  best = min(times, key=times.get)
  reason = (
    f"cost model ({cl.name} preset, {n} devices, {batch} images each, "
    f"{par.collective}): predicted step "
    + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
    + (f"; not runnable here: {', '.join(rejected)}" if rejected else "")
  )
  return best, reason
