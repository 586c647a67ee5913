"""Whole-image dense evaluation (deep_image/evaluate/accuracy.py, the eval iterator's 'whole'
mode in deep_image/data/pipeline.py) on non-square images.

An image folder of 3:2 and 2:3 photos (and a 16:9 one whose longer side is cut to the grid)
is generated here, prepared as `experiments.prepare` would, and scored by a stub model whose
score map is a function of the pixels we control: one class wins exactly where a bright patch
lies in a position's window. A real tiny VGG then checks that grouped, padded batches score
each image as it scores alone, flips and scales included.
"""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from deep_image.config_error import ConfigError
from deep_image.data import data_config, pipeline
from deep_image.data.array_record_source import ArrayRecordSource
from deep_image.data.prepare import prepare
from deep_image.data.sources import decode_image
from deep_image.evaluate.accuracy import Evaluator, fuse
from deep_image.evaluate.protocol import Protocol, parse_protocol, protocol_grid
from deep_image.models.vgg import make_model
from experiments.configs import base

S = 24  # evaluation scale: the shorter side
CROP = 16  # the model's input: one score-map position's window
GRID = 4  # the model's stride (vgg_tiny: 2 pools)
BATCH = 8  # global eval batch over the 8 simulated devices
CLASSES = 3
CUE = 1  # the class a bright patch votes for; class 0 wins a window without one


class PatchModel:
  """Stands in for an FC-as-conv VGG: position (i, j) of the score map sees the CROP x CROP
  window at (GRID i, GRID j); class CUE's logit is 10 where that window holds a pixel
  brighter than 200, class 0's is 0.1 everywhere, the rest 0. A window without the patch
  so gives nearly uniform posteriors with class 0 ahead, one with it gives CUE ~1: the
  average ranks CUE first once more than 3.3% of the positions see the patch."""

  def apply(self, variables, images, dense=False):
    del variables
    bright = images.astype(jnp.float32).min(axis=-1)  # white patch: all channels high
    window_max = lax.reduce_window(
      bright, -jnp.inf, lax.max, (1, CROP, CROP), (1, GRID, GRID), "VALID"
    )
    cue = (window_max > 200).astype(jnp.float32)
    logits = jnp.stack([jnp.full_like(cue, 0.1), 10 * cue, jnp.zeros_like(cue)], axis=-1)
    return logits if dense else logits[:, 0, 0]


def _sharding():
  return NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec("batch"))


def _cfg():
  cfg = data_config.default_config()
  cfg.train_scale = cfg.eval_scale = S
  cfg.augment.crop_size = CROP
  cfg.num_workers = 0
  return cfg


def _photo(height, width, patch=None, seed=0):
  """uint8 [height, width, 3]: dark noise, and a white 4 x 4 patch at `patch` (y, x)."""
  image = np.random.default_rng(seed).integers(0, 90, (height, width, 3), dtype=np.uint8)
  if patch is not None:
    y, x = patch
    image[y : y + 4, x : x + 4] = 255
  return image


# (height, width, patch position or None, label, cue only outside the centre square). At
# S = 24 the centre square of a 24 x 36 image is columns 6..29, of a 36 x 24 one rows 6..29.
# 48 x 72 photos are halved (their patch too).
PHOTOS = [
  (24, 36, (10, 0), CUE, True),  # 3:2, patch in the left strip
  (24, 36, (12, 32), CUE, True),  # 3:2, right strip
  (48, 72, (20, 64), CUE, True),  # 3:2 at twice the scale: right strip after resizing
  (36, 24, (0, 10), CUE, True),  # 2:3, top strip
  (36, 24, (32, 8), CUE, True),  # 2:3, bottom strip
  (72, 48, (66, 20), CUE, True),  # 2:3 at twice the scale: bottom strip
  (24, 36, (10, 16), CUE, False),  # inside the centre square: both views find it
  (36, 24, (16, 10), CUE, False),
  (24, 36, None, 0, False),  # no patch anywhere
  (36, 24, None, 0, False),
  # 16:9-ish: cut to 24 x 40 (columns 1..40); its square is columns 9..32, the patch 36..39
  (24, 43, (8, 36), CUE, True),
]


