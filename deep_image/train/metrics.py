"""Metrics of a run: `metrics.jsonl`, TensorBoard event files, a progress line with ETA.

Files in the workdir DIR (written by process 0 only):

| path                                  | content                                             |
| ------------------------------------- | --------------------------------------------------- |
| DIR/metrics.jsonl, train record       | {"step", "loss", "top1", "learning_rate", ...,      |
|                                       | "train_seconds"}: one JSON object a line, keys      |
|                                       | sorted, no "split" key                              |
| DIR/metrics.jsonl, eval record        | {"step", "split", "top1", "top5", maybe "count",    |
|                                       | "protocol" (e.g. "center@36"), "train_seconds"}     |
| DIR/tensorboard/events.out.tfevents.* | TensorBoard scalars, written by tensorboardX (no    |
|                                       | TensorFlow): tag "train/<key>" for each numeric key |
|                                       | of a train record, "<split>/<key>" for an eval      |
|                                       | record (e.g. "validation/top1"); TB step = "step"   |

`train_seconds` (records of the training loop, `deep_image.train.loop`): the run clock,
seconds of training since the run's step 0 up to the record's step, compilation (each
process's first step), evaluation, saving and logging not counted (as images/s), continued
over resumes from the value saved in the restored checkpoint; non-decreasing in step. What
`experiments.time_to_accuracy` reads.

Resuming (`MetricsWriter(DIR, resume_step=k)`, k = the restored checkpoint's step):
metrics.jsonl keeps the records with step <= k and drops the rest (rewritten atomically),
so a run killed after step k and resumed holds each step exactly once. TensorBoard files
are append-only, so a new event file is started with a `SessionLog.START` event at step
k + 1 (tensorboardX's `purge_step`): TensorBoard's Python reader (`EventAccumulator`) then
drops every point of earlier files with step > k, whatever its tag. (TensorBoard's Rust
data server ignores `SessionLog`; it drops a tag's points with step >= s when the tag goes
back to step s, i.e. as soon as the resumed run logs that tag again.) A fresh run (k = 0)
empties metrics.jsonl and deletes the old event files.

Read the file back with `read_metrics(DIR)`; `python -m experiments.plot` plots it.
The other files of a workdir: `deep_image.train.workdir`.
"""

from __future__ import annotations

import glob
import json
import numbers
import os
import time

import jax
import numpy as np
from absl import logging

from deep_image.train.workdir import METRICS_FILE, TENSORBOARD_DIR, raising_out_of_space

_EVENT_FILE_GLOB = "events.out.tfevents.*"


def _parse_lines(path: str) -> list[tuple[str, dict]]:
  """(line, record) for each non-empty line of a metrics.jsonl file.

  A torn LAST line (the process was killed mid-write) is skipped with a warning; an
  unparsable line anywhere else raises ValueError naming the file and line number.
  """
  with open(path) as f:
    lines = [(i, line.rstrip("\n")) for i, line in enumerate(f, start=1) if line.strip()]
  parsed = []
  for k, (number, line) in enumerate(lines):
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or "step" not in record:
        raise ValueError("not a JSON object with a 'step' key")
    except ValueError as e:
      if k == len(lines) - 1:
        logging.warning("%s:%d: skipping a torn last line (%s): %.80r", path, number, e, line)
        break
      raise ValueError(f"{path}:{number}: unparsable metrics record ({e}): {line[:80]!r}") from e
    parsed.append((line, record))
  return parsed


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train_records, eval_records) of DIR/metrics.jsonl, each in file order.

  Eval records are those with a "split" key. Raises FileNotFoundError naming the path
  when the workdir has no metrics.jsonl.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {METRICS_FILE} in workdir {workdir!r} (looked for {path})")
  records = [record for _, record in _parse_lines(path)]
  return [r for r in records if "split" not in r], [r for r in records if "split" in r]


def _json_value(value):
  """json.dumps fallback: numpy / JAX scalars become Python numbers."""
  array = np.asarray(value)
  if array.ndim == 0 and array.dtype.kind in "biuf":
    return array.item()
  raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serializable")


