"""prepare: every bad-file case, read-back, byte-identical reruns, crash safety, CLI errors."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from deep_image.data import array_record_source as ars
from deep_image.data import prepare
from deep_image.data.sources import decode_image

MAX_PIXELS = 10_000  # Small guard so a 150x150 image plays the decompression bomb.
SIZE = (64, 48)  # (width, height) of the good images.


def _photo(name: str, size=SIZE) -> Image.Image:
  return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _write(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _build_source(root) -> dict:
  """Writes the source tree; returns {relative path: expected outcome} for the checks."""
  astronaut, chelsea, coffee = _photo("astronaut"), _photo("chelsea"), _photo("coffee")
  jpeg = _save(astronaut, "JPEG", quality=90)
  rotated = Image.Exif()
  rotated[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display.
  wide = (np.linspace(0, 65535, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0])).astype(np.uint16)
  files = {
    "astronaut/a_good.jpg": (jpeg, "kept"),
    "astronaut/b_gray.jpg": (_save(astronaut.convert("L"), "JPEG"), "mode L -> RGB"),
    "astronaut/c_cmyk.jpg": (_save(astronaut.convert("CMYK"), "JPEG"), "mode CMYK -> RGB"),
    "astronaut/d_truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
    "chelsea/a_good.jpg": (_save(chelsea, "JPEG"), "kept"),
    "chelsea/b_rgba.png": (_save(chelsea.convert("RGBA"), "PNG"), "with alpha"),
    "chelsea/c_png_named.jpg": (_save(chelsea, "PNG"), "format PNG -> JPEG"),
    "chelsea/d_16bit.png": (_save(Image.fromarray(wide), "PNG"), "16-bit"),
    "chelsea/e_tiny.jpg": (_save(chelsea.resize((1, 1)), "JPEG"), "too small"),
    "chelsea/f_zero.jpg": (b"", "empty file"),
    "coffee/a_good.jpg": (_save(coffee, "JPEG"), "kept"),
    "coffee/b_random.jpg": (np.random.default_rng(0).bytes(5000), "not an image"),
    "coffee/c_bomb.jpg": (_save(coffee.resize((150, 150)), "JPEG"), "decompression bomb"),
    "coffee/d_rotated.jpg": (_save(coffee, "JPEG", exif=rotated), "EXIF orientation 6"),
    "coffee/e_unreadable.jpg": (_save(coffee, "JPEG"), "unreadable"),
    "coffee/.DS_Store": (b"\0\0\0\1Bud1", "hidden"),
    "README.txt": (b"not an image\n", "not inside a class folder"),
  }
  for rel, (data, _) in files.items():
    _write(os.path.join(root, rel), data)
  unreadable = os.path.join(root, "coffee/e_unreadable.jpg")
  os.chmod(unreadable, 0)
  if os.access(unreadable, os.R_OK):  # root ignores permissions: the file reads as a good JPEG.
    files["coffee/e_unreadable.jpg"] = (files["coffee/e_unreadable.jpg"][0], "kept")
  return {rel: outcome for rel, (_, outcome) in files.items()}


SKIP_OUTCOMES = (
  "truncated", "too small", "empty file", "not an image", "decompression bomb", "unreadable",
  "hidden", "not inside a class folder",
)  # fmt: skip


def _run(src, dst, **kwargs):
  kwargs.setdefault("max_image_pixels", MAX_PIXELS)
  return prepare.prepare(str(src), str(dst), num_shards=kwargs.pop("num_shards", 2), **kwargs)


def _read_dir(path) -> dict[str, bytes]:
  return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("prep")
  expected = _build_source(root / "src")
  result = _run(root / "src", root / "dst", log_every_s=0.0)
  return root, expected, result


def test_report_counts_and_reasons(prepared):
  root, expected, result = prepared
  report = json.loads((root / "dst" / ars.REPORT_NAME).read_text())
  skipped = {s["path"]: s["reason"] for s in report["skipped"]}
  converted = {c["path"]: " ".join(c["conversions"]) for c in report["converted"]}
  for rel, outcome in expected.items():
    if outcome in SKIP_OUTCOMES:
      assert outcome in skipped[rel], (rel, skipped.get(rel))
    elif outcome == "kept":
      assert rel not in skipped and rel not in converted, rel
    else:
      assert outcome in converted[rel], (rel, converted.get(rel))
  num_written = sum(o not in SKIP_OUTCOMES for o in expected.values())
  assert report["written"] == result.written == num_written
  assert len(skipped) + report["written"] == report["num_files"] == len(expected)
  assert result.classes == ["astronaut", "chelsea", "coffee"]
  assert json.loads((root / "dst" / ars.CLASSES_NAME).read_text()) == result.classes
  assert f"wrote {num_written} of {len(expected)} files" in result.summary


def test_read_back_every_record(prepared):
  root, expected, result = prepared
  source = ars.ArrayRecordSource(str(root / "dst"), verify_checksums=True)
  assert source.num_classes == 3 and len(source) == result.written
  written = sorted(r for r, o in expected.items() if o not in SKIP_OUTCOMES)
  records = [source[i] for i in range(len(source))]
  assert [r["path"] for r in records] == written  # Sorted path order, across both shards.
  for record in records:
    assert record["label"] == result.classes.index(record["path"].split("/")[0])
    image = decode_image(record["image"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # EXIF orientation 6 turns the 64x48 picture upright into 48 wide, 64 high.
    want = (SIZE[0], SIZE[1]) if "rotated" in record["path"] else (SIZE[1], SIZE[0])
    assert image.shape[:2] == want, record["path"]

  def decoded(rel):
    return decode_image(records[written.index(rel)]["image"]).astype(np.int32)

  # Converted colour/grey versions still show the same picture as the kept JPEG.
  for rel in ("astronaut/b_gray.jpg", "astronaut/c_cmyk.jpg"):
    assert np.abs(decoded(rel) - decoded("astronaut/a_good.jpg")).mean() < 40, rel
  gradient = decoded("chelsea/d_16bit.png")
  # 16-bit 0..65535 ramp scaled to 0..255, not clipped at 255.
  assert gradient[0, 0, 0] < 10 and gradient[-1, -1, 0] > 245 and 100 < gradient.mean() < 155
  with pytest.raises(IndexError):
    source[len(source)]


def test_rerun_is_byte_identical(prepared, tmp_path):
  root, _, _ = prepared
  reference = _read_dir(root / "dst")
  _run(root / "src", tmp_path / "again", num_workers=2)  # Worker count must not matter.
  assert _read_dir(tmp_path / "again") == reference
  _run(root / "src", root / "dst")  # Over the old output, in place.
  assert _read_dir(root / "dst") == reference


def test_interrupted_run_is_refused_and_rerun_recovers(prepared, tmp_path, monkeypatch):
  root, _, _ = prepared
  dst = tmp_path / "dst"
  _run(root / "src", dst)
  reference = _read_dir(dst)
  real_encode, calls = ars.encode_record, []

  def crash_on_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("simulated crash mid-shard")
    return real_encode(*args, **kwargs)

  monkeypatch.setattr(ars, "encode_record", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    _run(root / "src", dst)
  monkeypatch.setattr(ars, "encode_record", real_encode)
  assert not [n for n in os.listdir(dst) if n.endswith(".tmp")]
  with pytest.raises(FileNotFoundError, match="manifest.json not found.*interrupted"):
    ars.ArrayRecordSource(str(dst))
  # A kill -9 leaves a temp file behind: the next run removes it and writes the same bytes.
  _write(str(dst / ".data-00000-of-00002.array_record.tmp"), b"half a shard")
  _run(root / "src", dst)
  assert _read_dir(dst) == reference


def test_modified_shard_is_refused(prepared, tmp_path):
  root, _, _ = prepared
  dst = tmp_path / "dst"
  _run(root / "src", dst, num_shards=1)
  shard = dst / prepare.shard_name(0, 1)
  data = shard.read_bytes()
  shard.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="data-00000-of-00001.array_record: .* bytes"):
    ars.ArrayRecordSource(str(dst))
  shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  ars.ArrayRecordSource(str(dst))  # Same size: only the checksum can tell.
  with pytest.raises(ValueError, match="sha256 differs"):
    ars.ArrayRecordSource(str(dst), verify_checksums=True)


def test_flat_folder_with_label_file_uses_train_classes(prepared, tmp_path):
  root, _, result = prepared
  val = tmp_path / "val"
  for i, name in enumerate(["coffee", "astronaut", "coffee"]):
    _write(str(val / f"ILSVRC2012_val_{i:08d}.JPEG"), _save(_photo(name), "JPEG"))
  _write(str(val / "ILSVRC2012_val_00000009.JPEG"), _save(_photo("coffee"), "JPEG"))
  labels = tmp_path / "LOC_val_solution.csv"
  labels.write_text(
    "ImageId,PredictionString\n"
    "ILSVRC2012_val_00000000,coffee 1 2 3 4\n"
    "ILSVRC2012_val_00000001,astronaut 1 2 3 4\n"
    "ILSVRC2012_val_00000002,coffee 1 2 3 4\n"
  )
  out = _run(
    val, tmp_path / "out", labels=str(labels), classes=str(root / "dst" / ars.CLASSES_NAME)
  )
  assert out.classes == result.classes
  assert out.skipped == [
    {"path": "ILSVRC2012_val_00000009.JPEG", "reason": "no label in LOC_val_solution.csv"}
  ]
  source = ars.ArrayRecordSource(str(tmp_path / "out"))
  assert [source[i]["label"] for i in range(len(source))] == [2, 0, 2]


def test_bad_sources_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _run(tmp_path / "missing", tmp_path / "dst")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="contains no files"):
    _run(tmp_path / "empty", tmp_path / "dst")
  _write(str(tmp_path / "flat" / "a.jpg"), _save(_photo("coffee"), "JPEG"))
  with pytest.raises(ValueError, match="no class folders"):
    _run(tmp_path / "flat", tmp_path / "dst")
  _write(str(tmp_path / "bad" / "cls" / "a.jpg"), b"")
  with pytest.raises(ValueError, match="none of its 1 files"):
    _run(tmp_path / "bad", tmp_path / "dst")
  assert not (tmp_path / "dst" / ars.MANIFEST_NAME).exists()


def test_cli_summary_and_missing_src(prepared, tmp_path):
  root, expected, _ = prepared
  cmd = [
    sys.executable,
    "-m",
    "experiments.prepare",
    "--num_workers=1",
    f"--max_image_pixels={MAX_PIXELS}",
  ]
  cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ok = subprocess.run(
    cmd + [f"--src={root / 'src'}", f"--dst={tmp_path / 'dst'}"],
    capture_output=True,
    text=True,
    cwd=cwd,
  )
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip().startswith("prepare: wrote") and "skipped" in ok.stdout
  assert "files/s" in ok.stderr and "ETA" in ok.stderr  # The progress line.
  bad = subprocess.run(
    cmd + [f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'd2'}"],
    capture_output=True,
    text=True,
    cwd=cwd,
  )
  assert bad.returncode != 0 and "nope does not exist" in bad.stderr


def test_permission_denied_is_skipped_even_as_root(tmp_path, monkeypatch):
  # Tests run as root, where chmod 000 does not stop reads: fail the open itself instead.
  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(prepare, "open", denied, raising=False)
  status, reason, _ = prepare._check_file(str(tmp_path), "x.jpg", prepare.CheckOptions())
  assert (status, reason) == ("skip", "unreadable: permission denied")


def test_symlink_cycle_is_reported_not_followed_forever(tmp_path):
  _write(str(tmp_path / "src" / "cls" / "a.jpg"), _save(_photo("coffee"), "JPEG"))
  os.symlink(tmp_path / "src" / "cls", tmp_path / "src" / "cls" / "loop")
  result = _run(tmp_path / "src", tmp_path / "dst")
  assert result.written == 1
  assert result.skipped == [{"path": "cls/loop/", "reason": result.skipped[0]["reason"]}]
  assert "already visited" in result.skipped[0]["reason"]
