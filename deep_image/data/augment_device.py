"""The paper's augmentations batched in JAX: the one home of the device path.

Public names, used by the pipeline (`augment_on='device'`), the device cache and the
training loop's in-step preprocess hook:
  sample_params(u, space, image_hw)   uniforms [B, augment.NUM_UNIFORMS] -> batched params,
                                      `augment.params_from_uniforms` on jax.numpy (the host
                                      sampler's code, so host and device draw alike);
  apply_batch(images, params)         crop + augment a batch [B, H, W, 3] -> [B, c, c, 3];
  augment_batch(batch, crop_size)     the same for an `augment_on='device'` batch dict;
  apply_batch_jit, augment_batch_jit  jitted for callers outside a jitted step.

Same parameters (`augment.AugmentParams`, stacked to a leading [B]) and the same maps as the
host path in `augment_host.py`; only the resampler differs. cv2.remap quantises source
coordinates to 1/32 pixel and uses fixed-point weights, this file samples at the exact
float32 coordinates, so the two agree to well under one gray level on average (tested).

Every parameter is an array, so one compiled function serves every draw for a given batch
shape and crop size: `crop_size` is the only static field (it fixes the output shape) and is
carried as pytree metadata of AugmentParams, which this module registers as a JAX pytree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deep_image.data import augment

jax.tree_util.register_dataclass(
  augment.AugmentParams,
  data_fields=list(augment.AugmentParams.ARRAY_FIELDS),
  meta_fields=["crop_size"],
)


def sampling_grid(params: augment.AugmentParams) -> tuple[jax.Array, jax.Array]:
  """Composed output-to-source maps of a batch, as `augment_host.sampling_grid` documents.

  Crop centre cc = (c - 1) / 2, pixel-centre coordinates in source pixels, x right, y down;
  backwards through lens distortion / stretching, rotation (degrees, counter-clockwise),
  flip, then the crop offset.

  Args:
    params: batched AugmentParams (fields [B], color_shift [B, 3]).

  Returns:
    map_x, map_y: float32 [B, c, c] source coordinates.
  """
  c = params.crop_size
  half = (c - 1) / 2.0
  axis = jnp.arange(c, dtype=jnp.float32) - half
  dx, dy = axis[None, None, :], axis[None, :, None]
  r2 = (dx * dx + dy * dy) / max(2.0 * half * half, 1.0)  # [1, c, c], 1 at the corners.

  k, sx, sy = augment.lens_coefficients(params.lens_kind, params.lens_degree, xp=jnp)
  radial = 1.0 + k[:, None, None] * r2  # Exactly 1 where k == 0 (stretch or no lens).
  tx = dx * radial / sx[:, None, None]
  ty = dy * radial / sy[:, None, None]

  angle = jnp.deg2rad(params.rotation.astype(jnp.float32))[:, None, None]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  flip = jnp.where(params.flip, -1.0, 1.0)[:, None, None]
  map_x = flip * (cos * tx - sin * ty) + (half + params.crop_x.astype(jnp.float32)[:, None, None])
  map_y = sin * tx + cos * ty + (half + params.crop_y.astype(jnp.float32)[:, None, None])
  return map_x, map_y


def _reflect_101(i: jax.Array, n: int) -> jax.Array:
  """OpenCV's BORDER_REFLECT_101 index (... 2 1 | 0 1 2 ... n-1 | n-2 ...), any distance."""
  if n == 1:
    return jnp.zeros_like(i)
  period = 2 * (n - 1)
  i = jnp.abs(i) % period
  return jnp.where(i >= n, period - i, i)


