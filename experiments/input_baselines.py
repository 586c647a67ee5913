"""What the input benchmark compares the pipeline with: each JPEG decoder a user could pick,
the plain alternative (OpenCV reduced decode + albumentations 2.0.8 + a numpy vignette), and
the pool workers of the decode-only ceiling and of that alternative.

The pool functions are module-level so that spawned worker processes can import them;
`worker_setup` gives each worker the JPEGs and the same OpenCV threads / malloc settings as
the pipeline's Grain workers. albumentations is a dev-only requirement (requirements-dev.txt).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from deep_image.data import grain_workers
from deep_image.data.sources import decode_image


def _pillow(blob: bytes, reduced: int | None) -> np.ndarray:
  with Image.open(io.BytesIO(blob)) as img:
    if reduced:
      w, h = img.size
      img.draft("RGB", (-(-w * reduced // min(w, h)), -(-h * reduced // min(w, h))))
    return np.asarray(img.convert("RGB"))


def _opencv(blob: bytes, reduced: int | None) -> np.ndarray:
  flag = cv2.IMREAD_REDUCED_COLOR_2 if reduced else cv2.IMREAD_COLOR
  return cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), flag), cv2.COLOR_BGR2RGB)


def _simplejpeg(blob: bytes, reduced: int | None) -> np.ndarray:
  if not reduced:
    return simplejpeg.decode_jpeg(blob)
  return simplejpeg.decode_jpeg(blob, min_height=reduced, min_width=reduced)


def decoders() -> dict:
  found = {
    f"Pillow {Image.__version__}": _pillow,
    f"OpenCV {cv2.__version__} (imdecode + BGR->RGB)": _opencv,
    f"simplejpeg {simplejpeg.__version__}": _simplejpeg,
  }
  try:  # A ctypes wrapper: needs the system's libturbojpeg, which pip cannot install.
    from turbojpeg import TurboJPEG

    tj = TurboJPEG()
    found["PyTurboJPEG"] = lambda blob, reduced: tj.decode(
      blob, pixel_format=0, scaling_factor=(1, 2) if reduced else None
    )
  except (ImportError, RuntimeError, OSError):
    pass
  return found


# --- per-process work for the pool rows; module-level so spawned workers can import it.
_BLOBS: list[bytes] = []


_ALBU = None


def worker_setup(paths: list[str], scale: int, crop: int) -> None:
  global _BLOBS, _ALBU
  grain_workers.init_worker(0, 1)  # Same OpenCV threads and malloc settings as our workers.
  _BLOBS = [open(p, "rb").read() for p in paths]
  _ALBU = albumentations_transform(scale, crop)


def decode_ours(i: int) -> int:
  return decode_image(_BLOBS[i % len(_BLOBS)], min_side=_ALBU[1]).shape[0]


def albumentations_one(i: int) -> int:
  rng = np.random.default_rng(i)
  image = _opencv(_BLOBS[i % len(_BLOBS)], reduced=_ALBU[1])
  return numpy_vignette(_ALBU[0](image=image)["image"], rng).shape[0]


def albumentations_transform(scale: int, crop: int):
  """(albumentations Compose of the paper's augmentations, scale)."""
  import albumentations as A

  compose = A.Compose(
    [
      A.SmallestMaxSize(max_size=scale, interpolation=cv2.INTER_AREA),
      A.RandomCrop(crop, crop),
      A.HorizontalFlip(p=0.5),
      A.Rotate(limit=10, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
      A.OpticalDistortion(distort_limit=0.26, p=0.5),
      A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.5),
    ]
  )
  return compose, scale


def numpy_vignette(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Half of the images darkened towards the corners, as `augment_host.vignette_gain`, in numpy."""
  if rng.random() >= 0.5:
    return image
  h, w = image.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  r = np.sqrt(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * ((h - 1) / 2) ** 2))
  radius, strength = rng.uniform(0, 0.975), rng.uniform(0.02, 0.98)
  t = np.clip((r - radius) / (1 - radius), 0, 1)
  gain = 1 - strength * t * t * (3 - 2 * t)
  return np.clip(image * gain[..., None] + 0.5, 0, 255).astype(np.uint8)
