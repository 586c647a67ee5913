"""Top-k counting (deep_image/models/losses.py) and evaluation (deep_image/evaluate/accuracy.py).

A fake model reads its logits off the image pixels, so each test chooses every score exactly,
ties included, and runs the real eval pipeline (padding, masks, 8-device sharding).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deep_image.data import data_config, pipeline
from deep_image.evaluate.accuracy import Evaluator
from deep_image.evaluate.protocol import Protocol
from deep_image.models import losses
from deep_image.models.vgg import make_model
from experiments.configs import base

CLASSES = 8
SIDE = 4  # images [SIDE, SIDE, 3]: 48 pixels, the first CLASSES of them are the logits


class PixelLogits:
  """Stands in for a VGG: logits = the image's first CLASSES pixels, times params['scale']."""

  def apply(self, variables, images, dense=False):
    assert not dense, "PixelLogits has no score map"
    flat = images.reshape(images.shape[0], -1)[:, :CLASSES].astype(jnp.float32)
    return flat * variables["params"]["scale"]


class ScoreSource:
  """Record i: an image whose first pixels are scores[i], and label labels[i]."""

  def __init__(self, scores, labels):
    self.scores, self.labels = np.asarray(scores, np.uint8), list(labels)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    image = np.zeros(SIDE * SIDE * 3, np.uint8)
    image[:CLASSES] = self.scores[i]
    return {"image": image.reshape(SIDE, SIDE, 3), "label": self.labels[i]}

  def __repr__(self):
    return f"ScoreSource({len(self)})"


def _sharding():
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  return NamedSharding(mesh, PartitionSpec("batch"))


CENTER = Protocol("center", (SIDE,))


def _evaluate(source, scale=1.0):
  evaluator = Evaluator(PixelLogits(), _eval_cfg(), _sharding(), global_batch_size=8)
  evaluation = evaluator.run({"scale": jnp.float32(scale)}, [CENTER], split="-", source=source)
  return evaluation.results[CENTER.name]


def _eval_cfg():
  cfg = data_config.default_config()
  cfg.train_scale = cfg.eval_scale = SIDE
  cfg.augment.crop_size = SIDE
  cfg.num_workers = 0
  return cfg


def _scores(label_rank: int) -> list[int]:
  """Distinct scores where class 0 (the label used below) is strictly at 0-based `label_rank`."""
  order = [c for c in range(1, CLASSES)]
  order.insert(label_rank, 0)  # classes from best to worst
  scores = [0] * CLASSES
  for place, c in enumerate(order):
    scores[c] = 200 - 10 * place
  return scores


def test_padded_last_batch_counts_only_the_real_examples():
  # 10 examples, batch 8 over 8 devices: the second batch is 2 real rows + 6 padding rows
  # that repeat records 0..5. Records 0..5 are top-1 hits, 6..7 only top-5, 8..9 neither,
  # so counting the padding would raise both accuracies.
  ranks = [0, 0, 0, 0, 0, 0, 3, 4, 5, 7]
  source = ScoreSource([_scores(r) for r in ranks], [0] * 10)
  batches = list(
    pipeline.make_eval_iterator(_eval_cfg(), global_batch_size=8, source=source, num_workers=0)
  )
  # The case under test really occurs: a padded last batch whose padding are top-1 hits.
  assert [b["mask"].tolist() for b in batches] == [[True] * 8, [True] * 2 + [False] * 6]
  assert len(batches[1]["label"]) == 8
  result = _evaluate(source)
  assert result == {"top1": pytest.approx(0.6), "top5": pytest.approx(0.8), "count": 10}


def test_empty_split_is_an_error():
  with pytest.raises(ValueError, match="empty"):
    _evaluate(ScoreSource([], []))


def _tie_cases():
  """(scores, label, top1 hit, top5 hit): ties go against the label."""
  alone_first = _scores(0)
  tied_first = list(alone_first)
  tied_first[3] = tied_first[0]  # class 3 ties the label at the top
  fifth = _scores(4)  # four classes above: still top-5
  tied_fifth = list(fifth)
  tied_fifth[7] = tied_fifth[0]  # the worst class rises to tie the label for fifth place
  return [
    (alone_first, 0, 1, 1),
    (tied_first, 0, 0, 1),
    (fifth, 0, 0, 1),
    (tied_fifth, 0, 0, 0),
    ([50] * CLASSES, 0, 0, 0),  # a constant model ranks no label first
    (_scores(5), 0, 0, 0),
  ]


