"""`WORKDIR/config.json`: the config a run was started with, readable without JAX.

Written (atomically, by process 0) when a run starts or resumes, once every check has
passed (`deep_image.train.workdir` lists every file of a workdir), so tools that only have
the workdir (`experiments.evaluate`, `ensemble`, `predict`) rebuild the same model and
data before JAX starts, e.g. to simulate the run's device count on a CPU. JSON turns
tuples into lists; the code that reads configs accepts both.
"""

from __future__ import annotations

import json
import os

import ml_collections

from deep_image.config_error import ConfigError
from deep_image.train.workdir import CONFIG_NAME, raising_out_of_space


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Write `config` as WORKDIR/config.json (a reader never sees half a file); the path.

  Raises:
    OutOfSpace: the disk is full (the previous config.json, if any, is left as it was).
  """
  path = os.path.join(workdir, CONFIG_NAME)
  try:
    with raising_out_of_space(path, "the run's config"):
      with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
      os.replace(path + ".tmp", path)
  except BaseException:
    if os.path.exists(path + ".tmp"):
      os.remove(path + ".tmp")
    raise
  return path


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`.

  Raises:
    ConfigError: `workdir` holds no config.json (not a run directory).
  """
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    raise ConfigError(
      f"{path} does not exist: {workdir!r} is not the --workdir of an experiments.train run"
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
