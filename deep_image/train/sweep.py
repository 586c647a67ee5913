r"""A sweep: one training run per point of a config file's `sweep_<NAME>`, resumable, summarized.

A sweep is a module-level function of a config file named `sweep_<NAME>`:

  def sweep_strategies(config: ConfigDict) -> list[dict[str, object]]:
    return [{"parallel.strategy": s} for s in ("gspmd", "data", "lazy", "hybrid")]

It gets the config (variants and `--config.x=y` overrides applied, so a sweep can be relative
to it) and returns one dict of overrides per point, keyed by dotted field path. Each point
runs `deep_image.train.train_and_evaluate` in this process, on the config with the point's
overrides on top (they win over the command line's), in `ROOT/<point>`; the point's name
is its overrides, `strategy=lazy` or `train_scale=512,eval_scale=512` (last field name, or
the full path where two would clash; characters outside [A-Za-z0-9._=,+-] become '_').

Resumable: a run that finishes writes `<point>/result.json` = {"step", "split", "top1",
"top5", "images_per_sec"} (the training loop's contract); a point that has it is skipped
("skipping <point>: finished"), any other is (re)started, and the loop resumes it from its
latest checkpoint; a run that returns {'preempted': True} (SIGTERM) stops the sweep, to be
rerun. After every point, finished or skipped, `ROOT/summary.json` (a list,
one entry per point: name, overrides, workdir, status 'finished' | 'pending', and the
result's step, split, top1, top5, images_per_sec, null while pending) and
`ROOT/summary.md` (the same as a table) are rewritten, so a killed sweep leaves a
partial summary.

All points share one process, so the device count is fixed once: a sweep may not change
`parallel.num_devices`, `parallel.num_processes` or `parallel.distributed`.

The command line: `experiments/sweep.py`. `apply_overrides` is also how tests set dotted
fields (`tests/conftest.py:tiny_config`), so a test config is checked like a sweep point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any, Callable

import ml_collections
from absl import logging

from deep_image.config_error import ConfigError
from deep_image.train.result import RESULT_NAME, read_result

RESULT_KEYS = ("step", "split", "top1", "top5", "images_per_sec")
SWEEP_PREFIX = "sweep_"
# Fixed when the first run starts its backend: one process cannot sweep them.
PROCESS_FIELDS = ("parallel.num_devices", "parallel.num_processes", "parallel.distributed")

TrainFn = Callable[[ml_collections.ConfigDict, str], dict]


def load_config_module(config_arg: str):
  """The Python module of `--config=FILE[:variants]` (FILE loaded by path, as config_flags)."""
  path = config_arg.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"--config={config_arg}: no file {path!r}")
  spec = importlib.util.spec_from_file_location("sweep_config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_names(module) -> list[str]:
  """Names of the sweeps `module` defines (its `sweep_<name>` functions)."""
  return sorted(
    name[len(SWEEP_PREFIX) :]
    for name, value in vars(module).items()
    if name.startswith(SWEEP_PREFIX) and callable(value)
  )


def get_sweep(module, name: str) -> Callable[[ml_collections.ConfigDict], list[dict]]:
  """`module.sweep_<name>`; ConfigError naming the sweeps it has when there is none."""
  fn = getattr(module, SWEEP_PREFIX + name, None)
  if not callable(fn):
    raise ConfigError(
      f"--sweep={name!r}: {getattr(module, '__file__', module)} defines sweeps "
      f"{sweep_names(module)}"
    )
  return fn


def _value_text(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "x".join(_value_text(v) for v in value)
  return str(value)


def point_name(overrides: dict[str, object]) -> str:
  """A readable, filesystem-safe name: 'strategy=lazy', 'train_scale=512,eval_scale=512'.

  Each field is named by its last component unless two of the point's fields share it.
  """
  if not overrides:
    return "base"
  last = [key.rsplit(".", 1)[-1] for key in overrides]
  parts = []
  for key, short in zip(overrides, last, strict=True):
    label = short if last.count(short) == 1 else key
    parts.append(f"{label}={_value_text(overrides[key])}")
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, object], point: str = ""
) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` ({'a.b': value}) set.

  Raises:
    ConfigError: a field the config does not have, or a value of the wrong type (naming the
      point, the field and the value).
  """
  out = config.copy_and_resolve_references()
  where = f"sweep point {point!r}: " if point else ""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = out
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"{where}unknown config field {key!r} (no {'.'.join(parents[: i + 1])})")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"{where}unknown config field {key!r}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{where}config field {key}={value!r}: {e}") from e
  return out


