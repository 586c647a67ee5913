"""Bytes each device sends to devices on other hosts per step, from a compiled program.

A module of its own beside `bytes_sent` because it answers a different question: bytes_sent
is how much one device sends, a formula of the group size G alone; this is *where* it goes,
which needs the groups' members, a device -> host map and an assumption about the route
each algorithm takes through its group. It reads the same op list (`bytes_sent.
collective_ops`: each op once, operand bytes B, replica groups parsed by `hlo.replica_groups`)
and, like the rest of `deep_image.analysis`, only text: no JAX, nothing of deep_image.

`hosts[d]` is the host of the program's device d. In an SPMD program (replica_count 1, what
jit and shard_map compile) the ids in `replica_groups` and `source_target_pairs` are
partition ids, i.e. positions in the jit's device assignment, which for a `Mesh` is
`mesh.devices.flat` order (not `device.id`; tests/test_cross_host.py checks it on a mesh of
permuted devices). So `hosts = [host_of(dev) for dev in mesh.devices.flat]`; for node-major
ranks on H hosts of D devices that is `node_major_hosts(N, D)`: d // D.

For one op, bytes device d sends across hosts (g: d's group in group order, i its position,
next = g[(i + 1) % G], B: d's operand bytes, host(x) = hosts[x]):

==================  ==============================================  ==========================
op                  bytes device d sends to other hosts             route assumed
==================  ==============================================  ==========================
collective-permute  B per pair (d, t) with host(t) != host(d)       exact: the pairs say it
all-gather          B x (G - 1) if host(next) != host(d), else 0    ring over the group in
                                                                    group order: every shard
                                                                    passes d -> next
reduce-scatter      B x (G - 1) / G if host(next) != host(d)        same ring, G - 1 chunks of
                                                                    B / G
all-reduce          2 x B x (G - 1) / G if host(next) != host(d)    same ring: reduce-scatter
                                                                    then all-gather
all-to-all          B / G x (members of g on other hosts)           direct: B / G to each peer
==================  ==============================================  ==========================

The sum over d of the ring rows is what any ring that enters and leaves each host once
sends across hosts (for a group spread over h > 1 hosts with its devices grouped by host,
as node-major ranks are: h crossings), so the *mean* per device holds for NCCL's rings too.
The *max* does not: the group-order ring puts all of a host's outgoing bytes on its last
device, while NCCL builds its own rings per channel (its topology search reorders ranks and
stripes channels over the node's NICs) and may pick a tree or another algorithm for an
all-reduce; those move the same cross-host bytes per host over other devices (a tree's
amount differs). A group whose members are all on different hosts (the `node` axis of a
two-level mesh: one device of each host) crosses hosts on every route, so there the max is
the mean and the figure is all that the ring sends. The hand-written collectives
(`parallel.collective` butterfly / ring) compile to collective-permutes, whose figure is
exact.

Per step: a statically counted op in a loop body counts once, as in bytes_sent.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from deep_image.analysis.bytes_sent import CollectiveOp, collective_ops
from deep_image.analysis.hlo import module_devices


def node_major_hosts(num_devices: int, devices_per_host: int) -> list[int]:
  """hosts[d] = d // devices_per_host: node-major ranks (rank = host x D + local)."""
  if devices_per_host <= 0 or num_devices % devices_per_host:
    raise ValueError(f"{num_devices} devices do not divide into hosts of {devices_per_host}")
  return [d // devices_per_host for d in range(num_devices)]


def op_cross_host(op: CollectiveOp, hosts: Sequence[int]) -> list[float]:
  """Bytes each device sends to other hosts for one op (the module docstring's table)."""
  out = [0.0] * len(hosts)
  b = op.operand_bytes
  if op.kind == "collective-permute":
    for s, t in op.pairs:
      if hosts[s] != hosts[t]:
        out[s] += b
    return out
  for group in op.groups:
    g = len(group)
    if g <= 1:
      continue
    for i, d in enumerate(group):
      if op.kind == "all-to-all":
        out[d] += b / g * sum(hosts[p] != hosts[d] for p in group)
        continue
      if hosts[group[(i + 1) % g]] == hosts[d]:
        continue
      if op.kind == "all-gather":
        out[d] += b * (g - 1)
      elif op.kind == "reduce-scatter":
        out[d] += b * (g - 1) / g
      elif op.kind == "all-reduce":
        out[d] += 2.0 * b * (g - 1) / g
      else:
        raise ValueError(f"no cross-host route for collective kind {op.kind!r}")
  return out


@dataclasses.dataclass(frozen=True)
class CrossHost:
  """Cross-host bytes of one compiled program per step.

  Attributes:
    ops: its collectives (`bytes_sent.collective_ops`).
    per_op: for each op, the bytes each device sends to other hosts (`op_cross_host`).
    per_device: their sum per device: bytes device d sends to other hosts per step.
  """

  ops: tuple[CollectiveOp, ...]
  per_op: tuple[tuple[float, ...], ...]
  per_device: tuple[float, ...]

  @property
  def max(self) -> float:
    """Bytes per step of the device that sends the most across hosts."""
    return max(self.per_device, default=0.0)

  @property
  def mean(self) -> float:
    """Bytes per step across hosts, averaged over the devices (all hosts' total / N)."""
    return sum(self.per_device) / len(self.per_device) if self.per_device else 0.0

  def by_kind(self) -> dict[str, float]:
    """{kind: bytes across hosts per step, the mean per device} of the kinds that cross."""
    n = max(len(self.per_device), 1)
    out: dict[str, float] = {}
    for op, sent in zip(self.ops, self.per_op, strict=True):
      if any(sent):
        out[op.kind] = out.get(op.kind, 0.0) + sum(sent) / n
    return out


def cross_host_bytes(hlo_text: str, hosts: Sequence[int]) -> CrossHost:
  """Bytes each device of a compiled HLO module sends to other hosts per step.

  `hosts[d]`: the host of the program's device d (see the module docstring for how ids
  are numbered); its length must be the module's device count (num_partitions x
  replica_count of the header, when the header gives one).
  """
  n = module_devices(hlo_text)
  if n > 1 and n != len(hosts):
    raise ValueError(f"the module has {n} devices but hosts maps {len(hosts)}")
  ops = tuple(collective_ops(hlo_text, len(hosts)))
  per_op = tuple(tuple(op_cross_host(op, hosts)) for op in ops)
  per_device = (
    tuple(sum(col) for col in zip(*per_op, strict=True)) if per_op else (0.0,) * len(hosts)
  )
  return CrossHost(ops=ops, per_op=per_op, per_device=per_device)
