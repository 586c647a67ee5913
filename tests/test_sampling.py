"""Augmentation sampling honours every configured range and probability.

For the host sampler (`augment.sample_params`) and the on-device one
(`augment_device.sample_params`), with RESTRICTED configs (bounds and probabilities
away from the defaults): a few thousand seeded draws stay inside the configured grids, hit
every value of the small grids, and switch each augmentation on at its configured rate
(binomial counts within 5 sigma; a wrong probability of 0.1 or more is > 9 sigma off).
"""

import functools

import jax
import numpy as np
import pytest

from deep_image.data import augment, augment_device, data_config, pipeline
from experiments.configs import base

N = 4000
IMAGE_HW = (30, 41)  # crop 20: 10 x 21 offsets


def _restricted():
  cfg = augment.default_config()
  cfg.crop_size = 20
  cfg.flip.probability = 0.3
  cfg.rotation.update(probability=0.35, max_degrees=4)
  cfg.lens_distortion.update(probability=0.6, kinds=("pincushion", "stretch_v"), max_degree=7)
  cfg.vignetting.update(
    probability=0.25, min_radius=0.3, max_radius=0.5, min_strength=0.1, max_strength=0.2
  )
  cfg.color_cast.update(probability=0.7, channel_probability=0.4, max_shift=3)
  return cfg


