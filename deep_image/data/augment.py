"""The paper's training augmentations (Deep Image, section 4.1, Table 1), on the host.

Six augmentations, each with an explicit DISCRETE parameter space whose size is the paper's
Table 1 count:

| augmentation     | space (module constants below)                             | size   |
|------------------|------------------------------------------------------------|--------|
| color casting    | shift vectors in [-20, 20]^3 except (0, 0, 0)              | 68,920 |
| vignetting       | 40 start radii x 49 brightness reductions                  | 1,960  |
| lens distortion  | 4 kinds (barrel, pincushion, h-stretch, v-stretch) x 65    | 260    |
| rotation         | non-zero integer degrees in [-10, 10]                      | 20     |
| flipping         | {as is, mirrored left-right}                               | 2      |
| cropping         | offsets [0, S - c)^2; 288^2 for c = 224 of S = 512         | 82,944 |

Counting conventions follow the paper's numbers: color casting and rotation count only the
changes that alter the image (41^3 - 1, 2 * 10), flipping and cropping count every state
(flipped or not; every offset, with the exclusive upper bound of `randint(0, S - c)` that
gives 288 and not 289).

Everything but cropping is applied to the cropped image, as in the paper, but nothing is
resampled twice: crop offset, flip, rotation and lens distortion / stretching are each a map
from output pixel to source pixel, composed into ONE sampling grid over the uncropped image
and resampled once, bilinear with BORDER_REFLECT_101: `cv2.remap` of the grid, or, when the
composed map is affine (no radial distortion), `cv2.warpAffine` of the same map, which skips
building the grid in numpy, or slicing when it moves whole pixels (see `resample`). Pixels
that the geometric maps pull from outside the crop therefore come from the real image around
the crop, and reflection only where they leave the whole image. Colour casting and vignetting
are then one multiply-add per pixel: out = round(clip(in * gain[y, x] + shift[c], 0, 255)).

Sampling is deterministic from a `np.random.Generator`: one draw of `NUM_UNIFORMS` uniforms
per image, each augmentation reading its own fixed slots, so switching one augmentation on or
off in a config does not change the draws of the others.

`augment_device.py` runs the same parameters batched in JAX; the formulas below are shared
through `lens_coefficients` and the documented maps, and tests hold the two paths to one gray
level of each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Sequence

import cv2
import ml_collections
import numpy as np

from deep_image.config_error import ConfigError

# ----------------------------------------------------------------------------------------
# Parameter spaces. Table 1 is computed from these (see `space_sizes`); do not type counts.

# Colour casting: per-channel integer shift, R, G, B.
COLOR_SHIFTS: tuple[int, ...] = tuple(range(-20, 21))

# Vignetting "area": the normalised radius (0 = crop centre, 1 = crop corner) where
# darkening starts; everything outside it is darkened. 40 values, 0.0 to 0.975 by 0.025
# (1.0 would darken nothing).
VIGNETTE_RADII: tuple[float, ...] = tuple(i / 40 for i in range(40))
# Vignetting "how much brightness is reduced": the fraction of brightness removed at the
# corners. 49 values, 0.02 to 0.98 by 0.02 (0 is no change, 1 would black out corners).
VIGNETTE_STRENGTHS: tuple[float, ...] = tuple(i / 50 for i in range(1, 50))

# Lens distortion "type": two radial distortions and the paper's special case of stretching.
LENS_KINDS: tuple[str, ...] = ("barrel", "pincushion", "stretch_h", "stretch_v")
# Lens distortion "degree" d in 1..65: radial coefficient k = d / 250 (0.004 .. 0.26) or
# stretch factor 1 + d / 250 (1.004 .. 1.26). See `lens_coefficients`.
LENS_DEGREES: tuple[int, ...] = tuple(range(1, 66))
LENS_DEGREE_SCALE = 250.0

# Rotation: non-zero integer degrees, counter-clockwise positive (as cv2.getRotationMatrix2D).
ROTATION_DEGREES: tuple[int, ...] = tuple(d for d in range(-10, 11) if d != 0)

# Flipping: the two states.
FLIP_STATES: tuple[bool, ...] = (False, True)

# Table 1's cropping row: 224 crops of 512 x 512 images.
TABLE1_IMAGE_SIZE = 512
TABLE1_CROP_SIZE = 224

# Integer codes for `AugmentParams.lens_kind`; 0 means no lens distortion.
LENS_NONE = 0
LENS_BARREL, LENS_PINCUSHION, LENS_STRETCH_H, LENS_STRETCH_V = 1, 2, 3, 4

# Slots of the per-image uniform vector (see module docstring); `params_from_uniforms` is
# the one reader of them, for the host and the device.
_U_CROP_Y, _U_CROP_X, _U_FLIP = 0, 1, 2
_U_ROT_ON, _U_ROT = 3, 4
_U_LENS_ON, _U_LENS_KIND, _U_LENS_DEG = 5, 6, 7
_U_VIG_ON, _U_VIG_RADIUS, _U_VIG_STRENGTH = 8, 9, 10
_U_CAST_ON, _U_CAST_PICK, _U_CAST_SHIFT = 11, 12, 15  # PICK and SHIFT take 3 slots each.
NUM_UNIFORMS = 18
"""Uniforms one image's augmentation is drawn from (`params_from_uniforms`)."""