@pytest.fixture(scope="module")
def folder_source(tmp_path_factory):
  """PHOTOS as an image folder (class folders of PNGs), prepared to ArrayRecord shards
  (JPEGs, in sorted path order: class0/..., then class1/...)."""
  root = tmp_path_factory.mktemp("photos")
  src, dst = root / "src", root / "prepared"
  for i, (h, w, patch, label, _) in enumerate(PHOTOS):
    folder = src / f"class{label}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo(h, w, patch, seed=i)).save(folder / f"{i:02d}.png")
  prepare(str(src), str(dst))
  return ArrayRecordSource(str(dst))


def _in_source_order():
  """PHOTOS in the prepared source's record order (label, then file index)."""
  return sorted(PHOTOS, key=lambda p: (p[3], PHOTOS.index(p)))


def test_dense_square_is_a_protocol_by_name_only():
  p = parse_protocol("dense_square+flip@24,32", default_scale=16)
  assert p == Protocol("dense_square", (24, 32), flip=True) and p.name == "dense_square+flip@24,32"
  assert [v.name for v in p.views][:2] == ["dense_square@24", "dense_square+flip@24"]
  assert parse_protocol("dense", default_scale=16) == Protocol("dense", (16,))
  # experiments.evaluate --dense: the whole image only, the grid as before.
  assert {p.kind for p in protocol_grid((24, 32), flip=True, dense=True)} == {"center", "dense"}
  with pytest.raises(ConfigError, match=r"expected center\|dense\|dense_square"):
    parse_protocol("dense_squares", default_scale=16)


def test_whole_image_shape_snaps_the_longer_side_to_the_grid():
  rng = np.random.default_rng(0)
  for _ in range(300):
    height, width = (int(v) for v in rng.integers(8, 400, 2))
    scale, grid = int(rng.choice([16, 24, 32, 48])), int(rng.choice([1, 4, 8]))
    resized = pipeline.resize_shorter_side(np.zeros((height, width, 3), np.uint8), scale)
    h, w = pipeline.whole_image_shape(height, width, scale, grid)
    assert min(h, w) == scale
    for side, full in ((h, resized.shape[0]), (w, resized.shape[1])):
      assert 0 <= full - side < grid and (side - scale) % grid == 0
      if scale % grid == 0:  # no score-map position is lost
        assert side // grid == full // grid
  assert pipeline.whole_image_shape(341, 455, 256, 32) == (256, 320)  # a 4:3 photo, VGG-16


def test_image_shape_reads_headers_like_the_decoder():
  image = _photo(25, 37)
  for fmt in ("JPEG", "PNG"):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    assert pipeline.image_shape(buffer.getvalue()) == decode_image(buffer.getvalue()).shape[:2]
  assert pipeline.image_shape(image) == (25, 37)


def test_whole_mode_groups_by_shape_and_counts_every_image_once(folder_source):
  shapes = pipeline.record_shapes(_cfg(), source=folder_source)
  assert [tuple(s) for s in shapes.tolist()] == [p[:2] for p in _in_source_order()]
  plan = pipeline.whole_image_plan(shapes, scale=S, grid=GRID, global_batch_size=BATCH)
  assert plan.shapes == [(24, 36), (24, 40), (36, 24)]  # three programs per dense view
  # Two processes read their shares of every global batch: same shapes batch by batch,
  # every real record exactly once, padding only within a shape's last batch.
  per_process = [
    list(
      pipeline.make_eval_iterator(
        _cfg(),
        global_batch_size=BATCH,
        process_index=p,
        process_count=2,
        mode="whole",
        source=folder_source,
        grid=GRID,
        source_shape=shapes,
      )
    )
    for p in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1]) == 3
  seen = []
  for b0, b1 in zip(*per_process, strict=True):
    assert b0["image"].shape == b1["image"].shape and b0["image"].shape[0] == BATCH // 2
    for b in (b0, b1):
      seen += b["index"][b["mask"]].tolist()
      # Padding rows repeat records of the batch's own shape.
      for i in b["index"]:
        assert pipeline.whole_image_shape(*shapes[i], S, GRID) == b["image"].shape[1:3]
  assert sorted(seen) == list(range(len(PHOTOS)))
  # Without source_shape the iterator reads the headers itself: the same batches.
  alone = list(
    pipeline.make_eval_iterator(
      _cfg(), global_batch_size=BATCH, mode="whole", source=folder_source, grid=GRID
    )
  )
  assert [b["image"].shape[1:3] for b in alone] == [(24, 36), (24, 40), (36, 24)]
  assert sum(int(b["mask"].sum()) for b in alone) == len(PHOTOS)


