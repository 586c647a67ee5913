"""Bytes each device sends per step, read from a compiled program's HLO text.

Read from the compiled (post-optimization) HLO text (`collective_ops`): every collective
op counted once (an async `<kind>-start` counts, its `-done` does not; a collective wrapped
by `async-start` is counted in its wrapped computation), with G the size of that op's
replica group (not the mesh size), and B the bytes of its operands (a combined op sums
them):

==================  ==================================  ===============================
op                  bytes sent by one device            why
==================  ==================================  ===============================
all-gather          B x (G - 1) = output x (G-1)/G      ring: receive G-1 shards, send
                                                        as many
reduce-scatter      B x (G - 1) / G                     ring: G-1 chunks of B/G
all-reduce          2 x B x (G - 1) / G                 ring: reduce-scatter+all-gather
all-to-all          B x (G - 1) / G                     keep 1/G, send the rest
collective-permute  B x (sources / devices)             B if the device sends; averaged
                                                        over the program's devices
==================  ==================================  ===============================

G comes from `replica_groups` in any of XLA's forms: explicit `{{0,1},{2,3}}` (G = 2),
iota `[2,4]<=[8]` (G = the last dimension, 4), mesh `mesh['x'=2,'y'=4] {'y'}` (G = the
product of the named axes, 4) or empty `{}` (all devices). A statically counted op in
a loop body counts once (the step programs have no collective in a loop); an op whose
group is one device moves nothing and is not counted.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from deep_image.analysis.hlo import (
  COLLECTIVE_KINDS,
  module_devices,
  parse_computations,
  replica_groups,
  shape_bytes,
  source_target_pairs,
)


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
  """One collective of a compiled program.

  Attributes:
    kind: one of COLLECTIVE_KINDS.
    name: its instruction name.
    group: G, the size of its replica group.
    operand_bytes: B, the bytes of its operands.
    sent: bytes one device sends (the module docstring's table).
    op_name: the JAX op_name of its metadata ('' if none).
    groups: its replica groups, device ids in group order (`hlo.replica_groups`; one
      group of all devices for a collective-permute, which has none).
    pairs: a collective-permute's (source, target) pairs, () for the other kinds.
  """

  kind: str
  name: str
  group: int
  operand_bytes: int
  sent: float
  op_name: str
  groups: tuple[tuple[int, ...], ...] = ()
  pairs: tuple[tuple[int, int], ...] = ()

  @property
  def conv(self) -> bool:
    """Whether a convolution layer issued it (op_name under VGG.features)."""
    return "features" in self.op_name


def _sent(kind: str, operand_bytes: int, group: int, pairs, num_devices: int) -> float:
  """Bytes one device sends for one op (the module docstring's table)."""
  if kind == "all-gather":
    return operand_bytes * (group - 1)
  if kind == "all-reduce":
    return 2.0 * operand_bytes * (group - 1) / group
  if kind in ("reduce-scatter", "all-to-all"):
    return operand_bytes * (group - 1) / group
  sources = {s for s, t in pairs if s != t}
  return operand_bytes * len(sources) / max(num_devices, 1)


def collective_ops(hlo_text: str, num_devices: int | None = None) -> list[CollectiveOp]:
  """Every collective of a compiled HLO module with the bytes one device sends.

  `num_devices` defaults to the header's num_partitions x replica_count. Operand
  bytes come from the operands' own instructions (the compiled text prints operands
  by name only), or from shapes printed inline.
  """
  n = num_devices or module_devices(hlo_text)
  comps = parse_computations(hlo_text)
  shapes = {inst.name: inst.shape for insts in comps.values() for inst in insts}
  ops = []
  for comp, insts in comps.items():
    local = {inst.name: inst.shape for inst in insts}
    for inst in insts:
      kind = inst.opcode.removesuffix("-start")
      if kind not in COLLECTIVE_KINDS:
        continue  # -done, async-start (its wrapped op is counted), compute
      operands = inst.operands
      missing = [o for o in operands if o not in local and o not in shapes]
      if missing:
        raise ValueError(f"{inst.opcode} {inst.name!r} in {comp!r}: unknown operands {missing}")
      nbytes = sum(shape_bytes(local.get(o) or shapes[o]) for o in operands)
      groups = replica_groups(inst.line, n)
      group = len(groups[0])
      pairs = tuple(source_target_pairs(inst.line)) if kind == "collective-permute" else ()
      if group <= 1 and kind != "collective-permute":
        continue  # a group of one device: nothing moves (a 1-device step's metric psum)
      ops.append(
        CollectiveOp(
          kind=kind,
          name=inst.name,
          group=group,
          operand_bytes=nbytes,
          sent=_sent(kind, nbytes, group, pairs, n),
          op_name=inst.op_name,
          groups=tuple(groups),
          pairs=pairs,
        )
      )
  return ops


def bytes_summary(ops: Iterable[CollectiveOp]) -> dict:
  """{'ops', 'bytes_sent', 'conv_bytes', 'fc_bytes', 'by_kind': {kind: [count, bytes]}}.

  conv_bytes: ops issued under VGG.features (conv layers); fc_bytes: the rest (FC head,
  its activations, metric sums).
  """
  ops = list(ops)
  by_kind: dict[str, list] = {}
  for op in ops:
    entry = by_kind.setdefault(op.kind, [0, 0.0])
    entry[0] += 1
    entry[1] += op.sent
  return dict(
    ops=len(ops),
    bytes_sent=sum(op.sent for op in ops),
    conv_bytes=sum(op.sent for op in ops if op.conv),
    fc_bytes=sum(op.sent for op in ops if not op.conv),
    by_kind=by_kind,
  )
