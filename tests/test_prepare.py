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
from deep_image.data import image_check, prepare
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
  # A negative shard count is refused (it used to mean automatic), before anything is read.
  negative = subprocess.run(
    cmd + [f"--src={root / 'src'}", f"--dst={tmp_path / 'd3'}", "--num_shards=-3"],
    capture_output=True,
    text=True,
    cwd=cwd,
  )
  assert negative.returncode != 0 and "Traceback" not in negative.stderr
  assert negative.stderr.strip().splitlines()[-1].startswith("prepare: error: --num_shards=-3")
  assert not (tmp_path / "d3").exists()


def test_permission_denied_is_skipped_even_as_root(tmp_path, monkeypatch):
  # Tests run as root, where chmod 000 does not stop reads: fail the open itself instead.
  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(prepare, "open", denied, raising=False)
  status, reason, _ = prepare._check_file(str(tmp_path), "x.jpg", image_check.CheckOptions())
  assert (status, reason) == ("skip", "unreadable: permission denied")


def test_symlink_cycle_is_reported_not_followed_forever(tmp_path):
  _write(str(tmp_path / "src" / "cls" / "a.jpg"), _save(_photo("coffee"), "JPEG"))
  os.symlink(tmp_path / "src" / "cls", tmp_path / "src" / "cls" / "loop")
  result = _run(tmp_path / "src", tmp_path / "dst")
  assert result.written == 1
  assert result.skipped == [{"path": "cls/loop/", "reason": result.skipped[0]["reason"]}]
  assert "already visited" in result.skipped[0]["reason"]


# --------------------------------------------------------------------------- pixel-level checks
# Pictures are flat blocks of 16 px (a JPEG MCU with 4:2:0 chroma) so the re-encoded JPEG is
# near exact away from block edges; values are compared on block interiors.

BLOCK = 16
ORIENTATION = 0x0112  # EXIF tag.


def _quadrants() -> np.ndarray:
  """uint8 [32, 64, 3]: four distinct colours, so each of the 8 EXIF transforms differs."""
  image = np.zeros((2 * BLOCK, 4 * BLOCK, 3), np.uint8)
  image[:BLOCK, : 2 * BLOCK] = (255, 0, 0)
  image[:BLOCK, 2 * BLOCK :] = (0, 255, 0)
  image[BLOCK:, : 2 * BLOCK] = (0, 0, 255)
  image[BLOCK:, 2 * BLOCK :] = (255, 255, 0)
  return image


# EXIF 2.3 (CIPA DC-008) Orientation: how the stored rows/columns must be moved to display the
# picture upright, written independently of prepare's and Pillow's tables.
UPRIGHT = {
  1: lambda a: a,
  2: lambda a: a[:, ::-1],  # mirror horizontal
  3: lambda a: a[::-1, ::-1],  # rotate 180
  4: lambda a: a[::-1],  # mirror vertical
  5: lambda a: a.transpose(1, 0, 2),  # transpose (mirror horizontal + rotate 270 CW)
  6: lambda a: np.rot90(a, k=-1),  # rotate 90 CW: the stored top row becomes the right column
  7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
  8: lambda a: np.rot90(a, k=1),  # rotate 90 CCW: the stored top row becomes the left column
}


def _exif(orientation: int) -> Image.Exif:
  exif = Image.Exif()
  exif[ORIENTATION] = orientation
  return exif


def _bands(colours, mode="RGBA") -> Image.Image:
  """One BLOCK x BLOCK square per colour, left to right."""
  image = Image.new(mode, (BLOCK * len(colours), BLOCK))
  for i, colour in enumerate(colours):
    image.paste(colour, (i * BLOCK, 0, (i + 1) * BLOCK, BLOCK))
  return image