def test_worker_processes_give_the_same_batches(folder_source):
  # Grain workers take every W-th element: batched before them, so a batch keeps its shape
  # and its rows, and the header pre-pass its order.
  cfg = _cfg()
  shapes = pipeline.record_shapes(cfg, source=folder_source)
  np.testing.assert_array_equal(
    pipeline.record_shapes(cfg, source=folder_source, num_workers=2), shapes
  )
  kwargs = dict(global_batch_size=4, mode="whole", source=folder_source, grid=GRID)
  alone = list(pipeline.make_eval_iterator(cfg, **kwargs, source_shape=shapes))
  it = pipeline.make_eval_iterator(cfg, **kwargs, source_shape=shapes, num_workers=2)
  with it:
    workers = list(it)
  assert len(workers) == len(alone) == 5
  for a, w in zip(alone, workers, strict=True):
    for key in ("image", "index", "mask"):
      np.testing.assert_array_equal(a[key], w[key])
  # A source_shape out of source order is refused, not resized into another shape.
  swapped = shapes[::-1].copy()
  with pytest.raises(ValueError, match="source_shape says"):
    list(pipeline.make_eval_iterator(cfg, **kwargs, source_shape=swapped))


def test_whole_view_pixels_are_the_resized_image_cut_to_the_grid():
  images = [_photo(48, 86, seed=1), _photo(24, 24, seed=2)]
  source = [{"image": im, "label": 0} for im in images]
  batches = list(
    pipeline.make_eval_iterator(_cfg(), global_batch_size=1, mode="whole", source=source, grid=GRID)
  )
  by_index = {int(b["index"][0]): b["image"][0] for b in batches}
  resized = pipeline.resize_shorter_side(images[0], S)  # 24 x 43 -> cut to 24 x 40
  np.testing.assert_array_equal(by_index[0], resized[:, 1:41])
  np.testing.assert_array_equal(by_index[1], images[1])  # square at S: unchanged


def test_a_cue_outside_the_centre_square_is_found_by_dense_only(folder_source):
  evaluator = Evaluator(PatchModel(), _cfg(), _sharding(), global_batch_size=BATCH, grid=GRID)
  protocols = [parse_protocol(p, S) for p in ("dense", "dense_square", "dense+flip")]
  evaluation = evaluator.run({}, protocols, split="-", source=folder_source)
  labels = np.array([p[3] for p in _in_source_order()])
  outside = np.array([p[4] for p in _in_source_order()])
  np.testing.assert_array_equal(evaluation.labels, labels)
  n = len(PHOTOS)
  whole = evaluation.results["dense@24"]
  square = evaluation.results["dense_square@24"]
  assert whole == {"top1": 1.0, "top5": 1.0, "count": n}
  assert square["count"] == n and square["top1"] == pytest.approx((n - outside.sum()) / n)
  # Per image: the whole view ranks the label first; the square view misses exactly the
  # cues beyond it (it ranks class 0 first there).
  top_whole = evaluation.scores["dense@24"].argmax(-1)
  top_square = evaluation.scores["dense_square@24"].argmax(-1)
  np.testing.assert_array_equal(top_whole, labels)
  np.testing.assert_array_equal(top_square == labels, ~outside)
  # The mirrored whole image keeps the cue (in the mirrored strip).
  assert evaluation.results["dense+flip@24"]["top1"] == 1.0


