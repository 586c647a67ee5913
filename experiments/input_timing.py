"""The input benchmark's test images and timers: distinct JPEGs made from scikit-image's
bundled photos, a random-access source of their bytes, median rates over repeats, CPU
seconds of a process (/proc/<pid>/stat), and the FLOPs one H100 training image costs.
"""

from __future__ import annotations

import os
import statistics
import time

import cv2
import numpy as np
from PIL import Image

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


_TICKS = os.sysconf("SC_CLK_TCK")


def make_jpegs(directory: str, count: int, seed: int = 0) -> list[str]:
  """Writes `count` distinct 512x512 JPEGs (random crops / scales / flips of the photos)."""
  from skimage import data

  rng = np.random.default_rng(seed)
  photos = [getattr(data, name)()[..., :3] for name in _PHOTOS]
  paths = []
  for i in range(count):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    image = cv2.resize(photo[y : y + side, x : x + side], (512, 512), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
      image = image[:, ::-1]
    path = os.path.join(directory, f"{i:03d}.jpg")
    Image.fromarray(np.ascontiguousarray(image)).save(path, quality=90)
    paths.append(path)
  return paths


class JpegSource:
  """Random-access source of the JPEG bytes: {'image': bytes, 'label': int}."""

  def __init__(self, paths: list[str]):
    self.paths = list(paths)
    self.blobs = [open(p, "rb").read() for p in self.paths]

  def __len__(self):
    return len(self.blobs)

  def __getitem__(self, i):
    return {"image": self.blobs[i], "label": i % 10}

  def __repr__(self):
    return f"JpegSource({len(self.paths)} files)"


def median_rate(run, count: int, repeats: int) -> float:
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    rates.append(count / (time.perf_counter() - start))
  return statistics.median(rates)


def per_item_us(fn, items: list, repeats: int) -> float:
  """Median over repeats of the mean microseconds of fn(item) over items."""
  fn(items[0])
  return 1e6 / median_rate(lambda: [fn(x) for x in items], len(items), repeats)


def cpu_seconds(pid: int) -> float:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime.


def table2_train_flops() -> float:
  """FLOPs of one Table 2 training image: 3 x the forward pass (forward + backward)."""
  from deep_image.models import summary
  from deep_image.models.vgg import make_model
  from experiments.configs import table2

  return 3.0 * summary.total_flops(make_model(table2.get_config().model).spec)