def test_topk_ties_count_against_the_label():
  cases = _tie_cases()
  logits = jnp.asarray([c[0] for c in cases], jnp.float32)
  labels = jnp.asarray([c[1] for c in cases], jnp.int32)
  topk = jax.jit(losses.topk_correct)  # one compile: a mask picks each case
  for i, (_, _, top1, top5) in enumerate(cases):
    got = topk(logits, labels, jnp.arange(len(cases)) == i)
    assert (float(got["top1"]), float(got["top5"])) == (top1, top5), f"case {i}"
  total = topk(logits, labels, jnp.ones(len(cases), bool))
  assert float(total["top1"]) == sum(c[2] for c in cases)
  assert float(total["top5"]) == sum(c[3] for c in cases)
  # The training metrics count the same way.
  _, sums = losses.loss_and_counts(logits, labels)
  assert (float(sums["top1"]), float(sums["top5"])) == (1.0, 3.0)


def test_topk_ties_in_bfloat16_and_other_label_positions():
  # bfloat16 has 8 bits of mantissa: 1.0 and 1.001 are the same number, a tie.
  logits = jnp.asarray([[0.5, 1.0, 1.001, 0.2], [1.001, 0.5, 0.2, 1.0]], jnp.bfloat16)
  assert logits[0, 1] == logits[0, 2]
  got = losses.topk_correct(logits, jnp.asarray([2, 3], jnp.int32))
  assert float(got["top1"]) == 0.0 and float(got["top5"]) == 2.0
  # Label at the last class, alone on top: a hit (the label's own score is not a rival).
  got = losses.topk_correct(jnp.asarray([[0.1, 0.2, 0.9]]), jnp.asarray([2], jnp.int32))
  assert float(got["top1"]) == 1.0


def test_nan_scores_count_against_the_label():
  logits = jnp.asarray([[jnp.nan, 1.0, 0.0], [0.0, 1.0, jnp.nan]], jnp.float32)
  got = losses.topk_correct(logits, jnp.asarray([0, 1], jnp.int32))
  # Row 0: the label's own score is NaN. Row 1: a rival's is.
  assert float(got["top1"]) == 0.0


def test_mask_drops_rows_from_both_counts():
  logits = jnp.asarray([_scores(0), _scores(0), _scores(3)], jnp.float32)
  labels = jnp.zeros(3, jnp.int32)
  got = losses.topk_correct(logits, labels, jnp.asarray([True, False, True]))
  assert (float(got["top1"]), float(got["top5"])) == (1.0, 2.0)


def test_evaluation_counts_ties_against_the_label():
  cases = _tie_cases()
  source = ScoreSource([c[0] for c in cases], [c[1] for c in cases])
  result = _evaluate(source)
  n = len(cases)
  assert result["count"] == n
  assert result["top1"] == pytest.approx(sum(c[2] for c in cases) / n)
  assert result["top5"] == pytest.approx(sum(c[3] for c in cases) / n)


def test_dense_scores_of_a_real_model_on_training_and_larger_inputs():
  # What dense evaluation will average: the class-score map of the FC-as-convolution head.
  # tests/test_models.py checks one window of the map against the plain head; here the
  # whole model path, on the training size (one position = the plain logits) and larger.
  cfg = base.get_config().model
  cfg.name, cfg.image_size = "vgg_tiny", 8
  model = make_model(cfg)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)), jnp.uint8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)

  @jax.jit
  def scores(params, images):
    apply = lambda x, dense: model.apply({"params": params}, x, dense=dense)
    return apply(images, False), apply(images, True), apply(jnp.tile(images, (1, 2, 2, 1)), True)

  plain, as_map, score_map = scores(nn.unbox(params), images)
  assert plain.shape == (2, 10) and as_map.shape == (2, 1, 1, 10)
  np.testing.assert_allclose(as_map[:, 0, 0], plain, rtol=1e-5, atol=1e-5)
  assert score_map.shape[0] == 2 and score_map.shape[-1] == 10
  assert score_map.shape[1] == score_map.shape[2] > 1
  probs = jax.nn.softmax(score_map, axis=-1).mean(axis=(1, 2))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(probs)))
