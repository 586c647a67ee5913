"""`WORKDIR/result.json`: the final evaluation of a finished run.

Written last by the training loop (atomically, by process 0): its presence,
with `step == train.num_steps`, is what makes a run finished for a rerun of
the same command and for `experiments.sweep`. Fields: step, split, top1,
top5, count, images_per_sec (median of the logged windows). The other files of a
workdir: `deep_image.train.workdir`.
"""

from __future__ import annotations

import json
import os

from deep_image.train.workdir import RESULT_NAME, raising_out_of_space


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
  with raising_out_of_space(path, "the final result"):
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
  return path
