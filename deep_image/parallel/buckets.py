"""Gradient buckets: parameters synchronized together, one collective per bucket.

A bucket holds the synchronized parameters of one layout kind (replicated,
lazy or split, `deep_image.parallel.layouts`) of a run of consecutive layers,
grouped in *backward* order until it holds `parallel.bucket_mb` MiB:

===========  ==========================  ========================================
kind         collectives over            per step
===========  ==========================  ========================================
replicated   all N devices               reduce-scatter in backward; all-gather
                                         of the reduced chunks before the update
lazy         all N devices               all-gather of the stored 1/N shards
                                         before use; reduce-scatter in backward
split        the devices holding the     all-reduce of the shards' gradients in
             same shard (the nodes of    backward (tensor parallel inside a node,
             a node x local mesh)        data parallel across nodes)
===========  ==========================  ========================================

Split parameters on a one-axis mesh are split over every device: their
gradients are complete where they are, and they are in no bucket.

Inside `shard_map` over an axis of N devices, a bucket of leaves x_1..x_m of
sizes s_i has per-device chunks c_i = ceil(s_i / N) and C = sum c_i. Every
collective of a bucket moves one buffer, arranged as rows:

  rows(x_i)  = x_i flattened, zero-padded to N c_i, reshaped [N, c_i]
  buffer     = concat(rows(x_1), ..., rows(x_m), axis=1)   [N, C]

so row r of the buffer is device r's chunk of every leaf, and chunk r of a
leaf is exactly what `layouts.LAZY` stores on device r. Then:

======================  =====================================================
`gather(shards,         one all-gather: device r's [C] (its chunks) ->
  shapes)`              every leaf, of its shape, on every device
`sync_point(slot, xs,   identity on the usable leaves xs (full shapes); in
  after)`               backward, one reduce-scatter of their cotangents'
                        [N, C] buffer, so the cotangent of `slot` [C] is
                        device r's chunk of every leaf's gradient summed over
                        devices (a lazy bucket's leaves are `gather`ed before)
======================  =====================================================

The sync point is where the overlap comes from: backward reaches it as soon as
the bucket's layers are done, so the bucket's reduce-scatter is issued while
the layers before it still run backward, not after the whole backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp

from deep_image.parallel import collectives, layouts

SYNCED_KINDS = ("replicated", "lazy", "split")
# The dtypes gradient buffers may travel in (`parallel.grad_dtype`).
GRAD_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Leaves synchronized together.

  Attributes:
    kind: 'replicated', 'lazy' or 'split': the layout of every leaf in the bucket.
    layers: the layers' names, forward order.
    leaves: indices of the leaves in `jax.tree.leaves(params)`, forward order.
    chunks: c_i, each leaf's per-device chunk (elements); for 'split', the
      whole shard each device holds (its all-reduce pads the buffer itself).
    devices: over how many devices the bucket's collectives run (N; for
      'split', the devices that hold the same shard).
  """

  kind: str
  layers: tuple[str, ...]
  leaves: tuple[int, ...]
  chunks: tuple[int, ...]
  devices: int = 1

  @property
  def size(self) -> int:
    """C: elements per device of the bucket's buffer."""
    return sum(self.chunks)

  @property
  def elements(self) -> int:
    """Elements of the whole buffer the collective moves: N C, or C for an all-reduce."""
    return self.size if self.kind == "split" else self.size * self.devices