def default_config() -> ml_collections.ConfigDict:
  """Augmentation config, embedded by experiment configs as `config.data.augment`.

  Every augmentation has `enabled`, `probability` (chance that one image gets it) and the
  range it samples from, as bounds on the module's grids. The defaults cover the full grids,
  so `space_sizes(default_config())` reproduces Table 1. The paper gives no probabilities;
  0.5 each is our choice.
  """
  cfg = ml_collections.ConfigDict()
  cfg.crop_size = TABLE1_CROP_SIZE
  # Random crop offset when enabled, centre crop when not.
  cfg.crop = ml_collections.ConfigDict({"enabled": True})
  cfg.flip = ml_collections.ConfigDict({"enabled": True, "probability": 0.5})
  cfg.rotation = ml_collections.ConfigDict(
    {"enabled": True, "probability": 0.5, "max_degrees": max(ROTATION_DEGREES)}
  )
  cfg.lens_distortion = ml_collections.ConfigDict(
    {
      "enabled": True,
      "probability": 0.5,
      "kinds": LENS_KINDS,
      "max_degree": max(LENS_DEGREES),
    }
  )
  cfg.vignetting = ml_collections.ConfigDict(
    {
      "enabled": True,
      "probability": 0.5,
      "min_radius": min(VIGNETTE_RADII),
      "max_radius": max(VIGNETTE_RADII),
      "min_strength": min(VIGNETTE_STRENGTHS),
      "max_strength": max(VIGNETTE_STRENGTHS),
    }
  )
  cfg.color_cast = ml_collections.ConfigDict(
    {
      "enabled": True,
      "probability": 0.5,
      # The paper's three Booleans: each channel is altered with this probability.
      "channel_probability": 0.5,
      "max_shift": max(COLOR_SHIFTS),
    }
  )
  return cfg


def _within(grid: Sequence[float], lo: float, hi: float) -> tuple[float, ...]:
  # A small tolerance so config bounds written as decimals select the grid points they name.
  return tuple(v for v in grid if lo - 1e-9 <= v <= hi + 1e-9)


