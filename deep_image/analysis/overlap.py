"""Async collectives of a scheduled HLO module and the compute scheduled inside their windows.

Every `<kind>-start` / `<kind>-done` pair (and `async-start` / `async-done` wrapping a
collective) of `compiled.as_text()`, and how many of them have compute (a fusion,
convolution, cuDNN / cuBLAS custom-call, dot, loop, ...) scheduled between start and done,
by count and by bytes (the collective's output shape): what XLA's scheduler can hide.
Text only (`deep_image.analysis.hlo`): no CUDA, no JAX.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from deep_image.analysis.hlo import COLLECTIVE_KINDS, Instruction, parse_computations, shape_bytes

# Ops that are not compute: bookkeeping, aliases and copies, and the asynchronous
# pieces of other collectives / transfers (their windows are measured on their own).
TRIVIAL_OPS = frozenset(
  {
    "parameter",
    "constant",
    "bitcast",
    "copy",
    "tuple",
    "get-tuple-element",
    "partition-id",
    "replica-id",
    "after-all",
    "add-dependency",
    "opt-barrier",
    "send",
    "recv",
    "send-done",
    "recv-done",
    *COLLECTIVE_KINDS,  # a synchronous collective is communication, not compute
    "collective-broadcast",
  }
)


_TARGET = re.compile(r'custom_call_target="([^"]*)"')
# Convolutions and matrix products (cuDNN / cuBLAS custom-calls, Triton GEMM fusions):
# the compute that can actually hide a large transfer.
_HEAVY = re.compile(r"cudnn|cublas|gemm|conv|dot", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class AsyncCollective:
  """An asynchronous collective of the scheduled HLO.

  Attributes:
    kind: one of COLLECTIVE_KINDS.
    start / done: the names of its start and done instructions.
    computation: the HLO computation holding both.
    bytes: bytes of its output (the done's shape; a combined one sums its arrays).
    compute: names of the compute instructions scheduled between start and done.
    heavy: how many of them are convolutions / matrix products (`is_heavy`).
    heavy_before / heavy_total: convolutions / matrix products of its computation
      scheduled before its start / in all: where in forward / backward it sits.
    sync: XLA marked it synchronous (backend_config "is_sync":true).
    op_name: the JAX op_name of the start (which primitive / layer issued it).
    before / after: op_name of the nearest compute before the start and after the
      done, in schedule order ('' at either end): where in the step it sits.
  """

  kind: str
  start: str
  done: str
  computation: str
  bytes: int
  compute: tuple[str, ...]
  heavy: int
  heavy_before: int
  heavy_total: int
  sync: bool
  op_name: str
  before: str
  after: str

  @property
  def overlapped(self) -> bool:
    """Whether any compute is scheduled inside its window."""
    return bool(self.compute)


def _collective_kind(start: Instruction, comps: dict[str, list[Instruction]]) -> str | None:
  """The collective a start instruction begins, or None (copy-start, async compute, ...)."""
  for kind in COLLECTIVE_KINDS:
    if start.opcode == f"{kind}-start":
      return kind
  if start.opcode == "async-start":
    for inst in comps.get(start.calls, []):
      if inst.opcode in COLLECTIVE_KINDS:
        return inst.opcode
  return None


def is_compute(inst: Instruction) -> bool:
  """Whether an instruction is compute that can hide a collective (see TRIVIAL_OPS)."""
  op = inst.opcode
  if op in TRIVIAL_OPS or op.endswith("-start") or op.endswith("-done") or op.endswith("-update"):
    return False
  return True


def is_heavy(inst: Instruction) -> bool:
  """Whether an instruction is a convolution or matrix product (cuDNN, cuBLAS, GEMM fusion)."""
  if inst.opcode in ("convolution", "dot"):
    return True
  if inst.opcode == "custom-call":
    m = _TARGET.search(inst.line)
    return bool(m and _HEAVY.search(m.group(1)))
  if inst.opcode == "fusion":
    return bool(_HEAVY.search(inst.name) or (inst.calls and _HEAVY.search(inst.calls)))
  return False


def async_collectives(hlo_text: str) -> list[AsyncCollective]:
  """Every asynchronous collective of a scheduled HLO module, in schedule order.

  A start (`all-gather-start`, ..., or `async-start` whose called computation
  holds a collective) is paired with the done that takes it as operand, in the
  same computation; the compute between them (`is_compute`) is what the
  collective can overlap.
  """
  comps = parse_computations(hlo_text)
  found = []
  for comp_name, insts in comps.items():
    compute_at = [i for i, inst in enumerate(insts) if is_compute(inst)]
    heavy_total = sum(is_heavy(insts[k]) for k in compute_at)
    for i, inst in enumerate(insts):
      kind = _collective_kind(inst, comps)
      if kind is None:
        continue
      dones = [
        j
        for j in range(i + 1, len(insts))
        if insts[j].opcode.endswith("-done") and inst.name in insts[j].operands
      ]
      if not dones:
        raise ValueError(f"{inst.opcode} {inst.name!r} in {comp_name!r} has no matching done")
      j = dones[0]
      before = [k for k in compute_at if k < i]
      after = [k for k in compute_at if k > j]
      found.append(
        AsyncCollective(
          kind=kind,
          start=inst.name,
          done=insts[j].name,
          computation=comp_name,
          bytes=shape_bytes(insts[j].shape),
          compute=tuple(insts[k].name for k in compute_at if i < k < j),
          heavy=sum(is_heavy(insts[k]) for k in compute_at if i < k < j),
          heavy_before=sum(is_heavy(insts[k]) for k in compute_at if k < i),
          heavy_total=heavy_total,
          sync='"is_sync":true' in inst.line,
          op_name=inst.op_name,
          before=insts[before[-1]].op_name if before else "",
          after=insts[after[0]].op_name if after else "",
        )
      )
  return found


@dataclasses.dataclass(frozen=True)
class OverlapSummary:
  """Counts of async collectives per kind and the fractions with compute in their window."""

  per_kind: dict[str, tuple[int, int]]  # kind -> (count, count with compute)
  count: int
  overlapped: int
  bytes: int
  overlapped_bytes: int
  heavy: int  # collectives with a convolution / matrix product inside
  heavy_bytes: int
  sync: int

  @property
  def fraction(self) -> float:
    """Overlapped fraction by count (1.0 when there are no async collectives)."""
    return self.overlapped / self.count if self.count else 1.0

  @property
  def bytes_fraction(self) -> float:
    """Overlapped fraction by bytes (1.0 when there are no async collectives)."""
    return self.overlapped_bytes / self.bytes if self.bytes else 1.0

  def kinds_text(self) -> str:
    """'all-gather 2 (1), reduce-scatter 3 (3)': count (with compute) per kind."""
    return ", ".join(f"{k} {n} ({o})" for k, (n, o) in self.per_kind.items()) or "none"

  def line(self) -> str:
    """The one-line summary."""
    return (
      f"overlapped: {100 * self.fraction:.0f}% of {self.count} async collectives, "
      f"{100 * self.bytes_fraction:.0f}% of bytes"
    )


def overlap_summary(collectives: Iterable[AsyncCollective]) -> OverlapSummary:
  """Per-kind counts and overlapped fractions (by count and by bytes) of async collectives."""
  collectives = list(collectives)
  per_kind: dict[str, tuple[int, int]] = {}
  for c in collectives:
    n, o = per_kind.get(c.kind, (0, 0))
    per_kind[c.kind] = (n + 1, o + c.overlapped)
  return OverlapSummary(
    per_kind=per_kind,
    count=len(collectives),
    overlapped=sum(c.overlapped for c in collectives),
    bytes=sum(c.bytes for c in collectives),
    overlapped_bytes=sum(c.bytes for c in collectives if c.overlapped),
    heavy=sum(c.heavy > 0 for c in collectives),
    heavy_bytes=sum(c.bytes for c in collectives if c.heavy),
    sync=sum(c.sync for c in collectives),
  )
