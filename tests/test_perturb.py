"""Test-time perturbations (`deep_image/data/perturb.py`; `experiments.evaluate --perturb`
end to end: tests/test_evaluate.py, on the run it trains anyway).

The perturbations are checked against what they promise (how far each moves a textured
image, what is drawn per image, identities at strength 0) and, where they share a
convention with training, against `augment_host` itself on square images.
"""

import pickle

import numpy as np
import pytest
import simplejpeg
from conftest import tiny_config

from deep_image.config_error import ConfigError
from deep_image.data import augment, augment_host, pipeline
from deep_image.data.perturb import (
  PERTURBATIONS,
  Perturbation,
  PerturbedSource,
  parse_perturbation,
)
from deep_image.data.sources import decode_image

NAMES = ("color_cast", "vignetting", "lens_distortion", "rotation", "blur", "noise", "jpeg")


def _textured(height=48, width=64, seed=0):
  """uint8 [H, W, 3] in 40..215 (no clipping for casts of 20 or noise of 10): smooth waves
  of a few pixels' period, different per channel, plus mild noise."""
  y, x = np.mgrid[:height, :width].astype(np.float32)
  waves = [np.sin(x / 2.3 + c) * np.cos(y / 3.1 - c) for c in range(3)]
  noise = np.random.default_rng(seed).normal(0, 0.1, (height, width, 3))
  return np.clip(np.rint(128 + 75 * (np.stack(waves, -1) + noise)), 40, 215).astype(np.uint8)


def _diff(a, b) -> np.ndarray:
  return np.abs(a.astype(np.int32) - b.astype(np.int32))


def _sign(index: int, name: str, seed: int = 0) -> float:
  """The sign the module draws (first uniform of the image's generator < 0.5: +)."""
  rng = np.random.default_rng((seed, index, NAMES.index(name)))
  return 1.0 if rng.random() < 0.5 else -1.0


def test_names_defaults_and_labels():
  assert tuple(PERTURBATIONS) == NAMES
  assert PERTURBATIONS["color_cast"] == max(augment.COLOR_SHIFTS)  # the training maximum
  assert Perturbation("rotation", 10).label == "rotation:10"
  assert Perturbation("blur", 0.5).label == "blur:0.5"
  assert Perturbation("jpeg", 20.0).strength == 20.0
  assert parse_perturbation("jpeg") == Perturbation("jpeg", PERTURBATIONS["jpeg"])
  assert parse_perturbation(" lens_distortion:0.15 ").label == "lens_distortion:0.15"


@pytest.mark.parametrize(
  "text, words",
  [
    ("rotate:10", ["'rotate'", "color_cast", "jpeg"]),
    ("", ["''", "rotation"]),
    ("rotation:ten", ["'ten'", "not a number"]),
    ("jpeg:0", ["jpeg strength 0", "1..100"]),
    ("jpeg:101", ["101", "1..100"]),
    ("jpeg:20.5", ["an integer"]),
    ("blur:-1", ["blur strength -1", "0..50"]),
    ("noise:nan", ["nan", "0..255"]),
    ("vignetting:1.5", ["1.5", "0..1"]),
  ],
)
def test_parse_errors_name_the_flag_the_value_and_what_is_valid(text, words):
  with pytest.raises(ConfigError) as e:
    parse_perturbation(text)
  message = str(e.value)
  assert message.startswith(f"--perturb={text!r}"), message
  for word in words:
    assert word in message, message
  with pytest.raises(ConfigError, match="unknown perturbation"):
    Perturbation("rotate", 10)