def build_points(
  config: ml_collections.ConfigDict, overrides_list: list[dict[str, object]]
) -> list[dict[str, Any]]:
  """[{'name', 'overrides', 'config'}] per point; names unique, fields checked up front."""
  points, seen = [], set()
  if not overrides_list:
    raise ConfigError("the sweep has no points")
  for overrides in overrides_list:
    name = point_name(overrides)
    if name in seen:
      raise ConfigError(f"two sweep points have the same name {name!r}")
    seen.add(name)
    fixed = [k for k in overrides if k in PROCESS_FIELDS]
    if fixed:
      raise ConfigError(f"sweep point {name!r} sets {fixed}: one process cannot sweep these")
    point_config = apply_overrides(config, overrides, name)
    points.append({"name": name, "overrides": dict(overrides), "config": point_config})
  return points


def _entry(point: dict, workdir: str, result: dict | None) -> dict[str, Any]:
  entry = {
    "name": point["name"],
    "overrides": point["overrides"],
    "workdir": workdir,
    "status": "pending" if result is None else "finished",
  }
  entry.update({k: None if result is None else result.get(k) for k in RESULT_KEYS})
  return entry


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def summary_markdown(entries: list[dict], title: str = "") -> str:
  """The summary as a markdown table, one row per point."""

  def num(v, fmt):
    return "" if v is None else format(v, fmt)

  lines = [f"# {title}", ""] if title else []
  lines += [
    "| point | status | step | top-1 | top-5 | images/s | workdir |",
    "|---|---|---:|---:|---:|---:|---|",
  ]
  for e in entries:
    lines.append(
      f"| {e['name']} | {e['status']} | {num(e['step'], 'd')} | {num(e['top1'], '.4f')} | "
      f"{num(e['top5'], '.4f')} | {num(e['images_per_sec'], '.1f')} | {e['workdir']} |"
    )
  return "\n".join(lines) + "\n"


def write_summary(root: str, entries: list[dict], title: str = "") -> None:
  """Writes `root/summary.json` and `root/summary.md` (each replaced atomically)."""
  _write_atomic(os.path.join(root, "summary.json"), json.dumps(entries, indent=2) + "\n")
  _write_atomic(os.path.join(root, "summary.md"), summary_markdown(entries, title))


def run_sweep(
  points: list[dict[str, Any]], root: str, train_fn: TrainFn | None = None, title: str = ""
) -> list[dict[str, Any]]:
  """Runs (or skips, when finished) every point in `root/<name>`; returns the summary entries.

  Args:
    points: from `build_points`.
    root: the sweep's directory.
    train_fn: (config, workdir) -> dict, writing workdir/result.json when it finishes and
      returning {'step', 'preempted': True} when stopped early; default
      `deep_image.train.train_and_evaluate`.
    title: heading of summary.md.

  Raises:
    RuntimeError: a run returned without writing its result.json.
  """
  if train_fn is None:
    from deep_image.train import train_and_evaluate as train_fn
  os.makedirs(root, exist_ok=True)
  workdirs = [os.path.join(root, p["name"]) for p in points]
  # A result counts when the run finished at the point's train.num_steps: with more steps
  # asked for, the point trains on from its last checkpoint.
  results = [
    r if r is not None and r["step"] == p["config"].train.num_steps else None
    for p, r in ((p, read_result(w)) for p, w in zip(points, workdirs, strict=True))
  ]
  # Only process 0 writes the summary (every process of a multi-process run trains).
  import jax

  writer = jax.process_index() == 0

  def summarize():
    if writer:
      entries = [_entry(p, w, r) for p, w, r in zip(points, workdirs, results, strict=True)]
      write_summary(root, entries, title)

  for k, (point, workdir) in enumerate(zip(points, workdirs, strict=True)):
    logging.info("point %d/%d: %s", k + 1, len(points), point["name"])
    if results[k] is not None:
      logging.info("skipping %s: finished", point["name"])
    else:
      returned = train_fn(point["config"], workdir)
      results[k] = read_result(workdir)
      if results[k] is None and returned.get("preempted"):
        # SIGTERM: the loop saved a checkpoint; a rerun of the sweep resumes this point.
        logging.warning("point %s preempted at step %s: stopping", point["name"], returned["step"])
        summarize()
        break
      if results[k] is None:
        raise RuntimeError(
          f"sweep point {point['name']!r}: training returned without writing "
          f"{os.path.join(workdir, RESULT_NAME)}"
        )
    summarize()
  return [_entry(p, w, r) for p, w, r in zip(points, workdirs, results, strict=True)]
