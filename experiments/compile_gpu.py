r"""Compile the train step deviceless for H100s and measure how its collectives overlap compute.

  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu /tmp/gpu-aot/bin/python \
    -m experiments.compile_gpu [--devices=8] [--hosts=1] [--model=deep_image_16] \
    [--image_size=224] [--batch=256] [--dtype=bfloat16] [--strategies=gspmd,data,lazy,hybrid] \
    [--collectives=butterfly,xla] [--overlaps=none,deferred] [--bucket_mb=25] [--nogpu_flags] \
    [--dump_hlo=DIR] [--out=FILE.md]

XLA's GPU compiler runs on a CPU-only machine (deviceless, `experiments/gpu/h100_sxm.pbtxt`
describes the GPU): every
configuration's step is lowered and compiled for `--devices` H100 SXM GPUs
(`--hosts` hosts), nothing runs. For each configuration the script prints, in
one markdown table, the per-device argument and temp bytes (`memory_analysis`)
and, from the scheduled HLO (`compiled.as_text()`), the asynchronous
collectives: every `<kind>-start` / `<kind>-done` pair (and `async-start` /
`async-done` wrapping a collective) per kind, and how many of them have compute
(a fusion, convolution, cuDNN / cuBLAS custom-call, dot, loop, ...) scheduled
between start and done, by count and by bytes (the collective's output shape).
A second table lists the collectives with nothing to hide behind, with the
compute just before and after them in the schedule (which layer they sit at).

The GPU overlap flags come from `deep_image.parallel.mesh.GPU_OVERLAP_FLAGS`,
added to XLA_FLAGS before JAX starts, as in training.

Needs the CUDA wheels, kept out of requirements.txt; set them up once with
  python3 -m venv /tmp/gpu-aot && /tmp/gpu-aot/bin/pip install "jax[cuda12]==0.10.2" \
    -r requirements.txt && /tmp/gpu-aot/bin/pip install -e . --no-deps
The HLO parsing (`async_collectives`, `overlap_summary`) needs neither CUDA nor JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Iterable, Sequence

from absl import app, flags

from experiments.markdown import table

SETUP = (
  'python3 -m venv /tmp/gpu-aot && /tmp/gpu-aot/bin/pip install "jax[cuda12]==0.10.2" '
  "-r requirements.txt && /tmp/gpu-aot/bin/pip install -e . --no-deps; then run with "
  "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu /tmp/gpu-aot/bin/python -m "
  "experiments.compile_gpu"
)
# XLA's description of an H100 SXM 80 GB (gpu_device_info: SMs, memory, ...): what
# `topologies.get_topology_desc` compiles for, kept in the repository.
TARGET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu", "h100_sxm.pbtxt")

# The collectives whose start/done pairs are counted.
COLLECTIVE_KINDS = (
  "all-gather",
  "reduce-scatter",
  "all-reduce",
  "collective-permute",
  "all-to-all",
)
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
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
# Convolutions and matrix products (cuDNN / cuBLAS custom-calls, Triton GEMM fusions):
# the compute that can actually hide a large transfer.
_HEAVY = re.compile(r"cudnn|cublas|gemm|conv|dot", re.IGNORECASE)


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


def _collective_kind(start: Instruction, comps: dict[str, list[Instruction]]) -> str | None:
  """The collective a start instruction begins, or None (copy-start, async compute, ...)."""
  for kind in COLLECTIVE_KINDS:
    if start.opcode == f"{kind}-start":
      return kind
  if start.opcode == "async-start":
    m = _CALLS.search(start.line)
    for inst in comps.get(m.group(1), []) if m else []:
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
    m = _CALLS.search(inst.line)
    return bool(_HEAVY.search(inst.name) or (m and _HEAVY.search(m.group(1))))
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


def _where(op_name: str) -> str:
  """A short place from an op_name: the part after 'shard_map/' or 'jit(step)/'."""
  for prefix in ("jit(step)/shard_map/", "jit(step)/"):
    if op_name.startswith(prefix):
      return op_name[len(prefix) :]
  return op_name or "-"


# ----------------------------------------------------------------------------------------
# Compiling (needs the CUDA wheels; imported lazily so the parser above needs no JAX).

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: tests import this module beside others with flags."""
  flags.DEFINE_integer("devices", 8, "GPUs in all.")
  flags.DEFINE_integer("hosts", 1, "Hosts the GPUs are spread over.")
  flags.DEFINE_string("model", "deep_image_16", "Model name (deep_image.models.vgg).")
  flags.DEFINE_integer("image_size", 224, "Training crop side.")
  flags.DEFINE_integer("classes", 1000, "Output classes.")
  flags.DEFINE_integer("batch", 256, "Global batch.")
  flags.DEFINE_string("dtype", "bfloat16", "model.dtype (compute).")
  flags.DEFINE_list(
    "strategies", ["gspmd", "data", "lazy", "hybrid"], "Strategies (parallel.strategy)."
  )
  flags.DEFINE_list(
    "collectives", ["butterfly", "xla"], "parallel.collective of the shard_map strategies."
  )
  flags.DEFINE_list("overlaps", ["none", "deferred"], "parallel.overlap values.")
  flags.DEFINE_string("conv", "data", "parallel.conv of hybrid.")
  flags.DEFINE_float("bucket_mb", 25.0, "parallel.bucket_mb.")
  flags.DEFINE_string("out", None, "Also write the markdown report to this file.")
  flags.DEFINE_string("dump_hlo", None, "Write each scheduled HLO into this folder.")
  flags.DEFINE_bool(
    "gpu_flags",
    True,
    "Add mesh.GPU_OVERLAP_FLAGS to XLA_FLAGS (--nogpu_flags: XLA_FLAGS as given, to compare).",
  )