def _band_values(image: np.ndarray) -> np.ndarray:
  """int [bands, 3]: mean colour of each band's interior (4 px away from JPEG edges)."""
  inner = [image[4:-4, i * BLOCK + 4 : (i + 1) * BLOCK - 4] for i in range(image.shape[1] // BLOCK)]
  return np.array([b.reshape(-1, 3).mean(0) for b in inner]).round().astype(int)


def _palette_image(transparency: bool) -> Image.Image:
  """'P' bands of palette entries 0 (garbage green), 1 (blue), 2 (grey 77)."""
  image = Image.new("P", (3 * BLOCK, BLOCK))
  image.putpalette([10, 200, 30, 0, 0, 255, 77, 77, 77] + [0] * (256 * 3 - 9))
  for i in range(3):
    image.paste(i, (i * BLOCK, 0, (i + 1) * BLOCK, BLOCK))
  return image


def _frames(sizes_colours, fmt: str) -> bytes:
  frames = [Image.new("RGB", size, colour) for size, colour in sizes_colours]
  return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)


WHITE, GREY_HALF = (255, 255, 255), (127, 127, 127)  # 255 * (1 - 128 / 255) = 127.
PIXEL_CASES = {
  # path: (bytes, expected band colours or None, expected conversion text)
  "alpha/rgba.png": (
    _save(_bands([(255, 0, 0, 255), (10, 200, 30, 0), (0, 0, 0, 128), (255, 0, 0, 64)]), "PNG"),
    [(255, 0, 0), WHITE, GREY_HALF, (255, 191, 191)],
    "mode RGBA with alpha -> RGB over white",
  ),
  "alpha/la.png": (
    _save(_bands([(200, 255), (90, 0), (0, 128)], "LA"), "PNG"),
    [(200, 200, 200), WHITE, GREY_HALF],
    "mode LA with alpha -> RGB over white",
  ),
  "alpha/palette_transparent.png": (
    _save(_palette_image(True), "PNG", transparency=0),
    [WHITE, (0, 0, 255), (77, 77, 77)],
    "mode P with alpha -> RGB over white",
  ),
  "alpha/palette_transparent.gif": (
    _save(_palette_image(True), "GIF", transparency=0),
    [WHITE, (0, 0, 255), (77, 77, 77)],
    "mode P with alpha -> RGB over white",
  ),
  "alpha/rgb_colour_key.png": (
    _save(_bands([(10, 200, 30), (0, 0, 255)], "RGB"), "PNG", transparency=(10, 200, 30)),
    [WHITE, (0, 0, 255)],
    "mode RGB with alpha -> RGB over white",
  ),
  "alpha/grey_colour_key.png": (
    _save(_bands([7, 100], "L"), "PNG", transparency=7),
    [WHITE, (100, 100, 100)],
    "mode L with alpha -> RGB over white",
  ),
  "modes/palette.png": (
    _save(_palette_image(False), "PNG"),
    [(10, 200, 30), (0, 0, 255), (77, 77, 77)],
    "mode P -> RGB",
  ),
  "modes/grey.png": (
    _save(_bands([0, 60, 200], "L"), "PNG"),
    [(0,) * 3, (60,) * 3, (200,) * 3],
    "mode L -> RGB",
  ),
  "modes/bilevel.png": (_save(_bands([0, 1], "1"), "PNG"), [(0,) * 3, WHITE], "mode 1 -> RGB"),
  "modes/16bit.tif": (
    _save(_bands([0, 257 * 60, 65535], "I;16"), "TIFF"),
    [(0,) * 3, (60,) * 3, WHITE],
    "mode I;16 (16-bit) -> 8-bit RGB",
  ),
  "modes/32bit.tif": (  # 'I' is read as 16-bit data: 32768 -> 128, above 65535 clips to 255.
    _save(_bands([-5, 32768, 70000], "I"), "TIFF"),
    [(0,) * 3, (128,) * 3, WHITE],
    "mode I (16-bit) -> 8-bit RGB",
  ),
  "modes/cmyk.jpg": (
    _save(_bands([(0, 255, 255, 0), (255, 255, 0, 0), (0, 0, 0, 255)], "CMYK"), "JPEG"),
    [(255, 0, 0), (0, 0, 255), (0, 0, 0)],
    "mode CMYK -> RGB",
  ),
  "frames/animated.gif": (
    _frames([((32, 16), (255, 0, 0)), ((32, 16), (0, 255, 0)), ((32, 16), (0, 0, 255))], "GIF"),
    [(255, 0, 0), (255, 0, 0)],
    "first of 3 frames",
  ),
  "frames/pages.tif": (  # Later pages are bigger: the stored size tells which page was kept.
    _frames([((32, 16), (0, 0, 255)), ((48, 32), (0, 255, 0)), ((64, 48), (255, 0, 0))], "TIFF"),
    [(0, 0, 255), (0, 0, 255)],
    "first of 3 frames",
  ),
}
for _o in range(1, 9):
  PIXEL_CASES[f"orientation/{_o}.jpg"] = (
    _save(Image.fromarray(_quadrants()), "JPEG", quality=95, exif=_exif(_o)),
    None,
    f"EXIF orientation {_o} applied" if _o > 1 else None,
  )
# Orientation applies to any format, after alpha compositing: left half red, right transparent.
_half = np.zeros((BLOCK, 2 * BLOCK, 4), np.uint8)
_half[:, :BLOCK] = (255, 0, 0, 255)
PIXEL_CASES["orientation/rgba_6.png"] = (
  _save(Image.fromarray(_half), "PNG", exif=_exif(6)),
  None,
  "EXIF orientation 6 applied",
)
# Decompression-bomb guard at MAX_PIXELS = 10_000: Pillow itself only raises above 2x its
# limit and merely warns between 1x and 2x, so the band in between is prepare's own check.
BOMB_CASES = {
  "bomb/at_limit.png": ((100, 100), None),
  "bomb/just_over.png": ((101, 100), "decompression bomb guard: 101x100 = 10100 pixels"),
  "bomb/just_under_2x.png": ((199, 100), "decompression bomb guard: 199x100 = 19900 pixels"),
  "bomb/at_2x.png": ((200, 100), "decompression bomb guard: 200x100 = 20000 pixels"),
  "bomb/over_2x.png": ((201, 100), "over 2x max_image_pixels 10000: Image size (20100 pixels)"),
}


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
  """Prepares PIXEL_CASES and BOMB_CASES; returns (result, {path: record}, report)."""
  root = tmp_path_factory.mktemp("pixels")
  for rel, (data, _, _) in PIXEL_CASES.items():
    _write(str(root / "src" / rel), data)
  for rel, (size, _) in BOMB_CASES.items():
    _write(str(root / "src" / rel), _save(Image.new("RGB", size, (0, 128, 0)), "PNG"))
  guard = Image.MAX_IMAGE_PIXELS
  result = _run(root / "src", root / "dst", num_shards=1)
  assert Image.MAX_IMAGE_PIXELS == guard  # Pillow's process-wide guard is restored.
  source = ars.ArrayRecordSource(str(root / "dst"))
  records = {r["path"]: r for r in (source[i] for i in range(len(source)))}
  report = json.loads((root / "dst" / ars.REPORT_NAME).read_text())
  return result, records, report


def _stored(records, rel) -> np.ndarray:
  image = records[rel]["image"]
  # The upright picture is stored without an orientation tag (or a reader would turn it again).
  assert Image.open(io.BytesIO(image)).getexif().get(ORIENTATION, 1) == 1, rel
  return decode_image(image).astype(int)


def test_exif_orientations_give_the_upright_picture(pixels):
  from PIL import ImageOps

  _, records, report = pixels
  converted = {c["path"]: c["conversions"] for c in report["converted"]}
  original = _quadrants()
  for orientation in range(1, 9):
    rel = f"orientation/{orientation}.jpg"
    got = _stored(records, rel)
    expected = UPRIGHT[orientation](original).astype(int)
    # Pillow's exif_transpose on the source file must agree with the spec table.
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(PIXEL_CASES[rel][0])))
    np.testing.assert_array_equal(
      np.asarray(reference).shape, expected.shape, err_msg=f"orientation {orientation}"
    )
    assert np.abs(np.asarray(reference, int) - expected).mean() < 12, orientation
    distances = {
      o: np.abs(got - f(original)).mean() if got.shape == f(original).shape else np.inf
      for o, f in UPRIGHT.items()
    }
    assert got.shape == expected.shape and distances[orientation] < 12, (orientation, distances)
    # Every other transform is far off, so a swapped direction cannot pass.
    assert min(d for o, d in distances.items() if o != orientation) > 40, (orientation, distances)
    if orientation == 1:
      assert rel not in converted and records[rel]["image"] == PIXEL_CASES[rel][0]
    else:
      assert converted[rel] == [f"EXIF orientation {orientation} applied"], converted[rel]
  # RGBA + orientation 6: composited, then the left (red) half turned to the top.
  rgba = _stored(records, "orientation/rgba_6.png")
  assert rgba.shape == (2 * BLOCK, BLOCK, 3)
  np.testing.assert_allclose(rgba[4 : BLOCK - 4].mean((0, 1)), (255, 0, 0), atol=4)
  np.testing.assert_allclose(rgba[BLOCK + 4 : -4].mean((0, 1)), WHITE, atol=4)


