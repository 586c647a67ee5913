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

=========  =======================================  ============  ==================
algorithm  how                                      rounds        sent per device
=========  =======================================  ============  ==================
butterfly  recursive halving (reduce-scatter) /     ceil(log2 N)  (N-1)/N of buffer
           doubling (all-gather), any N; below
ring       pass chunks to r+1, accumulate           N-1           (N-1)/N of buffer
direct     device k receives part k from everyone   N-1           (N-1)/N of buffer
           (the paper's wording); one shift a round
xla        the lax builtins: XLA's own choice       -             -
=========  =======================================  ============  ==================

An all-reduce is a reduce-scatter followed by an all-gather, so each device
sends 2(N-1)/N of the buffer: the bandwidth optimum.

Butterfly on any N. Write N = 2^a m with m odd and c = buffer / N (one chunk).
The reduce-scatter runs `butterfly_rounds(N)`, every device sending one message
of the same size in each round:

=============  ==============================  =========================  ===========
rounds         partner of device r             message (per device)       phase
=============  ==============================  =========================  ===========
k = 0..a-1     r XOR 2^k (both ways)           N / 2^(k+1) chunks         halving
j = 0..b-1     sends to r + 2^j 2^a,           floor(L_j / 2) chunks,     odd factor
(b = ceil(     receives from r - 2^j 2^a       L_0 = m,
log2 m))       (mod N)                         L_(j+1) = ceil(L_j / 2)
total          a + b = ceil(log2 N) rounds     N - 1 chunks = (N-1)/N of the buffer
=============  ==============================  =========================  ===========

The all-gather runs the same rounds in reverse order, the shifts reversed
(r sends to r - 2^j 2^a), with the same messages: the same total. Examples
(chunks per round, in reduce-scatter order): N=8: 4 2 1; N=6: 3 | 1 1;
N=12: 6 3 | 1 1; N=5: | 2 1 1; N=7: | 3 2 1; N=144: 72 36 18 9 | 4 2 1 1.
Both phases are bandwidth optimal and take exactly ceil(log2 N) rounds, so no
device count needs a fold-in round (Rabenseifner's) or a fallback.

The halving phase splits the buffer by the low bits of the chunk index (round k
keeps the chunks whose bit k is the device's bit k), so after it device r holds
the m chunks r mod 2^a + 2^a i, i = 0..m-1, and chunk r lands on device r with
no final permutation. It starts at distance 1 with half the buffer: ranks are
node-major (consecutive ids share a node), so the largest exchanges take the
nearest, fastest links and only the small late ones cross nodes. The odd phase
is a distance-doubling (Bruck-style) reduce-scatter among the m devices of
stride 2^a: offsets relative to the device's own chunk are static, so each
round sends the odd offsets (half the remaining ones) one step on.

Levels. Given a tuple of mesh axes, outer first, e.g. ('node', 'local') with
sizes Nn x L, a collective runs level by level over the node-major rank
r = node L + local, with one algorithm per level (or one for all):

==============  =====================================  ===============================
collective      order                                  sent per device
==============  =====================================  ===============================
reduce-scatter  over local on the whole buffer S,      (L-1)/L S inside the node, then
                then over node on its S / L            (Nn-1)/Nn S/L across nodes
all-gather      over node on S / L, then over local    the same, reversed
==============  =====================================  ===============================

Device (n, l) exchanges across nodes only with (n', l): every device of a node
sends its own 1/L of the buffer over its own link at once (one NIC per GPU).
The result is the flat collective's over N = Nn L ranks, so 1/N layouts
(`layouts.LAZY`) are the same arrays on a one- or two-axis mesh.

`all_gather_with_scatter_grad` / `reduce_scatter_with_gather_grad` pair the
two with `jax.custom_vjp` so that autodiff runs *our* collective in backward:
the transpose of an all-gather is a reduce-scatter, and vice versa. The hybrid
FC block moves activations with them; parameters and their gradients move in
buckets (`deep_image.parallel.buckets`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from deep_image.config_error import ConfigError

ALGORITHMS = ("butterfly", "ring", "direct", "xla")

# A mesh axis, or a tuple of axes outer first (`Levels`); an algorithm, or one per level.
Axes = str | tuple[str, ...]
Algorithms = str | Sequence[str]


def check_algorithm(algorithm: str, field: str = "parallel.collective") -> None:
  """ConfigError naming `field` unless `algorithm` is one of ALGORITHMS (all run on any N)."""
  if algorithm not in ALGORITHMS:
    raise ConfigError(f"{field}={algorithm!r} is not a known algorithm; choose from {ALGORITHMS}")


def _two_adic(n: int) -> tuple[int, int]:
  """(2^a, m) with n = 2^a m and m odd."""
  power = n & -n
  return power, n // power


@dataclasses.dataclass(frozen=True)
class ButterflyRound:
  """One round of the butterfly: every device sends `chunks` chunks to one partner.

  how: 'xor' (partner r ^ distance, both ways) or 'shift' (device r sends to
  (r + distance) mod N; distance < 0 in the all-gather).
  """

  how: str
  distance: int
  chunks: int


def butterfly_rounds(n: int, kind: str = "reduce_scatter") -> tuple[ButterflyRound, ...]:
  """The rounds of a butterfly reduce-scatter or all-gather on n devices (module table)."""
  if kind not in ("reduce_scatter", "all_gather"):
    raise ValueError(f"kind={kind!r} must be 'reduce_scatter' or 'all_gather'")
  power, m = _two_adic(n)
  rounds = [ButterflyRound("xor", d, n // (2 * d)) for d in _powers_below(power)]
  length, step = m, power
  while length > 1:
    rounds.append(ButterflyRound("shift", step, length // 2))
    length, step = (length + 1) // 2, 2 * step
  if kind == "reduce_scatter":
    return tuple(rounds)
  # The all-gather: the same rounds backwards, each shift sending the other way.
  back = [dataclasses.replace(r, distance=-r.distance) if r.how == "shift" else r for r in rounds]
  return tuple(reversed(back))


def _powers_below(power: int) -> list[int]:
  """1, 2, 4, ... < power."""
  return [1 << k for k in range(power.bit_length() - 1)]


def _chunk(x: jax.Array, index, size: int) -> jax.Array:
  """x[index*size : (index+1)*size] along axis 0, with a traced index."""
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=0)


def _shift_pairs(n: int, shift: int) -> list[tuple[int, int]]:
  return [(j, (j + shift) % n) for j in range(n)]


def _xor_pairs(n: int, d: int) -> list[tuple[int, int]]:
  return [(j, j ^ d) for j in range(n)]


def _rotate(blocks: jax.Array, start) -> jax.Array:
  """blocks[(start + t) mod M] for t = 0..M-1 along axis 0, with a traced start."""
  m = blocks.shape[0]
  return lax.dynamic_slice_in_dim(jnp.concatenate([blocks, blocks]), start, m, axis=0)


def _butterfly_reduce_scatter(x: jax.Array, axis_name: str, n: int) -> jax.Array:
  """The module table's rounds. x [N*c, ...] -> [c, ...], chunk r summed, on device r."""
  c = x.shape[0] // n
  rank = lax.axis_index(axis_name)
  power, m = _two_adic(n)
  # Before the round at distance d, blocks [N / d, c, ...]: blocks[i] is chunk
  # i d + (r mod d), summed over the d devices r' with r' // d == r // d.
  blocks = x.reshape((n, c) + x.shape[1:])
  for d in _powers_below(power):
    # Split by bit 0 of the block index (the chunk index's bit worth d): keep
    # the half whose bit is r's.
    pairs = blocks.reshape((blocks.shape[0] // 2, 2) + blocks.shape[1:])
    bit = (rank // d) % 2
    keep = lax.dynamic_index_in_dim(pairs, bit, axis=1, keepdims=False)
    send = lax.dynamic_index_in_dim(pairs, 1 - bit, axis=1, keepdims=False)
    blocks = keep + lax.ppermute(send, axis_name, _xor_pairs(n, d))
  # Odd phase among the m devices r mod 2^a + 2^a i: now blocks[i'] is chunk
  # r mod 2^a + 2^a i'. Re-index by offset from our own block (i = r // 2^a):
  # offset t is block i + t. Each round sends the odd offsets one step on,
  # where offset t becomes t - step, an even offset of the receiver.
  if m == 1:
    return blocks[0]
  offsets = _rotate(blocks, rank // power)
  step = power
  while offsets.shape[0] > 1:
    moving = offsets[1::2]
    offsets = offsets[0::2]
    arrived = lax.ppermute(moving, axis_name, _shift_pairs(n, step))
    offsets = offsets.at[: arrived.shape[0]].add(arrived)
    step *= 2
  return offsets[0]


def _butterfly_all_gather(x: jax.Array, axis_name: str, n: int) -> jax.Array:
  """The reduce-scatter's rounds reversed. x [c, ...] -> [N*c, ...] in device order."""
  rank = lax.axis_index(axis_name)
  power, m = _two_adic(n)
  # Odd phase among the m devices r mod 2^a + 2^a i (i = r // 2^a): offsets[t]
  # is the chunk of device r + 2^a t, t = 0..L-1; each round fills the odd
  # offsets with the even ones of the device `step` ahead, the reduce-scatter's
  # rounds backwards. Then rotate back to device order: blocks[i'] is chunk
  # r mod 2^a + 2^a i'.
  lengths = [m]  # offsets held before each reduce-scatter round of this phase
  while lengths[-1] > 1:
    lengths.append((lengths[-1] + 1) // 2)
  offsets = x[None]
  step = power << max(len(lengths) - 2, 0)
  for length in reversed(lengths[:-1]):
    arrived = lax.ppermute(offsets[: length // 2], axis_name, _shift_pairs(n, -step))
    if arrived.shape[0] < offsets.shape[0]:
      pad = jnp.zeros((offsets.shape[0] - arrived.shape[0],) + arrived.shape[1:], arrived.dtype)
      arrived = jnp.concatenate([arrived, pad])
    offsets = jnp.stack([offsets, arrived], axis=1).reshape((-1,) + x.shape)[:length]
    step //= 2
  blocks = offsets if m == 1 else _rotate(offsets, (-(rank // power)) % m)
  # Doubling phase: before the round at distance d, blocks[i] is chunk
  # i 2d + (r mod 2d); interleave ours and the partner's by r's bit worth d.
  for d in reversed(_powers_below(power)):
    other = lax.ppermute(blocks, axis_name, _xor_pairs(n, d))
    upper = ((rank // d) % 2).astype(bool)
    pairs = jnp.where(upper, jnp.stack([other, blocks], axis=1), jnp.stack([blocks, other], axis=1))
    blocks = pairs.reshape((-1,) + x.shape)
  return blocks.reshape((n * x.shape[0],) + x.shape[1:])


def reduce_scatter(
  x: jax.Array, axis_name: Axes, *, algorithm: Algorithms = "butterfly"
) -> jax.Array:
  """Sum over devices, keep chunk r on device r. [N*c, ...] -> [c, ...].

  Same result as `lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)`.
  With a tuple of axes (outer first), level by level (`Levels`): r is the
  node-major rank. Raises ValueError when x.shape[0] does not divide by N.
  """
  n = lax.axis_size(axis_name)
  if x.shape[0] % n:
    raise ValueError(
      f"reduce_scatter: leading dimension {x.shape[0]} of shape {x.shape} does not divide "
      f"over the {n} devices of mesh axis {axis_name!r}"
    )
  if isinstance(axis_name, tuple):
    return _levels_reduce_scatter(x, *_levels(axis_name, algorithm))
  check_algorithm(algorithm)
  if n == 1:
    return x
  if algorithm == "xla":
    return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)
  if algorithm == "butterfly":
    return _butterfly_reduce_scatter(x, axis_name, n)
  c = x.shape[0] // n
  rank = lax.axis_index(axis_name)
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


def all_gather(x: jax.Array, axis_name: Axes, *, algorithm: Algorithms = "butterfly") -> jax.Array:
  """Concatenate every device's chunk in device order. [c, ...] -> [N*c, ...].

  Same result as `lax.all_gather(x, axis_name, axis=0, tiled=True)`. With a
  tuple of axes (outer first), level by level (`Levels`), in node-major order.
  """
  if isinstance(axis_name, tuple):
    return _levels_all_gather(x, *_levels(axis_name, algorithm))
  n = lax.axis_size(axis_name)
  check_algorithm(algorithm)
  if n == 1:
    return x
  if algorithm == "xla":
    return lax.all_gather(x, axis_name, axis=0, tiled=True)
  if algorithm == "butterfly":
    return _butterfly_all_gather(x, axis_name, n)
  rank = lax.axis_index(axis_name)
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


def _levels(
  axes: tuple[str, ...], algorithm: Algorithms
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(axes, one algorithm per axis): a single name applies to every level."""
  algorithms = (algorithm,) * len(axes) if isinstance(algorithm, str) else tuple(algorithm)
  if len(algorithms) != len(axes):
    raise ValueError(f"algorithm={algorithm!r}: one per level of axes {axes} is needed")
  for a in algorithms:
    check_algorithm(a)
  return axes, algorithms


def _levels_reduce_scatter(x: jax.Array, axes, algorithms) -> jax.Array:
  """`Levels`: innermost axis first, on the whole buffer. [N*c, ...] -> [c, ...]."""
  tail = x.shape[1:]
  sizes = [lax.axis_size(a) for a in axes]
  held = x.reshape(math.prod(sizes), -1)  # rows in node-major rank order
  for level in reversed(range(len(axes))):
    outer = math.prod(sizes[:level])  # rows are (outer rank, this level's rank)
    rows = held.reshape(outer, sizes[level], -1).swapaxes(0, 1).reshape(outer * sizes[level], -1)
    # This level's rank major: its reduce-scatter keeps the rows of our rank at this level.
    held = reduce_scatter(rows, axes[level], algorithm=algorithms[level])
  return held.reshape((-1,) + tail)


def _levels_all_gather(x: jax.Array, axes, algorithms) -> jax.Array:
  """`Levels`: outermost axis first, on 1/N of the buffer. [c, ...] -> [N*c, ...]."""
  held = x.reshape(1, -1)  # rows in rank order over the levels gathered so far
  for axis, algorithm in zip(axes, algorithms, strict=True):
    got = all_gather(held, axis, algorithm=algorithm)  # [size, rows, c]: this level major
    size = lax.axis_size(axis)
    held = got.reshape(size, held.shape[0], -1).swapaxes(0, 1).reshape(size * held.shape[0], -1)
  return held.reshape((held.shape[0] * x.shape[0],) + x.shape[1:])


def padded_size(size: int, n: int) -> int:
  """Smallest multiple of n that is >= size."""
  return -(-size // n) * n


def all_reduce(x: jax.Array, axis_name: Axes, *, algorithm: Algorithms = "butterfly") -> jax.Array:
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
def all_gather_with_scatter_grad(
  shard: jax.Array, axis_name: Axes, algorithm: Algorithms
) -> jax.Array:
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
def reduce_scatter_with_gather_grad(
  x: jax.Array, axis_name: Axes, algorithm: Algorithms
) -> jax.Array:
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