def _host_draws(cfg, n=N, image_hw=IMAGE_HW, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  space = augment.SamplingSpace.from_config(cfg)
  return augment.stack_params(
    [augment.sample_params(rng, space, image_hw) for _ in range(n)]
  ).as_dict()


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_uniforms_to_params(key, space, image_hw, n):
  u = jax.random.uniform(key, (n, augment.NUM_UNIFORMS), np.float32)
  return augment_device.sample_params(u, space, image_hw)


def _device_draws(cfg, n=N, image_hw=IMAGE_HW, seed=0) -> dict[str, np.ndarray]:
  space = augment.SamplingSpace.from_config(cfg)
  params = _device_uniforms_to_params(jax.random.key(seed), space, image_hw, n)
  return {k: np.asarray(v) for k, v in params.as_dict().items()}


DRAWS = {"host": _host_draws, "device": _device_draws}


def _assert_rate(hits, p, what):
  """`hits` (bool array) is on at rate p within 5 binomial sigmas."""
  n, k = hits.size, int(np.sum(hits))
  tolerance = 5 * np.sqrt(n * p * (1 - p)) + 1
  assert abs(k - n * p) <= tolerance, f"{what}: {k}/{n} = {k / n:.4f}, configured {p:.4f}"


def _assert_uniform_over(values, grid, what):
  """Every grid value occurs, nothing else does, each at rate 1/len(grid) of the draws."""
  values = np.asarray(values)
  assert set(np.unique(values).tolist()) == set(np.asarray(grid).tolist()), what
  for g in grid:
    _assert_rate(values == g, 1 / len(grid), f"{what} = {g}")


@pytest.mark.parametrize("where", DRAWS)
def test_restricted_config_is_honoured(where):
  cfg = _restricted()
  d = DRAWS[where](cfg)

  # Cropping: offsets [0, S - c) on each axis, uniform.
  _assert_uniform_over(d["crop_y"], range(30 - 20), "crop_y")
  _assert_uniform_over(d["crop_x"], range(41 - 20), "crop_x")

  _assert_rate(d["flip"], 0.3, "flip")

  rotated = d["rotation"] != 0
  _assert_rate(rotated, 0.35, "rotation on")
  _assert_uniform_over(d["rotation"][rotated], [-4, -3, -2, -1, 1, 2, 3, 4], "rotation")

  lens = d["lens_kind"] != augment.LENS_NONE
  _assert_rate(lens, 0.6, "lens on")
  assert np.all(d["lens_degree"][~lens] == 0)
  _assert_uniform_over(
    d["lens_kind"][lens], [augment.LENS_PINCUSHION, augment.LENS_STRETCH_V], "lens kind"
  )
  _assert_uniform_over(d["lens_degree"][lens], range(1, 8), "lens degree")

  vignetted = d["vignette_strength"] != 0
  _assert_rate(vignetted, 0.25, "vignetting on")
  assert np.all(d["vignette_radius"][~vignetted] == 0)
  radii = np.float32([0.3 + 0.025 * i for i in range(9)])
  strengths = np.float32([0.1 + 0.02 * i for i in range(6)])
  _assert_uniform_over(d["vignette_radius"][vignetted], radii, "vignette radius")
  _assert_uniform_over(d["vignette_strength"][vignetted], strengths, "vignette strength")

  # Colour casting: on with 0.7, then each channel shifted with 0.4, by one of -3..3 (0 is
  # a grid value too, so a shifted channel is non-zero with 6/7).
  shift = d["color_shift"]
  assert shift.shape == (N, 3)
  channel = 0.4 * 6 / 7
  for ch in range(3):
    _assert_rate(shift[:, ch] != 0, 0.7 * channel, f"channel {ch} shifted")
  _assert_rate(np.any(shift != 0, axis=1), 0.7 * (1 - (1 - channel) ** 3), "cast on")
  # The three channels draw independently (not one draw for all three).
  _assert_rate(np.all(shift != 0, axis=1), 0.7 * channel**3, "all three channels shifted")
  _assert_uniform_over(shift[shift != 0], [-3, -2, -1, 1, 2, 3], "shift")


@pytest.mark.parametrize("where", DRAWS)
def test_disabled_config_is_the_identity_with_a_centre_crop(where):
  cfg = _restricted()
  for name in ("crop", "flip", "rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg[name].enabled = False
  d = DRAWS[where](cfg, n=200)
  identity = augment.AugmentParams.identity(20, crop_y=(30 - 20) // 2, crop_x=(41 - 20) // 2)
  for field, value in identity.as_dict().items():
    np.testing.assert_array_equal(d[field], np.broadcast_to(value, d[field].shape), field)


@pytest.mark.parametrize("where", DRAWS)
def test_probabilities_zero_and_one(where):
  cfg = _restricted()
  for name in ("flip", "rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg[name].probability = 1.0
  cfg.color_cast.channel_probability = 1.0
  on = DRAWS[where](cfg, n=500)
  assert on["flip"].all() and np.all(on["rotation"] != 0)
  assert np.all(on["lens_kind"] != 0) and np.all(on["vignette_strength"] != 0)
  # Every channel shifted; 0 is still a grid value, drawn with 1/7.
  _assert_rate(on["color_shift"] != 0, 6 / 7, "shifted channel")
  for name in ("flip", "rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg[name].probability = 0.0
  off = DRAWS[where](cfg, n=500)
  for field in ("flip", "rotation", "lens_kind", "vignette_strength", "color_shift"):
    assert not np.any(off[field]), field


@pytest.mark.parametrize("where", DRAWS)
def test_the_default_digits_job_samples_its_own_bounds(where):
  # base.get_config() is the default training job: no flips, lens degree <= 25, vignetting
  # strength <= 0.5, 32 px crops of 36 px digits.
  aug = base.get_config().data.augment
  assert aug.lens_distortion.max_degree < max(augment.LENS_DEGREES)
  scale = aug.crop_size + 4
  d = DRAWS[where](aug, n=2000, image_hw=(scale, scale))
  assert not d["flip"].any()
  lens = d["lens_kind"] != 0
  _assert_uniform_over(
    d["lens_degree"][lens], range(1, aug.lens_distortion.max_degree + 1), "lens degree"
  )
  strengths = augment.vignette_values(aug)[1]
  assert max(strengths) == pytest.approx(aug.vignetting.max_strength)
  vignetted = d["vignette_strength"] != 0
  _assert_uniform_over(d["vignette_strength"][vignetted], np.float32(strengths), "strength")
  assert np.all(np.abs(d["color_shift"]) <= aug.color_cast.max_shift)
  _assert_rate(lens, aug.lens_distortion.probability, "lens on")


def test_crop_equal_to_image_has_one_offset():
  cfg = _restricted()
  d = _host_draws(cfg, n=50, image_hw=(20, 23))
  assert np.all(d["crop_y"] == 0)
  _assert_uniform_over(d["crop_x"], range(3), "crop_x")


@pytest.mark.parametrize(
  "field, value",
  [
    ("flip.probability", 1.5),
    ("rotation.probability", -0.1),
    ("lens_distortion.probability", 2.0),
    ("vignetting.probability", -1.0),
    ("color_cast.probability", 1.01),
    ("color_cast.channel_probability", -0.5),
  ],
)
def test_probabilities_outside_0_1_are_named(field, value):
  cfg = _restricted()
  group, name = field.split(".")
  cfg[group][name] = value
  with pytest.raises(ValueError, match=f"augment.{field}={value}"):
    augment.SamplingSpace.from_config(cfg)


class _FlatSource:
  """n flat grey 30 x 41 images; the sampler only looks at their size."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((*IMAGE_HW, 3), i % 256, np.uint8), "label": i % 10}

  def __repr__(self):
    return f"_FlatSource({self.n})"


def test_train_pipeline_samples_from_the_data_config():
  # The Grain pipeline builds its sampler from `data.augment`, not from the defaults.
  data_cfg = data_config.default_config()
  data_cfg.augment, data_cfg.augment_on = _restricted(), "device"
  data_cfg.train_scale, data_cfg.num_workers = min(IMAGE_HW), 0
  batches = pipeline.make_train_iterator(
    data_cfg, global_batch_size=512, seed=0, source=_FlatSource(512), num_workers=0
  )
  d = next(batches)["augment"]
  _assert_rate(d["flip"], 0.3, "flip")
  _assert_rate(d["lens_kind"] != 0, 0.6, "lens on")
  assert set(np.unique(d["lens_degree"]).tolist()) == set(range(8))
  assert set(np.unique(d["lens_kind"]).tolist()) == {
    0,
    augment.LENS_PINCUSHION,
    augment.LENS_STRETCH_V,
  }
  assert set(np.unique(d["rotation"]).tolist()) == {0, -4, -3, -2, -1, 1, 2, 3, 4}
  assert set(np.unique(d["color_shift"]).tolist()) == set(range(-3, 4))
  strengths = np.unique(d["vignette_strength"])
  np.testing.assert_array_equal(strengths, np.float32([0] + [0.1 + 0.02 * i for i in range(6)]))
