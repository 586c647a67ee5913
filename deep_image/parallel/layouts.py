"""How one parameter is stored across the devices of a mesh axis of size N.

Three layouts cover the strategies of the paper:

* `REPLICATED`: the full array on every device (data parallelism). Its
  gradient is a per-device partial sum that the strategy reduce-scatters and
  all-gathers (per bucket).
* `LAZY`: the array is flattened, zero-padded to N*c and device r stores
  elements [r*c, (r+1)*c). Stored as a global [N*c] array sharded P(axis).
  Inside the step the full weight is all-gathered just before use, with the
  other weights of its bucket, and backward reduce-scatters the bucket's
  gradient, so each device receives exactly the gradient of its own shard (the
  lazy update; `deep_image.parallel.buckets`). The zero padding stays zero:
  its gradient is zero and every optimizer transformation is elementwise.
* `split(dim)`: the full-shape array sharded along `dim` over the axis
  (tensor-parallel FC weights of the hybrid strategy). Device r stores the
  r-th 1/N slice and uses it as is.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deep_image.parallel import collectives


@dataclasses.dataclass(frozen=True)
class Layout:
  kind: str  # 'replicated' | 'lazy' | 'split'
  dim: int | None = None  # the split dimension, for 'split'


REPLICATED = Layout("replicated")
LAZY = Layout("lazy")


def split(dim: int) -> Layout:
  return Layout("split", dim)


def stored_spec(layout: Layout, ndim: int, axis: str) -> P:
  """PartitionSpec of the stored global array."""
  if layout.kind == "replicated":
    return P()
  if layout.kind == "lazy":
    return P(axis)
  return P(*[axis if i == layout.dim else None for i in range(ndim)])


def stored_shape(layout: Layout, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
  """Shape of the stored global array for a parameter of `shape`."""
  if layout.kind == "lazy":
    return (collectives.padded_size(math.prod(shape), n),)
  return tuple(shape)


def to_stored(full: jax.Array, layout: Layout, n: int) -> jax.Array:
  """Full parameter -> stored global array (jit-able; set out_shardings to place it)."""
  if layout.kind != "lazy":
    return full
  flat = full.reshape(-1)
  return jnp.pad(flat, (0, collectives.padded_size(flat.size, n) - flat.size))


def to_full(stored: jax.Array, layout: Layout, shape: tuple[int, ...]) -> jax.Array:
  """Stored global array -> full parameter of `shape` (inverse of `to_stored`)."""
  if layout.kind != "lazy":
    return stored
  return stored[: math.prod(shape)].reshape(shape)
