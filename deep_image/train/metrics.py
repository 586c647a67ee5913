"""`metrics.jsonl` writer and a progress line with ETA."""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging


class MetricsWriter:
  """Appends one JSON object per line to DIR/metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


def format_duration(seconds: float) -> str:
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
