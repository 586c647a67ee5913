"""The host resampler: one image's augmentation applied with OpenCV, in a Grain worker.

The parameters (`augment.AugmentParams`, drawn by `augment.sample_params`) say what to do;
this module does it to one uint8 image, without JAX (Grain workers import no JAX).

Everything but cropping is applied to the cropped image, as in the paper, but nothing is
resampled twice: crop offset, flip, rotation and lens distortion / stretching are each a map
from output pixel to source pixel, composed into ONE sampling grid over the uncropped image
and resampled once, bilinear with BORDER_REFLECT_101: `cv2.remap` of the grid, or, when the
composed map is affine (no radial distortion), `cv2.warpAffine` of the same map, which skips
building the grid in numpy, or slicing when it moves whole pixels (see `resample`). Pixels
that the geometric maps pull from outside the crop therefore come from the real image around
the crop, and reflection only where they leave the whole image. Colour casting and vignetting
are then one multiply-add per pixel: out = round(clip(in * gain[y, x] + shift[c], 0, 255)).

`augment_device.py` runs the same parameters batched in JAX; the formulas below are shared
through `augment.lens_coefficients` and the documented maps, and tests hold the two paths to
one gray level of each other.
"""

from __future__ import annotations

import functools
import math
import threading

import cv2
import numpy as np

from deep_image.data import augment


