"""A generated dataset where only small objects carry the class (paper section 4.2, Figs 7-8).

Each example is a large procedural scene (default 512x512): a random colour texture (smooth
multi-octave value noise plus fine stripes of random period and angle, plus pixel grain) with
a few small (default 12-20 px) filled polygons drawn on it:

  * class objects: 2-4 copies of the class's shape at random positions, sizes and colours. The
    class is (shape, orientation): classes 0-3 are a triangle pointing up / right / down /
    left, 4-7 an 'L' in its four rotations, 8-11 a 'T' in its four rotations, each jittered by
    up to +-15 degrees so orientations stay distinct (90 degrees apart). Several copies let a
    224 crop of a 512 scene contain one most of the time, as a crop of a photo usually
    contains (part of) its object.
  * `classes='mirror_shapes'` (for flips as augmentation and test views): (shape, up or
    down) for a triangle, an 'L' drawn mirrored ('J') half the time, a 'T' and an arrow:
    8 classes that a horizontal flip maps to themselves, as ImageNet's.
  * `classes='gratings'`: the objects are discs striped in two colours; the class is the
    stripes' period (2.5, 3.5, 5 or 7 px, +-5%) and direction (vertical or horizontal,
    +-10 degrees): 8 flip-invariant classes whose evidence is fine detail. Halving the
    scene leaves the 5 and 7 px stripes and takes the 2.5 and 3.5 px ones under the 2 px
    a period needs: the paper's small-object detail damaged by downsampling, in a form a
    small network learns in minutes (the shape classes take far longer). Damaged, not
    gone: what the resize leaves (aliases, residue) still tells them apart, and a model
    trained at half scale reads them (96% top-1 in RESULTS.md).
  * distractors: 2-4 shapes that look the same at every orientation (disc, plus sign, square
    at any angle), identical in distribution for all classes.

Colours, textures and positions are independent of the class, so the only evidence is the
shape and orientation of ~16 px objects: downsizing the scene to 64x64 leaves them ~2 px
wide and destroys it, downsizing to 256 blurs it, and full resolution keeps it.

Every example is a pure function of (seed, split, index): the RNG is seeded with the tuple
(seed, split code, index), so train (code 0) and validation (code 1) never share a stream.
Labels are `index % num_classes`, so every split is exactly balanced over any multiple of
`num_classes` consecutive indices (shuffle in the pipeline as with any source).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Polygons in unit coordinates (x right, y down, inside [-1, 1]^2), in their orientation 0.
_TRIANGLE = [(0.0, -1.0), (0.85, 0.85), (-0.85, 0.85)]  # Points up.
_ELL = [(-0.8, -1.0), (-0.2, -1.0), (-0.2, 0.4), (0.8, 0.4), (0.8, 1.0), (-0.8, 1.0)]
_TEE = [
  (-1.0, -1.0), (1.0, -1.0), (1.0, -0.4), (0.3, -0.4),
  (0.3, 1.0), (-0.3, 1.0), (-0.3, -0.4), (-1.0, -0.4),
]  # fmt: skip
_ARROW = [
  (0.0, -1.0), (0.9, -0.1), (0.3, -0.1), (0.3, 1.0), (-0.3, 1.0), (-0.3, -0.1), (-0.9, -0.1),
]  # fmt: skip
_CLASS_SHAPES = (_TRIANGLE, _ELL, _TEE)
MAX_CLASSES = 4 * len(_CLASS_SHAPES)
# Class c: shape c // 4, its orientation-0 top turned to face this way (clockwise steps).
CLASS_NAMES = tuple(
  f"{shape} {way}" for shape in ("triangle", "L", "T") for way in ("up", "right", "down", "left")
)
# mirror_shapes: class c is shape c // 2 pointing up (c even) or down; the 'L' is drawn
# mirrored half the time, so a flipped scene is a scene of the same class.
_MIRROR_CLASS_SHAPES = (_TRIANGLE, _ELL, _TEE, _ARROW)
MIRROR_CLASS_NAMES = tuple(
  f"{shape} {way}" for shape in ("triangle", "L/J", "T", "arrow") for way in ("up", "down")
)
# gratings: class c has stripes of period _PERIODS[c // 2], vertical (c even) or horizontal.
_PERIODS = (2.5, 3.5, 5.0, 7.0)
GRATING_CLASS_NAMES = tuple(
  f"{way} stripes {p:g}px" for p in _PERIODS for way in ("vertical", "horizontal")
)
CLASS_SETS = {
  "shapes": CLASS_NAMES,
  "mirror_shapes": MIRROR_CLASS_NAMES,
  "gratings": GRATING_CLASS_NAMES,
}
_PLUS = [
  (-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
  (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3),
]  # fmt: skip
_SQUARE = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
_DISC = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
_DISTRACTORS = (_DISC, _PLUS, _SQUARE)
_JITTER_DEG = 15.0
SPLIT_CODES = {"train": 0, "validation": 1, "test": 1, "eval": 1}
_SUBPIXEL_BITS = 4  # cv2 polygon coordinates in 1/16 px, for smooth small shapes.


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random colour texture, float32 [size, size, 3] in about 0..255."""
  noise = np.zeros((size, size), np.float32)
  for grid, weight in ((4, 1.0), (16, 0.5), (64, 0.25)):
    coarse = rng.random((grid, grid), dtype=np.float32)
    noise += weight * cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
  noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
  # Fine stripes (period 5-20 px) put detail at the object scale everywhere, so objects are
  # not the only high-frequency content and blur hurts them as much as it hurts the scene.
  angle, period = rng.uniform(0, math.pi), rng.uniform(5.0, 20.0)
  coords = np.arange(size, dtype=np.float32) * np.float32(2 * math.pi / period)
  along_x = coords * np.float32(math.cos(angle))
  along_y = coords * np.float32(math.sin(angle)) + np.float32(rng.uniform(0, 2 * math.pi))
  # sin(a + b) = sin a cos b + cos a sin b: two outer products instead of S^2 sines.
  stripes = np.outer(np.cos(along_y), np.sin(along_x)) + np.outer(np.sin(along_y), np.cos(along_x))
  mix = np.clip(0.8 * noise + 0.2 * rng.uniform(0.2, 1.0) * stripes, 0.0, 1.0)
  dark, light = rng.uniform(0, 255, (2, 3)).astype(np.float32)
  grain = np.float32(6.0) * rng.standard_normal((size, size), dtype=np.float32)
  # Per-channel planes merged by OpenCV: numpy broadcasting over a last axis of 3 is ~5x slower.
  return cv2.merge([mix * (light[c] - dark[c]) + (grain + dark[c]) for c in range(3)])


