"""Test protocols, fusion, and experiments.evaluate / ensemble / predict end to end.

The end-to-end test trains two `highres.py:tiny` runs (the low- and high-resolution models
of section 4.2 in miniature, seconds each) and drives the three scripts as a user would.
"""

import json
import struct
import zlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from deep_image.config_error import ConfigError
from deep_image.data import sources
from deep_image.evaluate.accuracy import Evaluator, accuracy, fuse
from deep_image.evaluate.protocol import Protocol, View, parse_protocol, protocol_grid, views_of
from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.train.checkpoint import Checkpointer
from deep_image.train.trained_model import resolve_step
from experiments.configs import highres

TINY_HIGHRES = "--config=experiments/configs/highres.py:tiny"


def test_protocol_names_round_trip_and_default_to_the_model_scale():
  p = parse_protocol("dense+flip@256,512", default_scale=224)
  assert p == Protocol("dense", (256, 512), flip=True) and p.name == "dense+flip@256,512"
  assert p.views == (
    View("dense", 256, False),
    View("dense", 256, True),
    View("dense", 512, False),
    View("dense", 512, True),
  )
  assert parse_protocol("center", default_scale=36).name == "center@36"
  for bad in ("centre", "dense+flip@", "dense@-3", "flip+dense@256"):
    with pytest.raises(ConfigError, match="test protocol"):
      parse_protocol(bad, default_scale=36)


def test_protocol_grid_covers_every_combination_once():
  grid = protocol_grid((24, 32), flip=True, dense=True)
  names = [p.name for p in grid]
  assert len(names) == len(set(names)) == 12 and names[0] == "center@24"
  assert {"center@24,32", "dense+flip@24,32", "dense@32", "center+flip@24"} <= set(names)
  # Shared views are run once: 2 kinds x 2 scales x 2 flips.
  assert len(views_of(grid)) == 8
  assert [p.name for p in protocol_grid((24,), flip=False, dense=False)] == ["center@24"]


def test_fuse_averages_softmax_posteriors():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
  assert fuse([a]) is a  # one view keeps its own scores, ties and all
  softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(np.exp(fuse([a, b])), (softmax(a) + softmax(b)) / 2, rtol=1e-5)
  # Scores are log-posteriors up to a constant: fusing shifted copies changes nothing.
  np.testing.assert_allclose(fuse([a, a + 3.0]), np.log(softmax(a)), rtol=1e-5, atol=1e-6)
  # Posteriors, not logits, are averaged: a model sure of another class (logit 9) does not
  # outvote two that agree on the label (averaged logits would: 4/3 < 9/3).
  labels = np.array([0])
  sure = np.array([[0.0, 9.0]], np.float32)
  right = np.array([[2.0, 0.0]], np.float32)
  assert accuracy(fuse([right, right, sure]), labels)["top1"] == 1.0
  assert accuracy(fuse([right, sure]), labels)["top1"] == 0.0
  assert accuracy(fuse([right, right]), labels)["top1"] == 1.0


def test_dense_at_the_crop_scale_is_the_centre_crop_and_flips_are_views():
  config = highres.get_config("tiny")
  model = make_model(config.model)
  mesh = mesh_lib.make_mesh(config.parallel)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  crop = config.data.augment.crop_size
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, crop, crop, 3), np.uint8))["params"])
  source = sources.make_source(config.data, "validation")
  evaluator = Evaluator(model, config.data, sharding, global_batch_size=16)
  protocols = [Protocol("center", (crop,)), Protocol("dense", (crop,))]
  protocols += [Protocol("dense", (24,)), Protocol("dense", (24,), flip=True)]
  evaluation = evaluator.run(params, protocols, split="validation", source=source)
  center, dense = (evaluation.scores[p.name] for p in protocols[:2])
  assert center.shape == (len(source), config.model.num_classes)
  # At S = crop the score map has one position: its posterior is the centre crop's.
  np.testing.assert_allclose(np.exp(dense), jax.nn.softmax(center), rtol=1e-4, atol=1e-6)
  # A larger scale is a real map (another result); a flip is another view.
  assert not np.allclose(evaluation.scores["dense@24"], dense, atol=1e-4)
  assert not np.allclose(evaluation.scores["dense+flip@24"], evaluation.scores["dense@24"])
  assert evaluation.labels.tolist() == [source.label(i) for i in range(len(source))]


