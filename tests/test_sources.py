"""Sources chosen by config: digits, generated highres, TFDS (mocked), ArrayRecord; decode_image."""

import hashlib
import io
import pickle

import cv2
import grain
import ml_collections
import numpy as np
import pytest
import skimage.data
from PIL import Image
from sklearn.datasets import load_digits

from deep_image.data import digits, highres, prepare, sources
from deep_image.data.sources import decode_image, make_source


def _cfg(highres: dict | None = None, **fields) -> ml_collections.ConfigDict:
  # From the one set of defaults; locked, so a misspelt field fails here.
  cfg = sources.default_config()
  cfg.lock()
  cfg.update(fields)
  cfg.highres.update(highres or {})
  return cfg


def _digest(image: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


# --------------------------------------------------------------------------- digits


def test_digits_arrays_split_shapes_and_determinism():
  train_x, train_y = digits.load_digits_arrays(32, "train", seed=0)
  test_x, test_y = digits.load_digits_arrays(32, "test", seed=0)
  assert train_x.shape == (1437, 32, 32, 3) and test_x.shape == (360, 32, 32, 3)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  assert (train_x[..., 0] == train_x[..., 2]).all() and train_x.max() == 255
  # Stratified: every class is 20% (+-1) held out.
  assert np.all(np.abs(np.bincount(test_y, minlength=10) * 4 - np.bincount(train_y)) <= 5)
  # At 8x8 (no resampling) train + test is exactly the full set as a multiset: a partition.
  raw = np.concatenate(
    [digits.load_digits_arrays(8, s, seed=0)[0][..., 0] for s in ("train", "test")]
  )
  full = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
  assert sorted(map(_digest, raw)) == sorted(map(_digest, full))
  again_x, again_y = digits.load_digits_arrays(32, "validation", seed=0)
  assert np.array_equal(again_x, test_x) and np.array_equal(again_y, test_y)
  other_y = digits.load_digits_arrays(32, "test", seed=1)[1]
  assert not np.array_equal(other_y, test_y)
  with pytest.raises(ValueError, match="digits split"):
    digits.load_digits_arrays(32, "training")


def test_digits_source_through_make_source():
  source = make_source(_cfg(source="digits", image_size=16, seed=0), "train")
  assert len(source) == 1437 and source.num_classes == 10
  record = source[5]
  assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
  assert isinstance(record["label"], int) and 0 <= record["label"] < 10
  assert len(make_source(_cfg(source="digits"), "validation")) == 360


# --------------------------------------------------------------------------- highres


def _highres(split="train", seed=0):
  sizes = dict(image_size=128, num_train_examples=24, num_eval_examples=16)
  return make_source(_cfg(source="highres", seed=seed, highres=sizes), split)


def test_highres_shapes_dtypes_and_balance():
  source = _highres()
  assert len(source) == 24 and source.num_classes == 8
  record = source[3]
  assert record["image"].shape == (128, 128, 3) and record["image"].dtype == np.uint8
  assert isinstance(record["label"], int)
  labels = [source[i]["label"] for i in range(len(source))]
  assert np.bincount(labels).tolist() == [3] * 8
  big = make_source(_cfg(source="highres", highres=dict(num_classes=12)), "train")
  assert len(big) == 10_000 and big.num_classes == 12
  assert big[11]["image"].shape == (512, 512, 3) and big[11]["label"] == 11
  assert (
    np.bincount([big.label(i) for i in range(len(big))]).tolist()
    == [10_000 // 12 + 1] * 4 + [10_000 // 12] * 8
  )


def test_highres_is_deterministic_and_picklable():
  a, b = _highres(), _highres()
  for i in (0, 7, 23):
    assert np.array_equal(a[i]["image"], b[i]["image"])
  clone = pickle.loads(pickle.dumps(a))
  assert np.array_equal(clone[7]["image"], a[7]["image"]) and repr(clone) == repr(a)
  other_seed = _highres(seed=1)
  assert not np.array_equal(other_seed[0]["image"], a[0]["image"])


def test_highres_splits_never_share_an_image():
  train, validation = _highres("train"), _highres("validation")
  assert len(validation) == 16
  assert repr(_highres("test")) == repr(validation)  # 'test' is the same held-out split.
  train_digests = {_digest(train[i]["image"]) for i in range(len(train))}
  assert len(train_digests) == len(train)
  assert not train_digests & {_digest(validation[i]["image"]) for i in range(len(validation))}


def test_highres_objects_are_small_and_inside():
  source = highres.HighResSource("train", 8, image_size=256)
  for i in range(8):
    image, label, boxes = source.render(i)
    assert label == i and 2 <= len(boxes) <= 4
    sides = boxes[:, 2:] - boxes[:, :2]
    assert np.all((sides >= 12) & (sides <= 20))
    assert np.all(boxes >= 0) and np.all(boxes <= 256)
  with pytest.raises(IndexError):
    source.render(8)
  with pytest.raises(ValueError, match="num_classes"):
    highres.HighResSource(num_classes=13)
  with pytest.raises(ValueError, match="split"):
    highres.HighResSource("training")


def _stripe_energy(disc: np.ndarray, axis: int) -> float:
  """Mean absolute difference between neighbouring pixels along `axis` (grey levels)."""
  grey = disc.astype(np.float32).mean(-1)
  return float(np.abs(np.diff(grey, axis=axis)).mean())


def test_highres_class_sets_names_and_what_halving_keeps():
  for classes, count in (("shapes", 12), ("mirror_shapes", 8), ("gratings", 8)):
    source = highres.HighResSource("train", 8, 96, num_classes=count, classes=classes)
    assert len(source.class_names) == count == len(set(source.class_names))
    assert source[3]["image"].shape == (96, 96, 3)
  with pytest.raises(ValueError, match="expected 2..8 with 'gratings'"):
    highres.HighResSource(num_classes=9, classes="gratings")
  with pytest.raises(ValueError, match="classes='stripes'"):
    highres.HighResSource(classes="stripes")
  # Gratings: vertical stripes change along x, horizontal along y; a 2.5 px period survives
  # at full resolution and is gone (flat) after halving, a 7 px period survives both.
  source = highres.HighResSource("train", 64, 192, num_classes=8, classes="gratings",
                                 object_size=(40, 44), num_distractors=(0, 0))  # fmt: skip
  for index, survives_halving in ((0, False), (6, True)):
    image, label, boxes = source.render(index)
    assert source.class_names[label].startswith("vertical")
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[0])
    inner = slice(y0 + 12, y1 - 12), slice(x0 + 12, x1 - 12)
    disc = image[inner]
    assert _stripe_energy(disc, axis=1) > 3 * _stripe_energy(disc, axis=0)
    half = cv2.resize(image, (96, 96), interpolation=cv2.INTER_AREA)
    half_disc = half[(y0 + 12) // 2 : (y1 - 12) // 2, (x0 + 12) // 2 : (x1 - 12) // 2]
    kept = _stripe_energy(half_disc, axis=1) / _stripe_energy(disc, axis=1)
    assert (kept > 0.5) == survives_halving, (index, kept)


def test_highres_through_grain():
  source = _highres()
  dataset = grain.MapDataset.source(source).seed(3).shuffle()
  labels = sorted(dataset[i]["label"] for i in range(len(source)))
  assert labels == sorted(source[i]["label"] for i in range(len(source)))


# --------------------------------------------------------------------------- tfds


@pytest.mark.parametrize(
  "name, split, shape", [("cifar10", "test", (32, 32, 3)), ("imagenette", "validation", None)]
)
def test_tfds_source_with_mock_data(name, split, shape):
  import tensorflow_datasets as tfds

  cfg = _cfg(source="tfds", name=name)
  cfg.splits.validation = split
  with tfds.testing.mock_data(num_examples=6):
    source = make_source(cfg, "validation")
    assert len(source) == 6 and source.num_classes == 10
    records = [source[i] for i in range(len(source))]
  for record in records:
    assert set(record) == {"image", "label"} and isinstance(record["label"], int)
    image = decode_image(record["image"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert shape is None or image.shape == shape
  assert "TfdsSource" in repr(source)


# --------------------------------------------------------------------------- array_record


def test_array_record_source_through_make_source(tmp_path):
  for cls in ("cat", "coffee"):
    photo = getattr(skimage.data, "chelsea" if cls == "cat" else "coffee")()
    for i in range(2):
      path = tmp_path / "src" / cls / f"{i}.jpg"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(photo).resize((40 + i, 30)).save(path)
  prepare.prepare(str(tmp_path / "src"), str(tmp_path / "data" / "train"))
  cfg = _cfg(source="array_record", data_dir=str(tmp_path / "data"), verify_checksums=True)
  source = make_source(cfg, "train")
  assert len(source) == 4 and source.num_classes == 2
  assert [source[i]["label"] for i in range(4)] == [0, 0, 1, 1]
  assert decode_image(source[1]["image"]).shape == (30, 41, 3)
  assert pickle.loads(pickle.dumps(source))[3]["path"] == "coffee/1.jpg"
  with pytest.raises(FileNotFoundError, match="manifest.json not found"):
    make_source(cfg, "validation")


def test_make_source_errors():
  with pytest.raises(ValueError, match="expected one of"):
    make_source(_cfg(source="lmdb"), "train")
  with pytest.raises(ValueError, match="data.name"):
    make_source(_cfg(source="tfds"), "train")
  with pytest.raises(ValueError, match="data.data_dir"):
    make_source(_cfg(source="array_record"), "train")


# --------------------------------------------------------------------------- decode_image


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def test_decode_image_bytes_and_arrays():
  photo = skimage.data.astronaut()  # uint8 [512, 512, 3]
  decoded = decode_image(_encode(photo, "PNG"))
  assert decoded.dtype == np.uint8 and np.array_equal(decoded, photo)
  grey = decode_image(_encode(photo[..., 0], "PNG"))
  assert grey.shape == (512, 512, 3) and np.array_equal(grey[..., 1], photo[..., 0])
  jpeg = _encode(photo, "JPEG")
  assert decode_image(jpeg).shape == (512, 512, 3)
  # DCT-scaled decode: the smallest 1/2^k scale whose shorter side is still >= 100.
  assert decode_image(jpeg, min_side=100).shape == (128, 128, 3)
  assert decode_image(photo[..., 0]).shape == (512, 512, 3)
  rgba = np.concatenate([photo, np.full_like(photo[..., :1], 255)], axis=-1)
  assert np.array_equal(decode_image(rgba), photo)
  with pytest.raises(ValueError, match="uint8"):
    decode_image(photo.astype(np.float32))