def _place(rng, size: int, radius: float, taken: list[tuple[float, float, float]]):
  """A centre at least `radius` from the border, avoiding `taken` (x, y, r) if it can."""
  for _ in range(20):
    x, y = rng.uniform(radius, size - radius, 2)
    if all((x - tx) ** 2 + (y - ty) ** 2 > (1.3 * (radius + tr)) ** 2 for tx, ty, tr in taken):
      break
  taken.append((x, y, radius))
  return x, y


def _draw(image, polygon, x, y, side, angle_deg, rng) -> None:
  """Fills `polygon` (unit coords) scaled to `side` px, rotated, centred at (x, y), in place."""
  theta = math.radians(angle_deg)
  rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  points = np.asarray(polygon) @ rotation.T * (side / 2.0) + (x, y)
  # Colour far from the local background so the object is visible at full resolution.
  x0, y0 = int(max(x - side, 0)), int(max(y - side, 0))
  local = image[y0 : int(y + side), x0 : int(x + side)].reshape(-1, 3).mean(0)
  for _ in range(8):
    colour = rng.uniform(0, 255, 3)
    if np.abs(colour - local).mean() >= 60:
      break
  else:
    colour = np.where(local > 127, local - 110, local + 110)
  fixed = np.round(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)
  cv2.fillPoly(
    image, [fixed], tuple(float(c) for c in np.clip(colour, 0, 255)), cv2.LINE_AA, _SUBPIXEL_BITS
  )


