"""One image file as a one-record source, tested like an eval image (`experiments.predict`)."""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from deep_image.config_error import ConfigError


class OneImage:
  """A one-record source: the encoded file as the pipeline's eval input (label unknown: 0).

  A missing file, one Pillow cannot read, or one over Pillow's decompression-bomb guard
  is a ConfigError naming `--image`.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ConfigError(f"--image={path!r}: no such file")
    with open(path, "rb") as f:
      self.data = f.read()
    try:
      with Image.open(io.BytesIO(self.data)) as img:
        img.load()
    except Image.DecompressionBombError as e:
      # Raised from the header alone, before any pixel is decoded.
      raise ConfigError(
        f"--image={path!r}: refused by Pillow's decompression-bomb guard "
        f"(PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {e}"
      ) from e
    except (UnidentifiedImageError, OSError) as e:
      raise ConfigError(f"--image={path!r} is not an image Pillow can read: {e}") from e
    self.path = path

  def __len__(self) -> int:
    return 1

  def __getitem__(self, index: int) -> dict:
    return {"image": self.data, "label": 0}

  def __repr__(self) -> str:
    return f"OneImage({self.path!r})"
