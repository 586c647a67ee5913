"""Device augmentations (deep_image/data/augment_device.py) against the host path."""

import cv2
import jax
import numpy as np
import skimage.data

from deep_image.data import augment, augment_device, augment_host

SIZE = 320  # Source side: large enough for 224 crops, small enough for a quick CPU test.
PHOTOS = np.stack(
  [
    cv2.resize(skimage.data.astronaut(), (SIZE, SIZE), interpolation=cv2.INTER_AREA),
    cv2.resize(skimage.data.chelsea(), (SIZE, SIZE), interpolation=cv2.INTER_AREA),
  ]
)  # uint8 [2, SIZE, SIZE, 3]


def _batch(seed: int, batch: int = 6):
  cfg = augment.default_config()
  for name in ("flip", "rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg[name].probability = 0.8
  rng = np.random.default_rng(seed)
  params = [augment.sample_params(rng, cfg, (SIZE, SIZE)) for _ in range(batch)]
  images = PHOTOS[np.arange(batch) % len(PHOTOS)]
  return images, params


def test_device_matches_host_and_jits_once():
  traces = []

  def traced(images, params):
    traces.append(1)  # Runs only while tracing.
    return augment_device.apply_batch(images, params)

  step = jax.jit(traced)
  for seed in (0, 1, 2):
    images, params = _batch(seed)
    out = np.asarray(step(images, augment.stack_params(params)))
    assert out.shape == (6, 224, 224, 3) and out.dtype == np.uint8
    for i, p in enumerate(params):
      host = augment_host.apply(images[i], p)
      diff = np.abs(out[i].astype(np.int16) - host.astype(np.int16))
      assert diff.mean() <= 1.0, (seed, i, p)
      # The wrong image of the batch would be far off: the comparison can fail.
      other = augment_host.apply(images[(i + 1) % len(images)], p)
      assert np.abs(out[i].astype(np.int16) - other.astype(np.int16)).mean() > 5.0
  assert len(traces) == 1


def test_plain_crops_and_flips_are_exact_on_device():
  ident = augment.AugmentParams.identity(224, crop_y=17, crop_x=95)
  params = augment.stack_params([ident, ident.replace(flip=True)])
  out = np.asarray(augment_device.apply_batch_jit(PHOTOS, params))
  np.testing.assert_array_equal(out[0], PHOTOS[0, 17:241, 95:319])
  np.testing.assert_array_equal(out[1], PHOTOS[1, 17:241, 95:319, :][:, ::-1])


def test_reflect_101_matches_opencv_border_interpolate():
  n = 7
  idx = np.arange(-30, 40)
  expected = [cv2.borderInterpolate(int(i), n, cv2.BORDER_REFLECT_101) for i in idx]
  got = np.asarray(augment_device._reflect_101(jax.numpy.asarray(idx), n))
  np.testing.assert_array_equal(got, expected)
