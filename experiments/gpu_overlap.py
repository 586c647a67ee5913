"""What `experiments.compile_gpu` compiles and reports: the configurations (strategy x
collective x overlap, on one mesh), one deviceless compile's memory, async collectives
(`deep_image.analysis.overlap`) and bytes across hosts (`deep_image.analysis.cross_host`,
beside the cost model's `cross_node_bytes` for the same config), and the markdown tables."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Sequence

from deep_image.analysis.cross_host import cross_host_bytes
from deep_image.analysis.overlap import async_collectives, overlap_summary
from deep_image.config_error import ConfigError
from deep_image.parallel import cost_model
from experiments import step_programs
from experiments.markdown import mib, table


def _where(op_name: str) -> str:
  """A short place from an op_name: the part after 'shard_map/' or 'jit(step)/'."""
  for prefix in ("jit(step)/shard_map/", "jit(step)/"):
    if op_name.startswith(prefix):
      return op_name[len(prefix) :]
  return op_name or "-"


@dataclasses.dataclass(frozen=True)
class Configuration:
  """One compiled program: its table label and config fields.

  `mesh`: parallel.mesh, () for the config's default (one axis over all devices);
  `node_collective`: parallel.node_collective of a two-axis mesh ('' = collective).
  """

  label: str
  strategy: str
  collective: str
  overlap: str
  mesh: tuple = ()
  node_collective: str = ""

  @property
  def token(self) -> str:
    """The label without spaces: one word for `cross_host_mib_per_gpu <token> <value>`."""
    return self.label.replace(" ", "")


def mesh_label(mesh: tuple) -> str:
  """'node 8 x local 8' for (('node', 8), ('local', 8)); '' for () or a one-axis mesh."""
  if len(mesh) < 2:
    return ""
  return " x ".join(f"{name} {size}" for name, size in mesh)


def configurations(
  strategies: Sequence[str],
  collectives: Sequence[str],
  overlaps: Sequence[str],
  conv: str,
  mesh: tuple = (),
  node_collective: str = "",
) -> list[Configuration]:
  """gspmd once (XLA's own collectives), each shard_map strategy x collective x overlap;
  all on `mesh` (named in the label when it has two axes, with the node level's algorithm
  when it differs)."""
  where = mesh_label(mesh)
  if where and node_collective:
    where += f" (node: {node_collective})"
  suffix = f" / {where}" if where else ""
  out = []
  for s in strategies:
    if s == "gspmd":
      out.append(Configuration("gspmd" + suffix, "gspmd", "xla", "none", mesh))
      continue
    name = f"hybrid(conv={conv})" if s == "hybrid" else s
    for alg in collectives:
      for ov in overlaps:
        label = f"{name} / {alg} / {ov}{suffix}"
        out.append(Configuration(label, s, alg, ov, mesh, node_collective))
  return out


def make_config(cfg: Configuration, *, model, image_size, batch, classes, dtype, conv, bucket_mb):
  """`step_programs.make_config` with the run's model, batch and dtype, and the
  configuration's parallel fields."""
  c = step_programs.make_config(
    model, image_size, batch, cfg.strategy, cfg.collective, conv, classes, overlap=cfg.overlap
  )
  c.model.dtype = dtype
  c.parallel.bucket_mb = bucket_mb
  if cfg.mesh:
    c.parallel.mesh = tuple(cfg.mesh)
  if cfg.node_collective:
    if "node_collective" not in c.parallel:
      raise ValueError("this config has no parallel.node_collective field")
    c.parallel.node_collective = cfg.node_collective
  return c


def device_hosts(mesh) -> list[int]:
  """The host of each of the program's devices: positions in `mesh.devices.flat` (how an
  SPMD program numbers them; deep_image.analysis.cross_host) mapped to `process_index`
  (on the deviceless topology `1xHxD`: device id // D)."""
  return [int(dev.process_index) for dev in mesh.devices.flat]


def model_cross_host(config, hosts: list[int], cluster: str = "h100"):
  """The cost model's `cross_node_bytes` (a `NodeBytes`: mean, max) of `config` on
  len(hosts) devices over the hosts of `hosts`, or None where it models no such step."""
  try:
    return cost_model.cross_node_bytes(config, len(hosts), len(set(hosts)), cluster)
  except ConfigError:  # a setup the cost model does not model (named in its message)
    return None


def compile_one(cfg: Configuration, config, devices, hlo_dir: str | None) -> dict:
  """Lower + compile one configuration (`config`: its `make_config`); its memory, compile
  seconds, async collectives and bytes across hosts (compiled, and the cost model's)."""
  strategy = step_programs.make_strategy(config, devices)
  images, labels = step_programs.abstract_batch(strategy, config)
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
  hosts = device_hosts(strategy.mesh)
  cross = cross_host_bytes(text, hosts)
  return dict(
    cfg=cfg,
    seconds=seconds,
    argument=mem.argument_size_in_bytes,
    temp=mem.temp_size_in_bytes,
    collectives=found,
    summary=overlap_summary(found),
    buckets=len(getattr(strategy, "buckets", ())),
    cross_host=cross,
    model_cross_host=model_cross_host(config, hosts),
  )


def _model_text(node_bytes) -> str:
  """The cost model's 'max / mean' MiB, or '-' where it has none."""
  if node_bytes is None:
    return "-"
  return f"{node_bytes.max / 2**20:,.1f} / {node_bytes.mean / 2**20:,.1f}"


def _pct(part: float, whole: float) -> str:
  return f"{100 * part / whole:.0f}%" if whole else "-"


def report(results: list[dict]) -> str:
  """The markdown tables: one row per configuration, then the collectives with no compute."""
  rows = [
    (
      r["cfg"].label,
      r["buckets"] or "-",
      mib(r["argument"], 0),
      mib(r["temp"], 0),
      r["summary"].kinds_text(),
      f"{100 * r['summary'].fraction:.0f}%",
      f"{100 * r['summary'].bytes_fraction:.0f}%",
      _pct(r["summary"].heavy, r["summary"].count),
      _pct(r["summary"].heavy_bytes, r["summary"].bytes),
      f"{r['summary'].bytes / 2**20:,.1f}",
      f"{r['cross_host'].max / 2**20:,.1f} / {r['cross_host'].mean / 2**20:,.1f}",
      _model_text(r.get("model_cross_host")),
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
      "cross-host MiB / GPU, max / mean",
      "cost model: max / mean",
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


def cross_host_lines(results: list[dict]) -> list[str]:
  """One `cross_host_mib_per_gpu <configuration> <MiB>` line per configuration: MiB per
  step that the device sending the most across hosts sends (deep_image.analysis.cross_host)."""
  return [
    f"cross_host_mib_per_gpu {r['cfg'].token} {r['cross_host'].max / 2**20:.2f}" for r in results
  ]
