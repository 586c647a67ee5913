"""Timing several programs against each other on a shared machine: round-robin rounds.

Every program is warmed up first, then timed one call each per round with the starting
point rotated, so that noise from other processes hits all of them alike; ratios are of
medians, or ("paired") the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def time_round_robin(runners: dict[str, Callable[[], None]], repeats: int, warmup: int = 2):
  """{name: [seconds per call]}: `warmup` untimed calls each, then `repeats` rounds.

  Each round calls every runner once, starting one further along than the last
  round, so slow spells on a shared machine spread over all programs alike.
  """
  names = list(runners)
  for name in names:
    for _ in range(warmup):
      runners[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    for i in range(len(names)):
      name = names[(r + i) % len(names)]
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
  return times


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
  """Median over rounds of times[r] / base[r]: robust to noise that spans a round."""
  return statistics.median([t / b for t, b in zip(times, base, strict=True)])
