"""Per-layer table of a VGG: output shape, parameters and FLOPs per image."""

from __future__ import annotations

import dataclasses

from deep_image.models.vgg import VGGSpec


@dataclasses.dataclass(frozen=True)
class LayerRow:
  name: str
  output_shape: tuple[int, ...]  # per image, e.g. (224, 224, 64)
  parameters: int
  flops: int  # per image, forward pass; a multiply-add counts as 2


def layer_rows(spec: VGGSpec) -> list[LayerRow]:
  """Rows for every conv, pool and FC layer of `spec` at its training crop.

  FLOPs count the multiply-adds of convolutions and matmuls (2 each); ReLU,
  bias and pooling are left out, as in the usual VGG accounting.
  """
  rows, size, ch, i = [], spec.image_size, spec.in_channels, 0
  for s, stage in enumerate(spec.stages):
    for width in stage:
      params = 3 * 3 * ch * width + width
      flops = 2 * size * size * 3 * 3 * ch * width
      rows.append(LayerRow(f"conv{i + 1} (convs_{i})", (size, size, width), params, flops))
      ch, i = width, i + 1
    size //= 2
    rows.append(LayerRow(f"maxpool{s + 1}", (size, size, ch), 0, 0))
  fan_in = size * size * ch
  widths = (*spec.fc, spec.num_classes)
  for j, width in enumerate(widths):
    rows.append(LayerRow(f"fc{j + 1}", (width,), fan_in * width + width, 2 * fan_in * width))
    fan_in = width
  return rows


def format_table(spec: VGGSpec, name: str) -> str:
  """The table as text, ending with the line `parameters: N`."""
  rows = layer_rows(spec)
  lines = [
    f"{name}: {spec.image_size}x{spec.image_size}x{spec.in_channels} input, "
    f"{spec.num_classes} classes",
    f"{'layer':<16} {'output':>16} {'parameters':>14} {'GFLOPs/image':>13}",
  ]
  for r in rows:
    shape = "x".join(map(str, r.output_shape))
    lines.append(f"{r.name:<16} {shape:>16} {r.parameters:>14,} {r.flops / 1e9:>13.3f}")
  total_params = sum(r.parameters for r in rows)
  total_flops = sum(r.flops for r in rows)
  weights = total_params - sum(r.output_shape[-1] for r in rows if r.parameters)
  lines.append(f"{'total':<16} {'':>16} {total_params:>14,} {total_flops / 1e9:>13.3f}")
  lines.append(f"weights without biases: {weights:,} ({weights / 1e6:.1f}M)")
  lines.append(f"parameters: {total_params}")
  return "\n".join(lines)


def total_parameters(spec: VGGSpec) -> int:
  return sum(r.parameters for r in layer_rows(spec))


def total_flops(spec: VGGSpec) -> int:
  return sum(r.flops for r in layer_rows(spec))