def color_shift_values(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Allowed per-channel shifts under `cfg.color_cast.max_shift`."""
  m = cfg.color_cast.max_shift
  return tuple(s for s in COLOR_SHIFTS if -m <= s <= m)


def vignette_values(cfg: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Allowed (radii, strengths) under the config's bounds."""
  v = cfg.vignetting
  return (
    _within(VIGNETTE_RADII, v.min_radius, v.max_radius),
    _within(VIGNETTE_STRENGTHS, v.min_strength, v.max_strength),
  )


def lens_values(cfg: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Allowed (kind codes, degrees) under the config; kind codes are `LENS_BARREL`...."""
  lc = cfg.lens_distortion
  unknown = set(lc.kinds) - set(LENS_KINDS)
  if unknown:
    raise ConfigError(
      f"data.augment.lens_distortion.kinds has unknown kinds {sorted(unknown)}; known: {LENS_KINDS}"
    )
  kinds = tuple(LENS_KINDS.index(k) + 1 for k in LENS_KINDS if k in lc.kinds)
  return kinds, tuple(d for d in LENS_DEGREES if d <= lc.max_degree)


def rotation_values(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Allowed rotation angles in degrees under `cfg.rotation.max_degrees`."""
  m = cfg.rotation.max_degrees
  return tuple(d for d in ROTATION_DEGREES if abs(d) <= m)


def crop_offsets(image_size: int, crop_size: int) -> int:
  """Number of crop offsets along one axis: [0, S - c), and 1 (offset 0) when S == c."""
  if image_size < crop_size:
    raise ValueError(f"image side {image_size} is smaller than crop_size {crop_size}")
  return max(image_size - crop_size, 1)


def space_sizes(
  cfg: ml_collections.ConfigDict | None = None,
  image_hw: tuple[int, int] = (TABLE1_IMAGE_SIZE, TABLE1_IMAGE_SIZE),
) -> dict[str, int]:
  """Number of possible changes of each augmentation (Table 1), from the grids above.

  Args:
    cfg: augmentation config; `default_config()` when None. Disabled augmentations still
      report the size of their configured space.
    image_hw: (H, W) of the images the crops are taken from.

  Returns:
    Ordered {name: count} with the paper's row names.
  """
  cfg = default_config() if cfg is None else cfg
  radii, strengths = vignette_values(cfg)
  kinds, degrees = lens_values(cfg)
  c = cfg.crop_size
  return {
    "Color casting": len(color_shift_values(cfg)) ** 3 - 1,
    "Vignetting": len(radii) * len(strengths),
    "Lens distortion": len(kinds) * len(degrees),
    "Rotation": len(rotation_values(cfg)),
    "Flipping": len(FLIP_STATES),
    "Cropping": crop_offsets(image_hw[0], c) * crop_offsets(image_hw[1], c),
  }


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Parameters of one image's augmentation (or, stacked, of a batch: leading dim [B]).

  Identity values switch an augmentation off: rotation 0, lens_kind 0, vignette_strength 0,
  color_shift (0, 0, 0), flip False.

  Attributes:
    crop_y, crop_x: int32 [] or [B], top-left corner of the crop in the source image.
    flip: bool [] or [B], mirror the crop left-right.
    rotation: float32 [] or [B], degrees, counter-clockwise, about the crop centre.
    lens_kind: int32 [] or [B], LENS_NONE / LENS_BARREL / LENS_PINCUSHION / LENS_STRETCH_H /
      LENS_STRETCH_V.
    lens_degree: int32 [] or [B], 1..65 (0 with LENS_NONE).
    vignette_radius: float32 [] or [B], normalised radius where darkening starts.
    vignette_strength: float32 [] or [B], brightness removed at the corners, 0 = none.
    color_shift: int32 [3] or [B, 3], added to R, G, B.
    crop_size: int, side c of the square output; static (not an array), shared by a batch.
  """

  crop_y: np.ndarray
  crop_x: np.ndarray
  flip: np.ndarray
  rotation: np.ndarray
  lens_kind: np.ndarray
  lens_degree: np.ndarray
  vignette_radius: np.ndarray
  vignette_strength: np.ndarray
  color_shift: np.ndarray
  crop_size: int

  ARRAY_FIELDS = (
    "crop_y",
    "crop_x",
    "flip",
    "rotation",
    "lens_kind",
    "lens_degree",
    "vignette_radius",
    "vignette_strength",
    "color_shift",
  )

  @classmethod
  def identity(cls, crop_size: int, crop_y: int = 0, crop_x: int = 0) -> AugmentParams:
    """A plain crop at (crop_y, crop_x) with every other augmentation off."""
    return cls(
      crop_y=np.int32(crop_y),
      crop_x=np.int32(crop_x),
      flip=np.bool_(False),
      rotation=np.float32(0),
      lens_kind=np.int32(LENS_NONE),
      lens_degree=np.int32(0),
      vignette_radius=np.float32(0),
      vignette_strength=np.float32(0),
      color_shift=np.zeros(3, np.int32),
      crop_size=int(crop_size),
    )

  def replace(self, **changes) -> AugmentParams:
    """A copy with fields changed, values cast to each field's dtype."""
    dtypes = {f: getattr(self, f).dtype for f in self.ARRAY_FIELDS}
    cast = {k: (np.asarray(v, dtypes[k]) if k in dtypes else v) for k, v in changes.items()}
    return dataclasses.replace(self, **cast)

  def as_dict(self) -> dict[str, np.ndarray]:
    """The array fields as a dict of numpy arrays (what a Grain record can carry)."""
    return {f: np.asarray(getattr(self, f)) for f in self.ARRAY_FIELDS}


def stack_params(params: Sequence[AugmentParams]) -> AugmentParams:
  """Stacks per-image params into one batched AugmentParams (arrays gain a leading [B])."""
  sizes = {p.crop_size for p in params}
  if len(sizes) != 1:
    raise ValueError(f"a batch needs one crop_size, got {sorted(sizes)}")
  arrays = {f: np.stack([getattr(p, f) for p in params]) for f in AugmentParams.ARRAY_FIELDS}
  return AugmentParams(**arrays, crop_size=sizes.pop())


_PROBABILITY_FIELDS = (
  "flip.probability",
  "rotation.probability",
  "lens_distortion.probability",
  "vignetting.probability",
  "color_cast.probability",
  "color_cast.channel_probability",
)


@dataclasses.dataclass(frozen=True)
class SamplingSpace:
  """A config's sampling choices as plain tuples and floats.

  Reading a ConfigDict costs microseconds per field; a data pipeline builds this once per
  config (`SamplingSpace.from_config`) and passes it to `sample_params` for every image.
  A probability of 0 stands for a disabled augmentation.
  """

  crop_size: int
  random_crop: bool
  flip_probability: float
  rotation_probability: float
  rotations: tuple[int, ...]
  lens_probability: float
  lens_kinds: tuple[int, ...]
  lens_degrees: tuple[int, ...]
  vignette_probability: float
  vignette_radii: tuple[float, ...]
  vignette_strengths: tuple[float, ...]
  cast_probability: float
  cast_channel_probability: float
  cast_shifts: tuple[int, ...]

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> SamplingSpace:
    """Snapshot of a `default_config()`-shaped config (later edits to cfg are not seen).

    Raises:
      ValueError naming the field when a probability is outside [0, 1].
    """
    for field in _PROBABILITY_FIELDS:
      group, name = field.split(".")
      value = cfg[group][name]
      if not 0.0 <= value <= 1.0:
        raise ConfigError(f"data.augment.{field}={value} must be a probability in [0, 1]")
    on = lambda sub, *spaces: float(sub.probability) if sub.enabled and all(spaces) else 0.0
    rotations = rotation_values(cfg)
    kinds, degrees = lens_values(cfg)
    radii, strengths = vignette_values(cfg)
    shifts = color_shift_values(cfg)
    return cls(
      crop_size=int(cfg.crop_size),
      random_crop=bool(cfg.crop.enabled),
      flip_probability=on(cfg.flip),
      rotation_probability=on(cfg.rotation, rotations),
      rotations=rotations,
      lens_probability=on(cfg.lens_distortion, kinds, degrees),
      lens_kinds=kinds,
      lens_degrees=degrees,
      vignette_probability=on(cfg.vignetting, radii, strengths),
      vignette_radii=radii,
      vignette_strengths=strengths,
      cast_probability=on(cfg.color_cast, shifts),
      cast_channel_probability=float(cfg.color_cast.channel_probability),
      cast_shifts=shifts,
    )


@functools.lru_cache(maxsize=64)
def _sampling_tables(space: SamplingSpace, image_hw: tuple[int, int], crop_size: int) -> dict:
  """Per-slot grid sizes and probabilities, and the grids, of one (space, image, crop).

  Built once, so sampling is a few whole-array operations on [B, NUM_UNIFORMS].
  """
  h, w = image_hw
  sizes = np.ones(NUM_UNIFORMS)
  if space.random_crop:
    sizes[_U_CROP_Y] = crop_offsets(h, crop_size)
    sizes[_U_CROP_X] = crop_offsets(w, crop_size)
  grids = {
    _U_ROT: (space.rotations, np.float32),
    _U_LENS_KIND: (space.lens_kinds, np.int32),
    _U_LENS_DEG: (space.lens_degrees, np.int32),
    _U_VIG_RADIUS: (space.vignette_radii, np.float32),
    _U_VIG_STRENGTH: (space.vignette_strengths, np.float32),
    _U_CAST_SHIFT: (space.cast_shifts, np.int32),
  }
  tables = {}
  for slot, (grid, dtype) in grids.items():
    # An empty grid has probability 0 (SamplingSpace): a 0 entry keeps indexing valid.
    tables[slot] = np.asarray(grid or (0,), dtype)
  for ch in range(3):
    sizes[_U_CAST_SHIFT + ch] = len(tables[_U_CAST_SHIFT])
  for slot in grids:
    sizes[slot] = len(tables[slot])
  # u < threshold switches a slot's augmentation on (0: never, as u >= 0).
  thresholds = np.zeros(NUM_UNIFORMS)
  thresholds[_U_FLIP] = space.flip_probability
  thresholds[_U_ROT_ON] = space.rotation_probability
  thresholds[_U_LENS_ON] = space.lens_probability
  thresholds[_U_VIG_ON] = space.vignette_probability
  thresholds[_U_CAST_ON] = space.cast_probability
  thresholds[_U_CAST_PICK : _U_CAST_PICK + 3] = space.cast_channel_probability
  centre = ((h - crop_size) // 2, (w - crop_size) // 2)
  return {"sizes": sizes, "thresholds": thresholds, "tables": tables, "centre": centre}


def params_from_uniforms(
  u,
  space: SamplingSpace,
  image_hw: tuple[int, int],
  crop_size: int | None = None,
  xp=np,
) -> AugmentParams:
  """A batch of augmentations from its uniforms: the one sampler of host and device.

  Each augmentation reads its own slots of an image's `NUM_UNIFORMS` uniforms: u < p
  switches it on, and values[min(int(u * len), len - 1)] picks from its discrete grid, so
  the same uniforms give the same parameters on the host (numpy, `sample_params`) and on
  the device (jax.numpy, `augment_device.sample_params`), up to float32 rounding of u * len
  there.

  Args:
    u: float [B, NUM_UNIFORMS] in [0, 1), numpy or jax.
    space: the config's SamplingSpace (static).
    image_hw: (H, W) of the source images (static).
    crop_size: side of the square crop; `space.crop_size` when None.
    xp: array module of `u` (numpy or jax.numpy).

  Returns:
    batched AugmentParams of xp arrays ([B]; color_shift [B, 3]).
  """
  c = space.crop_size if crop_size is None else int(crop_size)
  t = _sampling_tables(space, tuple(image_hw), c)
  sizes = t["sizes"].astype(u.dtype)
  index = xp.minimum((u * sizes).astype(xp.int32), (t["sizes"] - 1).astype(np.int32))
  on = u < t["thresholds"].astype(u.dtype)
  tables = {slot: xp.asarray(table) for slot, table in t["tables"].items()}

  def gated(on_slot, slot):
    table = tables[slot]
    return xp.where(on[:, on_slot], table[index[:, slot]], xp.zeros((), table.dtype))

  if space.random_crop:
    crop_y, crop_x = index[:, _U_CROP_Y], index[:, _U_CROP_X]
  else:
    crop_y = xp.full(u.shape[0], t["centre"][0], xp.int32)
    crop_x = xp.full(u.shape[0], t["centre"][1], xp.int32)
  cast_on = on[:, _U_CAST_ON : _U_CAST_ON + 1] & on[:, _U_CAST_PICK : _U_CAST_PICK + 3]
  shift = tables[_U_CAST_SHIFT][index[:, _U_CAST_SHIFT : _U_CAST_SHIFT + 3]]
  return AugmentParams(
    crop_y=crop_y,
    crop_x=crop_x,
    flip=on[:, _U_FLIP],
    rotation=gated(_U_ROT_ON, _U_ROT),
    lens_kind=gated(_U_LENS_ON, _U_LENS_KIND),
    lens_degree=gated(_U_LENS_ON, _U_LENS_DEG),
    vignette_radius=gated(_U_VIG_ON, _U_VIG_RADIUS),
    vignette_strength=gated(_U_VIG_ON, _U_VIG_STRENGTH),
    color_shift=xp.where(cast_on, shift, xp.zeros((), xp.int32)),
    crop_size=c,
  )


def sample_params(
  rng: np.random.Generator,
  cfg: ml_collections.ConfigDict | SamplingSpace,
  image_hw: tuple[int, int],
  crop_size: int | None = None,
) -> AugmentParams:
  """Draws one image's augmentation from the config's discrete spaces.

  `NUM_UNIFORMS` uniforms from `rng`, turned into parameters by `params_from_uniforms`.

  Args:
    rng: the only source of randomness; the same generator state gives the same params.
    cfg: `default_config()`-shaped config, or its `SamplingSpace` (faster per call).
    image_hw: (H, W) of the source image, each >= crop_size.
    crop_size: side of the square crop; `cfg.crop_size` when None.

  Returns:
    AugmentParams of numpy scalars (color_shift int32 [3]).
  """
  space = cfg if isinstance(cfg, SamplingSpace) else SamplingSpace.from_config(cfg)
  batch = params_from_uniforms(rng.random(NUM_UNIFORMS)[None], space, image_hw, crop_size)
  return AugmentParams(
    **{f: getattr(batch, f)[0] for f in AugmentParams.ARRAY_FIELDS}, crop_size=batch.crop_size
  )


def lens_coefficients(lens_kind, lens_degree, xp=np):
  """(k, stretch_x, stretch_y) of a lens distortion, for numpy or jax.numpy arrays.

  Args:
    lens_kind: int [] or [B], LENS_* code.
    lens_degree: int [] or [B], 1..65.
    xp: array module (numpy or jax.numpy).

  Returns:
    float32 arrays shaped like the inputs: radial coefficient k (> 0 barrel, < 0 pincushion,
    0 otherwise) and stretch factors (1 when not stretching). See `sampling_grid` for how
    they are used.
  """
  step = xp.asarray(lens_degree, xp.float32) / LENS_DEGREE_SCALE
  zero, one = xp.zeros_like(step), xp.ones_like(step)
  k = xp.where(lens_kind == LENS_BARREL, step, xp.where(lens_kind == LENS_PINCUSHION, -step, zero))
  sx = xp.where(lens_kind == LENS_STRETCH_H, one + step, one)
  sy = xp.where(lens_kind == LENS_STRETCH_V, one + step, one)
  return k, sx, sy


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


def sampling_grid(params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
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
  k, sx, sy = (float(v) for v in lens_coefficients(int(params.lens_kind), int(params.lens_degree)))
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


def affine_matrix(params: AugmentParams) -> np.ndarray | None:
  """`sampling_grid`'s map as a 2x3 matrix when it is affine, else None.

  Crop, flip, rotation and stretching are affine; only radial lens distortion is not. The
  matrix maps output pixel (u, v, 1) to source (x, y), the same map `sampling_grid` tabulates
  (same centre, units and order), for cv2.warpAffine with WARP_INVERSE_MAP.

  Returns:
    float64 [2, 3], or None for barrel / pincushion.
  """
  k, sx, sy = (float(v) for v in lens_coefficients(int(params.lens_kind), int(params.lens_degree)))
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


def resample(image: np.ndarray, params: AugmentParams) -> np.ndarray:
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
  axis_aligned = float(params.rotation) == 0.0 and int(params.lens_kind) == LENS_NONE
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


def apply(image: np.ndarray, params: AugmentParams) -> np.ndarray:
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