def _train(workdir, *variants):
  done = run_cli(
    "experiments.train",
    f"--workdir={workdir}",
    TINY_HIGHRES + "".join(f",{v}" for v in variants),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(workdir / "result.json") as f:
    return json.load(f)


def test_evaluate_ensemble_and_predict_end_to_end(tmp_path):
  low, high = tmp_path / "low", tmp_path / "high"
  result = _train(low)
  _train(high, "high")

  # evaluate: 12 protocols; the centre crop at the eval scale is the run's final evaluation.
  done = run_cli(
    "experiments.evaluate",
    f"--workdir={low}",
    "--checkpoint=latest",
    "--scales=24,32",
    "--flip",
    "--dense",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(low / "eval.json") as f:
    table = json.load(f)
  assert len(table) == 12 and "dense+flip@24,32" in table
  assert "| dense+flip@24,32 |" in done.stdout
  assert table["center@24"] == {
    "top1": result["top1"],
    "top5": result["top5"],
    "count": result["count"],
    "step": 12,
    "split": "validation",
  }
  # --perturb: keyed beside the clean results (kept), with the top-1 drop from them.
  done = run_cli(
    "experiments.evaluate", f"--workdir={low}", "--checkpoint=latest", "--perturb=rotation:10"
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(low / "eval.json") as f:
    table = json.load(f)
  assert len(table) == 13 and table["center@24"]["top1"] == result["top1"]
  perturbed = table["center@24/perturb=rotation:10"]
  assert (perturbed["count"], perturbed["step"]) == (result["count"], 12)
  row = next(line for line in done.stdout.splitlines() if "/perturb=rotation:10 |" in line)
  drop = result["top1"] - perturbed["top1"]
  assert "top-1 drop" in done.stdout and row.rstrip(" |").endswith(f"{drop:.2%}")
  done = run_cli("experiments.evaluate", f"--workdir={low}", "--perturb=rotate")
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith("config error: --perturb='rotate'")

  # 'best' is the evaluated checkpoint with the highest top-1 (step 8 or 12 here).
  with open(low / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "split" in r]
  best = max(evals, key=lambda r: (r["top1"], -r["step"]))["step"]
  checkpoints = Checkpointer(str(low), keep=3, read_only=True)
  assert resolve_step(checkpoints, "best") == best
  with pytest.raises(ConfigError, match=r"--checkpoint='5'.*\[8, 12\]"):
    resolve_step(checkpoints, "5")
  checkpoints.close()

  # ensemble: each model at its own scale, fused by averaging posteriors.
  out = tmp_path / "fused.json"
  done = run_cli(
    "experiments.ensemble",
    f"--workdirs={low},{high}",
    "--protocol=dense",
    "--checkpoint=latest",
    f"--out={out}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out) as f:
    fused = json.load(f)
  assert fused["models"][str(low)]["protocol"] == "dense@24"
  assert fused["models"][str(high)]["protocol"] == "dense@48"
  assert fused["fused"]["count"] == result["count"]
  assert 0.0 <= fused["fused"]["top1"] <= fused["fused"]["top5"] <= 1.0

  # predict: a top-k table with the dataset's class names, per model and fused, and a figure.
  config = highres.get_config("tiny")
  scene = sources.make_source(config.data, "validation")[0]["image"]
  Image.fromarray(scene).save(tmp_path / "scene.png")
  figure = tmp_path / "top3.png"
  done = run_cli(
    "experiments.predict",
    f"--workdirs={low},{high}",
    f"--image={tmp_path / 'scene.png'}",
    "--k=3",
    "--checkpoint=latest",
    f"--out={figure}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  header = next(line for line in done.stdout.splitlines() if line.startswith("| rank"))
  assert "(center@24)" in header and "(center@48)" in header and header.endswith("| fused |")
  rows = [line for line in done.stdout.splitlines() if line.startswith("| 3 |")]
  assert len(rows) == 1 and rows[0].count("%") == 3
  assert "stripes" in done.stdout  # the generated classes' names, e.g. 'vertical stripes 5px'

  assert figure.stat().st_size > 0

  # A file that is not an image: one line naming it.
  (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
  done = run_cli("experiments.predict", f"--workdirs={low}", f"--image={tmp_path / 'bad.jpg'}")
  assert done.returncode == 1 and "bad.jpg" in done.stderr.splitlines()[-1]
  # A 20000 x 20000 PNG (tens of KB): Pillow's decompression-bomb guard, named in one line.
  bomb = tmp_path / "bomb.png"
  _write_blank_png(bomb, 20_000, 20_000)
  assert bomb.stat().st_size < 200_000
  done = run_cli("experiments.predict", f"--workdirs={low}", f"--image={bomb}")
  last = done.stderr.strip().splitlines()[-1]
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert "bomb.png" in last and "MAX_IMAGE_PIXELS" in last and "400000000 pixels" in last
  # No class to list: refused before any model is loaded (it printed an empty table).
  done = run_cli(
    "experiments.predict", f"--workdirs={low}", f"--image={tmp_path / 'scene.png'}", "--k=0"
  )
  assert done.returncode == 1 and "| rank" not in done.stdout
  assert done.stderr.strip().splitlines()[-1] == (
    "config error: --k=0: expected how many classes to list, at least 1"
  )


def _write_blank_png(path, width, height):
  """A valid 1-bit greyscale PNG of width x height, all black, streamed (no image in memory)."""
  row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
  packer = zlib.compressobj(9)
  data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  path.write_bytes(
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
  )


def test_scripts_refuse_what_they_cannot_evaluate(tmp_path):
  done = run_cli("experiments.evaluate", f"--workdir={tmp_path}")
  assert done.returncode == 1
  assert done.stderr.splitlines()[-1].startswith("config error:") and "config.json" in done.stderr
  # An ensemble of models tested on different images (digits vs generated scenes).
  from deep_image.train.ensemble import ensemble
  from experiments.configs import default

  configs = [default.get_config("tiny"), highres.get_config("tiny")]
  with pytest.raises(ConfigError, match="the same eval images"):
    ensemble(["a", "b"], configs, "center", "latest", "")
