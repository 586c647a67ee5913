"""Grain pipelines: determinism, exact resume, one global stream over processes, errors,
workers, host == device."""

import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.data import augment, augment_device, augment_host, data_config, pipeline


def _highres_cfg(**overrides):
  # Small sizes keep every test well under a second per batch on 2 cores.
  cfg = data_config.default_config()
  cfg.source = "highres"
  cfg.highres.image_size = 96
  cfg.highres.num_train_examples = 24
  cfg.highres.num_eval_examples = 10
  cfg.train_scale = 64
  cfg.eval_scale = 64
  cfg.augment.crop_size = 56
  cfg.update(overrides)
  return cfg


class IndexSource:
  """Record i: a flat grey image of level i % 256 and label i, to trace examples by label."""

  def __init__(self, n: int, size: int = 16, shape: tuple[int, int] | None = None):
    self.n, self.shape = n, shape or (size, size)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((*self.shape, 3), i % 256, np.uint8), "label": i}

  def __repr__(self):
    return f"IndexSource({self.n}, {self.shape})"


def _index_cfg(crop=12, scale=16):
  cfg = data_config.default_config()
  cfg.train_scale, cfg.eval_scale = scale, scale
  cfg.augment.crop_size = crop
  return cfg


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys, strict=True):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_same_seed_same_batches_and_augmentations():
  cfg = _highres_cfg(augment_on="device")  # 'device' batches carry the sampled params.
  runs = [_take(pipeline.make_train_iterator(cfg, global_batch_size=8, seed=3), 2)]
  runs.append(_take(pipeline.make_train_iterator(cfg, global_batch_size=8, seed=3), 2))
  _assert_batches_equal(*runs)
  other = _take(pipeline.make_train_iterator(cfg, global_batch_size=8, seed=4), 1)[0]
  assert not np.array_equal(other["augment"]["crop_x"], runs[0][0]["augment"]["crop_x"])
  assert runs[0][0]["image"].shape == (8, 64, 64, 3)
  assert runs[0][0]["label"].dtype == np.int32


def test_resume_gives_the_uninterrupted_batches_across_epochs():
  cfg = _index_cfg()
  src = IndexSource(20)
  make = lambda: pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, source=src)
  full = _take(make(), 9)  # 5 batches per epoch: crosses into the second epoch.
  first = make()
  _take(first, 3)
  state = first.get_state()
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 6), full[3:])
  # Each epoch is a fresh permutation of all examples.
  epoch0 = np.concatenate([b["label"] for b in full[:5]])
  epoch1 = np.concatenate(
    [b["label"] for b in full[5:]] + [b["label"] for b in _take(make(), 10)[9:]]
  )
  assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20))
  assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("count,workers", [(1, 2), (2, 0), (2, 2), (4, 0)])
def test_processes_read_their_rows_of_one_global_stream(count, workers):
  """P processes' host batches, in process order, are the global batches of one process
  without workers: same records, same augmented pixels, with or without workers; so 2 x 4
  devices train like 1 x 8. Batches straddle epochs (25 examples, global batch 8)."""
  src = IndexSource(25)

  def batches(p, count, workers):
    cfg = _index_cfg()
    cfg.num_workers = workers
    it = pipeline.make_train_iterator(
      cfg, global_batch_size=8, seed=1, process_index=p, process_count=count, source=src
    )
    return _take(it, 7)  # 56 positions: two epochs and a part

  one = batches(0, 1, 0)
  parts = [batches(p, count, workers) for p in range(count)]
  for g, whole in enumerate(one):
    for key in ("image", "label"):
      joined = np.concatenate([parts[p][g][key] for p in range(count)])
      np.testing.assert_array_equal(joined, whole[key], err_msg=f"batch {g} {key}")
  epoch0 = np.concatenate([b["label"] for b in one])[:25]
  assert sorted(epoch0) == list(range(25))  # the stream is whole epochs, none left out


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match=r"train\.batch_size=10 .* 4 processes"):
    pipeline.make_train_iterator(
      _index_cfg(), global_batch_size=10, seed=0, process_count=4, source=IndexSource(40)
    )
  with pytest.raises(ValueError, match="augment_on"):
    cfg = _index_cfg()
    cfg.augment_on = "gpu"
    pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, source=IndexSource(40))


