"""The paper's training augmentations (Deep Image, section 4.1, Table 1): what each can be
and how one image's are drawn, for the host and the device alike.

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

Sampling is deterministic from a `np.random.Generator`: one draw of `NUM_UNIFORMS` uniforms
per image, each augmentation reading its own fixed slots, so switching one augmentation on or
off in a config does not change the draws of the others.

Two resamplers apply the drawn `AugmentParams`: `augment_host.py` one image with OpenCV (in
the Grain workers; neither this module nor it imports JAX) and `augment_device.py` a batch
in JAX (`params_from_uniforms` with xp=jax.numpy draws there); `lens_coefficients` is the
one formula of a lens parameter both use. One module because the grids, the config bounds
on them, the sampling space snapshot and the sampler that reads it are one definition: the
sampler indexes the grids by the slots this module assigns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

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
      ConfigError naming the field when a probability is outside [0, 1].
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
    0 otherwise) and stretch factors (1 when not stretching). See
    `augment_host.sampling_grid` for how they are used.
  """
  step = xp.asarray(lens_degree, xp.float32) / LENS_DEGREE_SCALE
  zero, one = xp.zeros_like(step), xp.ones_like(step)
  k = xp.where(lens_kind == LENS_BARREL, step, xp.where(lens_kind == LENS_PINCUSHION, -step, zero))
  sx = xp.where(lens_kind == LENS_STRETCH_H, one + step, one)
  sy = xp.where(lens_kind == LENS_STRETCH_V, one + step, one)
  return k, sx, sy