@pytest.mark.parametrize("rel", [r for r in PIXEL_CASES if not r.startswith("orientation/")])
def test_modes_alpha_and_frames_give_the_right_colours(pixels, rel):
  _, records, report = pixels
  _, colours, conversion = PIXEL_CASES[rel]
  converted = {c["path"]: c["conversions"] for c in report["converted"]}
  assert conversion in converted[rel], converted.get(rel)
  image = _stored(records, rel)
  assert image.shape == (BLOCK, BLOCK * len(colours), 3), image.shape
  np.testing.assert_allclose(_band_values(image), np.array(colours), atol=4, err_msg=rel)


def test_decompression_bomb_guard_between_1x_and_2x(pixels):
  result, records, _ = pixels
  skipped = {s["path"]: s["reason"] for s in result.skipped}
  for rel, (_, reason) in BOMB_CASES.items():
    if reason is None:
      assert rel in records and rel not in skipped, rel
    else:
      assert rel not in records and reason in skipped[rel], (rel, skipped.get(rel))
      assert str(MAX_PIXELS) in skipped[rel]
  # Same decision without prepare's own limit: Pillow's default applies when none is given.
  big = _save(Image.new("RGB", (101, 100)), "PNG")
  assert image_check.check_image(big)[1] == ["format PNG -> JPEG"]


