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

The step ends when its last task ends (a step is one XLA program).
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


def simulate(tasks: list[Task]) -> float:
  """End of the last task: compute in list order, the network by readiness and priority."""
  end: dict[str, float] = {}
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
      end[task.name] = compute_free = c_start + task.seconds
      ci += 1
    else:
      task = best[1]
      end[task.name] = net_free = n_start + task.seconds
      pending.remove(task)
  return max(end.values(), default=0.0)
