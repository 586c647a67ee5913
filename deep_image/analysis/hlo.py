"""Compiled HLO text, parsed: computations, instructions, shape bytes, replica groups.

The one parser of `compiled.as_text()` that the analyses of a compiled step share
(`deep_image.analysis.bytes_sent`: what each device sends; `deep_image.analysis.overlap`:
which async collectives the scheduler hides behind compute). It reads text only and needs
neither JAX nor a config, so it is a library module, below everything else in
`deep_image/`, that the experiment scripts and the tests import alike.

In a scheduled module (`is_scheduled=true`, what `compiled.as_text()` prints) text order
is execution order.
"""

from __future__ import annotations

import dataclasses
import math
import re

# The collective ops the analyses count: synchronous, or as a `<kind>-start` / `<kind>-done` pair.
COLLECTIVE_KINDS = (
  "all-gather",
  "reduce-scatter",
  "all-reduce",
  "collective-permute",
  "all-to-all",
)


# Bytes per element of HLO primitive types (sub-byte types rounded up to one byte).
DTYPE_BYTES = {
  "pred": 1,
  "s2": 1,
  "u2": 1,
  "s4": 1,
  "u4": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "f8e4m3": 1,
  "f8e5m2fnuz": 1,
  "f8e4m3fnuz": 1,
  "f8e4m3b11fnuz": 1,
  "f8e3m4": 1,
  "f8e8m0fnu": 1,
  "f4e2m1fn": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: name, result shape text, opcode, operand names, the whole line."""

  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  line: str

  @property
  def op_name(self) -> str:
    """The JAX op_name of its metadata ('' if none): names the layer / primitive."""
    m = _OP_NAME.search(self.line)
    return m.group(1) if m else ""

  @property
  def calls(self) -> str:
    """The computation it calls (`calls=`: a fusion's body, an async-start's op), or ''."""
    m = _CALLS.search(self.line)
    return m.group(1) if m else ""


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape text: 'f32[8,4]{1,0}' -> 128; a tuple sums its arrays."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      raise ValueError(f"unknown HLO element type {dtype!r} in shape {shape!r}")
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """'(f32[2], f32[2]) op(...)' -> ('(f32[2], f32[2])', 'op(...)'): a tuple shape nests."""
  if not rest.startswith("("):
    shape, _, tail = rest.partition(" ")
    return shape, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[: i + 1], rest[i + 1 :].lstrip()
  raise ValueError(f"unbalanced tuple shape in HLO line {rest[:200]!r}")


def _operands(call: str) -> tuple[str, ...]:
  """Operand names of 'op(%a, f32[2] %b), attr=...' (the text in the first parentheses)."""
  depth, end = 0, len(call)
  for i, ch in enumerate(call):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0 and ch == ")":
      end = i
      break
  return tuple(re.findall(r"%([\w.\-]+)", call[:end]))


def parse_computations(hlo_text: str) -> dict[str, list[Instruction]]:
  """{computation name: its instructions in text order} of an HLO module's text.

  In a scheduled module (`is_scheduled=true`, what `compiled.as_text()` prints)
  text order is execution order.
  """
  comps: dict[str, list[Instruction]] = {}
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and not line.startswith(" "):
        current = comps.setdefault(m.group(1), [])
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    shape, tail = _split_shape(m.group(2))
    opcode = re.match(r"[\w\-]+", tail)
    if not opcode:
      continue
    call = tail[opcode.end() :]
    current.append(Instruction(m.group(1), shape, opcode.group(0), _operands(call), line))
  return comps


_HEADER_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_HEADER_REPLICAS = re.compile(r"replica_count=(\d+)")


_GROUPS_EXPLICIT = re.compile(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)?\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[[\d,]+\]")


_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def module_devices(hlo_text: str) -> int:
  """Devices of a module from its header: num_partitions x replica_count (1 if absent)."""
  head = hlo_text.split("\n", 1)[0]
  parts = _HEADER_PARTITIONS.search(head)
  reps = _HEADER_REPLICAS.search(head)
  return (int(parts.group(1)) if parts else 1) * (int(reps.group(1)) if reps else 1)


def replica_group_size(line: str, num_devices: int) -> int:
  """G of a collective's HLO line; `num_devices` when its groups are empty ({}: all)."""
  m = _GROUPS_IOTA.search(line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = _GROUPS_MESH.search(line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    names = re.findall(r"'([^']+)'", m.group(2))
    unknown = [n for n in names if n not in sizes]
    if unknown:
      raise ValueError(f"replica_groups axes {unknown} not in the mesh of {line[:200]!r}")
    return math.prod(int(sizes[n]) for n in names)
  m = _GROUPS_EXPLICIT.search(line)
  if m:
    if not m.group(1):
      return num_devices
    first = re.match(r"\{([\d,\s]*)\}", m.group(1)).group(1)
    return len([d for d in first.split(",") if d.strip()])
  return num_devices  # no replica_groups attribute: all devices (XLA's default)


def count_collectives(hlo_text: str) -> int:
  """Collective ops of a compiled module, each once: a synchronous one or an async
  `<kind>-start` (its `-done` does not count; a collective wrapped by `async-start` counts
  in its wrapped computation). Ops of one-device groups count too (see
  `bytes_sent.collective_ops` for the ones that move bytes)."""
  return sum(
    inst.opcode.removesuffix("-start") in COLLECTIVE_KINDS
    for insts in parse_computations(hlo_text).values()
    for inst in insts
  )