def test_float_image_is_skipped_with_the_mode():
  data = _save(Image.fromarray(np.zeros((16, 16), np.float32)), "TIFF")
  with pytest.raises(image_check.SkipImage, match=r"unsupported float image \(mode F\)"):
    image_check.check_image(data)


# --------------------------------------------------------------------------- class ids, labels


def _labels_by_path(dst) -> dict[str, int]:
  source = ars.ArrayRecordSource(str(dst))
  return {r["path"]: r["label"] for r in (source[i] for i in range(len(source)))}


def _tree(root, rels) -> None:
  for rel in rels:
    _write(str(root / rel), _save(_photo("coffee", (16, 16)), "JPEG"))


def test_class_folder_ids_are_sorted_and_a_classes_file_fixes_them(tmp_path):
  # Numeric names sort as numbers ('2' before '10'); creation order does not matter.
  _tree(tmp_path / "num", ["10/a.jpg", "2/a.jpg", "1/a.jpg", "2/sub/b.jpg"])
  out = _run(tmp_path / "num", tmp_path / "num_dst")
  assert out.classes == ["1", "2", "10"]
  assert _labels_by_path(tmp_path / "num_dst") == {
    "1/a.jpg": 0, "10/a.jpg": 2, "2/a.jpg": 1, "2/sub/b.jpg": 1,
  }  # fmt: skip
  _tree(tmp_path / "names", ["b/x.jpg", "C/x.jpg", "a/x.jpg", "a10/x.jpg", "a9/x.jpg"])
  assert _run(tmp_path / "names", tmp_path / "names_dst").classes == ["C", "a", "a10", "a9", "b"]
  # A classes file gives its own order, keeps classes without images, and reports the
  # folders it does not name instead of inventing ids for them.
  classes = tmp_path / "classes.json"
  classes.write_text(json.dumps(["b", "zebra", "a"]))
  out = _run(tmp_path / "names", tmp_path / "fixed_dst", classes=str(classes))
  assert out.classes == ["b", "zebra", "a"]
  assert _labels_by_path(tmp_path / "fixed_dst") == {"a/x.jpg": 2, "b/x.jpg": 0}
  assert {s["path"]: s["reason"] for s in out.skipped} == {
    rel: f"class {rel.split('/')[0]!r} not in --classes {classes}"
    for rel in ("C/x.jpg", "a10/x.jpg", "a9/x.jpg")
  }
  manifest = json.loads((tmp_path / "fixed_dst" / ars.MANIFEST_NAME).read_text())
  assert manifest["num_classes"] == 3 and manifest["num_records"] == 2


