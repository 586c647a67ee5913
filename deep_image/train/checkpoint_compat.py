"""Whether a checkpoint can restore into a config: the fields that must agree.

A checkpoint's meta holds the config it was written with (`Checkpointer.save`);
`check_compatible` compares the fields that fix the saved state's shapes and meaning
(`RESUME_FIELDS`) and names the first that differs. Every other field (strategy,
devices, data, schedule) may change between a run and its resume.
"""

from __future__ import annotations

import json
from typing import Any

from deep_image.config_error import ConfigError

# Fields that fix the shapes and the meaning of the saved state: a checkpoint
# restores only into a config that agrees on all of them.
RESUME_FIELDS = (
  "model.name",
  "model.num_classes",
  "model.image_size",
  "model.in_channels",
  "train.momentum",
  "train.weight_decay",
)


class IncompatibleCheckpoint(ConfigError):
  """A checkpoint that cannot restore into the current config (names the field)."""


def _field(config_dict: dict, dotted: str) -> Any:
  value = config_dict
  for name in dotted.split("."):
    if not isinstance(value, dict) or name not in value:
      return None
    value = value[name]
  return value


def check_compatible(saved_config: dict, config, where: str) -> None:
  """Raise IncompatibleCheckpoint naming the first RESUME_FIELDS entry that differs."""
  current = json.loads(config.to_json_best_effort())
  for dotted in RESUME_FIELDS:
    was, now = _field(saved_config, dotted), _field(current, dotted)
    if was != now:
      raise IncompatibleCheckpoint(
        f"{where} was written with {dotted}={was!r}, but the config says {dotted}={now!r}; "
        f"the model and optimizer fields ({', '.join(RESUME_FIELDS)}) must match to restore "
        "(use another --workdir for a new run)"
      )
