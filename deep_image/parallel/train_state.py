"""The train state carried from step to step."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, replicated.
    params: the parameter tree in the strategy's *stored* layout (full arrays
      for `gspmd`/`data`, flat 1/N shards for `lazy`, see
      `deep_image.parallel.layouts`).
    opt_state: optax state, laid out like `params`.
  """

  step: jax.Array
  params: Any
  opt_state: Any