def plan(
  layer_order: list[str],
  leaf_layers: list[str],
  leaf_layouts: list[layouts.Layout],
  leaf_sizes: list[int],
  n: int,
  bucket_bytes: float,
  bytes_per_element: int = 4,
  tensor_n: int | None = None,
) -> tuple[Bucket, ...]:
  """Buckets ordered by their first layer, forward (the first holds the first layer).

  Each layout kind is bucketed on its own, so a layer whose kernel is lazy and
  whose bias is replicated has a part in two buckets: one buffer never mixes
  kinds, and a large kernel alone in its bucket is gathered without a copy.

  Args:
    layer_order: layer names, forward order (every name in leaf_layers).
    leaf_layers / leaf_layouts / leaf_sizes: per leaf (tree-leaves order) its
      layer, layout and number of elements.
    n: devices of the mesh.
    tensor_n: over how many devices split leaves are split (None: n). Each
      device's shard, size / tensor_n elements, is synchronized over the
      n / tensor_n devices that hold it; with tensor_n == n, split leaves are
      in no bucket.
    bucket_bytes: a bucket is closed before a layer that would take it past
      this many bytes (a larger layer gets a bucket of its own; 0: one layer
      per bucket). A forward-first bucket of more than bucket_bytes / 16 gives
      its first layer a bucket of its own: the step starts by fetching it, with
      nothing to overlap, so it is kept small.
  """
  rank = {name: i for i, name in enumerate(layer_order)}
  tensor_n = n if tensor_n is None else tensor_n
  if n % tensor_n:
    raise ValueError(f"tensor_n={tensor_n} does not divide the {n} devices")
  sizes = [
    s // tensor_n if layout.kind == "split" else s
    for s, layout in zip(leaf_sizes, leaf_layouts, strict=True)
  ]
  buckets = []
  for kind in SYNCED_KINDS:
    devices = n // tensor_n if kind == "split" else n
    if devices == 1 and kind == "split":
      continue
    by_layer: dict[str, list[int]] = {}
    for i, (layer, layout) in enumerate(zip(leaf_layers, leaf_layouts, strict=True)):
      if layout.kind == kind:
        by_layer.setdefault(layer, []).append(i)
    groups: list[list[str]] = []  # layers per bucket, backward order
    used = 0.0
    for layer in sorted(by_layer, key=rank.__getitem__, reverse=True):
      size = sum(sizes[i] for i in by_layer[layer]) * bytes_per_element
      if not groups or used + size > bucket_bytes:
        groups.append([])
        used = 0.0
      groups[-1].append(layer)
      used += size
    if groups and len(groups[-1]) > 1:
      first = sum(sizes[i] for layer in groups[-1] for i in by_layer[layer])
      if first * bytes_per_element > bucket_bytes / 16:
        groups.append([groups[-1].pop()])
    for group in groups:
      layers = tuple(reversed(group))
      leaves = tuple(i for layer in layers for i in by_layer[layer])
      if kind == "split":
        chunks = tuple(sizes[i] for i in leaves)
      else:
        chunks = tuple(collectives.padded_size(sizes[i], n) // n for i in leaves)
      buckets.append(Bucket(kind, layers, leaves, chunks, devices))
  return tuple(sorted(buckets, key=lambda b: (rank[b.layers[0]], SYNCED_KINDS.index(b.kind))))


def rows(x: jax.Array, n: int) -> jax.Array:
  """x of any shape -> [N, c]: flattened, zero-padded to N c (the LAZY layout, as rows)."""
  flat = x.reshape(-1)
  flat = jnp.pad(flat, (0, collectives.padded_size(flat.size, n) - flat.size))
  return flat.reshape(n, -1)


def chunk_of(x: jax.Array, axis_name: str) -> jax.Array:
  """Inside shard_map: this device's chunk [c] of a replicated array (its LAZY shard)."""
  n = jax.lax.axis_size(axis_name)
  return rows(x, n)[jax.lax.axis_index(axis_name)]


def split_chunks(buffer: jax.Array, chunks: tuple[int, ...]) -> list[jax.Array]:
  """[..., C] -> one [..., c_i] per leaf."""
  offsets = [0, *itertools.accumulate(chunks)]
  return [buffer[..., a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def gather(
  shards: list[jax.Array], shapes: tuple, axis_name, algorithm, dtype: str | None = None
) -> list[jax.Array]:
  """One all-gather for a bucket: device r's chunks [c_i] -> every leaf, of its shape.

  dtype: a `GRAD_DTYPES` name the buffer travels in (None: as it is); the leaves
  come back in the shards' dtype.
  """
  chunks = tuple(s.shape[0] for s in shards)
  local = jnp.concatenate(shards) if len(shards) > 1 else shards[0]
  wire = local if dtype is None else local.astype(GRAD_DTYPES[dtype])
  full = collectives.all_gather(wire, axis_name, algorithm=algorithm).astype(local.dtype)
  n = full.shape[0] // local.shape[0]
  rows = split_chunks(full.reshape(n, -1), chunks)
  return [r.reshape(-1)[: math.prod(s)].reshape(s) for r, s in zip(rows, shapes, strict=True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def sync_point(
  slot: jax.Array,
  values: tuple,
  after: jax.Array,
  axis_name,
  algorithm,
  grad_dtype: str = "float32",
  all_reduce: bool = False,
) -> tuple[tuple, jax.Array]:
  """The bucket's leaves for use; backward reduce-scatters their cotangents into `slot`'s.

  Args:
    slot: zeros [C], float32: differentiate with respect to it to receive this
      device's chunks of the bucket's summed gradient, [C]; with `all_reduce`
      (a 'split' bucket), the whole summed gradient of its leaves, [C].
    values: the bucket's leaves (full shapes; a lazy bucket's as gathered, a split
      bucket's shards), returned as they are.
    after: an activation the forward pass computes before the bucket is used
      (the input of the previous bucket's first layer), returned as it is. In
      backward, the reduce-scatter must be done when `after`'s cotangent is:
      it overlaps the previous bucket's backward instead of drifting to the end
      of the backward pass, where XLA's scheduler would otherwise issue it.
    axis_name / algorithm: the axis (or levels, `collectives.Levels`) and algorithm.
    grad_dtype: the `GRAD_DTYPES` name the gradient buffer travels in; the
      slot's cotangent is float32 either way.
  Returns:
    (the leaves for use, after).
  """
  del slot, axis_name, algorithm, grad_dtype, all_reduce
  return values, after


def _sync_fwd(slot, values, after, axis_name, algorithm, grad_dtype, all_reduce):
  return sync_point(slot, values, after, axis_name, algorithm, grad_dtype, all_reduce), None


def _sync_bwd(axis_name, algorithm, grad_dtype, all_reduce, _, cotangents):
  cotangents, after_cotangent = cotangents
  n = jax.lax.axis_size(axis_name)
  dtype = GRAD_DTYPES[grad_dtype]
  if all_reduce:
    buffer = jnp.concatenate([ct.reshape(-1).astype(dtype) for ct in cotangents])
    summed = collectives.all_reduce(buffer, axis_name, algorithm=algorithm)
  else:
    buffer = jnp.concatenate([rows(ct.astype(dtype), n) for ct in cotangents], axis=1)
    summed = collectives.reduce_scatter(buffer.reshape(-1), axis_name, algorithm=algorithm)
  summed = summed.astype(jnp.float32)
  summed, after_cotangent = jax.lax.optimization_barrier((summed, after_cotangent))
  return summed, jax.tree.map(jnp.zeros_like, cotangents), after_cotangent


sync_point.defvjp(_sync_fwd, _sync_bwd)
