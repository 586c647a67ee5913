"""Which setup to run on a cluster: every strategy x mesh x algorithm, predicted and ranked.

`experiments.plan` prints `plan_text(plan(...))`; `strategies.choose_strategy`
(parallel.strategy='auto') ranks the strategies on the mesh at hand with the same
`rank_key`. For G GPUs of a cluster preset (`clusters.PRESETS`, D devices per node):

=========  ===================================================================
axis       candidates
=========  ===================================================================
mesh       (G,) one axis; (G / D, D) node x local when G > D and D divides G
strategy   gspmd (one axis, XLA's own collectives: algorithm 'xla'), data, lazy,
           hybrid (parallel.conv as configured)
algorithm  parallel.collective: butterfly, ring, direct, xla; on node x local
           also parallel.node_collective: each of them across nodes
=========  ===================================================================

A candidate fits when `validation.validate_parallel_config` accepts it (e.g.
hybrid needs FC1's width to divide over its split) and its memory per GPU
(`memory_model`, or the compile's through `memory_of`) is within the cluster's
device memory. Every other field is the config's (overlap, bucket_mb,
prefetch_mb, grad_dtype, the model and its dtype).

Each row is `cost_model.predict` for the config's per-GPU batch b: step time,
speedup = time per image on one GPU running the whole global batch G b (data
parallelism's one-device step, as `scaling_model.speedup`) / on G GPUs,
efficiency = speedup / G, bytes per GPU per step inside a node and across nodes.
Rows rank by predicted step time (to 4 significant digits), then fewer bytes
across nodes, then less memory, then the simpler mesh (`rank_key`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Sequence

from deep_image.config_error import ConfigError
from deep_image.parallel import cost_model, memory_model, validation
from deep_image.parallel.clusters import PRESETS, Cluster, get_cluster
from deep_image.parallel.collectives import ALGORITHMS
from deep_image.parallel.layout_policy import STRATEGIES


@dataclasses.dataclass(frozen=True)
class Setup:
  """One candidate: what the config's parallel fields would say."""

  strategy: str
  mesh: tuple[int, ...]  # axis sizes, outer first: (G,) or (nodes, local)
  algorithm: str  # parallel.collective
  node_collective: str = ""  # parallel.node_collective ('': the same as algorithm)

  @property
  def mesh_label(self) -> str:
    return "x".join(str(s) for s in self.mesh)

  @property
  def algorithm_label(self) -> str:
    """One token: the algorithm, or 'node/local' where the two levels differ."""
    if self.node_collective and self.node_collective != self.algorithm:
      return f"{self.node_collective}/{self.algorithm}"
    return self.algorithm

  @property
  def label(self) -> str:
    return f"{self.strategy} {self.mesh_label} {self.algorithm_label}"

  def mesh_spec(self) -> tuple:
    """parallel.mesh: one axis 'data', or 'node' x 'local'."""
    if len(self.mesh) == 1:
      return (("data", self.mesh[0]),)
    return (("node", self.mesh[0]), ("local", self.mesh[1]))

  def flags(self) -> str:
    """The --config overrides that run it."""
    out = [f"--config.parallel.strategy={self.strategy}"]
    out.append(f'--config.parallel.mesh="{self.mesh_spec()}"')
    out.append(f"--config.parallel.collective={self.algorithm}")
    if self.node_collective and self.node_collective != self.algorithm:
      out.append(f"--config.parallel.node_collective={self.node_collective}")
    return " ".join(out)


