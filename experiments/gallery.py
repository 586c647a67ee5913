r"""Figure-5-style gallery: each augmentation alone at a few settings, then full combinations.

  python -m experiments.gallery --out=/tmp/gallery
  python -m experiments.gallery --out=/tmp/gallery --image=photo.jpg --scale=512 --seed=3

Writes DIR/augmentations.png: a grid of labelled crops (crop size from `augment.default_config`)
of one photo (default: scikit-image's bundled astronaut, no download) resized so its shorter
side is --scale, as training would see it. Row 1 is the plain centre crop and cropping /
flipping; then colour casting, vignetting, lens distortion and stretching, rotation; the last
row is random draws with every augmentation on, seeded by --seed.
"""

import os

import cv2
import numpy as np
import skimage.data
from absl import app, flags, logging

from deep_image.data import augment, augment_host

_OUT = flags.DEFINE_string("out", None, "Directory to write augmentations.png into.")
_IMAGE = flags.DEFINE_string("image", None, "Photo to use; scikit-image's astronaut if unset.")
_SCALE = flags.DEFINE_integer("scale", 256, "Shorter side the photo is resized to.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random full combinations.")
_COLS = flags.DEFINE_integer("columns", 5, "Tiles per row.")
flags.mark_flag_as_required("out")

_LABEL_HEIGHT = 22
_GAP = 6


def load_photo(path: str | None, scale: int) -> np.ndarray:
  """uint8 [H, W, 3] RGB photo with shorter side `scale` (area-resampled when shrinking)."""
  if path is None:
    image = skimage.data.astronaut()
  else:
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
      raise app.UsageError(f"cannot read image {path!r}")
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  h, w = image.shape[:2]
  f = scale / min(h, w)
  size = (max(round(w * f), scale), max(round(h * f), scale))
  interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
  return cv2.resize(image, size, interpolation=interp)


def gallery_rows(image: np.ndarray, crop: int, seed: int, columns: int):
  """Rows of (label, uint8 [crop, crop, 3]) tiles for `image`, uint8 [H, W, 3]."""
  h, w = image.shape[:2]
  centre = augment.AugmentParams.identity(crop, (h - crop) // 2, (w - crop) // 2)
  run = lambda label, p: (label, augment_host.apply(image, p))
  lens = lambda kind, d: centre.replace(lens_kind=kind, lens_degree=d)
  rows = [
    [
      run("original (centre crop)", centre),
      run("crop top-left", augment.AugmentParams.identity(crop)),
      run("crop bottom-right", augment.AugmentParams.identity(crop, h - crop - 1, w - crop - 1)),
      run("flip", centre.replace(flip=True)),
    ],
    [
      run(f"cast RGB {s[0]:+d} {s[1]:+d} {s[2]:+d}", centre.replace(color_shift=s))
      for s in ((20, 0, 0), (0, 20, 0), (0, 0, 20), (-20, -20, 0), (20, -20, 20))
    ],
    [
      run(f"vignette r={r:g} s={s:g}", centre.replace(vignette_radius=r, vignette_strength=s))
      for r, s in ((0.0, 0.5), (0.5, 0.5), (0.0, 0.98), (0.5, 0.98), (0.8, 0.98))
    ],
    [
      run("barrel d=65", lens(augment.LENS_BARREL, 65)),
      run("barrel d=30", lens(augment.LENS_BARREL, 30)),
      run("pincushion d=65", lens(augment.LENS_PINCUSHION, 65)),
      run("stretch h d=65", lens(augment.LENS_STRETCH_H, 65)),
      run("stretch v d=65", lens(augment.LENS_STRETCH_V, 65)),
    ],
    [run(f"rotate {d:+d} deg", centre.replace(rotation=d)) for d in (-10, -5, 5, 10)],
  ]
  cfg = augment.default_config()
  cfg.crop_size = crop
  for name in ("rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg[name].probability = 1.0
  rng = np.random.default_rng(seed)
  rows.append(
    [run(f"all, draw {i}", augment.sample_params(rng, cfg, (h, w))) for i in range(columns)]
  )
  return rows


def tile(rows, columns: int) -> np.ndarray:
  """Lays rows of (label, uint8 [c, c, 3]) out on a white uint8 RGB canvas."""
  c = rows[0][0][1].shape[0]
  cell_h, cell_w = c + _LABEL_HEIGHT + _GAP, c + _GAP
  canvas = np.full((len(rows) * cell_h + _GAP, columns * cell_w + _GAP, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for k, (label, img) in enumerate(row[:columns]):
      y, x = _GAP + r * cell_h, _GAP + k * cell_w
      canvas[y : y + c, x : x + c] = img
      # Shrink long labels to the tile width rather than let them run into the next tile.
      scale = 0.45
      (tw, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
      scale *= min(1.0, (c - 4) / tw)
      cv2.putText(
        canvas,
        label,
        (x + 2, y + c + 16),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
      )
  return canvas


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  crop = augment.default_config().crop_size
  if _SCALE.value < crop:
    raise app.UsageError(f"--scale={_SCALE.value} is smaller than the crop size {crop}")
  image = load_photo(_IMAGE.value, _SCALE.value)
  canvas = tile(gallery_rows(image, crop, _SEED.value, _COLS.value), _COLS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "augmentations.png")
  if not cv2.imwrite(path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
    raise RuntimeError(f"could not write {path}")
  logging.info("wrote %s (%dx%d)", path, canvas.shape[1], canvas.shape[0])
  print(path)


if __name__ == "__main__":
  app.run(main)
