"""The clusters the cost model predicts for, as data: link and compute rates per preset.

`Cluster` describes a cluster of identical nodes; `PRESETS` holds the paper's
Minwa, an H100 cluster and the simulated CPU devices of the tests, each number
with its source. `cluster_for_mesh` picks the preset for a mesh's devices
(`parallel.strategy='auto'`).

Links. Inside a node every device has its own link to every other (PCIe,
NVLink through NVSwitch). Between nodes a device's traffic leaves through *its*
NIC: the node's devices are attached to its NICs in runs of `devices_per_nic`
consecutive local ranks, and the devices of one run share that NIC's bandwidth.
A device cannot use another device's NIC: an algorithm uses several NICs of a
node only by having several devices send at once.

=======  =====  ==========  =========================  =========================
preset   GPUs   per node    in a node (per direction)  between nodes, per NIC
=======  =====  ==========  =========================  =========================
minwa    <=144  4 (36 x 4)  PCIe 3.0: 10 GB/s          1 FDR IB per node, shared
                                                       by its 4 GPUs: 6 GB/s
h100     <=512  8 (64 x 8)  NVLink 4: 450 GB/s         1 NDR IB per GPU: 50 GB/s
cpu      1024   1024 (1)    memcpy: 10 GB/s / N        (one host)
=======  =====  ==========  =========================  =========================
"""

from __future__ import annotations

import dataclasses
import math

from absl import logging


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
    nic_bandwidth: bytes/s of one NIC (a node's link to the other nodes), per
      direction, shared by the devices attached to it that send (or receive)
      across nodes at once.
    devices_per_nic: consecutive local ranks attached to one NIC (1: a NIC per
      device; devices_per_node: one NIC for the whole node).
    inter_latency: seconds per message between nodes.
    bytes_per_value: bytes of a parameter / gradient value (4: float32).
    overlaps_comm: whether collectives run concurrently with compute.
    memory_bandwidth: bytes/s of one device's memory; the optimizer update is
      bound by it (`UPDATE_BYTES_PER_PARAM`).
    shared_host: the devices share one host's compute, memory and copies
      (simulated XLA:CPU devices): each rate above is the host's, divided by
      the devices of the step.
    device_memory: bytes of one device's memory (what a setup must fit in;
      inf: not checked).
  """

  name: str
  description: str
  devices_per_node: int
  num_nodes: int
  peak_flops: float
  utilisation: float
  intra_bandwidth: float
  intra_latency: float
  nic_bandwidth: float
  devices_per_nic: int
  inter_latency: float
  bytes_per_value: int = 4
  overlaps_comm: bool = True
  memory_bandwidth: float = math.inf
  shared_host: bool = False
  device_memory: float = math.inf

  @property
  def flops(self) -> float:
    """Sustained FLOP/s of one device."""
    return self.peak_flops * self.utilisation

  @property
  def max_devices(self) -> int:
    return self.devices_per_node * self.num_nodes

  @property
  def nics_per_node(self) -> int:
    return -(-self.devices_per_node // self.devices_per_nic)

  @property
  def inter_bandwidth(self) -> float:
    """bytes/s of all of a node's NICs together, per direction (reports)."""
    return self.nics_per_node * self.nic_bandwidth


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
    # point-to-point reaches ~6 GB/s. Paper section 2: one adapter per node,
    # shared by its 4 GPUs.
    nic_bandwidth=6.0e9,
    devices_per_nic=4,
    # GPUDirect RDMA MPI latency, a few us; round up for the CUDA side.
    inter_latency=10e-6,
    # K40m data sheet: 288 GB/s GDDR5.
    memory_bandwidth=288e9,
    # Paper section 2: 12 GB per GPU.
    device_memory=12e9,
  ),
  # A modern cluster: DGX/HGX H100 SXM nodes.
  "h100": Cluster(
    name="h100",
    description="nodes of 8 H100 SXM, NVLink 4 in a node, one 400 Gb/s InfiniBand NIC per GPU",
    devices_per_node=8,
    # Up to 64 nodes (512 GPUs, issue 19): two scalable units of 32 DGX H100
    # nodes each (NVIDIA DGX SuperPOD reference architecture).
    num_nodes=64,
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
    # One 400 Gb/s NDR NIC per GPU (DGX H100: 8 ConnectX-7 single-port OSFP
    # for the compute fabric, rail-aligned): 50 GB/s per direction per GPU.
    # A GPU reaches another GPU's NIC only through that GPU, so one GPU sending
    # alone across nodes gets 50 GB/s, not the node's 400.
    nic_bandwidth=50e9,
    devices_per_nic=1,
    inter_latency=5e-6,
    # Parameters and gradients are float32 here (model.dtype sets the compute dtype).
    bytes_per_value=4,
    # H100 SXM data sheet: 3.35 TB/s HBM3, 80 GB.
    memory_bandwidth=3.35e12,
    device_memory=80e9,
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
    nic_bandwidth=10e9,
    devices_per_nic=1024,
    inter_latency=50e-6,
    overlaps_comm=False,
    memory_bandwidth=10e9,
    shared_host=True,
  ),
}


def get_cluster(cluster: str | Cluster) -> Cluster:
  """A preset by name, or `cluster` itself; ValueError naming the presets otherwise."""
  if isinstance(cluster, Cluster):
    return cluster
  if cluster not in PRESETS:
    raise ValueError(f"preset={cluster!r} is not a known cluster; choose from {sorted(PRESETS)}")
  return PRESETS[cluster]


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
  return dataclasses.replace(
    preset, devices_per_node=per_node, devices_per_nic=min(preset.devices_per_nic, per_node)
  )