@dataclasses.dataclass(frozen=True)
class Row:
  """A setup that fits, predicted."""

  setup: Setup
  prediction: cost_model.Prediction
  speedup: float
  efficiency: float
  memory_bytes: float
  memory_source: str  # 'model' | 'compile'

  @property
  def step_s(self) -> float:
    return self.prediction.step_s


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every candidate of a config on G GPUs of a cluster: the rows that fit, ranked, and
  the ones that do not with why."""

  cluster: Cluster
  gpus: int
  batch_per_gpu: int
  model: str
  rows: tuple[Row, ...]  # ranked, fastest first
  left_out: tuple[tuple[Setup, str], ...]

  @property
  def best(self) -> Row:
    return self.rows[0]

  @property
  def flat(self) -> Row:
    """The best row on a one-axis mesh."""
    return next(r for r in self.rows if len(r.setup.mesh) == 1)


def rank_key(row: Row) -> tuple:
  """Faster first (4 significant digits), then fewer bytes across nodes, less memory,
  fewer mesh axes, names."""
  p = row.prediction
  return (
    float(f"{p.step_s:.4g}"),
    round(p.bytes_across_per_device),
    round(row.memory_bytes),
    len(row.setup.mesh),
    row.setup.label,
  )


def cluster_for_plan(cluster: str) -> Cluster:
  """A preset by name; ConfigError naming --cluster otherwise."""
  if cluster not in PRESETS:
    raise ConfigError(
      f"--cluster={cluster!r} is not a known cluster; choose from {sorted(PRESETS)}"
    )
  return PRESETS[cluster]


def meshes(cluster: Cluster, gpus: int) -> list[tuple[int, ...]]:
  """(G,), and (G / D, D) when the G GPUs span several nodes of D."""
  out = [(gpus,)]
  per_node = cluster.devices_per_node
  if gpus > per_node and gpus % per_node == 0:
    out.append((gpus // per_node, per_node))
  return out


def candidates(cluster: Cluster, gpus: int) -> list[Setup]:
  """Every strategy x mesh x algorithm (module table)."""
  out = []
  for mesh in meshes(cluster, gpus):
    for strategy in STRATEGIES:
      if strategy == "gspmd":
        if len(mesh) == 1:
          out.append(Setup("gspmd", mesh, "xla"))
        continue
      for algorithm in ALGORITHMS:
        nodes = [""] if len(mesh) == 1 else ["", *(a for a in ALGORITHMS if a != algorithm)]
        out.extend(Setup(strategy, mesh, algorithm, node) for node in nodes)
  return out


def setup_config(config, setup: Setup):
  """A copy of `config` with the setup's parallel fields."""
  c = copy.deepcopy(config)
  par = c.parallel
  par.strategy, par.collective, par.node_collective = (
    setup.strategy,
    setup.algorithm,
    setup.node_collective,
  )
  par.mesh = setup.mesh_spec()
  par.num_devices = math.prod(setup.mesh)
  return c


def sized_config(config, gpus: int, per_gpu_batch: int | None):
  """`config` for G GPUs: parallel.num_devices = G, train.batch_size = G x per_gpu_batch
  (None: the config's batch, which must divide over G). ConfigError naming the flag."""
  if gpus < 1:
    raise ConfigError(f"--gpus={gpus} must be >= 1")
  c = copy.deepcopy(config)
  c.parallel.num_devices = gpus  # batch sizes that refer to it follow
  if per_gpu_batch is not None:
    if per_gpu_batch < 1:
      raise ConfigError(f"--per_gpu_batch={per_gpu_batch} must be >= 1")
    c.train.batch_size = gpus * per_gpu_batch
  batch = c.train.batch_size
  if batch < 1 or batch % gpus:
    raise ConfigError(
      f"train.batch_size={batch} does not divide over --gpus={gpus}; set --per_gpu_batch"
    )
  return c


def predict_row(
  config,
  cluster: Cluster,
  setup: Setup,
  one: cost_model.Prediction | None = None,
  memory_of: Callable[[object, Setup], float] | None = None,
) -> Row:
  """One setup of `config` (sized: num_devices, batch) predicted; `one`: the one-GPU
  baseline of the same global batch (None: predicted here)."""
  gpus = math.prod(setup.mesh)
  global_batch = config.train.batch_size
  b = global_batch // gpus
  step = cost_model.StepSetup.from_config(config)
  name = config.model.name
  p = cost_model.predict(
    name,
    setup.strategy,
    setup.algorithm,
    gpus,
    b,
    cluster,
    dataclasses.replace(step, node_collective=setup.node_collective),
    mesh=setup.mesh,
  )
  if one is None:
    one = cost_model.predict(name, "data", setup.algorithm, 1, global_batch, cluster, step)
  speedup = one.time_per_image_s / p.time_per_image_s
  if memory_of is None:
    memory = memory_model.estimate_memory(name, setup.strategy, setup.mesh, b, step).total
    source = "model"
  else:
    memory, source = memory_of(setup_config(config, setup), setup), "compile"
  return Row(setup, p, speedup, speedup / gpus, memory, source)