@functools.lru_cache(maxsize=16)
def base_grid(crop_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Cached centred pixel coordinates of a c x c crop.

  Returns:
    dx, dy: float32 [c, c], pixel-centre offsets from the crop centre ((c - 1) / 2, in
      pixels, x right, y down). r2, r: float32 [c, c], squared and plain radius normalised so
      the corner pixels have r == 1 (the unit of lens distortion and vignetting). Read-only.
  """
  half = (crop_size - 1) / 2.0
  axis = np.arange(crop_size, dtype=np.float32) - np.float32(half)
  dx, dy = np.meshgrid(axis, axis)
  norm2 = max(2.0 * half * half, 1.0)
  r2 = ((dx * dx + dy * dy) / np.float32(norm2)).astype(np.float32)
  r = np.sqrt(r2)
  for a in (dx, dy, r2, r):
    a.flags.writeable = False
  return dx, dy, r2, r


_scratch = threading.local()


def _buffers(crop_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  # Per-thread scratch so a call allocates little more than its output image: arrays of this
  # size sit above glibc's mmap threshold, and fresh ones cost page faults on every image.
  bufs = getattr(_scratch, "bufs", None)
  if bufs is None or bufs[0][0].shape[0] != crop_size:
    bufs = (
      [np.empty((crop_size, crop_size), np.float32) for _ in range(5)],
      [np.empty((crop_size, crop_size, 3), np.float32) for _ in range(2)],
    )
    _scratch.bufs = bufs
  return bufs


def _lens(params: augment.AugmentParams) -> tuple[float, float, float]:
  """(k, stretch_x, stretch_y) of one image's lens distortion (`augment.lens_coefficients`)."""
  k, sx, sy = augment.lens_coefficients(int(params.lens_kind), int(params.lens_degree))
  return float(k), float(sx), float(sy)


def sampling_grid(params: augment.AugmentParams) -> tuple[np.ndarray, np.ndarray]:
  """The composed map from output pixel to source pixel, for `cv2.remap`.

  Output pixel (u, v) of the c x c crop, centred d = (u - cc, v - cc) with cc = (c - 1) / 2
  (pixel-centre convention, x right, y down, units of source pixels), is mapped backwards
  through, in order:
    1. lens distortion about the crop centre, with r^2 = |d|^2 / (2 cc^2) (1 at the corners):
       radial d <- d * (1 + k r^2), where k > 0 samples farther out towards the edges
       (barrel) and k < 0 nearer in (pincushion), the model of cv2.initUndistortRectifyMap
       with k1 = k and focal length cc * sqrt(2); or stretching d_x <- d_x / stretch_x (or
       d_y <- d_y / stretch_y), a zoom along one axis about the centre;
    2. rotation by a = `rotation` degrees about the crop centre, counter-clockwise on screen
       (the inverse of cv2.getRotationMatrix2D's matrix): d <- (cos a d_x - sin a d_y,
       sin a d_x + cos a d_y);
    3. left-right flip: d_x <- -d_x;
    4. the crop: source = d + cc + (crop_x, crop_y).
  So the forward order on the image is crop, flip, rotate, lens-distort. The caller
  resamples with bilinear interpolation and BORDER_REFLECT_101 about the whole source image.

  Returns:
    map_x, map_y: float32 [c, c] source coordinates, per-thread scratch buffers that the
    next call in the same thread overwrites.
  """
  c = params.crop_size
  dx, dy, r2, _ = base_grid(c)
  (mx, my, tx, ty, tmp), _ = _buffers(c)
  k, sx, sy = _lens(params)
  if k != 0.0:
    np.multiply(r2, np.float32(k), out=tmp)
    tmp += np.float32(1.0)
    np.multiply(dx, tmp, out=tx)
    np.multiply(dy, tmp, out=ty)
  else:
    np.multiply(dx, np.float32(1.0 / sx), out=tx)
    np.multiply(dy, np.float32(1.0 / sy), out=ty)

  angle = math.radians(float(params.rotation))
  cos, sin = math.cos(angle), math.sin(angle)
  flip = -1.0 if params.flip else 1.0
  # map_x = flip (cos tx - sin ty) + cx ; map_y = sin tx + cos ty + cy.
  np.multiply(tx, np.float32(flip * cos), out=mx)
  np.multiply(ty, np.float32(flip * sin), out=tmp)
  mx -= tmp
  mx += np.float32((c - 1) / 2.0 + float(params.crop_x))
  np.multiply(ty, np.float32(cos), out=my)
  np.multiply(tx, np.float32(sin), out=tmp)
  my += tmp
  my += np.float32((c - 1) / 2.0 + float(params.crop_y))
  return mx, my


def vignette_gain(
  radius: float,
  strength: float,
  crop_size: int,
  scratch: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
  """Vignetting gain, float32 [c, c].

  gain = 1 - strength * smoothstep(t), t = clip((r - radius) / (1 - radius), 0, 1), with r
  the distance from the crop centre normalised to 1 at the corners (`base_grid`): untouched
  inside `radius`, falling smoothly to 1 - strength at the corners.

  Args:
    scratch: two float32 [c, c] buffers to compute in (the result is one of them); fresh
      arrays when None.
  """
  _, _, _, r = base_grid(crop_size)
  t, poly = scratch if scratch is not None else (None, None)
  t = np.subtract(r, np.float32(radius), out=t)
  t *= np.float32(1.0 / (1.0 - radius))
  np.clip(t, 0.0, 1.0, out=t)
  # 1 - strength * (3 t^2 - 2 t^3) = 1 + t^2 (2 strength t - 3 strength).
  s = np.float32(strength)
  poly = np.multiply(t, 2 * s, out=poly)
  poly -= 3 * s
  poly *= t
  poly *= t
  poly += np.float32(1.0)
  return poly


def affine_matrix(params: augment.AugmentParams) -> np.ndarray | None:
  """`sampling_grid`'s map as a 2x3 matrix when it is affine, else None.

  Crop, flip, rotation and stretching are affine; only radial lens distortion is not. The
  matrix maps output pixel (u, v, 1) to source (x, y), the same map `sampling_grid` tabulates
  (same centre, units and order), for cv2.warpAffine with WARP_INVERSE_MAP.

  Returns:
    float64 [2, 3], or None for barrel / pincushion.
  """
  k, sx, sy = _lens(params)
  if k != 0.0:
    return None
  angle = math.radians(float(params.rotation))
  cos, sin = math.cos(angle), math.sin(angle)
  f = -1.0 if params.flip else 1.0
  cc = (params.crop_size - 1) / 2.0
  linear = np.array([[f * cos / sx, -f * sin / sy], [sin / sx, cos / sy]])
  centre = np.array([cc + float(params.crop_x), cc + float(params.crop_y)])
  return np.hstack([linear, (centre - linear @ np.array([cc, cc]))[:, None]])


def _rgbx(image: np.ndarray) -> np.ndarray:
  # OpenCV's bilinear warpAffine / remap have vectorised kernels for 1 and 4 channels but
  # not 3: on 4-channel input they run 2.3-2.6x faster (BENCHMARKS.md, input profile), far
  # more than the ~10 us per 256x256 image that adding the fourth channel costs.
  return image if image.shape[2] == 4 else cv2.cvtColor(image, cv2.COLOR_RGB2RGBA)


def resample(image: np.ndarray, params: augment.AugmentParams) -> np.ndarray:
  """The geometric part of `apply`: one bilinear resampling of the composed map.

  The map is `sampling_grid`'s, evaluated by the cheapest exact-enough OpenCV call: plain
  slicing when it moves whole pixels (crop, and cv2.flip for the mirror; exact),
  cv2.warpAffine when it is affine (adds rotation or stretching; OpenCV builds the same grid
  internally, without our float arrays), cv2.remap of `sampling_grid` for radial lens
  distortion. All bilinear with BORDER_REFLECT_101 about the whole source image; the two
  resamplers run on a 4-channel copy of the image (`_rgbx`), their fast kernels.

  Args:
    image: uint8 [H, W, 3], or [H, W, 4] whose fourth channel is ignored.
    params: one image's AugmentParams.

  Returns:
    uint8 [c, c, C] with the input's C channels for a plain crop (a view into `image`
    without flip), uint8 [c, c, 4] (fourth channel meaningless) when resampled.
  """
  c = params.crop_size
  y0, x0 = int(params.crop_y), int(params.crop_x)
  axis_aligned = float(params.rotation) == 0.0 and int(params.lens_kind) == augment.LENS_NONE
  if axis_aligned and y0 + c <= image.shape[0] and x0 + c <= image.shape[1]:
    out = image[y0 : y0 + c, x0 : x0 + c]
    # cv2.flip is ~35x faster than numpy's copy of a negative-stride view of 3-byte pixels.
    return cv2.flip(out, 1) if params.flip else out
  matrix = affine_matrix(params)
  if matrix is not None:
    return cv2.warpAffine(
      _rgbx(image),
      matrix,
      (c, c),
      flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
      borderMode=cv2.BORDER_REFLECT_101,
    )
  map_x, map_y = sampling_grid(params)
  return cv2.remap(_rgbx(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def apply(image: np.ndarray, params: augment.AugmentParams) -> np.ndarray:
  """Crops and augments one image.

  Args:
    image: uint8 [H, W, 3] (RGB), H and W >= params.crop_size.
    params: one image's AugmentParams (unbatched).

  Returns:
    uint8 [c, c, 3], a new array: the geometric maps resampled once (`resample`), then
    round(clip(pixel * vignette_gain + color_shift, 0, 255)).
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
  c = params.crop_size
  out = resample(image, params)
  if out.shape[2] == 4:
    out = cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)
  # A plain crop is a view of `image`: never write into it or hand it out.
  if np.may_share_memory(out, image):
    out = out.copy()

  strength = float(params.vignette_strength)
  if strength != 0.0:
    (b0, b1, _, _, _), (gain3, _) = _buffers(c)
    gain = vignette_gain(float(params.vignette_radius), strength, c, scratch=(b0, b1))
    cv2.merge((gain, gain, gain), dst=gain3)
    # round(pixel * gain) straight to uint8 (gain <= 1, so it never saturates), then the
    # integer shift with saturation: equal to round(clip(pixel * gain + shift, 0, 255))
    # because round(x + s) = round(x) + s for integer s.
    cv2.multiply(out, gain3, dst=out, dtype=cv2.CV_8U)
  shift = tuple(float(v) for v in np.asarray(params.color_shift))
  if any(shift):
    # cv2 arithmetic takes a 4-vector scalar; uint8 results saturate.
    cv2.add(out, shift + (0.0,), dst=out)
  return out
