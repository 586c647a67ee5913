r"""The paper's scaling study (section 3.3, Figure 3): strategies x devices, measured and compiled.

  python -m experiments.scaling [--quick] [--out=benchmarks/scaling_YYYY-MM-DD.md]
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu /tmp/gpu-aot/bin/python \
      -m experiments.scaling --gpu_compile [--out=...]
  python -m experiments.scaling --model_only --preset=minwa
  python -m experiments.scaling --redraw [--out=...]

Parts (each writes its rows into the JSON beside --out, keeping the rows of the other
parts already there, then the markdown and the PNG are redrawn from all rows):

1. Measured on simulated CPU devices (`--xla_force_host_platform_device_count=8`, set
   before JAX starts): for `scaling_8conv_3fc` and `deep_image_16`, each strategy with
   the default algorithm at N = 1, 2, 4, 8 devices, the other algorithms at N = 8 only
   (--algorithm_devices); a fixed per-device batch, so the global batch grows with N.
   Step time (median of round-robin rounds, as experiments.benchmark_step), images/s,
   per-device memory (`memory_analysis` argument + temp) and the collectives of the
   compiled program. The simulated devices share this machine's cores, so the step time
   is at a reduced image size (--image_size) and its absolute scaling is not a GPU's.
   Also: compile-only memory and bytes at 224 px (--compile_size, --compile_devices);
   2 processes x 4 devices against 1 process x 8 (jax.distributed, gloo); and the
   speedup of the default strategy at fixed global batches (--speedup_batches).
2. `--gpu_compile` (needs the CUDA jax venv, README "How the strategies scale"): deviceless XLA GPU
   compiles for 8..64 H100s on 1..8 hosts (8 per host): per-device memory, collectives,
   bytes sent per device and the fraction of async collectives the scheduler overlaps
   (`experiments.compile_gpu.overlap_summary`). Nothing runs; skipped with a message when
   the CUDA plugin is missing.
3. `--model_only --preset=NAME [--plot=FILE.png]`: `deep_image.parallel.cost_model.report(NAME,
   model)`, and the predicted Figure 3 (`write_model_figure`).

Bytes sent per device per step, read from the compiled (post-optimization) HLO text
(`collective_ops`): every collective op counted once (an async `<kind>-start` counts,
its `-done` does not; a collective wrapped by `async-start` is counted in its wrapped
computation), with G the size of that op's replica group (not the mesh size), and B
the bytes of its operands (a combined op sums them):

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

The tables split the bytes sent into weights and the rest: the parameters a strategy
synchronises every step (replicated ones; every one for `lazy`, whose 1/N shards are
gathered whole) cost a ring all-reduce's 2 (N-1)/N of their bytes per device; the rest
follows the batch (activations of the split FC layers for hybrid and gspmd). Hybrid's
rest per image of the global batch, over (N-1)/N, is the check that its FC traffic
follows activations, not weights.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

from absl import app, flags, logging

# Importing JAX does not start a backend: the host device count set later still applies.
from deep_image.parallel import cost_model
from deep_image.parallel.collectives import ALGORITHMS
from deep_image.parallel.strategies import STRATEGIES
from experiments.compile_gpu import COLLECTIVE_KINDS, SETUP, parse_computations, shape_bytes
from experiments.markdown import table

FLAGS = flags.FLAGS

MODELS = ("scaling_8conv_3fc", "deep_image_16")
DEFAULT_ALGORITHM = "butterfly"
DEFAULT_STRATEGY = "hybrid"  # experiments/configs/base.py
# Bytes sent per device of data parallelism may grow from N=2 to N=8 by at most the ring
# factor ((8-1)/8) / ((2-1)/2) = 1.75 (plus this slack), and stay under 2 x gradient bytes.
FLAT_SLACK = 1.10
# Hybrid FC traffic per image of the global batch, over (N-1)/N, may vary this much in N.
ACTIVATION_TOLERANCE = 0.25


def _define_flags() -> None:
  """Defined only when run as a script: tests import this module beside others with flags."""
  flags.DEFINE_string("out", None, "Markdown report (default benchmarks/scaling_<date>.md); "
                      "the JSON and PNG go beside it.")  # fmt: skip
  flags.DEFINE_bool("quick", False, "A smoke run: 8conv only, N=1,2, 2 rounds, no extras.")
  flags.DEFINE_list("models", list(MODELS), "Models of the measured CPU table.")
  flags.DEFINE_list("strategies", list(STRATEGIES), "Strategies (parallel.strategy).")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "parallel.collective of shard_map ones.")
  flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Simulated device counts (CPU part).")
  flags.DEFINE_list("algorithm_devices", ["8"], "Device counts of the non-default algorithms.")
  flags.DEFINE_list("algorithm_models", [MODELS[0]], "Models of the non-default algorithms.")
  flags.DEFINE_integer("per_device_batch", 4, "Images per device (the paper's slices: 64).")
  flags.DEFINE_integer("image_size", 32, "Image side of the measured CPU steps (divisible by 32).")
  flags.DEFINE_integer("classes", 1000, "Output classes.")
  flags.DEFINE_integer("repeats", 3, "Timed round-robin rounds per program.")
  flags.DEFINE_float("memory_budget_gb", 6.0, "Host memory of one round-robin group of programs.")
  flags.DEFINE_integer("compile_size", 224, "Image side of the compile-only CPU rows (0: none).")
  flags.DEFINE_list("compile_devices", ["8"], "Device counts of the compile-only CPU rows.")
  flags.DEFINE_integer("compile_batch", 64, "Per-device batch of the compile-only CPU rows.")
  flags.DEFINE_list("process_strategies", [DEFAULT_STRATEGY], "Strategies timed as 2 x 4 and "
                    "1 x 8 processes x devices (empty: skip).")  # fmt: skip
  flags.DEFINE_list("speedup_batches", ["32", "64", "128"], "Fixed global batches of the "
                    "speedup panel (default strategy, 8conv; empty: skip).")  # fmt: skip
  flags.DEFINE_bool("gpu_compile", False, "Part 2 only: deviceless H100 compiles.")
  flags.DEFINE_list("gpu_devices", ["8", "16", "32", "64"], "H100 counts (8 per host).")
  flags.DEFINE_list("gpu_models", ["scaling_8conv_3fc:8,16,32,64", "deep_image_16:8,16,32,64"],
                    "model:GPU counts of the H100 compiles.")  # fmt: skip
  flags.DEFINE_integer("gpu_per_device_batch", 64, "Images per GPU (the paper's 64).")
  flags.DEFINE_bool("model_only", False, "Print the cost model's prediction and exit.")
  flags.DEFINE_string("preset", "minwa", "Cluster preset of --model_only.")
  flags.DEFINE_string("model", "scaling_8conv_3fc", "Model of --model_only.")
  flags.DEFINE_string("plot", None, "--model_only: also draw the predicted Figure 3 here (PNG).")
  flags.DEFINE_bool(
    "redraw", False, "Only recompute the checks and redraw the markdown and PNG from the JSON."
  )
  # A worker of the over-processes rows (started by this script, not by hand).
  flags.DEFINE_string("worker", None, "JSON spec of one process of a multi-process timing.")


# ----------------------------------------------------------------------------------------
# Bytes sent per device, from compiled HLO text (no JAX needed).


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
  """One collective of a compiled program.

  Attributes:
    kind: one of COLLECTIVE_KINDS.
    name: its instruction name.
    group: G, the size of its replica group.
    operand_bytes: B, the bytes of its operands.
    sent: bytes one device sends (module docstring's table).
    op_name: the JAX op_name of its metadata ('' if none).
  """

  kind: str
  name: str
  group: int
  operand_bytes: int
  sent: float
  op_name: str

  @property
  def conv(self) -> bool:
    """Whether a convolution layer issued it (op_name under VGG.features)."""
    return "features" in self.op_name


_HEADER_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_HEADER_REPLICAS = re.compile(r"replica_count=(\d+)")
_GROUPS_EXPLICIT = re.compile(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)?\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[[\d,]+\]")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


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


def _sent(kind: str, operand_bytes: int, group: int, line: str, num_devices: int) -> float:
  """Bytes one device sends for one op (the module docstring's table)."""
  if kind == "all-gather":
    return operand_bytes * (group - 1)
  if kind == "all-reduce":
    return 2.0 * operand_bytes * (group - 1) / group
  if kind in ("reduce-scatter", "all-to-all"):
    return operand_bytes * (group - 1) / group
  m = _PAIRS.search(line)
  pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1) if m else "")
  sources = {int(s) for s, t in pairs if s != t}
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
      group = replica_group_size(inst.line, n)
      if group <= 1 and kind != "collective-permute":
        continue  # a group of one device: nothing moves (a 1-device step's metric psum)
      m = _OP_NAME.search(inst.line)
      ops.append(
        CollectiveOp(
          kind=kind,
          name=inst.name,
          group=group,
          operand_bytes=nbytes,
          sent=_sent(kind, nbytes, group, inst.line, n),
          op_name=m.group(1) if m else "",
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


# ----------------------------------------------------------------------------------------
# Programs: compile, measure.


@dataclasses.dataclass(frozen=True)
class Program:
  """One step program of the study."""

  model: str
  strategy: str
  algorithm: str
  devices: int
  image_size: int
  global_batch: int
  classes: int = 1000
  dtype: str = "float32"

  @property
  def label(self) -> str:
    alg = "" if self.strategy == "gspmd" else f" / {self.algorithm}"
    return f"{self.model} {self.strategy}{alg} N={self.devices} B={self.global_batch}"


def make_config(p: Program):
  """benchmark_step's complete config with the program's fields."""
  from experiments.benchmark_step import make_config as step_config

  c = step_config(p.model, p.image_size, p.global_batch, p.strategy, p.algorithm, classes=p.classes)
  c.model.dtype = p.dtype
  return c


def param_bytes(model: str, image_size: int, classes: int) -> tuple[int, int]:
  """(all parameter bytes, FC head parameter bytes) of a model, float32, never allocated."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from deep_image.models.vgg import make_model
  from experiments.benchmark_step import make_config as step_config

  m = make_model(step_config(model, image_size, 1, "gspmd", classes=classes).model)
  shapes = jax.eval_shape(
    lambda: nn.unbox(m.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  )["params"]
  total = fc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    n = math.prod(leaf.shape) * 4
    total += n
    if jax.tree_util.keystr(path).startswith("['fc"):  # fc1, fc2, fc3; the rest: convs_i
      fc += n
  return total, fc


def compile_program(p: Program, devices) -> tuple[object, object, dict]:
  """(strategy, compiled step, row fields): memory and collectives of one program."""
  import jax
  import numpy as np

  from experiments.benchmark_step import make_strategy

  config = make_config(p)
  strategy = make_strategy(config, devices)
  s = p.image_size
  images = jax.ShapeDtypeStruct(
    (p.global_batch, s, s, 3), np.uint8, sharding=strategy.batch_sharding
  )
  labels = jax.ShapeDtypeStruct((p.global_batch,), np.int32, sharding=strategy.batch_sharding)
  t0 = time.perf_counter()
  compiled = strategy.lower_train_step(strategy.abstract_state(), images, labels).compile()
  seconds = time.perf_counter() - t0
  text = compiled.as_text()
  mem = compiled.memory_analysis()
  params = jax.tree.leaves(strategy.abstract_state().params)
  replicated = sum(x.size * x.dtype.itemsize for x in params if x.sharding.is_fully_replicated)
  if p.strategy == "lazy":  # its 1/N shards are gathered whole every step: all synchronised
    replicated = sum(x.size * x.dtype.itemsize for x in params)
  n = p.devices
  summary = bytes_summary(collective_ops(text, n))
  # Replicated weights are synchronised once per step (a ring all-reduce's 2 (N-1)/N of
  # their bytes); whatever else the program sends follows the batch: activations.
  weights = 2 * (n - 1) / n * replicated
  row = dict(
    model=p.model,
    strategy=p.strategy,
    algorithm=p.algorithm if p.strategy != "gspmd" else "xla",
    devices=p.devices,
    image_size=p.image_size,
    global_batch=p.global_batch,
    per_device_batch=p.global_batch // p.devices,
    dtype=p.dtype,
    classes=p.classes,
    argument_bytes=int(mem.argument_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    memory_bytes=int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
    compile_s=seconds,
    synced_param_bytes=int(replicated),
    split_param_bytes=int(sum(x.size * x.dtype.itemsize for x in params) - replicated),
    weight_bytes=weights,
    activation_bytes=max(0.0, summary["bytes_sent"] - weights),
    **summary,
  )
  return strategy, compiled, (row, text)


def _global_array(host, sharding):
  """A global array from a host array every process holds (works across processes)."""
  import jax

  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def make_runner(strategy, compiled, p: Program) -> Callable[[], None]:
  """Run the compiled step on a fresh state and random uint8 images; carries the state."""
  import jax
  import numpy as np

  rng = np.random.default_rng(0)
  s = p.image_size
  images = _global_array(
    rng.integers(0, 256, (p.global_batch, s, s, 3), dtype=np.uint8), strategy.batch_sharding
  )
  labels = _global_array(
    rng.integers(0, p.classes, (p.global_batch,)).astype(np.int32), strategy.batch_sharding
  )
  box = {"state": strategy.init(jax.random.key(0))}

  def run():
    box["state"], metrics = compiled(box["state"], images, labels, None)
    jax.block_until_ready(metrics)
    box["loss"] = metrics["loss"]

  run.loss = lambda: float(box["loss"])
  run.release = box.clear
  return run


def memory_groups(rows: Sequence[dict], budget_bytes: float) -> list[list[int]]:
  """Indices of rows packed in order into groups whose host memory (memory_bytes x devices)
  fits `budget_bytes`; a program over budget is a group of its own."""
  groups, current, used = [], [], 0.0
  for i, r in enumerate(rows):
    need = r["memory_bytes"] * r["devices"]
    if current and used + need > budget_bytes:
      groups.append(current)
      current, used = [], 0.0
    current.append(i)
    used += need
  if current:
    groups.append(current)
  return groups


def measure(programs: Sequence[Program], devices, repeats: int, budget_gb: float) -> list[dict]:
  """Compile every program, then time them round-robin in groups that fit the memory budget.

  Each row: the `compile_program` fields, step_ms (median over rounds), images_per_s,
  ms_per_image, rounds, group (the round-robin group), loss (finite or not).
  """
  from experiments.benchmark_step import time_round_robin

  built = []
  for p in programs:
    logging.info("compiling %s", p.label)
    strategy, compiled, (row, _) = compile_program(p, devices[: p.devices])
    built.append((p, strategy, compiled, row))
  rows = [b[3] for b in built]
  for g, group in enumerate(memory_groups(rows, budget_gb * 2**30)):
    runners = {}
    for i in group:
      p, strategy, compiled, _ = built[i]
      runners[i] = make_runner(strategy, compiled, p)
    logging.info("timing group %d: %s", g, [built[i][0].label for i in group])
    times = time_round_robin(runners, repeats, warmup=1)
    for i in group:
      step = statistics.median(times[i])
      rows[i].update(
        step_ms=1e3 * step,
        images_per_s=rows[i]["global_batch"] / step,
        ms_per_image=1e3 * step / rows[i]["global_batch"],
        rounds=repeats,
        group=g,
        loss=runners[i].loss(),
      )
      runners[i].release()
  return rows


# ----------------------------------------------------------------------------------------
# Over processes: the same step as P processes x D devices (jax.distributed, gloo).


def process_worker(spec: dict) -> None:
  """One process of a P x D timing: spec has processes, process_id, port, devices_per_process,
  programs (Program fields), repeats, out (written by process 0)."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", spec["devices_per_process"])
  if spec["processes"] > 1:
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{spec['port']}",
      num_processes=spec["processes"],
      process_id=spec["process_id"],
    )
  from experiments.benchmark_step import time_round_robin

  devices = jax.devices()
  programs = [Program(**p) for p in spec["programs"]]
  runners, rows = {}, []
  for i, p in enumerate(programs):
    strategy, compiled, (row, _) = compile_program(p, devices[: p.devices])
    runners[i] = make_runner(strategy, compiled, p)
    rows.append(row)
  times = time_round_robin(runners, spec["repeats"], warmup=1)
  for i, row in enumerate(rows):
    step = statistics.median(times[i])
    row.update(
      processes=spec["processes"],
      step_ms=1e3 * step,
      images_per_s=row["global_batch"] / step,
      ms_per_image=1e3 * step / row["global_batch"],
      rounds=spec["repeats"],
      loss=runners[i].loss(),
    )
  if spec["process_id"] == 0:
    with open(spec["out"], "w") as f:
      json.dump(rows, f)