@dataclasses.dataclass(frozen=True)
class Configuration:
  """One compiled program: its table label and config fields."""

  label: str
  strategy: str
  collective: str
  overlap: str


def configurations(
  strategies: Sequence[str], collectives: Sequence[str], overlaps: Sequence[str], conv: str
) -> list[Configuration]:
  """gspmd once (XLA's own collectives), each shard_map strategy x collective x overlap."""
  out = []
  for s in strategies:
    if s == "gspmd":
      out.append(Configuration("gspmd", "gspmd", "xla", "none"))
      continue
    name = f"hybrid(conv={conv})" if s == "hybrid" else s
    for alg in collectives:
      for ov in overlaps:
        out.append(Configuration(f"{name} / {alg} / {ov}", s, alg, ov))
  return out


def _cuda_missing() -> str | None:
  """Why the deviceless GPU compile cannot run here, or None."""
  if importlib.util.find_spec("jax_plugins") is None or (
    importlib.util.find_spec("jax_plugins.xla_cuda12") is None
  ):
    return "the CUDA plugin of jax (jax[cuda12]) is not installed"
  if not os.path.exists(TARGET_CONFIG):
    return f"the GPU description {os.path.normpath(TARGET_CONFIG)} is missing"
  return None


def make_config(cfg: Configuration, bucket_mb: float):
  """`experiments.benchmark_step.make_config` with the flags' model, batch and dtype, and
  the configuration's parallel fields."""
  from experiments.benchmark_step import make_config as step_config

  c = step_config(
    FLAGS.model,
    FLAGS.image_size,
    FLAGS.batch,
    cfg.strategy,
    cfg.collective,
    FLAGS.conv,
    FLAGS.classes,
    overlap=cfg.overlap,
  )
  c.model.dtype = FLAGS.dtype
  c.parallel.bucket_mb = bucket_mb
  return c


def compile_one(cfg: Configuration, devices, bucket_mb: float, hlo_dir: str | None) -> dict:
  """Lower + compile one configuration; its memory, compile seconds and async collectives."""
  import jax
  import numpy as np

  from deep_image.models.vgg import make_model
  from deep_image.parallel import mesh as mesh_lib
  from deep_image.parallel import strategies
  from deep_image.train.optimizer import make_optimizer

  config = make_config(cfg, bucket_mb)
  mesh = mesh_lib.make_mesh(config.parallel, devices)
  strategy = strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )
  s, b = FLAGS.image_size, FLAGS.batch
  images = jax.ShapeDtypeStruct((b, s, s, 3), np.uint8, sharding=strategy.batch_sharding)
  labels = jax.ShapeDtypeStruct((b,), np.int32, sharding=strategy.batch_sharding)
  start = time.perf_counter()
  compiled = strategy.lower_train_step(strategy.abstract_state(), images, labels).compile()
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    safe = re.sub(r"[^\w.-]+", "_", cfg.label)
    with open(os.path.join(hlo_dir, f"{safe}.hlo"), "w") as f:
      f.write(text)
  mem = compiled.memory_analysis()
  found = async_collectives(text)
  return dict(
    cfg=cfg,
    seconds=seconds,
    argument=mem.argument_size_in_bytes,
    temp=mem.temp_size_in_bytes,
    collectives=found,
    summary=overlap_summary(found),
    buckets=len(getattr(strategy, "buckets", ())),
  )


