"""An estimate of one device's memory in a training step, per strategy and mesh.

What `planner` shows without a compile (with `experiments.plan --compile` the
deviceless GPU compile's argument + temp bytes replace it). Per device, for the
parameters' layouts (`layout_policy.RULES`; lazy 1/N, split 1/L with L the
innermost mesh axis, replicated whole) and b images:

===========  ====================================================================
part         bytes
===========  ====================================================================
stored       4 x the parameters it stores (float32)
momentum     the same again (SGD with momentum: one trace per parameter)
pending      4 x its 1/N chunk of each replicated / lazy leaf and its split shards
             (overlap='deferred' on more than one device: the reduced gradients
             carried to the next step)
weights      4 x the lazy leaves whole: gathered before use and kept for backward
gradients    4 x every leaf it computes a gradient of, whole (split: its shard),
             before the buckets reduce them
activations  ACTIVATION_FACTOR x b x the layers' output elements x the activation
             bytes; + hybrid's gathered FC1 input, L b rows
===========  ====================================================================

A rough bound, not XLA's buffer assignment: it counts every gradient as live at
once and no rematerialisation.
"""

from __future__ import annotations

import dataclasses
import math

from deep_image.models.summary import layer_rows
from deep_image.models.vgg import make_spec
from deep_image.parallel import layout_policy
from deep_image.parallel.cost_model import StepSetup
from deep_image.parallel.model_layout import mesh_levels, model_layers, tensor_devices

# Live activation bytes over the layers' output bytes. From the deviceless H100 compile
# of hybrid, 8-conv, 64 bf16 images per GPU on 64 GPUs (BENCHMARKS.md, "Compiled for H100
# SXM"): 3,552 MiB per GPU, of which ~3.3 GB beyond the parameters and their state, 3.0x
# the 1,095 MiB of layer outputs (pre- and post-ReLU values and their gradients in flight).
ACTIVATION_FACTOR = 3.0
PARAM_BYTES = 4  # float32 parameters, momentum and gradients


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device (module table)."""

  stored: float
  momentum: float
  pending: float
  weights: float
  gradients: float
  activations: float

  @property
  def total(self) -> float:
    return (
      self.stored + self.momentum + self.pending + self.weights + self.gradients + self.activations
    )


def estimate_memory(
  model_name: str,
  strategy: str,
  mesh,
  batch_per_device: int,
  setup: StepSetup,
) -> MemoryEstimate:
  """One device's memory for `strategy` on `mesh` (axis sizes, outer first) with b images."""
  levels = mesh_levels(mesh)
  n, tp = math.prod(levels), tensor_devices(strategy, setup.conv, levels)
  layers = model_layers(model_name, setup.image_size, setup.num_classes, setup.in_channels)
  stored = pending = weights = gradients = 0.0
  for x in layers:
    for leaf, size in (("kernel", x.kernel), ("bias", x.bias)):
      kind = layout_policy.layout_of(strategy, setup.conv, (x.name, leaf)).kind
      if n == 1:
        kind = "replicated"
      part = size / {"replicated": 1, "lazy": n, "split": tp}[kind]
      stored += part
      pending += size / n if kind != "split" else part
      weights += size if kind == "lazy" else 0.0
      gradients += part if kind == "split" else size
  deferred = setup.overlap == "deferred" and n > 1 and strategy != "gspmd"
  abytes = PARAM_BYTES if setup.activation_bytes is None else setup.activation_bytes
  spec = make_spec(
    model_name,
    num_classes=setup.num_classes,
    image_size=setup.image_size,
    in_channels=setup.in_channels,
  )
  outputs = sum(math.prod(row.output_shape) for row in layer_rows(spec))
  activations = ACTIVATION_FACTOR * batch_per_device * outputs * abytes
  if tp > 1:  # FC1's input gathered over the split's devices
    activations += tp * batch_per_device * spec.feature_dim * abytes
  return MemoryEstimate(
    stored=PARAM_BYTES * stored,
    momentum=PARAM_BYTES * stored,
    pending=PARAM_BYTES * pending if deferred else 0.0,
    weights=PARAM_BYTES * weights,
    gradients=PARAM_BYTES * gradients,
    activations=activations,
  )
