"""The VGG family: sizes, FC-as-convolution, partition metadata, summary."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deep_image.models import summary
from deep_image.models.vgg import MODEL_AXIS, VGG, count_parameters, make_spec


def _abstract_params(name, image_size=224, classes=1000):
  model = VGG(make_spec(name, num_classes=classes, image_size=image_size))
  x = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])


def test_table2_model_has_the_papers_212_7m_weights():
  params = _abstract_params("deep_image_16")
  assert count_parameters(params) == 212_761_384
  weights = sum(
    int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)) if len(x.shape) > 1
  )
  assert round(weights / 1e6, 1) == 212.7
  assert nn.unbox(params)["fc1"]["kernel"].shape == (7 * 7 * 512, 6144)


@pytest.mark.parametrize("name, weights", [("vgg16", 138_357_544), ("vgg11", 132_863_336)])
def test_simonyan_zisserman_configurations_have_their_published_weight_counts(name, weights):
  # Simonyan & Zisserman (2014) Table 2 gives 133M (A) and 138M (D); D's exact
  # count, 138,357,544, is the one every VGG-16 implementation reports.
  assert count_parameters(_abstract_params(name)) == weights
  assert summary.total_parameters(make_spec(name, num_classes=1000, image_size=224)) == weights


def test_summary_table_agrees_with_flax_for_every_model():
  from deep_image.models.vgg import MODELS

  for name in MODELS:
    spec = make_spec(name, num_classes=1000, image_size=224)
    assert summary.total_parameters(spec) == count_parameters(_abstract_params(name)), name


def test_partition_metadata_on_every_parameter():
  params = _abstract_params("vgg_small", image_size=32, classes=10)
  boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(p, nn.LogicallyPartitioned) for p in boxed)
  names = {
    jax.tree_util.keystr(path): leaf.names
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
  }
  assert names["['fc1']['kernel']"] == (None, MODEL_AXIS)
  assert names["['fc2']['kernel']"] == (MODEL_AXIS, None)
  assert names["['fc3']['kernel']"] == (None, None)
  assert names["['convs_0']['kernel']"] == (None, None, None, None)


def _small_model_and_params(dtype=jnp.float32):
  model = VGG(make_spec("vgg_small", num_classes=10, image_size=32), dtype=dtype)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return model, params


def test_fc_as_convolution_equals_fc_network_on_training_size():
  model, params = _small_model_and_params()
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  dense = model.apply({"params": params}, x)
  # Run the head on the unflattened map through the convolution path.
  feats = model.apply({"params": params}, x, method=VGG.features)
  as_conv = model.apply({"params": params}, feats, method=lambda m, f: m.head(f, dense=True))
  assert as_conv.shape == (3, 1, 1, 10)
  np.testing.assert_allclose(as_conv[:, 0, 0], dense, rtol=1e-4, atol=1e-4)


def test_fc_as_convolution_gives_a_score_map_on_larger_inputs():
  model, params = _small_model_and_params()
  x = jax.random.normal(jax.random.key(2), (2, 48, 64, 3))
  scores = model.apply({"params": params}, x, dense=True)
  # 48x64 input -> 6x8 feature map; a 4x4 FC1 window -> 3x5 positions.
  assert scores.shape == (2, 3, 5, 10)
  # Each position is the FC network on the corresponding 4x4 window of the
  # feature map (a 32x32 input window, up to the conv layers' zero padding).
  feats = model.apply({"params": params}, x, method=VGG.features)
  window = model.apply({"params": params}, feats[:, 1:5, 2:6], method=VGG.head)
  np.testing.assert_allclose(scores[:, 1, 2], window, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params = _small_model_and_params(jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(params)))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits = model.apply({"params": params}, x)
  ref_model, _ = _small_model_and_params()
  ref = ref_model.apply({"params": params}, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.1)


def test_wrong_input_size_without_dense_is_a_clear_error():
  model, params = _small_model_and_params()
  with pytest.raises(ValueError, match="FC1 expects a 4x4 feature map .* dense=True"):
    model.apply({"params": params}, jnp.zeros((1, 40, 40, 3)))


def test_dropout_only_in_training():
  model = VGG(make_spec("vgg_small", num_classes=10, image_size=32), dropout_rate=0.5)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  a = model.apply({"params": params}, x)
  b = model.apply({"params": params}, x)
  np.testing.assert_array_equal(a, b)
  c = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, c)


@pytest.mark.parametrize(
  "name,size,message",
  [("vgg_99", 32, "model.name='vgg_99' is not a known model"), ("vgg_small", 20, "multiple of 8")],
)
def test_bad_model_configs(name, size, message):
  with pytest.raises(ValueError, match=message):
    make_spec(name, num_classes=10, image_size=size)


def test_summary_cli_ends_with_exact_parameter_count():
  out = subprocess.run(
    [sys.executable, "-m", "experiments.summary", "--config=experiments/configs/table2.py"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  lines = out.strip().splitlines()
  assert lines[-1] == "parameters: 212761384"
  assert any(line.startswith("fc1 ") and "154,146,816" in line for line in lines)
