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
slowest link it uses: inside a node the device's own link (PCIe, NVLink);
between nodes the node's inter-node link, *shared* by all of the node's
devices that send across it in that round (m x senders / bandwidth). So a
butterfly round with d >= devices_per_node puts all 4 of a Minwa node's GPUs
on its one InfiniBand link at once, where a ring crosses with one message
per node per round. The butterfly's halving starts at d = 1 with half the
buffer, so on nodes of 2^b devices its b largest rounds stay inside a node.
Every algorithm sends (N-1) c bytes per device per collective, on any N.
"""

from __future__ import annotations

import dataclasses
import functools

from deep_image.parallel.clusters import Cluster, get_cluster
from deep_image.parallel.collectives import butterfly_rounds, check_algorithm


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
  """One reduce-scatter or all-gather, as seen by one device."""

  seconds: float
  bytes_sent: float  # per device
  rounds: int
  algorithm: str  # the one that runs (xla: the one it is modelled as)


def _rounds(kind: str, algorithm: str, n: int) -> list[tuple[int, str, int]]:
  """(chunks per message, 'xor' | 'shift', distance) of each round, in order."""
  if algorithm == "butterfly":
    return [(r.chunks, r.how, r.distance) for r in butterfly_rounds(n, kind)]
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
  check_algorithm(algorithm)
  cluster = get_cluster(cluster)
  if n <= 1:
    return CollectiveCost(0.0, 0.0, 0, algorithm)
  if algorithm == "xla":
    options = [collective_cost(kind, a, buffer_bytes, n, cluster) for a in ("ring", "butterfly")]
    return min(options, key=lambda c: c.seconds)
  c = buffer_bytes / n
  seconds, sent, rounds = 0.0, 0.0, 0
  for chunks, how, dist in _rounds(kind, algorithm, n):
    seconds += round_seconds(chunks * c, n, how, dist, cluster)
    sent += chunks * c
    rounds += 1
  return CollectiveCost(seconds, sent, rounds, algorithm)