def _scalar(value) -> float | None:
  """`value` as a float for TensorBoard, or None for non-numeric values (strings, bools)."""
  if isinstance(value, bool | np.bool_ | str):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  array = np.asarray(value)
  if array.ndim == 0 and array.dtype.kind in "iuf":
    return float(array)
  return None


class MetricsWriter:
  """Writes train / eval records to DIR/metrics.jsonl and DIR/tensorboard (module docstring).

  Only process 0 writes; on other processes every method is a no-op. Each record is
  flushed to metrics.jsonl when written, so a SIGKILL loses at most a torn last line
  (which `read_metrics` skips). TensorBoard events are written by tensorboardX's
  background thread and reach the disk within `tb_flush_secs`, and at `close()`.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tb_flush_secs: int = 10):
    if resume_step < 0:
      raise ValueError(f"resume_step must be >= 0, got {resume_step}")
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self.enabled = jax.process_index() == 0
    self._file = self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.tb_dir, exist_ok=True)
    self._truncate_jsonl(resume_step)
    self._file = open(self.path, "a")
    old_event_files = sorted(glob.glob(os.path.join(self.tb_dir, _EVENT_FILE_GLOB)))
    if resume_step == 0:
      for old in old_event_files:
        os.remove(old)
      old_event_files = []
    # Imported here so that importing this module (e.g. for read_metrics) needs no
    # tensorboardX. The suffix keeps file names unique and in creation order: tensorboardX
    # names files by the second, and a second file in the same second would overwrite the
    # first one.
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(
      self.tb_dir,
      purge_step=resume_step + 1 if resume_step else None,
      flush_secs=tb_flush_secs,
      filename_suffix=f".{len(old_event_files):04d}",
    )

  def _truncate_jsonl(self, resume_step: int) -> None:
    """Keeps the records with step <= resume_step; write-then-rename, so never half done."""
    kept = []
    if resume_step and os.path.exists(self.path):
      kept = [line for line, record in _parse_lines(self.path) if record["step"] <= resume_step]
    tmp = f"{self.path}.tmp{os.getpid()}"
    with raising_out_of_space(self.path, "the metrics"):
      with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in kept)
      os.replace(tmp, self.path)

  def _write(self, step: int, record: dict, prefix: str) -> None:
    with raising_out_of_space(self.path, "the metrics"):
      self._file.write(json.dumps({"step": step, **record}, sort_keys=True, default=_json_value))
      self._file.write("\n")
      self._file.flush()
    for key, value in record.items():
      value = _scalar(value)
      if value is not None:
        self._tb.add_scalar(f"{prefix}/{key}", value, global_step=step)

  def write_train(self, step: int, record: dict) -> None:
    """Logs a train record (loss, top1, learning_rate, images_per_sec, norms, ...) at `step`."""
    if "split" in record:
      raise ValueError(f"a train record has no 'split' key (use write_eval): {record}")
    if self.enabled:
      self._write(step, record, "train")

  def write_eval(self, step: int, record: dict) -> None:
    """Logs an eval record {"split", "top1", "top5", ...} at `step`; TB tags "<split>/<key>"."""
    if not isinstance(record.get("split"), str):
      raise ValueError(f"an eval record needs a 'split' string (e.g. 'validation'): {record}")
    if self.enabled:
      self._write(step, record, record["split"])

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both files (drains tensorboardX's queue); idempotent."""
    if self._file is not None:
      self._file.close()
      self._tb.close()
      self._file = self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_duration(seconds: float) -> str:
  """`m:ss`, or `h:mm:ss` from one hour on."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Logs `step k/n (p%) loss ... images_per_sec ... | elapsed | ETA` from the recent step rate."""

  def __init__(self, total_steps: int, first_step: int = 0):
    self.total, self.first = total_steps, first_step
    self.start = time.perf_counter()

  def log(self, step: int, steps_per_sec: float, fields: dict) -> None:
    elapsed = time.perf_counter() - self.start
    remaining = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    shown = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
    logging.info(
      "step %d/%d (%.0f%%) %s | elapsed %s | ETA %s",
      step,
      self.total,
      100.0 * step / self.total,
      shown,
      format_duration(elapsed),
      format_duration(remaining) if remaining == remaining else "?",
    )
