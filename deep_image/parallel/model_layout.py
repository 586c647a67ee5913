"""The model as the cost model sees it: its parameter layers, and what one device holds.

`model_layers` lists a `vgg.MODELS` model's layers with parameters (forward order,
per-image FLOPs and sizes, from `summary.layer_rows`); the rest says, for a strategy on
a mesh (axis sizes, outer first; an int: one axis), what one device stores, updates
and synchronizes, from the layouts of `layout_policy.RULES`:

=====================  ===========================================================
function               per device
=====================  ===========================================================
`plan_buckets`         the strategy's buckets (`layout_policy.plan_buckets`, as the
                       strategies plan them)
`tensor_devices`       over how many devices FC1 / FC2 are split: the innermost axis
                       (`layout_policy.mesh_levels` / `tensor_devices`: the mesh's
                       levels, as the strategies read them)
`updated_parameters`   parameters it updates: replicated whole, lazy 1/N, split 1/L
=====================  ===========================================================

`cost_model` (time) and `memory_model` (bytes) both read them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from deep_image.models.summary import layer_rows
from deep_image.models.vgg import make_spec
from deep_image.parallel import layout_policy
from deep_image.parallel.layout_policy import mesh_levels


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer with parameters: its name in the parameter tree and per-image costs."""

  name: str  # convs_i | fc1 | fc2 | fc3
  flops: int  # forward, per image
  kernel: int  # elements
  bias: int
  width: int  # output features per image (FC: the activation width)
  fan_in: int  # input features per image (FC1: k k C, the gathered features)


@functools.cache
def model_layers(
  model_name: str,
  image_size: int = 224,  # the paper's ImageNet setting (cost_model.PAPER_SETUP)
  num_classes: int = 1000,
  in_channels: int = 3,
) -> tuple[Layer, ...]:
  """The parameter layers of a `vgg.MODELS` model, forward order (from `summary.layer_rows`)."""
  spec = make_spec(
    model_name, num_classes=num_classes, image_size=image_size, in_channels=in_channels
  )
  out, conv, fan_in = [], 0, None
  for row in layer_rows(spec):
    if not row.parameters:
      continue
    width = row.output_shape[-1]
    if row.name.startswith("conv"):
      name, conv = f"convs_{conv}", conv + 1
    else:
      name = row.name
      fan_in = spec.feature_dim if name == "fc1" else out[-1].width
    out.append(Layer(name, row.flops, row.parameters - width, width, width, fan_in or 0))
  return tuple(out)


def param_leaves(layers) -> list[tuple[tuple[str, str], int]]:
  """((layer, 'kernel' | 'bias'), elements) of every parameter, as the model's tree names it."""
  return [
    ((x.name, leaf), size)
    for x in layers
    for leaf, size in (("kernel", x.kernel), ("bias", x.bias))
  ]


def plan_buckets(layers, strategy: str, conv: str, mesh, bucket_mb: float, bpv: int):
  """The strategy's buckets (`layout_policy.plan_buckets`, as the strategies plan them).

  mesh: the axis sizes, outer first (an int: one axis of that many devices).
  """
  leaves = param_leaves(layers)
  return layout_policy.plan_buckets(
    strategy,
    conv,
    [x.name for x in layers],
    [names for names, _ in leaves],
    [size for _, size in leaves],
    mesh_levels(mesh),
    bucket_mb,
    bpv,
  )


def tensor_devices(strategy: str, conv: str, mesh) -> int:
  """Over how many devices the strategy splits FC1 / FC2 (`layout_policy.tensor_devices`:
  the innermost axis); 1 for a strategy that splits nothing."""
  return layout_policy.tensor_devices(mesh) if layout_policy.fc_split(strategy, conv) else 1


def updated_parameters(layers, strategy: str, conv: str, mesh) -> float:
  """Parameters one device updates per step: its 1/N of the lazy ones, 1/L of the split
  ones (L: the innermost axis, all N on one axis), all of the replicated ones (data
  parallelism repeats the whole update on every device).

  The layouts are `layout_policy.RULES`; gspmd's entry is where XLA places the
  weights (it keeps replicated weights replicated, their update too).
  """
  levels = mesh_levels(mesh)
  n, split_over = math.prod(levels), layout_policy.tensor_devices(levels)
  total = 0.0
  for names, size in param_leaves(layers):
    kind = layout_policy.layout_of(strategy, conv, names).kind
    total += size / {"replicated": 1, "lazy": n, "split": split_over}[kind]
  return total