def plan(
  config,
  cluster: str | Cluster,
  gpus: int,
  per_gpu_batch: int | None = None,
  *,
  memory_of: Callable[[object, Setup], float] | None = None,
  progress: Callable[[int, int, Setup], None] | None = None,
) -> Plan:
  """Every candidate of `config` on `gpus` GPUs of `cluster`, ranked (module docstring).

  memory_of(config, setup) -> bytes per GPU replaces the model's memory estimate (e.g.
  a deviceless compile); progress(i, total, setup) is called before each candidate.
  """
  cl = cluster_for_plan(cluster) if isinstance(cluster, str) else get_cluster(cluster)
  if gpus > cl.max_devices:
    raise ConfigError(
      f"--gpus={gpus} does not fit the {cl.name} cluster: at most {cl.max_devices} "
      f"({cl.num_nodes} nodes x {cl.devices_per_node})"
    )
  config = sized_config(config, gpus, per_gpu_batch)
  step = cost_model.StepSetup.from_config(config)
  one = cost_model.predict(
    config.model.name, "data", "butterfly", 1, config.train.batch_size, cl, step
  )
  todo = candidates(cl, gpus)
  rows, left_out = [], []
  for i, setup in enumerate(todo):
    if progress is not None:
      progress(i, len(todo), setup)
    c = setup_config(config, setup)
    try:
      validation.validate_parallel_config(c, gpus)
    except ConfigError as e:
      left_out.append((setup, str(e)))
      continue
    row = predict_row(config, cl, setup, one, None)
    if row.memory_bytes > cl.device_memory:
      left_out.append((setup, _no_room(row, cl)))
      continue
    if memory_of is not None:
      row = dataclasses.replace(row, memory_bytes=memory_of(c, setup), memory_source="compile")
      if row.memory_bytes > cl.device_memory:
        left_out.append((setup, _no_room(row, cl)))
        continue
    rows.append(row)
  if not rows:
    reasons = "; ".join(sorted({why for _, why in left_out}))
    raise ConfigError(f"no setup of this config fits {gpus} GPUs of {cl.name}: {reasons}")
  rows.sort(key=rank_key)
  return Plan(
    cl, gpus, config.train.batch_size // gpus, config.model.name, tuple(rows), tuple(left_out)
  )


def _no_room(row: Row, cl: Cluster) -> str:
  return (
    f"needs {row.memory_bytes / 2**30:.1f} GiB per GPU ({row.memory_source}), "
    f"the {cl.name} GPU has {cl.device_memory / 2**30:.1f}"
  )


def _exposed(p: cost_model.Prediction, top: int = 3) -> str:
  """The largest exposed collectives of a prediction, in words."""
  return ", ".join(f"{seconds * 1e3:.2f} ms {what}" for what, seconds in p.exposed[:top])


def _mib(x: float) -> str:
  return f"{x / 2**20:,.0f}"


