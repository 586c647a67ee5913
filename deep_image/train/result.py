"""`WORKDIR/result.json`: the final evaluation of a finished run.

Written last by the training loop (atomically, by process 0): its presence,
with `step == train.num_steps`, is what makes a run finished for a rerun of
the same command and for `experiments.sweep`. Fields: step, split, top1,
top5, count, images_per_sec (median of the logged windows).
"""

from __future__ import annotations

import json
import os

RESULT_NAME = "result.json"


def read_result(workdir: str) -> dict | None:
  """The result of the run in `workdir`, or None while it has not finished."""
  path = os.path.join(workdir, RESULT_NAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_result(workdir: str, result: dict) -> str:
  """Write `result` atomically (a reader never sees half a file); returns the path."""
  path = os.path.join(workdir, RESULT_NAME)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path
