"""Checks one image file and gives the bytes to store: an 8-bit RGB JPEG (`check_image`).

Every file is decoded with Pillow. What a reader would trip over is converted to an 8-bit RGB
JPEG (quality `jpeg_quality`): grayscale / CMYK / palette / 16-bit / alpha (composited over
white, because transparent pixels hold arbitrary colours) images, non-JPEG formats under any
name, EXIF-rotated JPEGs (rotated upright, because the JPEG is re-encoded without EXIF), and
multi-frame files (first frame). A valid RGB JPEG keeps its original bytes. Skipped (raising
`SkipImage` with the reason): empty, unidentifiable, truncated or corrupt files, images with
more than `max_image_pixels` pixels (Pillow's `Image.MAX_IMAGE_PIXELS` decompression-bomb
guard, set to that value while checking), images whose shorter side is below `min_side`
(default 8 px: a 224 crop of such an image is an upsampling blur with no content), and float
images. Only formats in `ALLOWED_FORMATS` are tried.

`deep_image.data.prepare` calls this for every file of a folder and reports each conversion
and skip; the module itself reads no files and writes none.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default guard (~ 0.25 GiB of RGB).
DEFAULT_MIN_SIDE = 8
DEFAULT_JPEG_QUALITY = 95
# Formats Pillow may try (its JPEG opener also covers multi-picture MPO files). Without a
# list, lenient decoders (TGA, ICO, ...) can "identify" random bytes as an image.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Pillow's exif_transpose table: EXIF orientation -> transpose that makes the image upright.
_ORIENTATION_TRANSPOSE = {
  2: Image.Transpose.FLIP_LEFT_RIGHT,
  3: Image.Transpose.ROTATE_180,
  4: Image.Transpose.FLIP_TOP_BOTTOM,
  5: Image.Transpose.TRANSPOSE,
  6: Image.Transpose.ROTATE_270,
  7: Image.Transpose.TRANSVERSE,
  8: Image.Transpose.ROTATE_90,
}


class SkipImage(Exception):
  """The file cannot be used; `str(e)` is the reason that goes into the report."""


@dataclasses.dataclass(frozen=True)
class CheckOptions:
  """How `check_image` judges a file."""

  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
  min_side: int = DEFAULT_MIN_SIDE
  jpeg_quality: int = DEFAULT_JPEG_QUALITY


class _PillowGuards:
  """Sets Pillow's process-wide bomb limit and strict truncation for the `with` body."""

  def __init__(self, max_image_pixels: int):
    self.max_image_pixels = max_image_pixels

  def __enter__(self):
    # Registers every plugin: open(formats=...) looks plugins up without loading them first,
    # so a not-yet-loaded one (MPO, WEBP, TIFF) would raise KeyError for any file.
    Image.init()
    self._saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    Image.MAX_IMAGE_PIXELS = self.max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # Someone may have relaxed it; we must not.

  def __exit__(self, *exc):
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


def _has_alpha(img: Image.Image) -> bool:
  return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgb(img: Image.Image, conversions: list[str]) -> Image.Image:
  """Any Pillow mode -> 8-bit 'RGB', appending what it did to `conversions`."""
  mode = img.mode
  if mode == "RGB" and not _has_alpha(img):
    return img
  if mode.startswith("I;16") or mode == "I":
    # Pillow's own I;16 -> RGB conversion clips at 255 instead of scaling: scale by hand.
    # 'I' (32-bit) is treated as 16-bit data, which is what PNG/TIFF give in that mode.
    wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    conversions.append(f"mode {mode} (16-bit) -> 8-bit RGB")
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode == "F":
    raise SkipImage("unsupported float image (mode F)")
  if _has_alpha(img):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    conversions.append(f"mode {mode} with alpha -> RGB over white")
    return Image.alpha_composite(white, rgba).convert("RGB")
  conversions.append(f"mode {mode} -> RGB")
  return img.convert("RGB")


def check_image(data: bytes, options: CheckOptions = CheckOptions()) -> tuple[bytes, list[str]]:
  """Decodes `data` fully and returns what to store.

  Args:
    data: the file's bytes.
    options: limits and JPEG quality.

  Returns:
    (jpeg, conversions): an 8-bit RGB JPEG (the original bytes when `data` already is one and
    needs no rotation) and the list of conversions applied (empty when kept as is).

  Raises:
    SkipImage: the file cannot be used; the message is the reason.
  """
  if not data:
    raise SkipImage("empty file (0 bytes)")
  with _PillowGuards(options.max_image_pixels):
    try:
      with warnings.catch_warnings():
        # Between 1x and 2x the limit Pillow only warns; the explicit check below skips those.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
      # Pillow's message names its raising threshold (2x), not the configured limit.
      raise SkipImage(
        f"decompression bomb guard: over 2x max_image_pixels {options.max_image_pixels}: {e}"
      ) from None
    except UnidentifiedImageError:
      raise SkipImage(
        f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
      ) from None
    except (OSError, ValueError) as e:  # Pillow turns other plugin errors into the above.
      raise SkipImage(f"corrupt header: {type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > options.max_image_pixels:
      # Pillow only raises above twice its limit (it warns in between): enforce the limit.
      raise SkipImage(
        f"decompression bomb guard: {width}x{height} = {width * height} pixels > "
        f"max_image_pixels {options.max_image_pixels}"
      )
    if min(width, height) < options.min_side:
      raise SkipImage(
        f"too small: {width}x{height}, shorter side below min_side {options.min_side}"
      )
    try:
      img.load()
    except Exception as e:  # Truncated data is an OSError; broken streams raise others.
      raise SkipImage(f"truncated or corrupt: {type(e).__name__}: {e}") from None
    image_format = img.format
    num_frames = getattr(img, "n_frames", 1)
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if image_format == "JPEG" and img.mode == "RGB" and orientation == 1:
      return data, []
    conversions: list[str] = []
    if num_frames > 1:
      conversions.append(f"first of {num_frames} frames")
    rgb = _to_rgb(img, conversions)
    if orientation in _ORIENTATION_TRANSPOSE:
      rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
      conversions.append(f"EXIF orientation {orientation} applied")
    if image_format != "JPEG":
      conversions.append(f"format {image_format} -> JPEG")
    if not conversions:
      conversions.append("re-encoded as JPEG")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return buffer.getvalue(), conversions