def table(rows: Sequence[Row]) -> str:
  """The markdown table of `rows`, in their order."""
  head = (
    "| rank | strategy | mesh | algorithm | step ms | speedup | efficiency | exposed comm ms "
    "| MiB / GPU inside a node | MiB / GPU across nodes (mean / max) | memory MiB / GPU |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for i, r in enumerate(rows, 1):
    p = r.prediction
    mem = _mib(r.memory_bytes) + (" (compiled)" if r.memory_source == "compile" else "")
    lines.append(
      f"| {i} | {r.setup.strategy} | {r.setup.mesh_label} | {r.setup.algorithm_label} | "
      f"{p.step_s * 1e3:.2f} | {r.speedup:.1f}x | {100 * r.efficiency:.0f}% | "
      f"{p.exposed_comm_s * 1e3:.2f} | {_mib(p.bytes_inside_per_device)} | "
      f"{_mib(p.bytes_across_per_device)} / {_mib(p.bytes_across_max_per_device)} | {mem} |"
    )
  return "\n".join(lines)


def why(plan_: Plan) -> list[str]:
  """The recommendation and its reasons, from the best and the best one-axis rows."""
  best, flat = plan_.best, plan_.flat
  bp, fp = best.prediction, flat.prediction
  out = [
    f"Recommended: {best.setup.label} ({best.setup.flags()}): {bp.step_s * 1e3:.2f} ms per "
    f"step, {best.speedup:.1f}x one GPU on the same mini-batch ({100 * best.efficiency:.0f}% "
    f"efficiency); {bp.compute_s * 1e3:.2f} ms of compute and {bp.exposed_comm_s * 1e3:.2f} ms "
    f"of communication left exposed ({bp.comm_s * 1e3:.2f} ms of collectives in all).",
  ]
  if bp.exposed:
    out.append(f"Exposed: {_exposed(bp)}.")
  if best is flat:
    out.append("It is also the fastest setup on a one-axis mesh.")
    two = next((r for r in plan_.rows if len(r.setup.mesh) > 1), None)
    if two is not None:
      tp = two.prediction
      out.append(
        f"The fastest node x local setup, {two.setup.label}, takes {tp.step_s * 1e3:.2f} ms "
        f"({two.speedup:.1f}x; {tp.exposed_comm_s * 1e3:.2f} ms exposed: {_exposed(tp)})."
      )
  else:
    out.append(
      f"The fastest one-axis setup, {flat.setup.label}, takes {fp.step_s * 1e3:.2f} ms "
      f"({flat.speedup:.1f}x; {fp.exposed_comm_s * 1e3:.2f} ms exposed: {_exposed(fp)}): "
      f"{best.speedup / flat.speedup:.2f}x slower than the recommendation."
    )
    if best.setup.strategy == "hybrid" and len(best.setup.mesh) > 1:
      out.append(
        f"On node x local, hybrid splits FC1 / FC2 over a node's {best.setup.mesh[1]} GPUs: "
        f"its FC activations ({_mib(bp.activation_bytes_sent_per_device)} MiB per GPU) stay "
        "on the node's links, and across nodes each GPU sends only its 1/L of the FC "
        "gradients, as data parallelism does."
      )
    out.append(
      f"Bytes per GPU per step across nodes (mean / max): {_mib(bp.bytes_across_per_device)} / "
      f"{_mib(bp.bytes_across_max_per_device)} MiB vs {_mib(fp.bytes_across_per_device)} / "
      f"{_mib(fp.bytes_across_max_per_device)} MiB one-axis; inside a node "
      f"{_mib(bp.bytes_inside_per_device)} vs {_mib(fp.bytes_inside_per_device)} MiB."
    )
  if bp.exposed_comm_s > 0.05 * bp.step_s:
    out.append(
      f"Communication still costs {100 * bp.exposed_comm_s / bp.step_s:.0f}% of the step: "
      "a larger --per_gpu_batch, parallel.prefetch_mb or parallel.grad_dtype='bfloat16' "
      "would hide or shrink it (rerun the plan with them)."
    )
  return out


def summary_lines(plan_: Plan) -> list[str]:
  """The three last lines: flat, best, speedup@G."""
  best, flat = plan_.best, plan_.flat
  return [
    f"flat: {flat.setup.strategy} {flat.setup.algorithm_label} {flat.speedup:.1f}x",
    f"best: {best.setup.strategy} {best.setup.mesh_label} {best.setup.algorithm_label}",
    f"speedup@{plan_.gpus}: {best.speedup:.1f}x",
  ]


def plan_text(plan_: Plan, header: str = "") -> str:
  """What `experiments.plan` prints: header, table, what does not fit, why, three lines."""
  cl = plan_.cluster
  lines = [header] if header else []
  lines += [
    f"plan: {plan_.model} on {plan_.gpus} GPUs of {cl.name} ({cl.description}), "
    f"{plan_.batch_per_gpu} images per GPU (mini-batch {plan_.gpus * plan_.batch_per_gpu}); "
    "predicted by the cost model, not measured. mesh: G (one axis) or NODESxLOCAL; "
    "algorithm 'a/b': parallel.node_collective a across nodes, parallel.collective b inside",
    "",
    table(plan_.rows),
  ]
  if plan_.left_out:
    lines += ["", "Left out (does not fit):"]
    lines += [f"- {s.label}: {why_not}" for s, why_not in plan_.left_out]
  lines += ["", *why(plan_), "", *summary_lines(plan_)]
  return "\n".join(lines)