def run_processes(
  programs: Sequence[Program], processes: int, devices: int, repeats: int, tmp: str
) -> list[dict]:
  """Start `processes` workers of `devices / processes` devices each; process 0's rows."""
  import portpicker

  from deep_image.parallel.mesh import PATIENT_COLLECTIVES

  port = portpicker.pick_unused_port()
  out = os.path.join(tmp, f"processes_{processes}x{devices // processes}.json")
  env = dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES)  # each worker sets its device count
  procs, logs = [], []
  for i in range(processes):
    spec = dict(
      processes=processes,
      process_id=i,
      port=port,
      devices_per_process=devices // processes,
      programs=[dataclasses.asdict(p) for p in programs],
      repeats=repeats,
      out=out,
    )
    log = open(os.path.join(tmp, f"process_{processes}_{i}.log"), "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "experiments.scaling", f"--worker={json.dumps(spec)}"]
    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    logs.append(log)
  codes = [p.wait() for p in procs]
  for log in logs:
    log.close()
  if any(codes):
    raise RuntimeError(f"{processes}-process timing failed ({codes}); logs in {tmp}")
  with open(out) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------
# Checks of the paper's claims.


def _series(rows: Sequence[dict], model: str, strategy: str) -> list[dict]:
  """The multi-device rows of `model` / `strategy` with the default algorithm, by N."""
  return sorted(
    (r for r in rows if r["model"] == model and r["strategy"] == strategy and r["devices"] > 1
     and r["algorithm"] == DEFAULT_ALGORITHM),
    key=lambda r: r["devices"],
  )  # fmt: skip


def flat_check(rows: Sequence[dict], grad_bytes: dict[str, int], part: str) -> list[str]:
  """Data-parallel bytes per device flat in N: <= 2 x gradient bytes, and from the smallest
  N >= 2 to the largest grown by at most the ring factor ((N-1)/N over (n-1)/n) x slack."""
  lines = []
  for model in sorted({r["model"] for r in rows}):
    data = _series(rows, model, "data")
    if len(data) < 2:
      continue
    lo, hi = data[0], data[-1]
    ring = ((hi["devices"] - 1) / hi["devices"]) / ((lo["devices"] - 1) / lo["devices"])
    growth = hi["bytes_sent"] / lo["bytes_sent"]
    bound = 2 * grad_bytes[model]
    ok = growth <= ring * FLAT_SLACK and all(r["bytes_sent"] <= bound * 1.01 for r in data)
    per = ", ".join(f"N={r['devices']}: {r['bytes_sent'] / 2**20:,.1f}" for r in data)
    lines.append(
      f"- {'PASS' if ok else 'FAIL'} ({part}, {model}): data-parallel MiB sent / device {per}; "
      f"N={hi['devices']} / N={lo['devices']} = {growth:.2f} (ring factor {ring:.2f}); "
      f"bound 2 x gradient bytes = {bound / 2**20:,.1f} MiB"
    )
  return lines


def activation_check(rows: Sequence[dict], fc_bytes: dict[str, int], part: str) -> list[str]:
  """Hybrid's FC traffic follows activations, not weights.

  Its FC traffic is `activation_bytes`: what the program sends beyond synchronising its
  replicated weights (conv, FC3). Per image of the global batch and over (N-1)/N it must
  be constant in N (within ACTIVATION_TOLERANCE) and grow from the smallest N to the
  largest; the split FC weights (`fc_bytes`, never sent) are printed beside it."""
  lines = []
  for model in sorted({r["model"] for r in rows}):
    hyb = _series(rows, model, "hybrid")
    if len(hyb) < 2:
      continue
    per_image = [
      r["activation_bytes"] / (r["global_batch"] * (r["devices"] - 1) / r["devices"]) for r in hyb
    ]
    spread = max(per_image) / min(per_image) - 1 if min(per_image) > 0 else float("inf")
    grows = hyb[-1]["activation_bytes"] > hyb[0]["activation_bytes"]
    ok = spread <= ACTIVATION_TOLERANCE and grows
    per = ", ".join(
      f"N={r['devices']} B={r['global_batch']}: {r['activation_bytes'] / 2**20:,.2f}" for r in hyb
    )
    lines.append(
      f"- {'PASS' if ok else 'FAIL'} ({part}, {model}): hybrid FC (non-weight) MiB sent / "
      f"device {per}; "
      f"per image x N/(N-1): {', '.join(f'{x / 2**10:,.1f}' for x in per_image)} KiB "
      f"(spread {100 * spread:.0f}%, tolerance {100 * ACTIVATION_TOLERANCE:.0f}%); "
      f"FC weights {fc_bytes[model] / 2**20:,.1f} MiB (a weight all-reduce would send "
      f"~2x that per device at every N)"
    )
  return lines


def crossover_lines(rows: Sequence[dict], part: str) -> list[str]:
  """Per model: hybrid / data bytes sent per device at each N, and where hybrid passes data.

  Where it never does, the N where it would on a straight line: with a fixed batch per
  device, hybrid's non-weight bytes grow by the same amount per added device
  (activation_bytes / (N-1) at the largest N) while data's stay at their largest-N value.
  """
  lines = []
  for model in sorted({r["model"] for r in rows}):
    pairs = {}
    for r in rows:
      if r["model"] == model and r["strategy"] == "hybrid" and r["algorithm"] == DEFAULT_ALGORITHM:
        d = [x for x in rows if x["model"] == model and x["strategy"] == "data"
             and x["devices"] == r["devices"] and x["algorithm"] == r["algorithm"]]  # fmt: skip
        if d and d[0]["bytes_sent"]:
          pairs[r["devices"]] = (r, d[0])
    if not pairs:
      continue
    ratio = {n: h["bytes_sent"] / d["bytes_sent"] for n, (h, d) in pairs.items()}
    above = [n for n in sorted(ratio) if ratio[n] > 1]
    text = ", ".join(f"N={n}: {ratio[n]:.2f}" for n in sorted(ratio))
    if above:
      where = f"hybrid sends more than data from N={above[0]}"
    else:
      where = "hybrid sends less than data at every N measured"
      n = max(pairs)
      h, d = pairs[n]
      step = h["activation_bytes"] / (n - 1)
      if step > 0:
        at = 1 + (d["bytes_sent"] - h["weight_bytes"]) / step
        where += (
          f"; on a line through N={n} (+{step / 2**20:,.1f} MiB of activations per added "
          f"device) it would at N ~ {at:.0f}"
        )
    lines.append(f"- {part}, {model}: hybrid / data bytes sent per device {text}; {where}")
  return lines


def claim_checks(rows: Sequence[dict], part: str, label: str) -> dict[str, list[str]]:
  """The stored checks of one part: {'<part>:flat': lines, '<part>:activations': lines}."""
  models = sorted({r["model"] for r in rows})
  size = {r["model"]: (r["image_size"], r.get("classes", 1000)) for r in rows}
  grad = {m: param_bytes(m, *size[m]) for m in models}
  return {
    f"{part}:flat": flat_check(rows, {m: g[0] for m, g in grad.items()}, label),
    f"{part}:activations": activation_check(rows, {m: g[1] for m, g in grad.items()}, label),
  }


def cost_model_rows(rows: Sequence[dict]) -> list[dict]:
  """(predicted - compiled) / compiled bytes sent per device of every multi-device row, by
  `deep_image.parallel.cost_model.compare_bytes` (h100 cluster for H100 rows, cpu else)."""
  out = []
  for r in rows:
    if r["devices"] < 2 or not r["bytes_sent"] or r["part"] not in ("cpu", "cpu_compile", "gpu"):
      continue
    error = cost_model.compare_bytes(
      r["model"], r["strategy"], r["algorithm"], r["devices"], r["per_device_batch"],
      r["bytes_sent"], cluster="h100" if r["part"] == "gpu" else "cpu",
      image_size=r["image_size"], activation_bytes=2 if r["dtype"] == "bfloat16" else 4,
    )  # fmt: skip
    out.append(dict(part=r["part"], model=r["model"], strategy=r["strategy"],
                    algorithm=r["algorithm"], devices=r["devices"], error=error))  # fmt: skip
  return out


def cost_model_time_rows(rows: Sequence[dict]) -> list[dict]:
  """(predicted - measured) / measured step time of every measured CPU row, by
  `cost_model.compare_step` on its `cpu` cluster (N devices sharing this host)."""
  out = []
  for r in rows:
    if r["part"] != "cpu" or not r.get("step_ms"):
      continue
    error = cost_model.compare_step(
      r["model"], r["strategy"], r["algorithm"], r["devices"], r["per_device_batch"],
      r["step_ms"] / 1e3, cluster="cpu", image_size=r["image_size"],
      num_classes=r.get("classes", 1000),
    )  # fmt: skip
    out.append(dict(part="cpu step time", model=r["model"], strategy=r["strategy"],
                    algorithm=r["algorithm"], devices=r["devices"], error=error))  # fmt: skip
  return out


def time_error_summary(errors: Sequence[dict]) -> list[str]:
  """One line per strategy: the median and largest |error| of the step-time rows."""
  lines = []
  for s in dict.fromkeys(e["strategy"] for e in errors):
    xs = sorted(abs(e["error"]) for e in errors if e["strategy"] == s)
    median = statistics.median(xs)
    lines.append(f"- {s}: median |error| {100 * median:.0f}%, largest {100 * xs[-1]:.0f}% "
                 f"({len(xs)} rows)")  # fmt: skip
  return lines


def cost_model_markdown(errors: Sequence[dict]) -> str:
  """One line per (part, model, strategy, algorithm): the relative byte error over N."""
  keys = dict.fromkeys((e["part"], e["model"], e["strategy"], e["algorithm"]) for e in errors)
  lines = []
  for key in keys:
    es = sorted((e["devices"], e["error"]) for e in errors
                if (e["part"], e["model"], e["strategy"], e["algorithm"]) == key)  # fmt: skip
    lines.append((*key, ", ".join(f"N={n}: {100 * x:+.1f}%" for n, x in es)))
  return table(("part", "model", "strategy", "algorithm", "(predicted - compiled) / compiled"),
               lines)  # fmt: skip


def recheck(data: dict) -> dict:
  """`data` with the checks of its cpu and gpu rows computed again (after a code change)."""
  checks = dict(data.get("checks", {}))
  for part, label in (("cpu", "measured CPU"), ("gpu", "H100 compile")):
    rows = [r for r in data["rows"] if r["part"] == part]
    if rows:
      checks.update(claim_checks(rows, part, label))
  return dict(
    data,
    checks=checks,
    cost_model=cost_model_rows(data["rows"]),
    cost_model_time=cost_model_time_rows(data["rows"]),
  )


# ----------------------------------------------------------------------------------------
# GPU compiles (part 2).


def gpu_compile_rows(specs: Sequence[tuple[str, int]], per_device_batch: int) -> list[dict]:
  """Deviceless H100 compiles of every (model, GPUs) x strategy, default algorithm, bf16."""
  from jax.experimental import topologies

  from experiments.compile_gpu import TARGET_CONFIG, async_collectives, overlap_summary

  with open(TARGET_CONFIG) as f:
    target = f.read()
  rows = []
  for model, gpus in specs:
    hosts = max(1, gpus // 8)
    topo = topologies.get_topology_desc(
      platform="cuda", target_config=target, topology=f"1x{hosts}x{gpus // hosts}"
    )
    for strategy in FLAGS.strategies:
      p = Program(model, strategy, DEFAULT_ALGORITHM, gpus, 224, per_device_batch * gpus,
                  dtype="bfloat16")  # fmt: skip
      logging.info("GPU compile %s", p.label)
      _, _, (row, text) = compile_program(p, list(topo.devices))
      summary = overlap_summary(async_collectives(text))
      row.update(
        hosts=hosts,
        async_collectives=summary.count,
        overlapped=summary.fraction,
        overlapped_bytes=summary.bytes_fraction,
      )
      print(f"{p.label}: {row['bytes_sent'] / 2**20:,.1f} MiB sent / GPU, "
            f"{summary.line()}, compiled in {row['compile_s']:.0f} s", flush=True)  # fmt: skip
      rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------
# Report: markdown, JSON, PNG.


def _mib(b: float) -> str:
  return f"{b / 2**20:,.1f}"


def _bytes_cells(r: dict) -> tuple:
  return (r["ops"], _mib(r["bytes_sent"]), _mib(r["weight_bytes"]), _mib(r["activation_bytes"]))


BYTES_HEAD = ("collective ops", "MiB sent / device", "of it: weights (2 (N-1)/N x synced)",
              "rest (activations)")  # fmt: skip


def cpu_table(rows: Sequence[dict]) -> str:
  """Measured rows: one line per program."""
  return table(
    ("model", "strategy", "algorithm", "N", "batch / device", "global batch", "step ms",
     "images/s", "ms / image", "memory MiB / device", *BYTES_HEAD),
    [
      (r["model"], r["strategy"], r["algorithm"], r["devices"], r["per_device_batch"],
       r["global_batch"], f"{r['step_ms']:.0f}", f"{r['images_per_s']:.1f}",
       f"{r['ms_per_image']:.2f}", _mib(r["memory_bytes"]), *_bytes_cells(r))
      for r in rows
    ],
  )  # fmt: skip


def compile_table(rows: Sequence[dict], gpu: bool) -> str:
  """Compile-only rows (CPU at 224 px, or H100)."""
  head = ("model", "strategy", "algorithm", "GPUs" if gpu else "N")
  head += ("hosts",) if gpu else ()
  head += ("batch / device", "global batch", "argument MiB", "temp MiB", "memory MiB / device",
           *BYTES_HEAD)  # fmt: skip
  head += ("async overlapped (count)", "(bytes)") if gpu else ()
  head += ("compile s",)
  out = []
  for r in rows:
    cells = (r["model"], r["strategy"], r["algorithm"], r["devices"])
    cells += (r["hosts"],) if gpu else ()
    cells += (r["per_device_batch"], r["global_batch"], _mib(r["argument_bytes"]),
              _mib(r["temp_bytes"]), _mib(r["memory_bytes"]), *_bytes_cells(r))  # fmt: skip
    if gpu:
      cells += (f"{100 * r['overlapped']:.0f}%", f"{100 * r['overlapped_bytes']:.0f}%")
    out.append(cells + (f"{r['compile_s']:.0f}",))
  return table(head, out)


def speedup_rows(rows: Sequence[dict]) -> list[dict]:
  """Speedup rows: time(N=1) / time(N) at each fixed global batch."""
  out = []
  for batch in sorted({r["global_batch"] for r in rows}):
    same = {r["devices"]: r for r in rows if r["global_batch"] == batch}
    if 1 not in same:
      continue
    for n in sorted(same):
      out.append(dict(global_batch=batch, devices=n, step_ms=same[n]["step_ms"],
                      speedup=same[1]["step_ms"] / same[n]["step_ms"]))  # fmt: skip
  return out


def report_markdown(data: dict) -> str:
  """The whole report from the JSON's contents (`data`: meta, rows, checks, skipped)."""
  rows, meta = data["rows"], data.get("meta", {})
  part = lambda name: [r for r in rows if r["part"] == name]  # noqa: E731
  out = ["## Scaling study (paper section 3.3, Figure 3)", ""]
  for key in ("cpu_header", "gpu_header"):
    if key in meta:
      out += [meta[key], ""]
  if part("cpu"):
    r0 = part("cpu")[0]
    out += [
      f"### Measured: simulated CPU devices, "
      f"{r0['image_size']}x{r0['image_size']} images (reduced from 224 so that a step runs "
      "on this machine), fixed batch per device",
      "",
      "The simulated devices share this machine's CPU cores: a step on N devices does N "
      "devices' work on the same cores, so step time grows with N and the absolute scaling "
      "is not a GPU's. Bytes and memory are those of the compiled program.",
      "",
      cpu_table(part("cpu")),
      "",
    ]
  if part("process"):
    out += ["### Over processes: the same step as processes x devices (jax.distributed, gloo)",
            "", table(("model", "strategy", "processes x devices", "global batch", "step ms",
                       "images/s", "vs 1 x 8"),
                      [(r["model"], r["strategy"],
                        f"{r['processes']} x {r['devices'] // r['processes']}",
                        r["global_batch"], f"{r['step_ms']:.0f}", f"{r['images_per_s']:.1f}",
                        f"{r['step_ms'] / _one_process(part('process'), r):.2f}x")
                       for r in part("process")]), ""]  # fmt: skip
  if part("speedup"):
    sp = speedup_rows(part("speedup"))
    r0 = part("speedup")[0]
    out += [f"### Speedup at fixed global batch: `{r0['model']}` {r0['strategy']} / "
            f"{r0['algorithm']}, {r0['image_size']} px, simulated CPU devices", "",
            table(("global batch", "N", "step ms", "speedup vs N=1"),
                  [(s["global_batch"], s["devices"], f"{s['step_ms']:.0f}",
                    f"{s['speedup']:.2f}") for s in sp]), ""]  # fmt: skip
  if part("cpu_compile"):
    r0 = part("cpu_compile")[0]
    out += [
      f"### Compile only on CPU devices at {r0['image_size']}x{r0['image_size']} "
      "(nothing executed)",
      "",
      compile_table(part("cpu_compile"), gpu=False),
      "",
    ]
  if part("gpu"):
    out += [
      "### Compile only for H100 SXM (deviceless XLA GPU compile, bf16, 8 GPUs per "
      "host, nothing executed)",
      "",
      compile_table(part("gpu"), gpu=True),
      "",
    ]
  checks = data.get("checks", {})
  if checks:
    out += ["### The paper's claims", ""]
    for key in sorted(checks):
      if not key.endswith(":crossover"):  # written by an earlier version; drawn below
        out += checks[key]
    out.append("")
  names = {"cpu": "measured CPU", "cpu_compile": "CPU compile", "gpu": "H100 compile"}
  cross = [line for name, label in names.items() for line in crossover_lines(part(name), label)]
  if cross:
    out += ["### Hybrid against data parallelism: bytes sent per device", ""] + cross + [""]
  if data.get("cost_model"):
    out += ["### Cost model against the compiled programs: bytes sent per device", "",
            "`deep_image.parallel.cost_model.compare_bytes` (cluster h100 for the H100 rows, "
            "cpu for the others; activations of the rows' dtype):", "",
            cost_model_markdown(data["cost_model"]), ""]  # fmt: skip
  if data.get("cost_model_time"):
    out += ["### Cost model against the measured step times", "",
            "`deep_image.parallel.cost_model.compare_step` with the `cpu` cluster (the N "
            "simulated devices share the host's FLOP/s, memory and copies; its one fitted number, "
            "the utilisation 0.11, is the model FLOP rate that gspmd / 8-conv / N=8 reached "
            "(18 GFLOP/s of 160; update and copies inside), so that row is not independent):", "",
            *time_error_summary(data["cost_model_time"]), "",
            cost_model_markdown(data["cost_model_time"]).replace("compiled", "measured"),
            ""]  # fmt: skip
  if data.get("skipped"):
    out += ["### Skipped", ""] + [f"- {s}" for s in data["skipped"]] + [""]
  return "\n".join(out)


def write_model_figure(rows: Sequence[dict], preset: str, path: str) -> None:
  """Figure 3 as the cost model predicts it (`cost_model.predict_rows` rows): left, time
  per image of each strategy at a fixed batch per device; right, speedup at fixed
  mini-batches. On Minwa the paper's crossover (16) and 47x at 64 are marked."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  lefts = [r for r in rows if r["figure"] == "left"]
  for strategy in dict.fromkeys(r["strategy"] for r in lefts):
    pts = sorted((r["num_devices"], r["time_per_image_s"] * 1e3) for r in lefts
                 if r["strategy"] == strategy)  # fmt: skip
    left.plot(*zip(*pts, strict=True), marker="o", label=strategy)
  b = lefts[0]["batch_per_device"]
  left.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="ms / image",
           title=f"time per image, {b} images per GPU")  # fmt: skip
  rights = [r for r in rows if r["figure"] == "right"]
  for batch in sorted({r["global_batch"] for r in rights}):
    pts = sorted((r["num_devices"], r["speedup"]) for r in rights if r["global_batch"] == batch)
    right.plot(*zip(*pts, strict=True), marker="o", label=f"mini-batch {batch}")
  ns = sorted({r["num_devices"] for r in rights})
  right.plot(ns, ns, "k:", label="linear")
  right.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="speedup",
            title="speedup over one GPU (faster of hybrid / data)")  # fmt: skip
  if preset == "minwa":
    paper = cost_model.PAPER
    left.axvline(paper["crossover"], color="grey", ls="--", label="paper: crossover")
    right.plot([64], [paper["speedup@64"]], "k*", ms=12, label="paper: 47x, mini-batch 1024")
  for ax in (left, right):
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(
    f"cost model: {rows[0]['model']} on {preset} ({cost_model.PRESETS[preset].description})"
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _one_process(rows: Sequence[dict], r: dict) -> float:
  same = [x for x in rows if x["processes"] == 1 and x["model"] == r["model"]
          and x["strategy"] == r["strategy"] and x["devices"] == r["devices"]]  # fmt: skip
  return same[0]["step_ms"] if same else float("nan")


def write_figure(data: dict, path: str) -> bool:
  """Figure 3's two panels from the measured rows; False (nothing written) without them."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

  cpu = [
    r
    for r in data["rows"]
    if r["part"] == "cpu"
    and r["algorithm"] in (DEFAULT_ALGORITHM, "xla")
    and (r["strategy"] == "gspmd") == (r["algorithm"] == "xla")
  ]
  speed = speedup_rows([r for r in data["rows"] if r["part"] == "speedup"])  # fmt: skip
  if not cpu and not speed:
    return False
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  styles = dict(zip(sorted({r["model"] for r in cpu}), ("-", "--", ":"), strict=False))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for model, style in styles.items():
    for k, strategy in enumerate(STRATEGIES):
      pts = sorted((r["devices"], r["ms_per_image"]) for r in cpu
                   if r["model"] == model and r["strategy"] == strategy)  # fmt: skip
      if pts:
        left.plot(*zip(*pts, strict=True), style, marker="o", color=colors[k],
                  label=f"{strategy} ({model})")  # fmt: skip
  size = cpu[0]["image_size"] if cpu else "?"
  left.set(title=f"time per image, fixed batch per device ({size} px)\nsimulated CPU devices "
                 f"sharing {os.cpu_count()} cores: not a GPU's scaling", xlabel="devices",
           ylabel="ms / image", yscale="log")  # fmt: skip
  for batch in sorted({s["global_batch"] for s in speed}):
    pts = [(s["devices"], s["speedup"]) for s in speed if s["global_batch"] == batch]
    right.plot(*zip(*pts, strict=True), marker="o", label=f"mini-batch {batch}")
  if speed:
    ns = sorted({s["devices"] for s in speed})
    right.plot(ns, ns, "k:", label="linear")
  right.set(
    title="speedup vs 1 device at a fixed global batch\n(hybrid, simulated CPU devices)",
    xlabel="devices",
    ylabel="speedup",
    yscale="log",
  )
  ticks = sorted({r["devices"] for r in cpu} | {s["devices"] for s in speed})
  for ax in (left, right):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def paths(out: str | None) -> tuple[str, str, str]:
  """(markdown, JSON, PNG) paths: --out or benchmarks/scaling_<UTC date>.md, and beside it."""
  md = out or f"benchmarks/scaling_{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.md"
  stem = md[:-3] if md.endswith(".md") else md
  return md, stem + ".json", stem + ".png"


def load(json_path: str) -> dict:
  if os.path.exists(json_path):
    with open(json_path) as f:
      return json.load(f)
  return {"meta": {}, "rows": [], "checks": {}, "skipped": []}


def save(data: dict, out: str | None) -> None:
  """Write the JSON, the markdown and the PNG of `data`."""
  md, js, png = paths(out)
  os.makedirs(os.path.dirname(md) or ".", exist_ok=True)
  with open(js, "w") as f:
    json.dump(data, f, indent=1)
  with open(md, "w") as f:
    f.write(report_markdown(data) + "\n")
  drew = write_figure(data, png)
  text = report_markdown(data)
  if "### The paper's claims" in text:  # the checks and the hybrid / data lines, on stdout too
    print(text[text.index("### The paper's claims") :], flush=True)
  print(f"wrote {md}, {js}" + (f", {png}" if drew else ""), flush=True)


def merge(data: dict, parts: Iterable[str], rows: list[dict], checks: dict, skipped: list):
  """Replace the rows of `parts` (and checks / skipped notes of those parts) in `data`."""
  parts = set(parts)
  data["rows"] = [r for r in data["rows"] if r["part"] not in parts] + rows
  data["checks"] = {k: v for k, v in data.get("checks", {}).items()
                    if k.split(":")[0] not in parts} | checks  # fmt: skip
  data["skipped"] = [s for s in data.get("skipped", []) if s.split(":")[0] not in parts] + skipped
  return data


# ----------------------------------------------------------------------------------------
# main


def _ints(values: Sequence[str]) -> list[int]:
  return [int(v) for v in values if v]


def cpu_study() -> None:
  """Part 1 (measured on simulated CPU devices) into the JSON / markdown / PNG."""
  from deep_image.parallel import mesh as mesh_lib

  mesh_lib.configure_host_devices(max(_ints(FLAGS.devices) + [8]))
  import jax

  from experiments.markdown import machine_markdown

  devices = jax.devices()
  quick = FLAGS.quick
  models = FLAGS.models[:1] if quick else FLAGS.models
  ns = [n for n in _ints(FLAGS.devices) if n <= len(devices)]
  ns = ns[:2] if quick else ns
  alg_ns = [] if quick else _ints(FLAGS.algorithm_devices)
  repeats = 2 if quick else FLAGS.repeats
  b = FLAGS.per_device_batch
  size, classes = FLAGS.image_size, FLAGS.classes
  if size % 32:
    raise app.UsageError(f"--image_size={size} must be divisible by 32 (five 2x2 poolings)")
  t_start = time.perf_counter()
  data = load(paths(FLAGS.out)[1])
  command = " ".join(["python -m experiments.scaling"] + sys.argv[1:])
  data.setdefault("meta", {})["cpu_header"] = machine_markdown(command)
  checks, skipped = {}, []

  programs = []
  for m in models:
    for n in ns:
      for s in FLAGS.strategies:
        algs = [DEFAULT_ALGORITHM] + (
          [a for a in FLAGS.algorithms if a != DEFAULT_ALGORITHM]
          if n in alg_ns and s != "gspmd" and n > 1 and m in FLAGS.algorithm_models
          else []
        )
        for a in algs:  # fmt: skip
          programs.append(Program(m, s, a, n, size, b * n, classes))
  t0 = time.perf_counter()
  rows = [dict(r, part="cpu") for r in measure(programs, devices, repeats, FLAGS.memory_budget_gb)]
  logging.info("measured %d programs in %.0f s", len(rows), time.perf_counter() - t0)
  if alg_ns:
    skipped.append(
      f"cpu: algorithms other than {DEFAULT_ALGORITHM} only at N={alg_ns} and for "
      f"{FLAGS.algorithm_models} (time: a data-parallel step on 8 simulated devices takes "
      "5-14 s here, by load)"
    )
  checks.update(claim_checks(rows, "cpu", "measured CPU"))
  data = merge(data, ["cpu"], rows, checks, skipped)
  save(data, FLAGS.out)

  if quick:
    return
  if FLAGS.speedup_batches:
    m = models[0]
    sp = [Program(m, DEFAULT_STRATEGY, DEFAULT_ALGORITHM, n, size, gb, classes)
          for gb in _ints(FLAGS.speedup_batches) for n in ns if gb % n == 0]  # fmt: skip
    t0 = time.perf_counter()
    sp_rows = [
      dict(r, part="speedup") for r in measure(sp, devices, repeats, FLAGS.memory_budget_gb)
    ]
    logging.info("speedup rows in %.0f s", time.perf_counter() - t0)
    data = merge(data, ["speedup"], sp_rows, {}, [])
    save(data, FLAGS.out)

  if FLAGS.process_strategies:
    import tempfile

    n = max(ns)
    progs = [Program(models[0], s, DEFAULT_ALGORITHM, n, size, b * n, classes)
             for s in FLAGS.process_strategies]  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      proc_rows = []
      for procs in (1, 2):
        proc_rows += [dict(r, part="process") for r in run_processes(progs, procs, n, repeats, tmp)]
    logging.info("process rows in %.0f s", time.perf_counter() - t0)
    data = merge(data, ["process"], proc_rows, {}, [])
    save(data, FLAGS.out)

  if FLAGS.compile_size:
    cb = FLAGS.compile_batch
    comp = []
    for m in models:
      for n in _ints(FLAGS.compile_devices):
        for s in FLAGS.strategies:
          p = Program(m, s, DEFAULT_ALGORITHM, n, FLAGS.compile_size, cb * n, classes)
          logging.info("compiling %s (compile only)", p.label)
          _, _, (row, _) = compile_program(p, devices[:n])
          comp.append(dict(row, part="cpu_compile"))
    data = merge(data, ["cpu_compile"], comp, {}, [])
    save(recheck(data), FLAGS.out)
  logging.info("CPU study took %.0f s", time.perf_counter() - t_start)


def gpu_study() -> None:
  """Part 2: deviceless H100 compiles into the JSON / markdown / PNG."""
  from experiments.compile_gpu import _cuda_missing

  missing = _cuda_missing()
  if missing:
    print(f"scaling: skipping the H100 compiles: {missing}; set up a CUDA jax venv with: "
          f"{SETUP.split('; then')[0]}, and run this with /tmp/gpu-aot/bin/python")  # fmt: skip
    return
  from deep_image.parallel import mesh as mesh_lib

  mesh_lib.add_gpu_overlap_flags()  # before JAX starts, as in training
  allowed = set(_ints(FLAGS.gpu_devices))
  specs, skipped = [], []
  for item in FLAGS.gpu_models:
    model, _, counts = item.partition(":")
    for n in _ints(counts.split(",")) if counts else sorted(allowed):
      (specs if n in allowed else skipped).append((model, n))
  not_done = [f"{m} at {n}" for m in dict.fromkeys(m for m, _ in specs)
              for n in sorted(allowed) if (m, n) not in specs]  # fmt: skip
  t0 = time.perf_counter()
  rows = [dict(r, part="gpu") for r in gpu_compile_rows(specs, FLAGS.gpu_per_device_batch)]
  checks = claim_checks(rows, "gpu", "H100 compile")
  notes = (
    [f"gpu: H100 compiles left out by --gpu_models: {', '.join(not_done)}"] if not_done else []
  )
  data = load(paths(FLAGS.out)[1])
  import jax

  data.setdefault("meta", {})["gpu_header"] = (
    f"- H100 compiles: jax {jax.__version__}, XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`, "
    f"{FLAGS.gpu_per_device_batch} images per GPU, took {time.perf_counter() - t0:.0f} s; "
    f"command: `python -m experiments.scaling {' '.join(sys.argv[1:])}`"
  )
  save(recheck(merge(data, ["gpu"], rows, checks, notes)), FLAGS.out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    process_worker(json.loads(FLAGS.worker))
  elif FLAGS.model_only:
    print(cost_model.report(FLAGS.preset, FLAGS.model))
    if FLAGS.plot:
      rows = cost_model.predict_rows(FLAGS.preset, FLAGS.model)
      write_model_figure(rows, FLAGS.preset, FLAGS.plot)
      logging.info("wrote %s", FLAGS.plot)  # stdout ends with the crossover / speedup lines
  elif FLAGS.redraw:
    save(recheck(load(paths(FLAGS.out)[1])), FLAGS.out)
  elif FLAGS.gpu_compile:
    gpu_study()
  else:
    cpu_study()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
