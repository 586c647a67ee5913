"""A source written as an image folder, DST/<class name>/<index>.png: the layout that
`deep_image.data.prepare` reads (`experiments.export_images` is the command line).

Class folders are named by the source's class names, made filesystem-safe
(`folder_name`); PNG keeps the pixels exact, so the folder holds the source's images as
they are.
"""

from __future__ import annotations

import os
import re

from PIL import Image

from deep_image.data import sources


def folder_name(name: str) -> str:
  """'L/J up' -> 'L-J_up': a class name as one safe path component."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "-")).strip("_") or "class"


def export_image_folder(source, dst: str, limit: int = 0) -> tuple[int, list[str]]:
  """Writes the first `limit` records of `source` (all for limit <= 0) under `dst`.

  `source`: a random-access source with `class_names` and records {"image": encoded
  bytes, "label": int} (`deep_image.data.sources`). Returns (images written, class folder
  names). Raises ValueError when two class names become the same folder name.
  """
  names = [folder_name(n) for n in source.class_names]
  if len(set(names)) != len(names):
    raise ValueError(f"class names {source.class_names} collide as folder names {names}")
  count = len(source) if limit <= 0 else min(limit, len(source))
  for name in names:
    os.makedirs(os.path.join(dst, name), exist_ok=True)
  for i in range(count):
    record = source[i]
    image = sources.decode_image(record["image"])
    Image.fromarray(image).save(os.path.join(dst, names[record["label"]], f"{i:06d}.png"))
  return count, names
