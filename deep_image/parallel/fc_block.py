"""The tensor-parallel FC head of the hybrid strategy (paper section 3.2).

Run inside `shard_map` over one mesh axis of N devices; the conv layers before
it are data parallel, so each device enters with its own b = B / N images.
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

The gather and the scatter are `collectives.gather_params` /
`scatter_partials`: our hand-written collectives, whose VJPs are each other,
so backward moves activation gradients with the same algorithms. Traffic per
step is activations (B F + B H2), not the FC weight gradients (F H1 + H1 H2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deep_image.parallel import collectives


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rate == 0.0 or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def tensor_parallel_head(
  fc: dict,
  feats: jax.Array,
  *,
  axis: str,
  algorithm: str,
  dtype=jnp.float32,
  dropout_rate: float = 0.0,
  rng: jax.Array | None = None,
) -> jax.Array:
  """FC1-FC3 with FC1/FC2 weights split over `axis`. feats [b, k, k, C] -> logits [b, classes].

  Args:
    fc: {'fc1': {'kernel' [F, H1/N], 'bias' [H1/N]}, 'fc2': {'kernel'
      [H1/N, H2], 'bias' [H2]}, 'fc3': {'kernel' [H2, C], 'bias' [C]}}: this
      device's parts.
    feats: this device's conv features (local batch b).
    rng: dropout key (None: no dropout). Masks differ per device, so with
      dropout the result depends on the layout.
  Returns:
    float32 logits [b, classes] for the local batch.
  """
  b = feats.shape[0]
  x = feats.reshape(b, -1).astype(dtype)
  x = collectives.gather_params(x, axis, algorithm)  # [B, F]
  rngs = (
    (None, None) if rng is None else jax.random.split(jax.random.fold_in(rng, lax.axis_index(axis)))
  )
  h1 = x @ fc["fc1"]["kernel"].astype(dtype) + fc["fc1"]["bias"].astype(dtype)
  h1 = _dropout(jax.nn.relu(h1), dropout_rate, rngs[0])  # [B, H1/N]
  partial = h1 @ fc["fc2"]["kernel"].astype(dtype)  # [B, H2], summed over devices next
  # The bias is added once, after the sum.
  h2 = collectives.scatter_partials(partial, axis, algorithm) + fc["fc2"]["bias"].astype(dtype)
  h2 = _dropout(jax.nn.relu(h2), dropout_rate, rngs[1])  # [b, H2]
  logits = h2 @ fc["fc3"]["kernel"].astype(dtype) + fc["fc3"]["bias"].astype(dtype)
  return logits.astype(jnp.float32)
