"""The tensor-parallel FC head of the hybrid strategy (paper section 3.2).

Run inside `shard_map`, tensor parallel over one mesh axis of N devices (all
devices, or on a node x local mesh the L devices of a node: B below is then the
node's L b images); the conv layers before it are data parallel, so each device
enters with its own b images.
Parameters are the local parts of the `VGG` head (`fc1`, `fc2`, `fc3`):

=====  ===================  ============================================
layer  stored on device r   computes
=====  ===================  ============================================
input  -                    gather features over the batch: [b, F] -> [B, F]
FC1    kernel [F, H1/N]     output columns r: [B, F] @ [F, H1/N] -> [B, H1/N]
FC2    kernel [H1/N, H2]    partial sums over FC1's columns r: [B, H2];
                            reduce-scatter over the batch -> [b, H2]
FC3    kernel [H2, C], all  data parallel: [b, H2] @ [H2, C] -> [b, C]
=====  ===================  ============================================

The gather and the scatter are `collectives.all_gather_with_scatter_grad` and
`collectives.reduce_scatter_with_gather_grad`: our hand-written collectives,
whose VJPs are each other, so backward moves activation gradients with the
same algorithms. Traffic per
step is activations (B F + B H2), not the FC weight gradients (F H1 + H1 H2).

Dropout masks are those of `VGG.head` for the same global examples
(`vgg.dropout_keep_mask`): FC1's [B, H1/N] block on device r is columns
[r H1/N, (r+1) H1/N) of each example's full-width mask; FC2's [b, H2] rows are
the global examples r b .. r b + b - 1. So the head computes, with dropout, the
same function on any device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deep_image.models import vgg
from deep_image.parallel import collectives


def tensor_parallel_head(
  fc: dict,
  feats: jax.Array,
  *,
  axis: str,
  algorithm: str,
  batch_axes=None,
  dtype=jnp.float32,
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
  micro_batches: int = 1,
) -> jax.Array:
  """FC1-FC3 with FC1/FC2 weights split over `axis`. feats [b, k, k, C] -> logits [b, classes].

  Args:
    fc: {'fc1': {'kernel' [F, H1/N], 'bias' [H1/N]}, 'fc2': {'kernel'
      [H1/N, H2], 'bias' [H2]}, 'fc3': {'kernel' [H2, C], 'bias' [C]}}: this
      device's parts.
    feats: this device's conv features (local batch b).
    axis / algorithm: the tensor-parallel axis and its collective algorithm.
    batch_axes: the axes (or tuple of axes, outer first) the global batch is split
      over, for the global example index of each row (dropout masks); None: `axis`.
    dropout_key: the step's dropout key (None: no dropout); masks as in
      `VGG.head` for the same global examples.
    micro_batches: the local batch runs through the head in this many parts
      (it must divide b). The parts are independent, so one part's feature
      gather and partial-sum scatter (and their backward) can overlap another
      part's matrix products: the activation collectives are otherwise on the
      critical path with nothing to hide behind. Same result for any value.
  Returns:
    float32 logits [b, classes] for the local batch.
  """
  b = feats.shape[0]
  if b % micro_batches:
    raise ValueError(f"micro_batches={micro_batches} does not divide the local batch {b}")
  m = b // micro_batches
  x = feats.reshape(b, -1).astype(dtype)
  rank = lax.axis_index(axis if batch_axes is None else batch_axes)
  parts = [
    _head_part(
      fc, x[i * m : (i + 1) * m], i * m, b, rank, axis, algorithm, dtype, dropout_rate, dropout_key
    )
    for i in range(micro_batches)
  ]
  return jnp.concatenate(parts) if micro_batches > 1 else parts[0]


def _head_part(fc, x, offset, b, rank, axis, algorithm, dtype, dropout_rate, dropout_key):
  """The head on local rows [offset, offset + m) of every device: x [m, F] -> logits [m, C].

  Row j of the device of batch rank `rank` is global example rank b + offset + j (the
  dropout masks' index); the devices of `axis` have consecutive batch ranks.
  """
  m = x.shape[0]
  n, local = lax.axis_size(axis), lax.axis_index(axis)
  first = rank - local  # batch rank of the axis's first device
  x = collectives.all_gather_with_scatter_grad(x, axis, algorithm)  # [N m, F]
  drop = dropout_rate > 0.0 and dropout_key is not None
  h1 = x @ fc["fc1"]["kernel"].astype(dtype) + fc["fc1"]["bias"].astype(dtype)
  h1 = jax.nn.relu(h1)  # [N m, H1/N]
  if drop:
    cols = h1.shape[1]
    # Each example's full [H1] mask, then this device's columns: the mask of
    # the 1-device program, at the cost of N m H1 random bits per device.
    gathered_ids = ((first + jnp.arange(n))[:, None] * b + offset + jnp.arange(m)[None, :]).reshape(
      -1
    )
    keep = vgg.dropout_keep_mask(
      dropout_key, vgg.FC1_DROPOUT, gathered_ids, (cols * n,), dropout_rate
    )
    keep = lax.dynamic_slice_in_dim(keep, local * cols, cols, axis=1)
    h1 = vgg.apply_dropout(h1, keep, dropout_rate)
  partial = h1 @ fc["fc2"]["kernel"].astype(dtype)  # [N m, H2], summed over devices next
  # The bias is added once, after the sum.
  h2 = collectives.reduce_scatter_with_gather_grad(partial, axis, algorithm)
  h2 = jax.nn.relu(h2 + fc["fc2"]["bias"].astype(dtype))  # [m, H2]
  if drop:
    ids = rank * b + offset + jnp.arange(m)
    keep = vgg.dropout_keep_mask(dropout_key, vgg.FC2_DROPOUT, ids, h2.shape[1:], dropout_rate)
    h2 = vgg.apply_dropout(h2, keep, dropout_rate)
  logits = h2 @ fc["fc3"]["kernel"].astype(dtype) + fc["fc3"]["bias"].astype(dtype)
  return logits.astype(jnp.float32)