@pytest.mark.parametrize("name", NAMES)
def test_each_changes_the_image_plausibly_and_deterministically(name):
  image = _textured()
  p = Perturbation(name, PERTURBATIONS[name])
  out = p.apply(image, index=3)
  assert out.shape == image.shape and out.dtype == np.uint8
  assert not np.shares_memory(out, image)
  np.testing.assert_array_equal(out, p.apply(image.copy(), index=3))  # same bytes again
  mean = _diff(out, image).mean()
  # Every default moves a textured image by a few to a few tens of gray levels on average.
  assert 2.0 < mean < 60.0, (name, mean)
  other_seed = p.apply(image, index=3, seed=1)
  if name in ("color_cast", "lens_distortion", "rotation", "noise"):  # something is drawn
    draws = [p.apply(image, index=i) for i in range(8)]
    assert any(not np.array_equal(d, draws[0]) for d in draws[1:]), name
  else:  # nothing drawn: the same for every index and seed
    np.testing.assert_array_equal(p.apply(image, index=5), out)
    np.testing.assert_array_equal(other_seed, out)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "jpeg"])
def test_strength_zero_is_the_identity(name):
  image = _textured()
  out = Perturbation(name, 0).apply(image, index=1)
  np.testing.assert_array_equal(out, image)
  assert not np.shares_memory(out, image)


def test_jpeg_quality_orders_the_damage():
  image = _textured()
  errors = [_diff(Perturbation("jpeg", q).apply(image, 0), image).mean() for q in (100, 60, 5)]
  assert errors[0] < errors[1] < errors[2]
  # Quality 100 is near the image where 4:2:0 chroma loses nothing: a gray one (the
  # coloured texture keeps ~5 levels of chroma error at any quality).
  gray = np.repeat(image[..., :1], 3, axis=-1)
  assert _diff(Perturbation("jpeg", 100).apply(gray, 0), gray).mean() < 0.5
  # What the sources decode: the round trip through simplejpeg's own encoder.
  ref = simplejpeg.decode_jpeg(
    simplejpeg.encode_jpeg(image, quality=60, colorspace="RGB", colorsubsampling="420")
  )
  np.testing.assert_array_equal(Perturbation("jpeg", 60).apply(image, 7), ref)


def test_color_cast_shifts_each_channel_by_plus_or_minus_the_strength():
  image = _textured()
  signs = set()
  for index in range(8):
    out = Perturbation("color_cast", 20).apply(image, index)
    shift = out.astype(np.float64).mean((0, 1)) - image.astype(np.float64).mean((0, 1))
    np.testing.assert_allclose(np.abs(shift), 20.0, atol=1e-9)  # 40..215: no clipping
    signs.add(tuple(np.sign(shift).astype(int)))
  assert len(signs) > 1  # signs are drawn per image and channel


def test_vignetting_keeps_the_centre_and_darkens_the_corners():
  image = np.full((41, 61, 3), 200, np.uint8)
  out = Perturbation("vignetting", 0.5).apply(image, 0)
  assert (out[15:26, 25:36] == 200).all()  # inside the start radius 0.3
  for y, x in ((0, 0), (0, 60), (40, 0), (40, 60)):
    assert (out[y, x] == 100).all()  # 1 - strength at the corners
  assert (np.diff(out[20, 30:].astype(int), axis=0) <= 0).all()  # darker outwards
  # A square image is the training vignette (`augment_host`) at radius 0.3.
  square = _textured(40, 40)
  params = augment.AugmentParams.identity(40).replace(vignette_radius=0.3, vignette_strength=0.5)
  np.testing.assert_array_equal(
    Perturbation("vignetting", 0.5).apply(square, 0), augment_host.apply(square, params)
  )


