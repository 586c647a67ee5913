"""Hand-written reduce-scatter / all-gather, used inside `jax.shard_map`.

The paper's *butterfly synchronization* (section 3.1): gradients are cut into
N parts, device k receives part k from all others and sums it (reduce-scatter),
then sends the sum back to everyone (all-gather). Each function here takes a
per-device array `x` and the name of a mesh axis of size N and has the
semantics of the `lax` builtin named in its docstring:

* `reduce_scatter(x, axis)`  == `lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True)`:
  x [N*c, ...] on every device -> the sum over devices of chunk r, [c, ...], on device r.
* `all_gather(x, axis)`      == `lax.all_gather(x, axis, axis=0, tiled=True)`:
  x [c, ...] on device r -> [N*c, ...], chunk r from device r, on every device.

Algorithms (each device's traffic is for the whole of one call):

=========  =======================================  =========  ==================
algorithm  how                                      rounds     sent per device
=========  =======================================  =========  ==================
butterfly  recursive halving (reduce-scatter) /     log2 N     (N-1)/N of buffer
           doubling (all-gather) with partner r^d
ring       pass chunks to r+1, accumulate           N-1        (N-1)/N of buffer
direct     device k receives part k from everyone   N-1        (N-1)/N of buffer
           (the paper's wording); one shift a round
xla        the lax builtins: XLA's own choice       -          -
=========  =======================================  =========  ==================

An all-reduce is a reduce-scatter followed by an all-gather, so each device
sends 2(N-1)/N of the buffer: the bandwidth optimum.

Butterfly needs a power-of-two N; on any other N it falls back to `ring`
(logged once), so a config that names butterfly still runs on, say, 6 devices.

`all_gather_with_scatter_grad` / `reduce_scatter_with_gather_grad` pair the
two with `jax.custom_vjp` so that autodiff runs *our* collective in backward:
the transpose of an all-gather is a reduce-scatter, and vice versa. The hybrid
FC block moves activations with them; parameters and their gradients move in
buckets (`deep_image.parallel.buckets`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from deep_image.config_error import ConfigError

ALGORITHMS = ("butterfly", "ring", "direct", "xla")


def _check_algorithm(algorithm: str) -> None:
  if algorithm not in ALGORITHMS:
    raise ConfigError(
      f"parallel.collective={algorithm!r} is not a known algorithm; choose from {ALGORITHMS}"
    )


def _is_power_of_two(n: int) -> bool:
  return n & (n - 1) == 0


@functools.cache
def _warn_butterfly_fallback(n: int) -> None:
  logging.warning("butterfly needs a power-of-two device count; using ring on %d devices", n)


def resolve_algorithm(algorithm: str, n: int) -> str:
  """The algorithm that actually runs on `n` devices (butterfly -> ring off powers of two)."""
  _check_algorithm(algorithm)
  if algorithm == "butterfly" and not _is_power_of_two(n):
    _warn_butterfly_fallback(n)
    return "ring"
  return algorithm


def _chunk(x: jax.Array, index, size: int) -> jax.Array:
  """x[index*size : (index+1)*size] along axis 0, with a traced index."""
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=0)


def _shift_pairs(n: int, shift: int) -> list[tuple[int, int]]:
  return [(j, (j + shift) % n) for j in range(n)]


def reduce_scatter(x: jax.Array, axis_name: str, *, algorithm: str = "butterfly") -> jax.Array:
  """Sum over devices, keep chunk r on device r. [N*c, ...] -> [c, ...].

  Same result as `lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)`.
  Raises ValueError when x.shape[0] does not divide by N.
  """
  n = lax.axis_size(axis_name)
  algorithm = resolve_algorithm(algorithm, n)
  if x.shape[0] % n:
    raise ValueError(
      f"reduce_scatter: leading dimension {x.shape[0]} of shape {x.shape} does not divide "
      f"over the {n} devices of mesh axis {axis_name!r}"
    )
  if n == 1:
    return x
  if algorithm == "xla":
    return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)
  c = x.shape[0] // n
  rank = lax.axis_index(axis_name)
  if algorithm == "butterfly":
    # Recursive halving: in the round with distance d the buffer covers 2d
    # chunks; the device whose bit d is set keeps the upper half and sends the
    # lower half to its partner r ^ d, which does the opposite. After log2 N
    # rounds the buffer is chunk r summed over all devices.
    buf = x
    d = n // 2
    while d >= 1:
      half = d * c
      upper = (rank // d) % 2
      keep = _chunk(buf, upper, half)
      send = _chunk(buf, 1 - upper, half)
      buf = keep + lax.ppermute(send, axis_name, [(j, j ^ d) for j in range(n)])
      d //= 2
    return buf
  if algorithm == "ring":
    # Step s: send the running sum of chunk (r - s - 1) to r + 1; receive the
    # running sum of chunk (r - s - 2) from r - 1 and add our own part of it.
    # After N - 1 steps device r holds the full sum of chunk r.
    acc = _chunk(x, (rank - 1) % n, c)
    for s in range(n - 1):
      acc = lax.ppermute(acc, axis_name, _shift_pairs(n, 1)) + _chunk(x, (rank - s - 2) % n, c)
    return acc
  # direct: in round s every device j sends its part (j + s) to device j + s,
  # so device r receives its part r from device r - s; N - 1 rounds.
  acc = _chunk(x, rank, c)
  for s in range(1, n):
    acc = acc + lax.ppermute(_chunk(x, (rank + s) % n, c), axis_name, _shift_pairs(n, s))
  return acc


def all_gather(x: jax.Array, axis_name: str, *, algorithm: str = "butterfly") -> jax.Array:
  """Concatenate every device's chunk in device order. [c, ...] -> [N*c, ...].

  Same result as `lax.all_gather(x, axis_name, axis=0, tiled=True)`.
  """
  n = lax.axis_size(axis_name)
  algorithm = resolve_algorithm(algorithm, n)
  if n == 1:
    return x
  if algorithm == "xla":
    return lax.all_gather(x, axis_name, axis=0, tiled=True)
  rank = lax.axis_index(axis_name)
  if algorithm == "butterfly":
    # Recursive doubling: after the round with distance d the buffer holds the
    # 2d chunks of the aligned block containing r, in order.
    buf = x
    d = 1
    while d < n:
      other = lax.ppermute(buf, axis_name, [(j, j ^ d) for j in range(n)])
      upper = ((rank // d) % 2).astype(bool)
      buf = jnp.where(upper, jnp.concatenate([other, buf]), jnp.concatenate([buf, other]))
      d *= 2
    return buf
  c = x.shape[0]
  out = jnp.zeros((n * c,) + x.shape[1:], x.dtype)
  out = lax.dynamic_update_slice_in_dim(out, x, rank * c, axis=0)
  if algorithm == "ring":
    # Step s: forward the chunk received last step to r + 1; what arrives is
    # chunk (r - s - 1).
    moving = x
    for s in range(n - 1):
      moving = lax.ppermute(moving, axis_name, _shift_pairs(n, 1))
      out = lax.dynamic_update_slice_in_dim(out, moving, ((rank - s - 1) % n) * c, axis=0)
    return out
  # direct: in round s every device sends its own chunk to device j + s.
  for s in range(1, n):
    got = lax.ppermute(x, axis_name, _shift_pairs(n, s))
    out = lax.dynamic_update_slice_in_dim(out, got, ((rank - s) % n) * c, axis=0)
  return out


def padded_size(size: int, n: int) -> int:
  """Smallest multiple of n that is >= size."""
  return -(-size // n) * n


def all_reduce(x: jax.Array, axis_name: str, *, algorithm: str = "butterfly") -> jax.Array:
  """Sum over devices of an array of any shape: reduce-scatter then all-gather.

  The array is flattened and zero-padded to a multiple of N, so every device
  owns one equal part (the paper's "partitioned into K parts").
  """
  n = lax.axis_size(axis_name)
  flat = x.reshape(-1)
  flat = jnp.pad(flat, (0, padded_size(flat.size, n) - flat.size))
  part = reduce_scatter(flat, axis_name, algorithm=algorithm)
  return all_gather(part, axis_name, algorithm=algorithm)[: x.size].reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def all_gather_with_scatter_grad(shard: jax.Array, axis_name: str, algorithm: str) -> jax.Array:
  """All-gather whose backward is the reduce-scatter. [c, ...] -> [N*c, ...].

  Forward: every device's rows are gathered (e.g. the local batch's features
  before a tensor-parallel layer). Backward: each device's full-size cotangent
  is summed over devices and scattered, so each device receives the gradient
  of exactly the rows it contributed.
  """
  return all_gather(shard, axis_name, algorithm=algorithm)


def _gather_fwd(shard, axis_name, algorithm):
  return all_gather(shard, axis_name, algorithm=algorithm), None


def _gather_bwd(axis_name, algorithm, _, cotangent):
  return (reduce_scatter(cotangent, axis_name, algorithm=algorithm),)


all_gather_with_scatter_grad.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reduce_scatter_with_gather_grad(x: jax.Array, axis_name: str, algorithm: str) -> jax.Array:
  """Reduce-scatter whose backward is the all-gather. [N*c, ...] -> [c, ...].

  Used where each device holds partial sums of a full-batch activation (FC2
  with input rows split): the sum is scattered back to batch shards.
  """
  return reduce_scatter(x, axis_name, algorithm=algorithm)


def _scatter_fwd(x, axis_name, algorithm):
  return reduce_scatter(x, axis_name, algorithm=algorithm), None


def _scatter_bwd(axis_name, algorithm, _, cotangent):
  return (all_gather(cotangent, axis_name, algorithm=algorithm),)


reduce_scatter_with_gather_grad.defvjp(_scatter_fwd, _scatter_bwd)
