"""Host augmentations (deep_image/data/augment_host.py, drawn by augment.py) against OpenCV.

Geometric transforms are checked against independent OpenCV constructions (cv2.flip,
cv2.warpAffine with cv2.getRotationMatrix2D, cv2.initUndistortRectifyMap) using the same
BORDER_REFLECT_101 about the whole source image, so no border is excluded. Each check also
shows that a wrong parameter would fail it.
"""

import math
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data

from deep_image.data import augment, augment_host

ASTRONAUT = skimage.data.astronaut()  # uint8 [512, 512, 3]
CHELSEA = skimage.data.chelsea()  # uint8 [300, 451, 3]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
  assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
  return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  return cv2.warpAffine(
    image, matrix[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
  )


def _rotation(centre: float, degrees: float) -> np.ndarray:
  return np.vstack([cv2.getRotationMatrix2D((centre, centre), degrees, 1.0), [0, 0, 1]])


def test_space_sizes_match_table1():
  assert augment.space_sizes(augment.default_config(), (512, 512)) == {
    "Color casting": 68_920,
    "Vignetting": 1_960,
    "Lens distortion": 260,
    "Rotation": 20,
    "Flipping": 2,
    "Cropping": 82_944,
  }


def test_space_sizes_follow_config():
  cfg = augment.default_config()
  cfg.color_cast.max_shift = 10
  cfg.rotation.max_degrees = 5
  cfg.lens_distortion.kinds = ("barrel", "pincushion")
  cfg.vignetting.max_strength = 0.5
  cfg.crop_size = 200
  sizes = augment.space_sizes(cfg, (256, 300))
  assert sizes["Color casting"] == 21**3 - 1
  assert sizes["Rotation"] == 10
  assert sizes["Lens distortion"] == 2 * 65
  assert sizes["Vignetting"] == 40 * 25
  assert sizes["Cropping"] == 56 * 100


def _all_on(probability: float = 1.0):
  cfg = augment.default_config()
  for name in ("flip", "rotation", "lens_distortion", "vignetting", "color_cast"):
    cfg[name].probability = probability
  return cfg


def test_sampling_is_deterministic_from_seed():
  cfg = augment.default_config()
  draw = lambda seed: augment.sample_params(np.random.default_rng(seed), cfg, (512, 512))
  a, b, other = draw(7), draw(7), draw(8)
  for f in augment.AugmentParams.ARRAY_FIELDS:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert any(
    not np.array_equal(getattr(a, f), getattr(other, f)) for f in augment.AugmentParams.ARRAY_FIELDS
  )
  np.testing.assert_array_equal(augment_host.apply(ASTRONAUT, a), augment_host.apply(ASTRONAUT, b))


def test_switching_one_augmentation_keeps_the_others_draws():
  on, off = _all_on(), _all_on()
  off.rotation.enabled = False
  a = augment.sample_params(np.random.default_rng(3), on, (512, 512))
  b = augment.sample_params(np.random.default_rng(3), off, (512, 512))
  assert float(a.rotation) != 0 and float(b.rotation) == 0
  for f in augment.AugmentParams.ARRAY_FIELDS:
    if f != "rotation":
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_samples_stay_in_the_discrete_spaces():
  cfg = _all_on(0.5)
  rng = np.random.default_rng(0)
  params = [augment.sample_params(rng, cfg, (300, 451)) for _ in range(2000)]
  c = cfg.crop_size
  radii, strengths = augment.vignette_values(cfg)
  kinds, degrees = augment.lens_values(cfg)
  seen = {"rot": set(), "cast": set(), "lens": set(), "flip": set()}
  for p in params:
    assert 0 <= p.crop_y < 300 - c and 0 <= p.crop_x < 451 - c
    assert p.rotation == 0 or int(p.rotation) in augment.ROTATION_DEGREES
    assert (p.lens_kind, p.lens_degree) == (0, 0) or (
      p.lens_kind in kinds and p.lens_degree in degrees
    )
    assert p.vignette_strength == 0 or (
      p.vignette_radius in np.float32(radii) and p.vignette_strength in np.float32(strengths)
    )
    assert np.all(np.abs(p.color_shift) <= 20)
    seen["rot"].add(float(p.rotation))
    seen["cast"].update(p.color_shift.tolist())
    seen["lens"].add(int(p.lens_kind))
    seen["flip"].add(bool(p.flip))
  # Probabilities 0.5: identity and every kind occur; the extreme grid values are reached.
  assert {-10.0, 0.0, 10.0} <= seen["rot"]
  assert {-20, 0, 20} <= seen["cast"]
  assert seen["lens"] == {0, 1, 2, 3, 4} and seen["flip"] == {False, True}


def test_centre_crop_when_crop_disabled():
  cfg = augment.default_config()
  cfg.crop.enabled = False
  p = augment.sample_params(np.random.default_rng(0), cfg, (300, 451))
  assert (int(p.crop_y), int(p.crop_x)) == ((300 - 224) // 2, (451 - 224) // 2)


def test_plain_crop_and_flip_are_exact():
  p = augment.AugmentParams.identity(224, crop_y=40, crop_x=100)
  crop = CHELSEA[40:264, 100:324]
  np.testing.assert_array_equal(augment_host.apply(CHELSEA, p), crop)
  np.testing.assert_array_equal(
    augment_host.apply(CHELSEA, p.replace(flip=True)), cv2.flip(crop, 1)
  )
  full = augment.AugmentParams.identity(512).replace(flip=True)
  out = augment_host.apply(ASTRONAUT, full)
  np.testing.assert_array_equal(out, cv2.flip(ASTRONAUT, 1))
  assert not np.shares_memory(augment_host.apply(ASTRONAUT, full.replace(flip=False)), ASTRONAUT)


@pytest.mark.parametrize("degrees", [-10, -3, 7])
def test_rotation_matches_warp_affine(degrees):
  p = augment.AugmentParams.identity(512).replace(rotation=degrees)
  expected = _warp(ASTRONAUT, _rotation(255.5, degrees), 512)
  assert _mad(augment_host.apply(ASTRONAUT, p), expected) <= 1.0
  assert _mad(augment_host.apply(ASTRONAUT, p.replace(rotation=-degrees)), expected) > 5.0


def test_flip_then_rotation_matches_warp_affine_of_flipped():
  p = augment.AugmentParams.identity(512).replace(flip=True, rotation=6)
  expected = _warp(cv2.flip(ASTRONAUT, 1), _rotation(255.5, 6), 512)
  assert _mad(augment_host.apply(ASTRONAUT, p), expected) <= 1.0


def test_crop_flip_rotation_compose_into_one_affine_map():
  # Forward order: crop at (y0, x0), mirror about the crop centre, rotate about it.
  c, y0, x0, cc = 224, 50, 180, 111.5
  translate = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
  mirror = np.array([[-1, 0, 2 * cc], [0, 1, 0], [0, 0, 1]], np.float64)
  matrix = _rotation(cc, -8) @ mirror @ translate
  p = augment.AugmentParams.identity(c, crop_y=y0, crop_x=x0).replace(flip=True, rotation=-8)
  assert _mad(augment_host.apply(CHELSEA, p), _warp(CHELSEA, matrix, c)) <= 1.0


@pytest.mark.parametrize("kind,sign", [(augment.LENS_BARREL, 1), (augment.LENS_PINCUSHION, -1)])
def test_radial_lens_distortion_matches_opencv_undistort_map(kind, sign):
  degree = 60
  k = sign * degree / augment.LENS_DEGREE_SCALE
  cc = 255.5
  camera = np.array([[cc * math.sqrt(2), 0, cc], [0, cc * math.sqrt(2), cc], [0, 0, 1]])
  map_x, map_y = cv2.initUndistortRectifyMap(
    camera, np.array([k, 0, 0, 0], np.float64), None, camera, (512, 512), cv2.CV_32FC1
  )
  expected = cv2.remap(ASTRONAUT, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  p = augment.AugmentParams.identity(512).replace(lens_kind=kind, lens_degree=degree)
  out = augment_host.apply(ASTRONAUT, p)
  assert _mad(out, expected) <= 1.0
  # The distortion is visible: far from the identity, and barrel != pincushion.
  assert _mad(out, ASTRONAUT) > 5.0
  other = p.replace(lens_kind=augment.LENS_BARREL + augment.LENS_PINCUSHION - kind)
  assert _mad(augment_host.apply(ASTRONAUT, other), expected) > 5.0


def test_barrel_on_a_crop_samples_the_surrounding_image():
  # A barrel map pulls pixels from outside the crop; they must be the real neighbours.
  c, y0, x0, degree = 224, 40, 120, 65
  p = augment.AugmentParams.identity(c, crop_y=y0, crop_x=x0).replace(
    lens_kind=augment.LENS_BARREL, lens_degree=degree
  )
  cc = (c - 1) / 2
  u, v = np.meshgrid(np.arange(c, dtype=np.float64), np.arange(c, dtype=np.float64))
  radial = 1 + degree / augment.LENS_DEGREE_SCALE * ((u - cc) ** 2 + (v - cc) ** 2) / (2 * cc**2)
  map_x = ((u - cc) * radial + cc + x0).astype(np.float32)
  map_y = ((v - cc) * radial + cc + y0).astype(np.float32)
  assert map_x.min() < x0 and map_y.max() > y0 + c  # The map does leave the crop.
  expected = cv2.remap(CHELSEA, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  assert _mad(augment_host.apply(CHELSEA, p), expected) <= 1.0


@pytest.mark.parametrize("kind", [augment.LENS_STRETCH_H, augment.LENS_STRETCH_V])
def test_stretching_matches_warp_affine(kind):
  degree, cc = 50, 255.5
  s = 1 + degree / augment.LENS_DEGREE_SCALE
  axis = 0 if kind == augment.LENS_STRETCH_H else 1

  def stretch(axis):
    matrix = np.eye(3)
    matrix[axis, axis], matrix[axis, 2] = s, (1 - s) * cc
    return _warp(ASTRONAUT, matrix, 512)

  p = augment.AugmentParams.identity(512).replace(lens_kind=kind, lens_degree=degree)
  out = augment_host.apply(ASTRONAUT, p)
  assert _mad(out, stretch(axis)) <= 1.0
  assert _mad(out, stretch(1 - axis)) > 5.0


def test_color_cast_adds_exact_integers_with_clipping():
  source = CHELSEA.copy()  # A plain crop is a view: the cast must not write through it.
  p = augment.AugmentParams.identity(224, crop_y=10, crop_x=20)
  crop = augment_host.apply(CHELSEA, p)
  out = augment_host.apply(CHELSEA, p.replace(color_shift=[-20, 0, 20]))
  expected = np.clip(crop.astype(np.int16) + np.array([-20, 0, 20]), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(CHELSEA, source)


def test_vignetting_darkens_only_outside_its_radius():
  c = 224
  p = augment.AugmentParams.identity(c, crop_y=30, crop_x=60)
  crop = augment_host.apply(CHELSEA, p).astype(np.float64)
  out = augment_host.apply(CHELSEA, p.replace(vignette_radius=0.5, vignette_strength=0.6))
  out = out.astype(np.float64)
  centre = slice(c // 2 - 30, c // 2 + 30)  # Radius < 0.5 of the half-diagonal.
  np.testing.assert_array_equal(out[centre, centre], crop[centre, centre])
  # At the corner pixels the gain is 1 - strength = 0.4.
  for y, x in [(0, 0), (0, c - 1), (c - 1, 0), (c - 1, c - 1)]:
    np.testing.assert_allclose(out[y, x], np.round(crop[y, x] * 0.4), atol=1)
  assert out.mean() < crop.mean() * 0.9


def test_vignette_gain_formula():
  gain = augment_host.vignette_gain(0.25, 0.5, 224)
  _, _, _, r = augment_host.base_grid(224)
  t = np.clip((r - 0.25) / 0.75, 0, 1)
  np.testing.assert_allclose(gain, 1 - 0.5 * (3 * t**2 - 2 * t**3), atol=1e-6)
  assert gain.max() == 1.0 and abs(gain.min() - 0.5) < 1e-6


def test_apply_rejects_non_uint8_rgb():
  p = augment.AugmentParams.identity(224)
  with pytest.raises(ValueError, match="uint8"):
    augment_host.apply(CHELSEA.astype(np.float32), p)


def test_stack_params_batches_and_checks_crop_size():
  a = augment.AugmentParams.identity(224)
  batch = augment.stack_params([a, a.replace(rotation=3, color_shift=[1, 2, 3])])
  assert batch.rotation.shape == (2,) and batch.color_shift.shape == (2, 3)
  assert batch.crop_size == 224
  with pytest.raises(ValueError, match="crop_size"):
    augment.stack_params([a, augment.AugmentParams.identity(200)])


def _run_script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.augmentations", *args],
    capture_output=True,
    text=True,
    timeout=60,
    cwd=pathlib.Path(__file__).resolve().parents[1],
  )


def test_table_script_prints_table1_and_rejects_unknown_flags():
  done = _run_script("--table")
  assert done.returncode == 0, done.stderr
  rows = dict(line.split("  ", 1) for line in done.stdout.splitlines()[2:])
  counts = {name.strip(): value.split()[0] for name, value in rows.items()}
  assert counts["Color casting"] == "68,920" and counts["Cropping"] == "82,944"
  assert counts["Vignetting"] == "1,960" and counts["Lens distortion"] == "260"
  assert counts["Rotation"] == "20" and counts["Flipping"] == "2"
  assert counts["Total (product of the rows)"] == f"{68920 * 1960 * 260 * 20 * 2 * 82944:,}"
  bad = _run_script("--table", "--no_such_flag")
  assert bad.returncode != 0 and "no_such_flag" in bad.stderr


def test_gallery_script_writes_a_png_grid(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "experiments.gallery", f"--out={tmp_path}", "--columns=3"],
    capture_output=True,
    text=True,
    timeout=60,
    cwd=pathlib.Path(__file__).resolve().parents[1],
  )
  assert done.returncode == 0, done.stderr
  grid = cv2.imread(str(tmp_path / "augmentations.png"))
  assert grid is not None and grid.shape[1] > 3 * 224 and grid.shape[0] > 6 * 224


@pytest.mark.parametrize(
  "kind", [augment.LENS_NONE, augment.LENS_STRETCH_H, augment.LENS_STRETCH_V]
)
def test_affine_fast_path_is_the_sampling_grid(kind):
  # apply() hands affine maps to cv2.warpAffine; it must be the map sampling_grid tabulates.
  p = augment.AugmentParams.identity(224, crop_y=30, crop_x=150).replace(
    flip=True, rotation=-7, lens_kind=kind, lens_degree=40 if kind else 0
  )
  assert augment_host.affine_matrix(p) is not None
  map_x, map_y = augment_host.sampling_grid(p)
  expected = cv2.remap(CHELSEA, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  resampled = augment_host.resample(CHELSEA, p)
  assert resampled.shape == (224, 224, 4)  # The 4-channel fast kernels (module docstring).
  assert _mad(np.ascontiguousarray(resampled[..., :3]), expected) <= 0.05
  barrel = p.replace(lens_kind=augment.LENS_BARREL, lens_degree=40)
  assert augment_host.affine_matrix(barrel) is None
