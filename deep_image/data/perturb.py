"""Test-time perturbations of evaluation images (paper section 5, Figures 8-9).

The paper shows the model keeps its answer under colour casts, lighting, lens distortion,
rotation, blur and compression, because it was trained with such changes. This module
applies one of them to every image of an evaluation split, at a fixed strength, so
`experiments.evaluate --perturb=NAME[:STRENGTH]` can measure how much accuracy each costs.
The geometric and photometric ones follow the training conventions of `augment_host`
(the same maps, bilinear with BORDER_REFLECT_101, the same vignetting formula), on the
whole H x W source image instead of a c x c crop; the pipeline then resizes and crops as
for a clean pass. Every perturbation keeps H and W.

| name            | strength means                                | default | drawn per image      |
|-----------------|-----------------------------------------------|---------|----------------------|
| color_cast      | gray levels added per channel, 0..255         | 20      | each channel's sign  |
| vignetting      | brightness removed at the corners, 0..1       | 0.5     | nothing              |
| lens_distortion | radial coefficient k, 0..1                    | 0.2     | barrel or pincushion |
| rotation        | degrees, 0..180                               | 10      | the sign             |
| blur            | Gaussian sigma in source pixels, 0..50        | 1       | nothing              |
| noise           | Gaussian std in gray levels, 0..255           | 10      | the noise field      |
| jpeg            | JPEG quality, integer 1..100, lower: stronger | 20      | nothing              |

Conventions (x right, y down, pixel centres, centre c = ((W - 1) / 2, (H - 1) / 2),
r normalised to 1 at the corners: r^2 = |d|^2 / |c|^2 for d = pixel - c):
  color_cast       out = round(clip(in + s_ch, 0, 255)), s_ch = +-strength; the training
                   maximum is 20 (`augment.COLOR_SHIFTS`).
  vignetting       out = round(in * gain), gain = 1 - strength * smoothstep(t),
                   t = clip((r - 0.3) / 0.7, 0, 1): `augment_host.vignette_gain` on H x W,
                   start radius fixed at VIGNETTE_RADIUS.
  lens_distortion  source = c + d (1 + k r^2) (`augment_host.sampling_grid` step 1; training
                   draws |k| up to 0.26).
  rotation         source = c + R(a) d about the centre, the training rotation (a > 0
                   counter-clockwise on screen; training draws |a| up to 10).
  blur             cv2.GaussianBlur, BORDER_REFLECT_101.
  noise            out = round(clip(in + n, 0, 255)), n ~ N(0, strength^2) per pixel and channel.
  jpeg             encoded (4:2:0 chroma, the common camera / web setting) and decoded again
                   with simplejpeg (libjpeg-turbo, what the sources decode with).
Geometric maps are resampled once, bilinear, BORDER_REFLECT_101, as in training.

Per-image draws come from np.random.default_rng((seed, index, position of the name in
PERTURBATIONS)): deterministic in (name, strength, seed, index), the same on any process
or worker. Like `augment_host`, this module imports no JAX: Grain workers run it.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg

from deep_image.config_error import ConfigError
from deep_image.data.sources import decode_image

# name -> default strength, in the table's order (the position seeds the per-image draws).
PERTURBATIONS: dict[str, float] = {
  "color_cast": 20.0,
  "vignetting": 0.5,
  "lens_distortion": 0.2,
  "rotation": 10.0,
  "blur": 1.0,
  "noise": 10.0,
  "jpeg": 20.0,
}

# name -> (lowest, highest strength, whether it must be an integer, what it means).
_RANGES: dict[str, tuple[float, float, bool, str]] = {
  "color_cast": (0.0, 255.0, False, "gray levels added per channel"),
  "vignetting": (0.0, 1.0, False, "fraction of brightness removed at the corners"),
  "lens_distortion": (0.0, 1.0, False, "radial coefficient k"),
  "rotation": (0.0, 180.0, False, "degrees"),
  "blur": (0.0, 50.0, False, "Gaussian sigma in source pixels"),
  "noise": (0.0, 255.0, False, "Gaussian std in gray levels"),
  "jpeg": (1.0, 100.0, True, "JPEG quality, lower is stronger"),
}

# Vignetting's start radius (normalised, 1 = corner): fixed, strength says how dark.
VIGNETTE_RADIUS = 0.3


def _compact(value: float) -> str:
  """10.0 -> '10', 0.5 -> '0.5': the shortest text that reads back as the same float."""
  value = float(value)
  if value.is_integer() and abs(value) < 1e15:
    return str(int(value))
  return repr(value)


def _problem(name: str, strength: float) -> str | None:
  """Why (name, strength) is not a perturbation, or None when it is one."""
  if name not in PERTURBATIONS:
    return f"unknown perturbation {name!r}; expected one of {', '.join(PERTURBATIONS)}"
  lo, hi, integer, unit = _RANGES[name]
  ok = math.isfinite(strength) and lo <= strength <= hi
  if not ok or (integer and not float(strength).is_integer()):
    kind = "an integer" if integer else "a number"
    return (
      f"{name} strength {_compact(strength)}: expected {kind} in "
      f"{_compact(lo)}..{_compact(hi)} ({unit})"
    )
  return None


def _centred(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """dx, dy, r2: float32 [H, W] offsets from the image centre and r^2 (1 at the corners)."""
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  dy, dx = np.meshgrid(
    np.arange(height, dtype=np.float32) - np.float32(cy),
    np.arange(width, dtype=np.float32) - np.float32(cx),
    indexing="ij",
  )
  norm2 = max(cx * cx + cy * cy, 1.0)
  return dx, dy, ((dx * dx + dy * dy) / np.float32(norm2)).astype(np.float32)


def _round_clip(values: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _sign(rng: np.random.Generator) -> float:
  return 1.0 if rng.random() < 0.5 else -1.0


def vignette_gain(height: int, width: int, strength: float) -> np.ndarray:
  """float32 [H, W]: `augment_host.vignette_gain`'s smoothstep with radius VIGNETTE_RADIUS,
  r normalised to 1 at the corners of the H x W image (equal to it for a square)."""
  _, _, r2 = _centred(height, width)
  t = np.clip((np.sqrt(r2) - np.float32(VIGNETTE_RADIUS)) / np.float32(1 - VIGNETTE_RADIUS), 0, 1)
  return (1.0 - np.float32(strength) * t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _color_cast(image, strength, rng):
  shift = np.where(rng.random(3) < 0.5, -strength, strength).astype(np.float32)
  return _round_clip(image.astype(np.float32) + shift)


def _vignetting(image, strength, rng):
  gain = vignette_gain(image.shape[0], image.shape[1], strength)
  return _round_clip(image.astype(np.float32) * gain[..., None])


def _lens_distortion(image, strength, rng):
  k = _sign(rng) * strength  # + barrel (samples farther out), - pincushion
  height, width = image.shape[:2]
  dx, dy, r2 = _centred(height, width)
  scale = 1.0 + np.float32(k) * r2
  map_x = dx * scale + np.float32((width - 1) / 2.0)
  map_y = dy * scale + np.float32((height - 1) / 2.0)
  return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _rotation(image, strength, rng):
  angle = math.radians(_sign(rng) * strength)
  cos, sin = math.cos(angle), math.sin(angle)
  height, width = image.shape[:2]
  centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
  # Output pixel -> source pixel, `augment_host.affine_matrix`'s rotation about the centre.
  linear = np.array([[cos, -sin], [sin, cos]])
  matrix = np.hstack([linear, (centre - linear @ centre)[:, None]])
  return cv2.warpAffine(
    image,
    matrix,
    (width, height),
    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
    borderMode=cv2.BORDER_REFLECT_101,
  )


def _blur(image, strength, rng):
  return cv2.GaussianBlur(
    image, (0, 0), sigmaX=strength, sigmaY=strength, borderType=cv2.BORDER_REFLECT_101
  )


def _noise(image, strength, rng):
  noise = rng.normal(0.0, strength, image.shape).astype(np.float32)
  return _round_clip(image.astype(np.float32) + noise)


def _jpeg(image, strength, rng):
  data = simplejpeg.encode_jpeg(
    np.ascontiguousarray(image), quality=int(strength), colorspace="RGB", colorsubsampling="420"
  )
  return simplejpeg.decode_jpeg(data, colorspace="RGB")


_APPLY: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
  "color_cast": _color_cast,
  "vignetting": _vignetting,
  "lens_distortion": _lens_distortion,
  "rotation": _rotation,
  "blur": _blur,
  "noise": _noise,
  "jpeg": _jpeg,
}


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """One perturbation at one strength (the module docstring's table says what each means).

  Raises ConfigError for an unknown name or a strength out of its range.
  """

  name: str
  strength: float

  def __post_init__(self):
    object.__setattr__(self, "strength", float(self.strength))
    problem = _problem(self.name, self.strength)
    if problem is not None:
      raise ConfigError(f"perturbation {self.name}:{self.strength}: {problem}")

  @property
  def label(self) -> str:
    """'NAME:STRENGTH' with the strength written compactly, e.g. 'rotation:10', 'blur:0.5'."""
    return f"{self.name}:{_compact(self.strength)}"

  def apply(self, image: np.ndarray, index: int, seed: int = 0) -> np.ndarray:
    """The perturbed image.

    Args:
      image: uint8 [H, W, 3] RGB.
      index: the image's record index (seeds its draws), >= 0.
      seed: the evaluation's seed, >= 0.

    Returns:
      uint8 [H, W, 3], a new array; the same for the same (name, strength, seed, index).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if self.strength == 0.0:  # every perturbation but jpeg (>= 1) is the identity at 0
      return image.copy()
    position = list(PERTURBATIONS).index(self.name)
    rng = np.random.default_rng((int(seed), int(index), position))
    out = _APPLY[self.name](image, self.strength, rng)
    return image.copy() if out is image or np.may_share_memory(out, image) else out


def parse_perturbation(text: str) -> Perturbation:
  """'NAME' (its default strength) or 'NAME:STRENGTH' -> Perturbation.

  Raises:
    ConfigError: naming --perturb, the value, and the valid names or range.
  """
  name, sep, value = text.strip().partition(":")
  name = name.strip()
  usage = f"expected NAME or NAME:STRENGTH, NAME one of {', '.join(PERTURBATIONS)}"
  if name not in PERTURBATIONS:
    raise ConfigError(f"--perturb={text!r}: unknown perturbation {name!r}; {usage}")
  if not sep:
    return Perturbation(name, PERTURBATIONS[name])
  try:
    strength = float(value)
  except ValueError:
    raise ConfigError(
      f"--perturb={text!r}: strength {value.strip()!r} is not a number; {usage}, "
      f"e.g. {name}:{_compact(PERTURBATIONS[name])}"
    ) from None
  problem = _problem(name, strength)
  if problem is not None:
    raise ConfigError(f"--perturb={text!r}: {problem}")
  return Perturbation(name, strength)


class PerturbedSource:
  """A random-access source whose images come perturbed: record i's 'image' is
  `perturbation.apply(decode_image(image), i, seed)` (uint8 [H, W, 3]), every other field
  as the wrapped source has it. Picklable (Grain workers), with a repr that names both
  (the Evaluator caches image shapes by repr; a perturbation keeps H and W)."""

  def __init__(self, source, perturbation: Perturbation, seed: int = 0):
    self.source, self.perturbation, self.seed = source, perturbation, int(seed)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    index = operator.index(index)
    if index < 0:
      index += len(self.source)
    record = self.source[index]
    image = self.perturbation.apply(decode_image(record["image"]), index, self.seed)
    return {**record, "image": image}

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.source.class_names

  def __repr__(self) -> str:
    return f"PerturbedSource({self.source!r}, {self.perturbation.label!r}, seed={self.seed})"