def _pct(part: float, whole: float) -> str:
  return f"{100 * part / whole:.0f}%" if whole else "-"


def _mib(b: int) -> str:
  return f"{b / 2**20:,.0f}"


def report(results: list[dict]) -> str:
  """The markdown tables: one row per configuration, then the collectives with no compute."""
  rows = [
    (
      r["cfg"].label,
      r["buckets"] or "-",
      _mib(r["argument"]),
      _mib(r["temp"]),
      r["summary"].kinds_text(),
      f"{100 * r['summary'].fraction:.0f}%",
      f"{100 * r['summary'].bytes_fraction:.0f}%",
      _pct(r["summary"].heavy, r["summary"].count),
      _pct(r["summary"].heavy_bytes, r["summary"].bytes),
      f"{r['summary'].bytes / 2**20:,.1f}",
      r["summary"].sync,
      f"{r['seconds']:.0f}",
    )
    for r in results
  ]
  main = table(
    (
      "strategy / collective / overlap",
      "buckets",
      "argument MiB / device",
      "temp MiB / device",
      "async collectives: kind count (with compute inside)",
      "overlapped (count)",
      "overlapped (bytes)",
      "conv/GEMM inside (count)",
      "conv/GEMM inside (bytes)",
      "async MiB",
      "marked sync",
      "compile s",
    ),
    rows,
  )
  bare = [
    (
      r["cfg"].label,
      c.kind,
      f"{c.bytes / 2**20:,.2f}",
      f"{c.heavy_before} / {c.heavy_total}",
      _where(c.op_name),
      _where(c.before),
      _where(c.after),
    )
    for r in results
    for c in r["collectives"]
    if not c.overlapped
  ]
  lines = [main, ""]
  lines += [f"- {r['cfg'].label}: {r['summary'].line()}" for r in results]
  lines += ["", "Async collectives with no compute inside their window:", ""]
  header = (
    "configuration",
    "kind",
    "MiB",
    "conv/GEMM before it / in all",
    "issued by (op_name)",
    "compute before",
    "compute after",
  )
  lines.append(table(header, bare) if bare else "(none)")
  return "\n".join(lines)


def main(argv):
  del argv
  missing = _cuda_missing()
  if missing:
    sys.exit(f"compile_gpu: {missing}; set it up with: {SETUP}")
  from deep_image.parallel import mesh as mesh_lib

  if FLAGS.gpu_flags:
    mesh_lib.add_gpu_overlap_flags()  # before JAX starts its backends
  from jax.experimental import topologies

  if FLAGS.devices % FLAGS.hosts:
    sys.exit(f"compile_gpu: --devices={FLAGS.devices} does not divide over --hosts")
  with open(TARGET_CONFIG) as f:
    topo = topologies.get_topology_desc(
      platform="cuda",
      target_config=f.read(),
      topology=f"1x{FLAGS.hosts}x{FLAGS.devices // FLAGS.hosts}",
    )
  devices = list(topo.devices)
  configs = configurations(FLAGS.strategies, FLAGS.collectives, FLAGS.overlaps, FLAGS.conv)
  results = []
  for cfg in configs:
    r = compile_one(cfg, devices, FLAGS.bucket_mb, FLAGS.dump_hlo)
    print(f"{cfg.label}: {r['summary'].line()} (compiled in {r['seconds']:.0f} s)", flush=True)
    results.append(r)
  header = (
    f"Deviceless XLA GPU compile of `{FLAGS.model}` ({FLAGS.image_size}x{FLAGS.image_size}, "
    f"{FLAGS.classes} classes, {FLAGS.dtype}), global batch {FLAGS.batch}, "
    f"{FLAGS.devices} x H100 SXM on {FLAGS.hosts} host(s), parallel.bucket_mb="
    f"{FLAGS.bucket_mb:g}.\n"
    f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`\n"
    f"command: `python -m experiments.compile_gpu {' '.join(sys.argv[1:])}`"
  )
  text = header + "\n\n" + report(results)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
