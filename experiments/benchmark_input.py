r"""Input-pipeline throughput: JPEG decode ceiling, our pipeline, albumentations, device path.

  python -m experiments.benchmark_input --workers=2 --repeats=3 > benchmarks/input_DATE.md

All rows run on the same `--num_images` 512x512 JPEGs (quality 90), made from
scikit-image's bundled photos (crops, resizes, flips), written to a temp dir:

  (a) decode only, `--workers` processes: full 512 decode, and the reduced-DCT decode the
      pipeline uses (`decode_image(min_side=256)`), the ceiling for any decoding pipeline;
  (b) our train pipeline (Grain, `--workers` processes): decode -> shorter side 256 ->
      random 224 crop -> all augmentations (`pipeline.make_train_iterator`, host mode);
  (c) the same steps through albumentations 2.0.8 (SmallestMaxSize, RandomCrop, HorizontalFlip,
      Rotate, OpticalDistortion, RGBShift) plus a numpy vignette, same decode, same processes;
  (d) augmentation only, one core, on already-decoded 256x256 images: ours vs (c)'s;
  (e) `augment_device.apply_batch` jitted on a batch of 256x256 images (this machine's
      default JAX backend).

Each number is the median images/s over `--repeats` runs. albumentations is a dev-only
requirement of this script (`pip install albumentations==2.0.8`).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time

import cv2
import numpy as np
from absl import app, flags
from PIL import Image

from deep_image.data import augment, pipeline
from deep_image.data.sources import decode_image

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 64, "Distinct JPEGs to generate.")
flags.DEFINE_integer("passes", 8, "Passes over the JPEGs per timed run of (a), (b), (c).")
flags.DEFINE_integer("workers", 2, "Processes for (a), (b), (c).")
flags.DEFINE_integer("repeats", 3, "Timed runs per row; the median is reported.")
flags.DEFINE_integer("batch_size", 32, "Batch for (b) and (e).")
flags.DEFINE_integer("scale", 256, "Training scale S.")
flags.DEFINE_integer("crop", 224, "Crop side c.")

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


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


# --- per-process work for (a) and (c); module-level so spawned workers can import it.
_BLOBS: list[bytes] = []
_ALBU = None


def _worker_setup(paths: list[str], scale: int, crop: int) -> None:
  global _BLOBS, _ALBU
  pipeline.init_worker(0, 1)  # Same OpenCV threads and malloc settings as our workers.
  _BLOBS = [open(p, "rb").read() for p in paths]
  _ALBU = albumentations_transform(scale, crop)


def _decode_full(i: int) -> int:
  return decode_image(_BLOBS[i % len(_BLOBS)]).shape[0]


def _decode_draft(i: int) -> int:
  return decode_image(_BLOBS[i % len(_BLOBS)], min_side=256).shape[0]


def _albumentations_one(i: int) -> int:
  rng = np.random.default_rng(i)
  image = decode_image(_BLOBS[i % len(_BLOBS)], min_side=_ALBU[1])
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
  """Half of the images darkened towards the corners, as `augment.vignette_gain`, in numpy."""
  if rng.random() >= 0.5:
    return image
  h, w = image.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  r = np.sqrt(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * ((h - 1) / 2) ** 2))
  radius, strength = rng.uniform(0, 0.975), rng.uniform(0.02, 0.98)
  t = np.clip((r - radius) / (1 - radius), 0, 1)
  gain = 1 - strength * t * t * (3 - 2 * t)
  return np.clip(image * gain[..., None] + 0.5, 0, 255).astype(np.uint8)


def _median_rate(run, count: int, repeats: int) -> float:
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    rates.append(count / (time.perf_counter() - start))
  return statistics.median(rates)


def pool_rate(pool, fn, count: int, repeats: int) -> float:
  pool.map(fn, range(2 * FLAGS.workers))  # Warm the workers (imports, first decode).
  return _median_rate(lambda: pool.map(fn, range(count), chunksize=8), count, repeats)


def pipeline_rate(paths: list[str], count: int, repeats: int) -> float:
  cfg = pipeline.default_config()
  cfg.train_scale, cfg.num_workers = FLAGS.scale, FLAGS.workers
  cfg.augment.crop_size = FLAGS.crop
  it = pipeline.make_train_iterator(
    cfg, global_batch_size=FLAGS.batch_size, seed=0, source=JpegSource(paths)
  )
  for _ in range(2 * FLAGS.workers):  # Worker start-up is not throughput.
    next(it)
  batches = max(count // FLAGS.batch_size, 1)

  def run():
    for _ in range(batches):
      next(it)

  return _median_rate(run, batches * FLAGS.batch_size, repeats)


def augment_only_rates(paths: list[str], repeats: int) -> tuple[float, float]:
  """(ours, albumentations + numpy vignette) images/s on one core, decoded 256 inputs."""
  cv2.setNumThreads(1)
  images = [
    pipeline.resize_shorter_side(decode_image(open(p, "rb").read()), FLAGS.scale) for p in paths
  ]
  space = augment.SamplingSpace.from_config(_aug_config())
  compose, _ = albumentations_transform(FLAGS.scale, FLAGS.crop)
  count = len(images) * 4

  def ours():
    rng = np.random.default_rng(0)
    for i in range(count):
      image = images[i % len(images)]
      augment.apply(image, augment.sample_params(rng, space, image.shape[:2]))

  def albu():
    rng = np.random.default_rng(0)
    for i in range(count):
      numpy_vignette(compose(image=images[i % len(images)])["image"], rng)

  return _median_rate(ours, count, repeats), _median_rate(albu, count, repeats)


def _aug_config():
  cfg = augment.default_config()
  cfg.crop_size = FLAGS.crop
  return cfg


def device_rate(paths: list[str], repeats: int) -> tuple[float, str]:
  import jax

  from deep_image.data import augment_device

  b = FLAGS.batch_size
  images = np.stack(
    [
      cv2.resize(decode_image(open(paths[i % len(paths)], "rb").read()), (FLAGS.scale,) * 2)
      for i in range(b)
    ]
  )
  rng = np.random.default_rng(0)
  space = augment.SamplingSpace.from_config(_aug_config())
  params = augment.stack_params(
    [augment.sample_params(rng, space, (FLAGS.scale, FLAGS.scale)) for _ in range(b)]
  )
  x = jax.device_put(images)
  augment_device.apply_batch_jit(x, params).block_until_ready()
  steps = 8

  def run():
    for _ in range(steps):
      out = augment_device.apply_batch_jit(x, params)
    out.block_until_ready()

  return _median_rate(run, steps * b, repeats), str(jax.devices()[0].device_kind)


def main(argv):
  del argv
  count = FLAGS.num_images * FLAGS.passes
  with tempfile.TemporaryDirectory() as tmp:
    paths = make_jpegs(tmp, FLAGS.num_images)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(
      FLAGS.workers, initializer=_worker_setup, initargs=(paths, FLAGS.scale, FLAGS.crop)
    ) as pool:
      decode_full = pool_rate(pool, _decode_full, count, FLAGS.repeats)
      decode_draft = pool_rate(pool, _decode_draft, count, FLAGS.repeats)
      albu_all = pool_rate(pool, _albumentations_one, count, FLAGS.repeats)
    ours_all = pipeline_rate(paths, count, FLAGS.repeats)
    ours_aug, albu_aug = augment_only_rates(paths, FLAGS.repeats)
    device, kind = device_rate(paths, FLAGS.repeats)

  w, s, c = FLAGS.workers, FLAGS.scale, FLAGS.crop
  rows = [
    (f"(a) JPEG decode only, full 512, {w} procs", decode_full, ""),
    (
      f"(a') JPEG decode only, reduced DCT (min_side={s}), {w} procs",
      decode_draft,
      "the decode (b) and (c) use",
    ),
    (
      f"(b) ours: Grain, decode -> {s} -> crop {c} -> all augs, {w} workers",
      ours_all,
      f"{ours_all / decode_draft:.2f} x (a'), {ours_all / decode_full:.2f} x (a); target >= 0.8",
    ),
    (
      f"(c) albumentations 2.0.8 + numpy vignette, same decode, {w} procs",
      albu_all,
      f"(b) / (c) = {ours_all / albu_all:.2f}",
    ),
    (f"(d) augment only, ours, 1 core, {s}x{s} in", ours_aug, ""),
    (
      "(d) augment only, albumentations + numpy vignette, 1 core",
      albu_aug,
      f"ours / albumentations = {ours_aug / albu_aug:.2f}; target >= 3",
    ),
    (f"(e) augment_device.apply_batch jit, batch {FLAGS.batch_size}, {kind}", device, ""),
  ]
  print(f"Input pipeline, {FLAGS.num_images} distinct 512x512 JPEGs (q90), {os.cpu_count()} cores;")
  print(f"median images/s of {FLAGS.repeats} runs of {count} images ((e): 8 batches).\n")
  print("| measurement | images/s | ratio |")
  print("|---|---:|---|")
  for name, rate, note in rows:
    print(f"| {name} | {rate:.0f} | {note} |")


if __name__ == "__main__":
  app.run(main)