def _draw_grating(image, x, y, side, period, angle_deg, rng) -> None:
  """A disc of diameter `side` at (x, y) striped in two colours, in place (antialiased)."""
  r = side / 2.0
  x0, x1 = max(int(x - r) - 1, 0), min(int(x + r) + 2, image.shape[1])
  y0, y1 = max(int(y - r) - 1, 0), min(int(y + r) + 2, image.shape[0])
  v, u = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  u, v = u + 0.5 - x, v + 0.5 - y
  theta = math.radians(angle_deg)
  phase = rng.uniform(0, 2 * math.pi)
  wave = 0.5 + 0.5 * np.sin(
    (u * math.cos(theta) + v * math.sin(theta)) * (2 * math.pi / period) + phase
  )
  alpha = np.clip(r - np.sqrt(u * u + v * v) + 0.5, 0.0, 1.0)[..., None]
  local = image[y0:y1, x0:x1].reshape(-1, 3).mean(0)
  first = np.where(local > 127, local - 110, local + 110)
  second = rng.uniform(0, 255, 3)
  for _ in range(8):  # the two stripe colours far apart, so the stripes are visible
    if np.abs(second - first).mean() >= 80:
      break
    second = rng.uniform(0, 255, 3)
  disc = first + wave[..., None] * (second - first).astype(np.float32)
  image[y0:y1, x0:x1] = (1 - alpha) * image[y0:y1, x0:x1] + alpha * disc


def _class_names(classes: str) -> tuple[str, ...]:
  """The names of a class set; ValueError naming `classes` for an unknown one."""
  if classes not in CLASS_SETS:
    raise ValueError(f"highres classes={classes!r}: expected one of {sorted(CLASS_SETS)}")
  return CLASS_SETS[classes]