@pytest.mark.parametrize("kind", ["text", "json"])
def test_label_file_names_every_form_and_every_line_counts(tmp_path, kind):
  files = ["sub/x.png", "y.jpg", "z.jpeg", "w.jpg", "u.jpg", "unlabelled.jpg"]
  _tree(tmp_path / "flat", files)
  # No header: the first line is a label like every other. Names are the relative path, the
  # base name or the stem; separators are spaces, tabs or commas; extra fields are ignored.
  mapping = {"sub/x.png": "dog", "y.jpg": "cat", "z": "10", "w.jpg": "9", "u": "cat"}
  if kind == "json":
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(mapping))
  else:
    labels = tmp_path / "labels.txt"
    labels.write_text(
      "sub/x.png dog\n# a comment line\n\ny.jpg\tcat 1 2 3 4\n  z,10,extra\nw.jpg,9\nu cat\n"
    )
  out = _run(tmp_path / "flat", tmp_path / "dst", labels=str(labels))
  assert out.classes == ["10", "9", "cat", "dog"]  # Not all integers: plain string order.
  assert _labels_by_path(tmp_path / "dst") == {
    "sub/x.png": 3, "y.jpg": 2, "z.jpeg": 0, "w.jpg": 1, "u.jpg": 2,
  }  # fmt: skip
  assert out.skipped == [{"path": "unlabelled.jpg", "reason": f"no label in {labels.name}"}]


def test_label_file_class_outside_the_classes_file_is_reported(tmp_path):
  _tree(tmp_path / "flat", ["a.jpg", "b.jpg", "c.jpg"])
  labels = tmp_path / "labels.txt"
  labels.write_text("a.jpg n02\nb.jpg n01\nc.jpg n99\n")
  classes = tmp_path / "classes.json"
  classes.write_text(json.dumps(["n01", "n02", "n03"]))
  out = _run(tmp_path / "flat", tmp_path / "dst", labels=str(labels), classes=str(classes))
  assert out.classes == ["n01", "n02", "n03"]
  assert _labels_by_path(tmp_path / "dst") == {"a.jpg": 1, "b.jpg": 0}
  assert out.skipped == [{"path": "c.jpg", "reason": f"class 'n99' not in --classes {classes}"}]


def test_bad_label_and_classes_files_give_clear_errors(tmp_path):
  _tree(tmp_path / "flat", ["a.jpg"])
  _tree(tmp_path / "folders", ["cls/a.jpg"])

  def run_with(labels_text=None, classes_text=None, labels_name="labels.txt"):
    kwargs = {}
    if labels_text is not None:
      (tmp_path / labels_name).write_text(labels_text)
      kwargs["labels"] = str(tmp_path / labels_name)
    if classes_text is not None:
      (tmp_path / "classes.json").write_text(classes_text)
      kwargs["classes"] = str(tmp_path / "classes.json")
    src = tmp_path / ("flat" if labels_text is not None else "folders")
    return _run(src, tmp_path / "dst", **kwargs)

  with pytest.raises(ValueError, match=r"--labels .*labels\.txt:3: expected 'name class', got 'b'"):
    run_with("a.jpg cls\n\nb\n")
  with pytest.raises(ValueError, match=r"--labels .*labels\.txt: no labels in the file"):
    run_with("# only a comment\n")
  with pytest.raises(ValueError, match=r"--labels .*labels\.json: expected a JSON object"):
    run_with('["a.jpg", "cls"]', labels_name="labels.json")
  with pytest.raises(ValueError, match=r"--labels .*labels\.json: not JSON \(.* at line 1 column"):
    run_with('{"a.jpg": "cls",', labels_name="labels.json")
  with pytest.raises(FileNotFoundError, match=r"--labels .*missing\.txt: cannot read"):
    _run(tmp_path / "flat", tmp_path / "dst", labels=str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match=r"--classes .*classes\.json: expected a JSON list"):
    run_with(classes_text='{"cls": 0}')
  with pytest.raises(ValueError, match=r"--classes .*classes\.json: cannot read a JSON list"):
    run_with(classes_text="cls\n")
