"""The VGG family of Deep Image (paper Table 2 and section 5), in Flax linen.

One configurable module, `VGG`, covers every model the project trains:

* stacks of 3x3 convolutions (stride 1, SAME padding, ReLU), a 2x2 max pool
  after each stage;
* a fully-connected head FC1, FC2 (ReLU, optional dropout) and the classifier
  FC3, followed by softmax in the loss.

In DESIGN terms: conv layers are data parallel (their kernels carry the
logical axis names `(None, None, None, None)`, i.e. replicated), FC1's kernel is
split over its output columns and FC2's over its input rows on the logical
axis ``'model'`` (`deep_image.parallel.mesh.logical_rules` maps it to mesh
axes). FC3, the 1000-way classifier (3% of the Table 2 weights), stays
replicated: splitting it would need the class count to divide by the device
count and an extra exchange of logits.

The FC layers can run as convolutions (`FullyConnected` on a 4-D input): FC1
becomes a k x k VALID convolution over the last feature map (k x k the map
size at the training crop), FC2 and FC3 become 1x1 convolutions. On a
training-size input this is exactly the FC network; on a larger input it gives
a class-score map [B, H', W', classes] for dense evaluation (paper section 5,
after Sermanet et al.).

Parameters are float32; `dtype` sets the compute dtype (e.g. bfloat16).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Logical axis name of the tensor-sharded FC dimension (see module docstring).
MODEL_AXIS = "model"
# Parameter-tree names of the FC layers, forward order (FC3 is the classifier).
FC_LAYERS = ("fc1", "fc2", "fc3")


@dataclasses.dataclass(frozen=True)
class VGGSpec:
  """Architecture of one VGG variant.

  Attributes:
    stages: filters of each conv layer, grouped by stage; a 2x2 max pool
      follows every stage.
    fc: widths of the hidden FC layers (exactly two: FC1, FC2).
    num_classes: width of the classifier FC3.
    image_size: side of the square training crop; fixes FC1's input size.
    in_channels: image channels (3 for RGB).
  """

  stages: tuple[tuple[int, ...], ...]
  fc: tuple[int, int]
  num_classes: int
  image_size: int
  in_channels: int = 3

  @property
  def feature_map_size(self) -> int:
    """Side of the last conv feature map at the training crop."""
    size = self.image_size
    for _ in self.stages:
      size //= 2
    return size

  @property
  def feature_dim(self) -> int:
    """FC1 input width: k * k * C_last at the training crop."""
    return self.feature_map_size**2 * self.stages[-1][-1]


# Dropout layer ids: the layer's part of each mask key (see `dropout_keep_mask`).
FC1_DROPOUT, FC2_DROPOUT = 0, 1


def dropout_keep_mask(
  key: jax.Array, layer: int, example_ids: jax.Array, shape: tuple[int, ...], rate: float
) -> jax.Array:
  """Which units dropout keeps, one example at a time: bool [len(example_ids), *shape].

  Example i's mask is bernoulli(fold_in(fold_in(key, layer), example_ids[i]),
  1 - rate, shape): a function of the key (config seed and step), the layer and
  the *global* example index only, never of the device that holds the example.
  So N devices drop exactly the units one device drops for the same global
  batch, and a run resumed on another topology draws the same masks. A
  tensor-parallel layer slices its columns out of the example's full-width mask.

  Args:
    key: the step's dropout key (fold_in(dropout base key, step)).
    layer: `FC1_DROPOUT` or `FC2_DROPOUT`.
    example_ids: int [b], global indices in the batch of the local rows.
    shape: one example's unit shape, e.g. (H1,).
  """
  layer_key = jax.random.fold_in(key, layer)
  return jax.vmap(
    lambda i: jax.random.bernoulli(jax.random.fold_in(layer_key, i), 1.0 - rate, shape)
  )(example_ids)


def apply_dropout(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout: kept units scaled by 1 / (1 - rate), the rest 0 (dtype of x)."""
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def normalize_images(x: jax.Array) -> jax.Array:
  """uint8 [..., C] pixels -> float32 (x - 127.5) / 64; float inputs pass through."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return (x.astype(jnp.float32) - 127.5) / 64.0
  return x


class FullyConnected(nn.Module):
  """A dense layer that can also run as a convolution.

  The kernel is stored as [window*window*in_features, features], exactly the
  kernel of a dense layer on the flattened [window, window, in_features] input
  (row-major H, W, C order, as `jnp.reshape` flattens NHWC).

  Inputs:
    x: [B, D] with D = window^2 * in_features: a dense layer, returns [B, F];
       or [B, H, W, in_features] with H, W >= window: a VALID window x window
       convolution (stride 1), returns [B, H-window+1, W-window+1, F].
  """

  features: int
  in_features: int
  window: int = 1
  kernel_axes: tuple[str | None, str | None] = (None, None)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = self.window * self.window * self.in_features
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.he_normal(), self.kernel_axes),
      (fan_in, self.features),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.kernel_axes[1],)),
      (self.features,),
      jnp.float32,
    )
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if x.ndim == 2:
      y = x @ kernel
    else:
      window = kernel.reshape(self.window, self.window, self.in_features, self.features)
      y = lax.conv_general_dilated(
        x, window, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    return y + bias.astype(self.dtype)


class VGG(nn.Module):
  """VGG classifier. Input [B, H, W, C] images; output logits.

  `__call__(x)` on the training crop (H = W = spec.image_size) returns
  [B, num_classes] float32 logits. With `dense=True` it runs the FC head as
  convolutions and accepts any H, W >= image_size, returning a score map
  [B, H', W', num_classes], H' = (H - image_size) / 2^S + 1 (S pools).
  """

  spec: VGGSpec
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    convs = []
    in_ch = self.spec.in_channels
    for stage in self.spec.stages:
      for width in stage:
        convs.append(
          nn.Conv(
            width,
            (3, 3),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
              nn.initializers.he_normal(), (None, None, None, None)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
          )
        )
        in_ch = width
    self.convs = convs
    h1, h2 = self.spec.fc
    k = self.spec.feature_map_size
    self.fc1 = FullyConnected(h1, in_ch, k, (None, MODEL_AXIS), self.dtype)
    self.fc2 = FullyConnected(h2, h1, 1, (MODEL_AXIS, None), self.dtype)
    self.fc3 = FullyConnected(self.spec.num_classes, h2, 1, (None, None), self.dtype)

  def features(self, x: jax.Array) -> jax.Array:
    """Conv stages. [B, H, W, C] -> [B, H / 2^S, W / 2^S, C_last] (compute dtype).

    uint8 images are normalised here, on device, so hosts ship 1 byte per
    pixel: (x - 127.5) / 64 (64 is about the pixel standard deviation of
    natural images).
    """
    x = normalize_images(x).astype(self.dtype)
    i = 0
    for stage in self.spec.stages:
      for _ in stage:
        x = nn.relu(self.convs[i](x))
        i += 1
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x

  def head(
    self,
    feats: jax.Array,
    *,
    train: bool = False,
    dense: bool = False,
    dropout_key: jax.Array | None = None,
    example_ids: jax.Array | None = None,
  ) -> jax.Array:
    """FC1-FC3 on conv features.

    Args:
      feats: [B, h, w, C_last] from `features`.
      train: apply dropout (when `dropout_rate` > 0) after FC1 and FC2.
      dense: False: h = w = k (the training crop's map), FC layers as matrix
        products, returns [B, classes]. True: FC1 as a k x k VALID
        convolution, FC2/FC3 as 1x1, returns a score map
        [B, h - k + 1, w - k + 1, classes] (any h, w >= k).
      dropout_key: the step's dropout key (None: the 'dropout' rng stream).
      example_ids: int [B], the global batch index of each row (None:
        0..B-1). Masks depend on these, not on the device (`dropout_keep_mask`).
    Returns:
      float32 logits.
    """
    k = self.spec.feature_map_size
    if not dense:
      if feats.shape[1:3] != (k, k):
        raise ValueError(
          f"FC1 expects a {k}x{k} feature map (a {self.spec.image_size}px input), got "
          f"{feats.shape[1]}x{feats.shape[2]}; pass dense=True for a class-score map"
        )
      feats = feats.reshape(feats.shape[0], -1)
    rate = self.dropout_rate
    if train and rate > 0.0:
      if dropout_key is None:
        dropout_key = self.make_rng("dropout")
      if example_ids is None:
        example_ids = jnp.arange(feats.shape[0])

    def dropout(x, layer):
      if not train or rate == 0.0:
        return x
      return apply_dropout(
        x, dropout_keep_mask(dropout_key, layer, example_ids, x.shape[1:], rate), rate
      )

    x = dropout(nn.relu(self.fc1(feats)), FC1_DROPOUT)
    x = dropout(nn.relu(self.fc2(x)), FC2_DROPOUT)
    return self.fc3(x).astype(jnp.float32)

  def __call__(
    self,
    x: jax.Array,
    *,
    train: bool = False,
    dense: bool = False,
    dropout_key: jax.Array | None = None,
    example_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Logits of `head(features(x))`; the keyword arguments are `head`'s."""
    return self.head(
      self.features(x),
      train=train,
      dense=dense,
      dropout_key=dropout_key,
      example_ids=example_ids,
    )


# Named variants. Widths of the CPU variants are small enough that the default
# job trains to >= 97% on digits in minutes on 2 cores.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

MODELS: dict[str, dict] = {
  # Paper Table 2: 13 conv + 3 FC; 212.7M weights at 224 x 224.
  "deep_image_16": dict(stages=_VGG16_STAGES, fc=(6144, 6144)),
  # Section 3.3: "8 convolutional layers and 3 fully-connected layers followed
  # by a 1000-way softmax". The paper gives no widths; we take VGG's
  # configuration A (Simonyan & Zisserman 2014, 8 conv: 64 | 128 | 256x2 |
  # 512x2 | 512x2) with the paper's FC width 6144.
  "scaling_8conv_3fc": dict(
    stages=((64,), (128,), (256, 256), (512, 512), (512, 512)), fc=(6144, 6144)
  ),
  # Section 5: "varied the number of filters ... up to 1024 and the neurons at
  # fully-connected layers up to 8192".
  "deep_image_16_wide": dict(
    stages=((128, 128), (256, 256), (512, 512, 512), (1024, 1024, 1024), (1024, 1024, 1024)),
    fc=(8192, 8192),
  ),
  "deep_image_16_fc8192": dict(stages=_VGG16_STAGES, fc=(8192, 8192)),
  # Simonyan & Zisserman (2014), "Very Deep Convolutional Networks", Table 1
  # configurations A (VGG-11) and D (VGG-16) with their FC 4096-4096: not Deep
  # Image models, here so that published scaling studies of VGG can be replayed
  # (`experiments.plan --config.model.name=vgg16`). 132,863,336 / 138,357,544
  # weights at 224 px, 1000 classes.
  "vgg11": dict(stages=((64,), (128,), (256, 256), (512, 512), (512, 512)), fc=(4096, 4096)),
  "vgg16": dict(stages=_VGG16_STAGES, fc=(4096, 4096)),
  # CPU variants (not in the paper): same shape of network, tiny widths.
  "vgg_small": dict(stages=((16, 16), (32, 32), (64, 64)), fc=(256, 256)),
  "vgg_tiny": dict(stages=((4,), (8,)), fc=(24, 24)),
}


def make_spec(name: str, *, num_classes: int, image_size: int, in_channels: int = 3) -> VGGSpec:
  """The `VGGSpec` of a named variant; raises ValueError for an unknown name."""
  if name not in MODELS:
    raise ValueError(f"model.name={name!r} is not a known model; choose from {sorted(MODELS)}")
  arch = MODELS[name]
  downsample = 2 ** len(arch["stages"])
  if image_size % downsample or image_size < downsample:
    raise ValueError(
      f"model.image_size={image_size} must be a positive multiple of {downsample} for "
      f"{name!r} ({len(arch['stages'])} max pools)"
    )
  return VGGSpec(
    stages=tuple(tuple(s) for s in arch["stages"]),
    fc=tuple(arch["fc"]),
    num_classes=num_classes,
    image_size=image_size,
    in_channels=in_channels,
  )


def make_model(model_cfg) -> VGG:
  """A `VGG` from `config.model` (fields name, num_classes, image_size, dropout, dtype)."""
  spec = make_spec(
    model_cfg.name,
    num_classes=model_cfg.num_classes,
    image_size=model_cfg.image_size,
    in_channels=model_cfg.in_channels,
  )
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if model_cfg.dtype not in dtypes:
    raise ValueError(f"model.dtype={model_cfg.dtype!r} must be one of {sorted(dtypes)}")
  return VGG(spec, dropout_rate=model_cfg.dropout, dtype=dtypes[model_cfg.dtype])


def count_parameters(params) -> int:
  """Exact number of scalars in a parameter tree (boxed or not)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))


def conv_layer_names(spec: VGGSpec) -> Sequence[str]:
  """Parameter-tree names of the conv layers, in forward order."""
  n = sum(len(s) for s in spec.stages)
  return [f"convs_{i}" for i in range(n)]


def layer_names(spec: VGGSpec) -> list[str]:
  """Parameter-tree names of every layer with parameters, in forward order."""
  return [*conv_layer_names(spec), *FC_LAYERS]