def render_scene(
  rng: np.random.Generator,
  label: int,
  image_size: int = 512,
  object_size: tuple[int, int] = (12, 20),
  num_objects: tuple[int, int] = (2, 4),
  num_distractors: tuple[int, int] = (2, 4),
  classes: str = "shapes",
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one scene.

  Args:
    rng: the example's generator (consumed).
    label: class id in [0, MAX_CLASSES).
    image_size: scene side S.
    object_size: inclusive range of object sides in px.
    num_objects: inclusive range of class-object copies.
    num_distractors: inclusive range of class-independent shapes.
    classes: 'shapes' | 'mirror_shapes' | 'gratings' (module docstring).

  Returns:
    image uint8 [S, S, 3]; boxes float32 [K, 4] (x0, y0, x1, y1) of the K class objects.
  """
  limit = len(_class_names(classes))
  if not 0 <= label < limit:
    raise ValueError(f"label {label} outside [0, {limit})")
  canvas = _texture(rng, image_size)
  if classes == "mirror_shapes":
    shape, quarter_turns = _MIRROR_CLASS_SHAPES[label // 2], 2 * (label % 2)
  elif classes == "shapes":
    shape, quarter_turns = _CLASS_SHAPES[label // 4], label % 4
  taken: list[tuple[float, float, float]] = []
  boxes = []
  count = int(rng.integers(num_objects[0], num_objects[1] + 1))
  for _ in range(count):
    side = rng.uniform(object_size[0], object_size[1])
    x, y = _place(rng, image_size, side, taken)
    if classes == "gratings":
      period = _PERIODS[label // 2] * rng.uniform(0.95, 1.05)
      angle = 90.0 * (label % 2) + rng.uniform(-10.0, 10.0)
      _draw_grating(canvas, x, y, side, period, angle, rng)
    else:
      angle = 90.0 * quarter_turns + rng.uniform(-_JITTER_DEG, _JITTER_DEG)
      polygon = shape
      if classes == "mirror_shapes" and rng.random() < 0.5:
        polygon = [(-px, py) for px, py in shape]
      _draw(canvas, polygon, x, y, side, angle, rng)
    boxes.append((x - side / 2, y - side / 2, x + side / 2, y + side / 2))
  for _ in range(int(rng.integers(num_distractors[0], num_distractors[1] + 1))):
    side = rng.uniform(object_size[0], object_size[1])
    x, y = _place(rng, image_size, side, taken)
    polygon = _DISTRACTORS[int(rng.integers(len(_DISTRACTORS)))]
    _draw(canvas, polygon, x, y, side, rng.uniform(0, 360), rng)
  np.clip(canvas, 0, 255, out=canvas)
  image = np.rint(canvas, out=canvas).astype(np.uint8)
  return image, np.asarray(boxes, np.float32).reshape(-1, 4)


class HighResSource:
  """Random-access generated source: `source[i]` = {'image': uint8 [S,S,3], 'label': int}.

  Nothing is stored: each `__getitem__` renders its scene (~10 ms at 512 px), so any size
  works and Grain workers pickle only the parameters.
  """

  def __init__(
    self,
    split: str = "train",
    num_examples: int = 10_000,
    image_size: int = 512,
    num_classes: int = 8,
    seed: int = 0,
    object_size: tuple[int, int] = (12, 20),
    num_objects: tuple[int, int] = (2, 4),
    num_distractors: tuple[int, int] = (2, 4),
    classes: str = "shapes",
  ):
    """Args: see `render_scene`; `split` is 'train' or 'validation' ('test'/'eval' alias it)."""
    if split not in SPLIT_CODES:
      raise ValueError(f"highres split {split!r}: expected one of {sorted(SPLIT_CODES)}")
    limit = len(_class_names(classes))
    if not 2 <= num_classes <= limit:
      raise ValueError(f"highres num_classes {num_classes}: expected 2..{limit} with {classes!r}")
    if min(object_size) < 2 or max(object_size) * 4 > image_size:
      raise ValueError(f"highres object_size {object_size} does not fit image_size {image_size}")
    # Aliases collapse to one name, so equal sources have equal reprs (Grain keys on it).
    self.split = "train" if SPLIT_CODES[split] == 0 else "validation"
    self.num_examples, self.image_size = int(num_examples), int(image_size)
    self.num_classes, self.seed = int(num_classes), int(seed)
    self.object_size = tuple(int(s) for s in object_size)
    self.num_objects = tuple(int(n) for n in num_objects)
    self.num_distractors = tuple(int(n) for n in num_distractors)
    self.classes = str(classes)

  def __len__(self) -> int:
    return self.num_examples

  @property
  def class_names(self) -> tuple[str, ...]:
    """Names of labels 0..num_classes-1, e.g. 'triangle up', 'L right'."""
    return CLASS_SETS[self.classes][: self.num_classes]

  def label(self, index: int) -> int:
    """The class of example `index`, without rendering it."""
    return index % self.num_classes

  def render(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(image uint8 [S,S,3], label, class-object boxes float32 [K,4]) of example `index`."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], int(index)])
    label = self.label(index)
    image, boxes = render_scene(
      rng,
      label,
      self.image_size,
      self.object_size,
      self.num_objects,
      self.num_distractors,
      self.classes,
    )
    return image, label, boxes

  def __getitem__(self, index: int) -> dict:
    image, label, _ = self.render(index)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (
      f"HighResSource(split={self.split!r}, num_examples={self.num_examples}, "
      f"image_size={self.image_size}, num_classes={self.num_classes}, seed={self.seed}, "
      f"object_size={self.object_size}, num_objects={self.num_objects}, "
      f"num_distractors={self.num_distractors}"
      + (f", classes={self.classes!r})" if self.classes != "shapes" else ")")
    )
