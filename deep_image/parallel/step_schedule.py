"""The schedule of one simulated step: a compute stream and a network, tasks with dependencies.

`cost_model` appends a step's tasks in program order; `simulate` runs them on two
resources per device:

=========  ==================================================================
resource   order
=========  ==================================================================
compute    the compute tasks in list order (one XLA stream), each once its
           dependencies have ended
network    one collective at a time: of those ready when the network frees up,
           the critical ones first (priority 0: activation collectives), then
           the first ready, then list order
=========  ==================================================================

The step ends when its last task ends (a step is one XLA program). What is
exposed is charged to the collectives that cause it: every interval in which
the compute stream waits (for a collective it depends on, or, after its last
task, for the step's last collective) is charged to the collectives the network
runs during it, by overlap, and what remains to the one waited for; so the
charges add up to the step time less the compute time.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Task:
  """A compute or network task of one device."""

  name: str
  comm: bool
  seconds: float
  deps: tuple[str, ...]
  priority: int = 1  # comm: 0 before 1 (critical-path activations first)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A simulated step: when it ends, and the exposed seconds charged to each collective."""

  end: float
  exposed: dict[str, float]


def simulate(tasks: list[Task]) -> Schedule:
  """Compute in list order, the network by readiness and priority (module table)."""
  end: dict[str, float] = {}
  comm = {t.name for t in tasks if t.comm}
  waits: list[tuple[float, float, str]] = []  # (from, to, the collective waited for)
  runs: list[tuple[float, float, str]] = []  # the network's (start, end, collective)
  compute = [t for t in tasks if not t.comm]
  pending = [t for t in tasks if t.comm]
  ci, compute_free, net_free = 0, 0.0, 0.0
  while ci < len(compute) or pending:
    c_start = math.inf
    if ci < len(compute) and all(d in end for d in compute[ci].deps):
      c_start = max([compute_free] + [end[d] for d in compute[ci].deps])
    best, n_start = None, math.inf
    for order, t in enumerate(pending):
      if not all(d in end for d in t.deps):
        continue
      ready = max([0.0] + [end[d] for d in t.deps])
      # Among collectives ready when the network frees up, the critical ones first.
      key = (max(ready, net_free), t.priority if ready <= net_free else 2, order)
      if best is None or key < best[0]:
        best = (key, t)
    if best is not None:
      n_start = best[0][0]
    if c_start == math.inf and n_start == math.inf:
      raise RuntimeError("cost model schedule has a cycle")  # a bug here, not a config
    if c_start <= n_start:
      task = compute[ci]
      if c_start > compute_free:  # the compute stream waited for a collective
        gate = max(task.deps, key=end.__getitem__)
        if gate in comm:
          waits.append((compute_free, c_start, gate))
      end[task.name] = compute_free = c_start + task.seconds
      ci += 1
    else:
      task = best[1]
      end[task.name] = net_free = n_start + task.seconds
      runs.append((n_start, net_free, task.name))
      pending.remove(task)
  last = max(end, key=end.__getitem__, default=None)
  if last is not None and end[last] > compute_free and last in comm:
    waits.append((compute_free, end[last], last))
  exposed: dict[str, float] = {}
  for a, b, gate in waits:
    charged = 0.0
    for start, stop, name in runs:
      overlap = min(b, stop) - max(a, start)
      if overlap > 0:
        exposed[name] = exposed.get(name, 0.0) + overlap
        charged += overlap
    if b - a > charged:
      exposed[gate] = exposed.get(gate, 0.0) + (b - a - charged)
  return Schedule(max(end.values(), default=0.0), exposed)