@pytest.mark.parametrize("source", ["highres", "digits"])
def test_host_and_device_augmentation_agree(source):
  if source == "highres":
    cfg = _highres_cfg()
  else:
    cfg = data_config.default_config()
    cfg.source, cfg.image_size, cfg.train_scale = "digits", 32, 40
    cfg.augment.crop_size = 32
  host = _take(pipeline.make_train_iterator(cfg, global_batch_size=16, seed=5), 2)
  cfg.augment_on = "device"
  device = _take(pipeline.make_train_iterator(cfg, global_batch_size=16, seed=5), 2)
  mesh = jax.make_mesh((8,), ("data",))
  for h, d in zip(host, device, strict=True):
    np.testing.assert_array_equal(h["label"], d["label"])
    on_device = jax.device_put(d, NamedSharding(mesh, P("data")))
    crops = augment_device.augment_batch_jit(on_device, cfg.augment.crop_size)
    assert crops.shape == h["image"].shape and crops.sharding.spec[0] == "data"
    diff = np.abs(np.asarray(crops).astype(int) - h["image"].astype(int))
    assert diff.max() <= 1, diff.max()


def test_square_window_holds_the_crop_of_a_wide_image():
  image = np.random.default_rng(0).integers(0, 256, (64, 150, 3), np.uint8)
  params = augment.AugmentParams.identity(56, crop_y=3, crop_x=90)
  window, moved = pipeline.square_window(image, params)
  assert window.shape == (64, 64, 3)
  np.testing.assert_array_equal(
    augment_host.apply(window, moved), augment_host.apply(image, params)
  )


