"""The alpha-beta cost of one reduce-scatter or all-gather on a cluster of nodes.

A reduce-scatter or all-gather of a buffer of S bytes over N devices (chunk
c = S / N) runs as rounds in which every device sends one message to one partner:

=========  ===============================  ==============================
algorithm  rounds                           message of each round
=========  ===============================  ==============================
butterfly  ceil(log2 N): N = 2^a m, m odd   halving: N/(2d) c, d = 1..2^(a-1);
           `collectives.butterfly_rounds`:  odd phase: floor(L_j / 2) c
           partner r ^ d, then r + 2^j 2^a  (reduce-scatter order; the
                                            all-gather reverses it)
ring       N - 1, partner r + 1             c
direct     N - 1, partner r + s (s = 1..)   c
xla        the faster of ring / butterfly   (NCCL picks ring or tree)
=========  ===============================  ==============================

Device r sits on node r // devices_per_node (ranks node-major, as
`jax.devices()` orders them). A round takes alpha + m / bandwidth on the
slowest link it uses (`round_seconds`):

==============  ==========================================================
link            time of a round with message m
==============  ==========================================================
inside a node   intra_latency + m / intra_bandwidth (each device its own link)
across nodes    inter_latency + m x k / nic_bandwidth, k = the most devices
                of one NIC that send (or receive) across nodes in the round
==============  ==========================================================

A device's cross-node traffic leaves through its own NIC (`clusters`): on
`h100` one NIC per GPU, so a flat ring, where one GPU per node crosses in each
round, sends at 50 GB/s, not at the node's 400; on `minwa` the node's 4 GPUs
share one adapter, so a butterfly round at d >= 4 puts all 4 on it at once.
Only an algorithm in which several devices of a node cross at once uses
several NICs: the butterfly's rounds at d >= devices_per_node, and the node
level of a two-level collective.

Levels (a node x local mesh, sizes outer first, node-major ranks; `Levels` in
`collectives`): a collective over one axis runs at once in every group of
devices that differ only in that axis' index (`level_cost`); a collective
over all axes runs level by level (`mesh_cost`):

==============  =====================================  ===========================
collective      order                                  buffer of each level
==============  =====================================  ===========================
reduce-scatter  innermost axis first                   S, then S / L, ...
all-gather      outermost axis first                   ..., S / L, then S
==============  =====================================  ===========================

The butterfly's halving starts at d = 1 with half the buffer, so on nodes of
2^b devices its b largest rounds stay inside a node. Every algorithm sends
(N-1) c bytes per device per collective, on any N; `bytes_across` counts the
part whose partner is on another node, averaged over the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from deep_image.parallel.clusters import Cluster, get_cluster
from deep_image.parallel.collectives import butterfly_rounds, check_algorithm

KINDS = ("reduce_scatter", "all_gather")


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
  """One reduce-scatter or all-gather, as seen by one device (bytes averaged over devices).

  across_by_device: bytes each device of the mesh (node-major) sends to a partner
  on another node (None: no device crosses, or no mesh); `bytes_across` is their
  mean, `max_across` their max (a flat ring's last device of a node sends all of
  its node's crossing bytes).
  """

  seconds: float
  bytes_sent: float  # per device
  rounds: int
  algorithm: str  # the one that runs (xla: the one it is modelled as); levels joined by '/'
  bytes_across: float = 0.0  # of bytes_sent, to a partner on another node
  across_by_device: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def bytes_inside(self) -> float:
    return self.bytes_sent - self.bytes_across

  @property
  def max_across(self) -> float:
    return 0.0 if self.across_by_device is None else float(self.across_by_device.max())

  def __add__(self, other: CollectiveCost) -> CollectiveCost:
    a, b = self.across_by_device, other.across_by_device
    return CollectiveCost(
      self.seconds + other.seconds,
      self.bytes_sent + other.bytes_sent,
      self.rounds + other.rounds,
      f"{self.algorithm}/{other.algorithm}",
      self.bytes_across + other.bytes_across,
      b if a is None else a if b is None else a + b,
    )


def _rounds(kind: str, algorithm: str, n: int) -> list[tuple[int, str, int]]:
  """(chunks per message, 'xor' | 'shift', distance) of each round, in order."""
  if algorithm == "butterfly":
    return [(r.chunks, r.how, r.distance) for r in butterfly_rounds(n, kind)]
  if algorithm == "ring":
    return [(1, "shift", 1)] * (n - 1)
  return [(1, "shift", s) for s in range(1, n)]  # direct


@dataclasses.dataclass(frozen=True)
class RoundLinks:
  """Which links one round uses: every device of the mesh sends one message."""

  nic_load: int  # most devices of one NIC sending (or receiving) across nodes; 0: none
  inside: bool  # some device's partner is on its own node
  crossing: np.ndarray = dataclasses.field(compare=False, repr=False)  # [devices] bool

  @property
  def across(self) -> float:
    """The fraction of the devices whose partner is on another node."""
    return float(self.crossing.mean())


@functools.cache
def round_links(
  devices: int,
  per_node: int,
  per_nic: int,
  group: int,
  stride: int,
  how: str,
  dist: int,
) -> RoundLinks:
  """One round of a collective over `group` devices of stride `stride`, run at once in
  every such group of `devices` node-major devices: partner of the group's rank i is
  i ^ dist ('xor') or i + dist mod group ('shift')."""
  r = np.arange(devices)
  i = (r // stride) % group
  p = i ^ dist if how == "xor" else (i + dist) % group
  q = r + (p - i) * stride  # the partner's device
  crossing = r // per_node != q // per_node
  nics = -(-per_node // per_nic)
  load = 0
  if crossing.any():
    nic_out = (r // per_node) * nics + (r % per_node) // per_nic
    nic_in = (q // per_node) * nics + (q % per_node) // per_nic
    load = int(max(np.bincount(nic_out[crossing]).max(), np.bincount(nic_in[crossing]).max()))
  crossing.setflags(write=False)
  return RoundLinks(load, bool((~crossing).any()), crossing)


def round_seconds(
  message_bytes: float,
  n: int,
  how: str,
  dist: int,
  cluster: Cluster,
  *,
  devices: int | None = None,
  stride: int = 1,
) -> float:
  """alpha + bytes / bandwidth of one round, on the slowest link it uses.

  The round runs over groups of `n` devices of stride `stride` among `devices`
  (None: n) node-major devices, all groups at once.
  """
  devices = n * stride if devices is None else devices
  links = round_links(
    devices, cluster.devices_per_node, cluster.devices_per_nic, n, stride, how, dist
  )
  return _round_time(message_bytes, links, cluster)


def _round_time(message_bytes: float, links: RoundLinks, cl: Cluster) -> float:
  """The module's table: the slower of the NIC and the intra-node link the round uses."""
  t = 0.0
  if links.nic_load:
    t = cl.inter_latency + message_bytes * links.nic_load / cl.nic_bandwidth
  if links.inside:
    t = max(t, cl.intra_latency + message_bytes / cl.intra_bandwidth)
  return t


def level_cost(
  kind: str,
  algorithm: str,
  buffer_bytes: float,
  mesh: Sequence[int],
  axis: int,
  cluster: str | Cluster,
) -> CollectiveCost:
  """Reduce-scatter ([n c] -> [c]) or all-gather of `buffer_bytes` = n c bytes over axis
  `axis` of `mesh` (sizes, outer first, node-major): every group along that axis at once."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} must be 'reduce_scatter' or 'all_gather'")
  check_algorithm(algorithm)
  cl = get_cluster(cluster)
  mesh = tuple(int(s) for s in mesh)
  if mesh[axis] <= 1:
    return CollectiveCost(0.0, 0.0, 0, algorithm)
  if algorithm == "xla":
    options = [level_cost(kind, a, buffer_bytes, mesh, axis, cl) for a in ("ring", "butterfly")]
    return min(options, key=lambda c: c.seconds)
  n = mesh[axis]
  c = buffer_bytes / n
  rounds = _schedule(kind, algorithm, mesh, axis, cl.devices_per_node, cl.devices_per_nic)
  seconds = sum(_round_time(chunks * c, links, cl) for chunks, links in rounds)
  chunks_sent, across_chunks = _traffic(
    kind, algorithm, mesh, axis, cl.devices_per_node, cl.devices_per_nic
  )
  across = None if not across_chunks.any() else across_chunks * c
  mean = 0.0 if across is None else float(across.mean())
  return CollectiveCost(seconds, chunks_sent * c, len(rounds), algorithm, mean, across)


@functools.cache
def _schedule(kind, algorithm, mesh, axis, per_node, per_nic) -> tuple:
  """((chunks per message, RoundLinks) of each round) of one level's collective."""
  n, stride, devices = mesh[axis], math.prod(mesh[axis + 1 :]), math.prod(mesh)
  return tuple(
    (chunks, round_links(devices, per_node, per_nic, n, stride, how, dist))
    for chunks, how, dist in _rounds(kind, algorithm, n)
  )


@functools.cache
def _traffic(kind, algorithm, mesh, axis, per_node, per_nic) -> tuple[int, np.ndarray]:
  """(chunks each device sends, [devices] chunks each sends across nodes) of one level."""
  rounds = _schedule(kind, algorithm, mesh, axis, per_node, per_nic)
  across = np.zeros(math.prod(mesh))
  for chunks, links in rounds:
    across += chunks * links.crossing
  across.setflags(write=False)
  return sum(chunks for chunks, _ in rounds), across


def mesh_cost(
  kind: str,
  algorithms: str | Sequence[str],
  buffer_bytes: float,
  mesh: Sequence[int],
  cluster: str | Cluster,
) -> CollectiveCost:
  """A collective over every axis of `mesh`, level by level (module table).

  algorithms: one per axis (outer first), or one for all. One axis: `level_cost`.
  """
  mesh = tuple(mesh)
  algorithms = (algorithms,) * len(mesh) if isinstance(algorithms, str) else tuple(algorithms)
  if len(algorithms) != len(mesh):
    raise ValueError(f"algorithms={algorithms!r}: one per axis of mesh {mesh} is needed")
  levels = []
  inner = 1  # devices of the axes inside the current one
  for axis in reversed(range(len(mesh))):  # reduce-scatter order: innermost first
    levels.append(level_cost(kind, algorithms[axis], buffer_bytes / inner, mesh, axis, cluster))
    inner *= mesh[axis]
  if kind == "all_gather":
    levels.reverse()
  levels = [lv for lv in levels if lv.rounds] or levels[:1]
  return functools.reduce(lambda a, b: a + b, levels)


def collective_cost(
  kind: str, algorithm: str, buffer_bytes: float, n: int, cluster: str | Cluster
) -> CollectiveCost:
  """Reduce-scatter ([N c] -> [c]) or all-gather ([c] -> [N c]) of `buffer_bytes` = N c bytes
  over a one-axis mesh of n devices."""
  return level_cost(kind, algorithm, buffer_bytes, (n,), 0, cluster)
