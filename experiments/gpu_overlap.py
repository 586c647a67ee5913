"""What `experiments.compile_gpu` compiles and reports: the configurations (strategy x
collective x overlap), one deviceless compile's memory and async collectives
(`deep_image.analysis.overlap`), and the markdown tables."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Sequence

from deep_image.analysis.overlap import async_collectives, overlap_summary
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


def make_config(cfg: Configuration, *, model, image_size, batch, classes, dtype, conv, bucket_mb):
  """`step_programs.make_config` with the run's model, batch and dtype, and the
  configuration's parallel fields."""
  c = step_programs.make_config(
    model, image_size, batch, cfg.strategy, cfg.collective, conv, classes, overlap=cfg.overlap
  )
  c.model.dtype = dtype
  c.parallel.bucket_mb = bucket_mb
  return c


def compile_one(cfg: Configuration, config, devices, hlo_dir: str | None) -> dict:
  """Lower + compile one configuration (`config`: its `make_config`); its memory, compile
  seconds and async collectives."""
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