def test_device_augment_needs_no_communication():
  mesh = jax.make_mesh((8,), ("data",))
  cfg = _highres_cfg(augment_on="device")
  batch = next(pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  hlo = augment_device.augment_batch_jit.lower(sharded, 56).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo


def test_eval_pads_the_last_batch_and_masks_it():
  cfg, src = _index_cfg(crop=8), IndexSource(11, shape=(16, 24))
  seen = []
  for p in range(2):
    it = pipeline.make_eval_iterator(
      cfg, global_batch_size=4, process_index=p, process_count=2, source=src
    )
    batches = list(it)
    assert len(batches) == 3 and all(b["image"].shape == (2, 8, 8, 3) for b in batches)
    seen += [
      int(label) for b in batches for label, m in zip(b["label"], b["mask"], strict=True) if m
    ]
  assert sorted(seen) == list(range(11))
  full = list(pipeline.make_eval_iterator(cfg, global_batch_size=4, mode="full", source=src))
  assert full[0]["image"].shape == (4, 16, 24, 3) and full[-1]["mask"].sum() == 3


def test_eval_modes_scales_and_source_indices():
  cfg, src = _index_cfg(crop=8, scale=16), IndexSource(5, shape=(16, 24))
  # 'square': the centre S x S square of the resized image (dense evaluation's input).
  (square,) = pipeline.make_eval_iterator(cfg, global_batch_size=8, mode="square", source=src)
  assert square["image"].shape == (8, 16, 16, 3)
  # 'index' is the record's position in the source; padding repeats real records.
  assert square["index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
  assert square["label"].tolist() == square["index"].tolist()
  (larger,) = pipeline.make_eval_iterator(
    cfg, global_batch_size=8, mode="square", scale=32, source=src
  )
  assert larger["image"].shape == (8, 32, 32, 3)
  with pytest.raises(ValueError, match="crop_size=8 exceeds the evaluation scale 6"):
    pipeline.make_eval_iterator(cfg, global_batch_size=8, scale=6, source=src)


def test_eval_scale_zero_follows_train_scale():
  cfg = _index_cfg(crop=8, scale=20)
  cfg.eval_scale = 0
  assert pipeline.eval_scale(cfg) == 20
  (batch,) = pipeline.make_eval_iterator(
    cfg, global_batch_size=2, mode="square", source=IndexSource(2)
  )
  assert batch["image"].shape == (2, 20, 20, 3)
  cfg.eval_scale = 24
  assert pipeline.eval_scale(cfg) == 24
  cfg.eval_scale = -1
  with pytest.raises(ValueError, match=r"data.eval_scale=-1 must be >= 0"):
    pipeline.eval_scale(cfg)


# A plain program (no absl app: `make_train_iterator` must set up Grain's flags itself).
# It prints its workers' pids before it fails on purpose; the test checks they are gone.
_WORKERS_SCRIPT = textwrap.dedent(
  """
  import gc, multiprocessing, signal, sys, time
  import numpy as np
  from deep_image.data import data_config, pipeline

  # Ctrl-C raises KeyboardInterrupt, as in a terminal. Python keeps SIGINT ignored when its
  # parent ignored it, and a pytest-xdist worker may: the SIGINT test then hung for 60 s.
  signal.signal(signal.SIGINT, signal.default_int_handler)

  def workers_alive(timeout=15.0):
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
      time.sleep(0.05)
    return multiprocessing.active_children()

  def make(source, workers=2):
    cfg = data_config.default_config()
    cfg.source, cfg.num_workers = source, workers
    if source == "highres":
      cfg.highres.image_size, cfg.highres.num_train_examples, cfg.train_scale = 96, 32, 64
      cfg.augment.crop_size = 56
    else:
      cfg.image_size, cfg.train_scale = 32, 32
      cfg.augment.crop_size = 28
    return pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0), cfg.augment.crop_size

  for source in ("highres", "digits"):
    it, c = make(source)
    first = [next(it) for _ in range(2)]
    assert all(b["image"].shape == (8, c, c, 3) for b in first), source
    assert len(multiprocessing.active_children()) == 2, multiprocessing.active_children()
    if source == "highres":  # Resume once: every worker start costs ~2 s on 2 cores.
      state = it.get_state()
      rest = [next(it) for _ in range(2)]
      resumed, _ = make(source)
      resumed.set_state(state)
      for x in rest:
        y = next(resumed)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
      del resumed, rest, x, y
    # Dropping the iterator ends its workers. (Batches are Grain shared-memory arrays: one
    # still held when the interpreter exits makes Grain print an ignored error.)
    del it, first
    gc.collect()
    assert not workers_alive(), f"{source}: workers outlive their iterator"
    print(source, "ok", flush=True)

  it, _ = make(sys.argv[1], workers=1)
  next(it)
  print("PIDS", *[p.pid for p in multiprocessing.active_children()], flush=True)
  if sys.argv[2] == "raise":
    raise RuntimeError("planted failure")
  while True:  # Until the test's SIGINT.
    next(it)
  """
)


def _pids_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
  """The pids still running (not zombies) after up to `timeout` seconds."""

  def running(pid):
    try:
      with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
      return False

  deadline = time.monotonic() + timeout
  while any(map(running, pids)) and time.monotonic() < deadline:
    time.sleep(0.1)
  return [p for p in pids if running(p)]


def _worker_pids(stdout: str) -> list[int]:
  (line,) = [x for x in stdout.splitlines() if x.startswith("PIDS")]
  pids = [int(p) for p in line.split()[1:]]
  assert len(pids) == 1, line
  return pids


def test_workers_in_a_plain_program_end_with_the_iterator_and_an_exception():
  # Workers end when the iterator is dropped, and after an uncaught exception no orphan is
  # left (the atexit hook closes the iterator). Spawned workers re-import the main module:
  # a fresh interpreter is the honest setting.
  result = subprocess.run(
    [sys.executable, "-c", _WORKERS_SCRIPT, "highres", "raise"],
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert "highres ok" in result.stdout and "digits ok" in result.stdout, result.stderr[-3000:]
  assert result.returncode == 1 and "RuntimeError: planted failure" in result.stderr
  assert "Exception ignored" not in result.stderr, result.stderr[-3000:]
  assert not _pids_gone(_worker_pids(result.stdout))


def test_ctrl_c_in_the_parent_leaves_no_worker_behind():
  # SIGINT to the parent only (the harder case than a terminal's Ctrl-C, which also
  # interrupts the workers): KeyboardInterrupt unwinds it and its workers must go too.
  proc = subprocess.Popen(
    [sys.executable, "-c", _WORKERS_SCRIPT.replace('("highres", "digits")', "()"), "digits", "-"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    line = proc.stdout.readline()
    pids = _worker_pids(line)
    time.sleep(0.5)  # Inside the endless loop of next().
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-3000:]
  assert not _pids_gone(pids)


# The Grain workers' side (the pipeline's callables, the host augmentation, the sources) and
# the config files, with `import jax` made to fail: none of them may need JAX. (Grain itself
# imports jax when it is installed and runs without it.)
_NO_JAX_SCRIPT = textwrap.dedent(
  """
  import glob, importlib, pathlib, sys
  sys.modules["jax"] = None  # Any `import jax` from here on raises ImportError.
  from deep_image.data import data_config, pipeline
  for path in sorted(glob.glob("experiments/configs/*.py")):
    importlib.import_module("experiments.configs." + pathlib.Path(path).stem)
  for augment_on, side in (("host", 32), ("device", 36)):
    cfg = data_config.default_config()
    cfg.source, cfg.image_size, cfg.train_scale, cfg.augment_on = "digits", 32, 36, augment_on
    cfg.augment.crop_size = 32
    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, side, side, 3), (augment_on, batch["image"].shape)
  print("no jax needed", flush=True)
  """
)


def test_workers_and_config_files_run_without_jax():
  root = pathlib.Path(__file__).resolve().parent.parent
  result = subprocess.run(
    [sys.executable, "-c", _NO_JAX_SCRIPT], capture_output=True, text=True, timeout=120, cwd=root
  )
  assert result.returncode == 0 and "no jax needed" in result.stdout, result.stderr[-3000:]


def test_jpeg_decode_matches_pillow_and_falls_back_to_it():
  # decode_image reads JPEGs with simplejpeg (libjpeg-turbo, like Pillow) for speed; the
  # pixels and DCT-scaled sizes must be Pillow's, and what simplejpeg rejects goes to Pillow.
  import io

  import skimage.data
  from PIL import Image

  from deep_image.data.sources import decode_image

  photo = skimage.data.chelsea()  # uint8 [300, 451, 3]
  buffer = io.BytesIO()
  Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
  jpeg = buffer.getvalue()
  with Image.open(io.BytesIO(jpeg)) as img:
    full = np.asarray(img.convert("RGB"))
  with Image.open(io.BytesIO(jpeg)) as img:
    img.draft("RGB", (200, 150))
    half = np.asarray(img.convert("RGB"))
  np.testing.assert_array_equal(decode_image(jpeg), full)
  np.testing.assert_array_equal(decode_image(jpeg, min_side=150), half)  # 1/2: 150 x 226.
  # M/8 scales too: the smallest keeping the shorter side >= 100 is 3/8 (113 x 170).
  assert decode_image(jpeg, min_side=100).shape == (113, 170, 3)
  cmyk = io.BytesIO()
  Image.fromarray(photo).convert("CMYK").save(cmyk, format="JPEG")
  with Image.open(io.BytesIO(cmyk.getvalue())) as img:
    expected = np.asarray(img.convert("RGB"))
  np.testing.assert_array_equal(decode_image(cmyk.getvalue()), expected)
