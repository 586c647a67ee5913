"""The train state carried from step to step."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class PendingUpdate:
  """Synchronized gradients whose update the next step applies (`parallel.overlap='deferred'`).

  Attributes:
    grads: a tree like the params: each leaf's gradient of the mean loss,
      summed over devices, as this device's part (`ShardMapStrategy.pending_layouts`:
      replicated parameters as LAZY 1/N chunks, lazy ones as their shards,
      split ones as their slices): 1/N of the parameters per device.
    valid: bool scalar, replicated: False before the first step (nothing to apply).
  """

  grads: Any
  valid: jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, replicated: steps whose gradients have been computed.
    params: the parameter tree in the strategy's *stored* layout (full arrays
      for `gspmd`/`data`, flat 1/N shards for `lazy`, see
      `deep_image.parallel.layouts`).
    opt_state: optax state, laid out like `params`.
    pending: None, or with `parallel.overlap='deferred'` the last step's
      `PendingUpdate`: the weights after `step` steps are `params` updated with
      it (`Strategy.full_params` applies it; the next step applies it just
      before each bucket's first use).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  pending: PendingUpdate | None = None
