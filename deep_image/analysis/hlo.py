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
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def module_devices(hlo_text: str) -> int:
  """Devices of a module from its header: num_partitions x replica_count (1 if absent)."""
  head = hlo_text.split("\n", 1)[0]
  parts = _HEADER_PARTITIONS.search(head)
  reps = _HEADER_REPLICAS.search(head)
  return (int(parts.group(1)) if parts else 1) * (int(reps.group(1)) if reps else 1)


def _iota_groups(shape: str, dims: str, perm: str | None) -> list[tuple[int, ...]]:
  """`[G0,G1]<=[d0,d1,..]T(p0,p1,..)`: iota(prod d) reshaped to d, transposed by p (if
  given), read row-major and cut into G0 groups of G1 (XLA's IotaReplicaGroupList)."""
  group_shape = [int(x) for x in shape.split(",")]
  sizes = [int(x) for x in dims.split(",")]
  order = [int(x) for x in perm.split(",")] if perm else list(range(len(sizes)))
  if sorted(order) != list(range(len(sizes))):
    raise ValueError(f"iota replica_groups: T({perm}) is no permutation of {len(sizes)} dims")
  total = math.prod(sizes)
  if math.prod(group_shape) != total:
    raise ValueError(f"iota replica_groups [{shape}]<=[{dims}]: the sizes do not match")
  strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
  t_sizes = [sizes[i] for i in order]
  flat = []
  for k in range(total):  # the k-th element of the transposed array, row-major
    index, rest = 0, k
    for axis in reversed(range(len(t_sizes))):
      rest, i = divmod(rest, t_sizes[axis])
      index += i * strides[order[axis]]
    flat.append(index)
  g = group_shape[-1]
  return [tuple(flat[i : i + g]) for i in range(0, total, g)]


def _mesh_groups(axes_text: str, names_text: str, line: str) -> list[tuple[int, ...]]:
  """`mesh['x'=2,'y'=4] {'y'}`: devices numbered row-major over the mesh; one group per
  index of the other axes, its devices in the order of the named axes (row-major)."""
  axes = [(n, int(s)) for n, s in re.findall(r"'([^']+)'=(\d+)", axes_text)]
  sizes = dict(axes)
  names = re.findall(r"'([^']+)'", names_text)
  unknown = [n for n in names if n not in sizes]
  if unknown:
    raise ValueError(f"replica_groups axes {unknown} not in the mesh of {line[:200]!r}")
  strides = {n: math.prod(s for _, s in axes[i + 1 :]) for i, (n, _) in enumerate(axes)}
  others = [n for n, _ in axes if n not in names]

  def offsets(axis_names):
    out = [0]
    for n in axis_names:
      out = [o + i * strides[n] for o in out for i in range(sizes[n])]
    return out

  members = offsets(names)
  return [tuple(base + m for m in members) for base in sorted(offsets(others))]


def replica_groups(line: str, num_devices: int) -> list[tuple[int, ...]]:
  """The replica groups of a collective's HLO line, each a tuple of device ids in group
  order, in any of XLA's forms: explicit `{{0,1},{2,3}}`; iota `[2,4]<=[8]` or
  `[4,2]<=[2,4]T(1,0)`; mesh `mesh['x'=2,'y'=4] {'y'}`; empty `{}` or absent (one
  group of all `num_devices`). Device ids are the program's: with replica_count 1 (an SPMD
  program) its partition ids, i.e. positions in the jit's device assignment."""
  m = _GROUPS_IOTA.search(line)
  if m:
    return _iota_groups(*m.groups())
  m = _GROUPS_MESH.search(line)
  if m:
    return _mesh_groups(m.group(1), m.group(2), line)
  m = _GROUPS_EXPLICIT.search(line)
  if m and m.group(1):
    return [
      tuple(int(d) for d in g.split(",") if d.strip())
      for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))
    ]
  return [tuple(range(num_devices))]  # {} or no replica_groups attribute: all devices


def replica_group_size(line: str, num_devices: int) -> int:
  """G of a collective's HLO line (the size of its first group; `replica_groups`)."""
  return len(replica_groups(line, num_devices)[0])


def source_target_pairs(line: str) -> list[tuple[int, int]]:
  """A collective-permute's `source_target_pairs={{0,1},{1,0}}` as [(0, 1), (1, 0)]."""
  m = _PAIRS.search(line)
  return [(int(s), int(t)) for s, t in re.findall(r"\{(\d+),(\d+)\}", m.group(1) if m else "")]


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
