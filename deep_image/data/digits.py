"""scikit-learn's bundled handwritten digits as a tiny, offline image-classification set.

1,797 8x8 grey images with 17 levels (0..16), 10 classes. Upsampled (bilinear) to
`image_size` and repeated to 3 channels so it flows through the same RGB pipeline and models
as ImageNet. The split is a stratified 80/20 train/test split seeded by `seed`.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

NUM_CLASSES = 10
TEST_FRACTION = 0.2
_HELD_OUT = ("test", "validation", "eval")


@functools.lru_cache(maxsize=8)
def _arrays(image_size: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  # Cached because the train loop and the source may both ask; a few MB at most.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], 0..255
  labels = digits.target.astype(np.int32)
  index = np.arange(len(labels))
  train_index, test_index = train_test_split(
    index, test_size=TEST_FRACTION, stratify=labels, random_state=seed
  )
  chosen = np.sort(test_index if split in _HELD_OUT else train_index)
  resized = np.stack(
    [
      np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.Resampling.BILINEAR))
      for g in grey[chosen]
    ]
  )
  images = np.repeat(resized[..., None], 3, axis=-1)
  images.setflags(write=False)  # Shared through the cache: nobody may modify it in place.
  return images, labels[chosen]


def load_digits_arrays(
  image_size: int = 32, split: str = "train", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """The digits split as arrays.

  Args:
    image_size: output side S.
    split: 'train', or one of 'test' / 'validation' / 'eval' for the held-out 20%.
    seed: split seed; train and held-out parts of one seed never share an image.

  Returns:
    images uint8 [N, S, S, 3] (read-only), labels int32 [N] in 0..9; N = 1437 train, 360 test.
  """
  if split != "train" and split not in _HELD_OUT:
    raise ValueError(f"digits split {split!r}: expected 'train' or one of {_HELD_OUT}")
  return _arrays(int(image_size), "test" if split in _HELD_OUT else "train", int(seed))


class DigitsSource:
  """In-memory random-access source: `source[i]` = {'image': uint8 [S,S,3], 'label': int}."""

  num_classes = NUM_CLASSES
  class_names = tuple(str(d) for d in range(NUM_CLASSES))

  def __init__(self, image_size: int = 32, split: str = "train", seed: int = 0):
    self.image_size, self.split, self.seed = image_size, split, seed
    self.images, self.labels = load_digits_arrays(image_size, split, seed)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"DigitsSource(image_size={self.image_size}, split={self.split!r}, seed={self.seed})"