def test_rotation_and_lens_distortion_are_the_training_maps():
  square = _textured(40, 40)
  identity = augment.AugmentParams.identity(40)
  kinds = set()
  for index in range(6):
    sign = _sign(index, "rotation")
    want = augment_host.apply(square, identity.replace(rotation=10 * sign))
    np.testing.assert_array_equal(Perturbation("rotation", 10).apply(square, index), want)
    # k = 0.2 is lens degree 50 (k = degree / 250), barrel for +, pincushion for -.
    sign = _sign(index, "lens_distortion")
    kinds.add(sign)
    kind = augment.LENS_BARREL if sign > 0 else augment.LENS_PINCUSHION
    want = augment_host.apply(square, identity.replace(lens_kind=kind, lens_degree=50))
    np.testing.assert_array_equal(Perturbation("lens_distortion", 0.2).apply(square, index), want)
  assert kinds == {1.0, -1.0}
  # Non-square images rotate about their own centre: the centre pixel of an odd image stays.
  image = _textured(31, 45)
  out = Perturbation("rotation", 30).apply(image, 0)
  np.testing.assert_array_equal(out[15, 22], image[15, 22])


def test_blur_and_noise_have_their_strength():
  image = _textured()
  blurred = Perturbation("blur", 2.0).apply(image, 0)
  assert blurred.astype(float).std() < 0.8 * image.astype(float).std()
  assert abs(blurred.astype(float).mean() - image.astype(float).mean()) < 1.0
  out = Perturbation("noise", 10).apply(image, 0)
  residual = out.astype(float) - image
  assert 9.0 < residual.std() < 11.0 and abs(residual.mean()) < 0.5


class _JpegSource:
  """A few JPEG records of two shapes, as an ArrayRecord source holds them (bytes)."""

  num_classes = 2
  class_names = ("a", "b")

  def __init__(self):
    shapes = [(20, 24), (24, 20)] * 5
    self.records = [
      {
        "image": simplejpeg.encode_jpeg(_textured(h, w, seed=i), quality=95),
        "label": i % 2,
        "extra": f"r{i}",
      }
      for i, (h, w) in enumerate(shapes)
    ]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]

  def __repr__(self):
    return "_JpegSource()"


def test_perturbed_source_records_pickle_and_repr():
  p = Perturbation("rotation", 10)
  src = _JpegSource()
  perturbed = PerturbedSource(src, p, seed=2)
  assert len(perturbed) == len(src) and perturbed.num_classes == 2
  record = perturbed[3]
  assert record["label"] == 1 and record["extra"] == "r3"
  np.testing.assert_array_equal(record["image"], p.apply(decode_image(src[3]["image"]), 3, 2))
  np.testing.assert_array_equal(perturbed[-1]["image"], perturbed[len(src) - 1]["image"])
  assert "_JpegSource()" in repr(perturbed) and "rotation:10" in repr(perturbed)
  assert repr(PerturbedSource(src, p, seed=3)) != repr(perturbed)  # not one shape cache
  again = pickle.loads(pickle.dumps(perturbed))
  assert repr(again) == repr(perturbed)
  np.testing.assert_array_equal(again[5]["image"], perturbed[5]["image"])


@pytest.mark.parametrize("mode", ["center", "whole"])
def test_perturbed_source_through_the_eval_iterator(mode):
  data_cfg = tiny_config().data  # crop 16
  p = Perturbation("noise", 10)
  perturbed = PerturbedSource(_JpegSource(), p)
  # Scale 20 is every image's shorter side: no resize, so the views are plain crops.
  batches = list(
    pipeline.make_eval_iterator(
      data_cfg,
      global_batch_size=4,
      mode=mode,
      scale=20,
      source=perturbed,
      num_workers=0,
      grid=1,
    )
  )
  seen = set()
  for batch in batches:
    for image, index, real in zip(batch["image"], batch["index"], batch["mask"], strict=True):
      whole = perturbed[int(index)]["image"]
      if mode == "center":
        h, w = whole.shape[:2]
        y0, x0 = (h - 16) // 2, (w - 16) // 2
        whole = whole[y0 : y0 + 16, x0 : x0 + 16]
      np.testing.assert_array_equal(image, whole)
      if real:
        seen.add(int(index))
  assert seen == set(range(len(perturbed)))
  if mode == "whole":  # the header pre-pass reads the perturbed arrays' shapes
    shapes = {b["image"].shape[1:3] for b in batches}
    assert shapes == {(20, 24), (24, 20)}