@pytest.fixture(scope="module")
def tiny_vgg():
  cfg = base.get_config().model
  cfg.name, cfg.image_size, cfg.num_classes = "vgg_tiny", CROP, CLASSES
  model = make_model(cfg)
  images = jnp.zeros((1, CROP, CROP, 3), jnp.uint8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  return model, nn.unbox(params)


def _alone(model, params, source, scale, flip):
  """Each image's dense score run by itself: the pipeline's whole view, batch of one."""
  apply = jax.jit(lambda x: model.apply({"params": params}, x, dense=True))
  out = {}
  for b in pipeline.make_eval_iterator(
    _cfg(), global_batch_size=1, mode="whole", scale=scale, source=source, grid=GRID
  ):
    image = b["image"][:, :, ::-1] if flip else b["image"]
    score_map = apply(jnp.asarray(image))
    assert score_map.shape[1:3] == (image.shape[1] // GRID - 3, image.shape[2] // GRID - 3)
    out[int(b["index"][0])] = np.log(jax.nn.softmax(score_map, -1).mean(axis=(1, 2)))[0]
  return np.stack([out[i] for i in range(len(source))])


def test_grouped_padded_batches_score_each_image_as_it_scores_alone(tiny_vgg):
  model, params = tiny_vgg
  # 3:2 and 2:3 photos, one 3:2 at twice the size: groups of 3 and 2 in batches of 8, so
  # every batch is mostly padding rows.
  sizes = [(24, 36), (36, 24), (48, 72), (24, 36), (36, 24)]
  source = [{"image": _photo(h, w, seed=i), "label": i % 2} for i, (h, w) in enumerate(sizes)]
  evaluator = Evaluator(model, _cfg(), _sharding(), global_batch_size=BATCH)
  assert evaluator.grid is None  # read off the model: 16 px input, 4 x 4 map -> 4
  protocols = [Protocol("dense", (S,)), Protocol("dense", (S,), flip=True)]
  protocols.append(Protocol("dense", (S, 32)))
  evaluation = evaluator.run(params, protocols, split="-", source=source)
  views = {(s, f): _alone(model, params, source, s, f) for s, f in ((S, False), (S, True))}
  views[(32, False)] = _alone(model, params, source, 32, False)
  expected = {
    "dense@24": views[(S, False)],  # one view: the grouped, masked batches change nothing
    "dense+flip@24": fuse([views[(S, False)], views[(S, True)]]),
    "dense@24,32": fuse([views[(S, False)], views[(32, False)]]),
  }
  for name, scores in expected.items():
    np.testing.assert_allclose(evaluation.scores[name], scores, rtol=1e-4, atol=1e-6)
  # The flipped and the larger views are other views (the checks above have teeth).
  assert not np.allclose(views[(S, True)], views[(S, False)], atol=1e-4)
  assert not np.allclose(views[(32, False)], views[(S, False)], atol=1e-4)
  assert evaluation.results["dense@24,32"]["count"] == len(sizes)


# Two processes: 7 records (3:2 and 2:3, cues outside the square), shares of 4 and 3 rows.
_MP_PHOTOS = [p for p in PHOTOS if p[:2] in ((24, 36), (36, 24))][:7]
_MP_PROTOCOLS = ("dense", "dense_square", "dense+flip")


def _mp_evaluate() -> dict:
  """{protocol: (scores list, results)} and the gathered record shapes, on any topology."""
  source = [
    {"image": _photo(h, w, patch, seed=i), "label": label}
    for i, (h, w, patch, label, _) in enumerate(_MP_PHOTOS)
  ]
  evaluator = Evaluator(PatchModel(), _cfg(), _sharding(), global_batch_size=BATCH, grid=GRID)
  evaluation = evaluator.run(
    {}, [parse_protocol(p, S) for p in _MP_PROTOCOLS], split="-", source=source
  )
  return {
    "shapes": evaluator.source_shape("-", source).tolist(),
    "labels": evaluation.labels.tolist(),
    "scores": {k: v.tolist() for k, v in evaluation.scores.items()},
    "results": evaluation.results,
  }


def _mp_worker(process_id: int, port: int, out_dir: str) -> None:
  import json
  import os

  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  out = _mp_evaluate()
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(out, f)
  jax.distributed.shutdown()


def test_two_processes_score_their_shares_like_one(tmp_path):
  import json

  from conftest import run_two_processes

  outs = run_two_processes(__file__, tmp_path)
  reference = json.loads(json.dumps(_mp_evaluate()))  # one process, 8 devices
  n = len(_MP_PHOTOS)
  assert reference["results"]["dense@24"]["top1"] == 1.0
  assert reference["results"]["dense_square@24"]["top1"] < 1.0
  for out in outs:
    assert out["shapes"] == [list(p[:2]) for p in _MP_PHOTOS]
    assert out["labels"] == reference["labels"]
    assert out["results"] == reference["results"]
    for name, scores in reference["scores"].items():
      np.testing.assert_allclose(out["scores"][name], scores, rtol=1e-6)
    assert all(r["count"] == n for r in out["results"].values())


if __name__ == "__main__":
  import sys

  _mp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