def remap_bilinear(images: jax.Array, map_x: jax.Array, map_y: jax.Array) -> jax.Array:
  """Bilinear resampling with BORDER_REFLECT_101, like cv2.remap(INTER_LINEAR).

  Args:
    images: uint8 or float [B, H, W, C].
    map_x, map_y: float32 [B, h, w] source coordinates (pixel centres at integers).

  Returns:
    float32 [B, h, w, C], not rounded.
  """
  _, h, w, _ = images.shape
  x0f, y0f = jnp.floor(map_x), jnp.floor(map_y)
  fx, fy = (map_x - x0f)[..., None], (map_y - y0f)[..., None]
  x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
  xs = (_reflect_101(x0, w), _reflect_101(x0 + 1, w))
  ys = (_reflect_101(y0, h), _reflect_101(y0 + 1, h))
  gather = jax.vmap(lambda img, iy, ix: img[iy, ix].astype(jnp.float32))
  top = gather(images, ys[0], xs[0]) * (1 - fx) + gather(images, ys[0], xs[1]) * fx
  bottom = gather(images, ys[1], xs[0]) * (1 - fx) + gather(images, ys[1], xs[1]) * fx
  return top * (1 - fy) + bottom * fy


def vignette_gain(params: augment.AugmentParams) -> jax.Array:
  """float32 [B, c, c] gain, `augment_host.vignette_gain`'s formula; 1 where strength is 0."""
  c = params.crop_size
  half = (c - 1) / 2.0
  axis = jnp.arange(c, dtype=jnp.float32) - half
  r = jnp.sqrt((axis[None, :] ** 2 + axis[:, None] ** 2) / max(2.0 * half * half, 1.0))
  radius = params.vignette_radius.astype(jnp.float32)[:, None, None]
  strength = params.vignette_strength.astype(jnp.float32)[:, None, None]
  t = jnp.clip((r[None] - radius) / (1.0 - radius), 0.0, 1.0)
  return 1.0 + t * t * (2.0 * strength * t - 3.0 * strength)


def apply_batch(images: jax.Array, params: augment.AugmentParams) -> jax.Array:
  """Crops and augments a batch; jit-able, one trace per (batch shape, crop_size).

  Args:
    images: uint8 [B, H, W, 3], H and W >= crop_size (one source size per batch).
    params: batched AugmentParams (`augment.stack_params`), numpy or jax arrays.

  Returns:
    uint8 [B, c, c, 3]: resampled, rounded to uint8 levels as the host path's cv2.remap
    output is, then round(clip(pixel * vignette_gain + color_shift, 0, 255)).
  """
  map_x, map_y = sampling_grid(params)
  pixels = jnp.round(remap_bilinear(images, map_x, map_y))
  shift = params.color_shift.astype(jnp.float32)[:, None, None, :]
  out = pixels * vignette_gain(params)[..., None] + shift
  return jnp.round(jnp.clip(out, 0.0, 255.0)).astype(jnp.uint8)


def sample_params(
  u: jax.Array, space: augment.SamplingSpace, image_hw: tuple[int, int]
) -> augment.AugmentParams:
  """`augment.params_from_uniforms` on device: u float32 [B, augment.NUM_UNIFORMS] in [0, 1)
  -> batched AugmentParams of jax arrays ([B]; color_shift [B, 3]); space, image_hw static."""
  return augment.params_from_uniforms(u, space, image_hw, xp=jnp)


def augment_batch(batch: dict, crop_size: int) -> jax.Array:
  """Crops and augments an `augment_on='device'` batch on its devices.

  Per example (`apply_batch`): each output row reads only its own input row, so with the
  batch sharded over the data axis every device augments its own rows and XLA inserts no
  communication. Jit with `crop_size` static (`augment_batch_jit`), or call inside the
  jitted train step.

  Args:
    batch: {'image': uint8 [B, S, S, 3], 'augment': {field: [B] / color_shift [B, 3]}, ...},
      numpy or jax arrays (global arrays sharded on the batch axis).
    crop_size: c, `data.augment.crop_size`.

  Returns:
    uint8 [B, c, c, 3], sharded like batch['image'].
  """
  params = augment.AugmentParams(**batch["augment"], crop_size=int(crop_size))
  return apply_batch(batch["image"], params)


apply_batch_jit = jax.jit(apply_batch)
augment_batch_jit = jax.jit(augment_batch, static_argnums=1)
