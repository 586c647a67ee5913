"""Host-local batches -> one global `jax.Array` sharded over the mesh's batch axes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows [b_local, ...] -> the global [B, ...] array.

  With one process this is a device_put; with several, each process passes
  its own rows and JAX assembles the global array without moving data between
  hosts. Raises ValueError naming the sizes when the rows do not divide over
  this process's devices.
  """
  devices = len(sharding.addressable_devices)
  if local.shape[0] % devices:
    raise ValueError(
      f"a host batch of {local.shape[0]} examples does not divide over this process's "
      f"{devices} devices (train.batch_size / processes must be a multiple of them)"
    )
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local)
