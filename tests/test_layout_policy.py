"""The layout policy (deep_image/parallel/layout_policy.py) against the model it lays out."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from deep_image.models.vgg import MODEL_AXIS, MODELS, VGG, make_spec
from deep_image.parallel import layout_policy, layouts


def _boxed_params(name):
  spec = make_spec(name, num_classes=10, image_size=32)
  sample = jnp.zeros((1, 32, 32, 3))
  return jax.eval_shape(lambda: VGG(spec).init(jax.random.key(0), sample)["params"])


@pytest.mark.parametrize("model", ["vgg_tiny", "scaling_8conv_3fc"])
@pytest.mark.parametrize("strategy", ["hybrid", "gspmd"])
@pytest.mark.parametrize("conv", layout_policy.CONV_MODES)
def test_the_split_parameters_are_the_ones_the_model_marks_with_its_model_axis(
  model, strategy, conv
):
  boxed = _boxed_params(model)
  specs = nn.get_partition_spec(boxed)
  marked, split = {}, {}
  for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: x is None):
    names = layout_policy.path_names(path)
    if spec is not None and MODEL_AXIS in tuple(spec):
      marked[names] = tuple(spec).index(MODEL_AXIS)
    layout = layout_policy.layout_of(strategy, conv, names)
    if layout.kind == "split":
      split[names] = layout.dim
  assert marked, "the model marks no parameter with its model axis"
  assert split == marked  # the same parameters, split along the marked dimension


def test_every_parameter_of_every_model_has_a_layout_under_every_rule():
  shapes = nn.unbox(_boxed_params("vgg_tiny"))
  for (strategy, conv), _ in layout_policy.RULES.items():
    tree = layout_policy.param_layouts(strategy, conv, shapes)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, layouts.Layout))
    assert all(isinstance(lo, layouts.Layout) for lo in leaves), (strategy, conv)
    kinds = {lo.kind for lo in leaves}
    assert kinds <= {"replicated", "lazy", "split"}
  assert set(layout_policy.RULES) == {
    (s, c) for s in layout_policy.STRATEGIES for c in layout_policy.CONV_MODES
  }
  assert "vgg_tiny" in MODELS


def test_lazy_shards_kernels_not_biases_and_hybrid_lazy_only_conv_kernels():
  assert layout_policy.layout_of("lazy", "data", ("fc1", "kernel")) == layouts.LAZY
  assert layout_policy.layout_of("lazy", "data", ("fc1", "bias")) == layouts.REPLICATED
  assert layout_policy.layout_of("hybrid", "lazy", ("convs_3", "kernel")) == layouts.LAZY
  assert layout_policy.layout_of("hybrid", "lazy", ("fc3", "kernel")) == layouts.REPLICATED
  assert layout_policy.layout_of("hybrid", "data", ("convs_3", "kernel")) == layouts.REPLICATED


def test_fc_micro_batches_auto_and_a_batch_the_parts_do_not_divide():
  assert layout_policy.fc_micro_batches(0, True, 8) == 2
  assert layout_policy.fc_micro_batches(0, False, 8) == 1
  assert layout_policy.fc_micro_batches(4, False, 8) == 4
  assert layout_policy.fc_micro_batches(2, True, 3) == 1  # runs whole
