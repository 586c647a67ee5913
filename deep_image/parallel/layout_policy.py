"""Which layout each parameter gets, per strategy and conv mode: the one table.

The strategies (`shard_map_strategy`), the bucket planner (`buckets.plan`, through
`plan_buckets` here) and the cost model (`cost_model`) all read `RULES`, so the
cost model predicts the program the strategies build.

A parameter is named by its path in the model's parameter tree, joined by '/':
'convs_3/kernel', 'fc1/bias'. Each (strategy, parallel.conv) has a list of
(pattern, layout) rules, `fnmatch` patterns over that name; the first match wins
(as maxtext's logical-axis rules):

======== ============ =========================================================
strategy parallel.conv layouts
======== ============ =========================================================
data     (any)        everything replicated
lazy     (any)        kernels lazy (1/N per device); biases replicated
hybrid   data         FC1 split on its output columns, FC2's kernel on its input
                      rows (over the innermost mesh axis: all devices, or the
                      devices of a node); the rest replicated
hybrid   lazy         as hybrid / data, but conv kernels lazy
gspmd    (any)        as hybrid / data: where XLA puts them under the model's
                      logical axes (`vgg.MODEL_AXIS`, parallel.shard_fc=True);
                      the gspmd strategy stores full arrays and lets jit's
                      shardings place them, the cost model reads this entry
======== ============ =========================================================

Biases stay replicated under lazy: they are 0.01% of the weights, sharding them
saves nothing, and in buckets of their own (`buckets.plan` buckets each kind
apart) a large kernel's bucket buffer is the kernel alone (FC1's 616 MB):
concatenating a bias into it would cost two copies of the kernel per step.
FC2's bias is added once after the partial sums are reduced (`fc_block`), whole
on every device. FC3, the classifier, is never split (`deep_image.models.vgg`).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import jax

from deep_image.parallel import buckets
from deep_image.parallel.layouts import LAZY, REPLICATED, Layout, split

# The strategies, as `config.parallel.strategy` names them ('auto' picks one of them).
STRATEGIES = ("gspmd", "data", "lazy", "hybrid")
# `config.parallel.conv`: how the hybrid strategy lays out its conv layers.
CONV_MODES = ("data", "lazy")

Rules = tuple[tuple[str, Layout], ...]

_REST_REPLICATED: Rules = (("*", REPLICATED),)
_FC_SPLIT: Rules = (
  ("fc1/kernel", split(1)),  # output columns
  ("fc1/bias", split(0)),
  ("fc2/kernel", split(0)),  # input rows: each device's partial sums, reduced after
)

RULES: dict[tuple[str, str], Rules] = {
  **{("data", conv): _REST_REPLICATED for conv in CONV_MODES},
  **{("lazy", conv): (("*/kernel", LAZY), *_REST_REPLICATED) for conv in CONV_MODES},
  ("hybrid", "data"): (*_FC_SPLIT, *_REST_REPLICATED),
  ("hybrid", "lazy"): (*_FC_SPLIT, ("convs_*/kernel", LAZY), *_REST_REPLICATED),
  **{("gspmd", conv): (*_FC_SPLIT, *_REST_REPLICATED) for conv in CONV_MODES},
}


def path_names(path) -> tuple[str, ...]:
  """A `jax.tree_util` key path -> its names, e.g. ('fc1', 'kernel')."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def layout_of(strategy: str, conv: str, names: Sequence[str]) -> Layout:
  """The layout of the parameter at `names` (e.g. ('fc1', 'kernel')) under `RULES`."""
  name = "/".join(names)
  for pattern, layout in RULES[(strategy, conv)]:
    if fnmatch.fnmatchcase(name, pattern):
      return layout
  raise KeyError(f"no layout rule of {(strategy, conv)} matches parameter {name!r}")


def param_layouts(strategy: str, conv: str, param_shapes):
  """The parameter tree with a `layouts.Layout` at each leaf."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: layout_of(strategy, conv, path_names(path)), param_shapes
  )


def plan_buckets(
  strategy: str,
  conv: str,
  layer_order: Sequence[str],
  leaf_names: Sequence[Sequence[str]],
  leaf_sizes: Sequence[int],
  mesh: int | Sequence[int],
  bucket_mb: float,
  bytes_per_element: int = 4,
) -> tuple[buckets.Bucket, ...]:
  """`buckets.plan` over the layouts `RULES` gives: what the strategy synchronizes.

  Args:
    layer_order: layer names, forward order (`vgg.layer_names`).
    leaf_names / leaf_sizes: per leaf (tree-leaves order), its path names and elements.
    mesh: the mesh's axis sizes larger than 1, outer first (an int: one axis);
      split leaves are split over the innermost (`tensor_devices`).
    bucket_mb: `parallel.bucket_mb`.
  """
  sizes = mesh_levels(mesh)
  leaf_layouts = [layout_of(strategy, conv, names) for names in leaf_names]
  return buckets.plan(
    list(layer_order),
    [names[0] for names in leaf_names],
    leaf_layouts,
    list(leaf_sizes),
    math.prod(sizes),
    bucket_mb * 2**20,
    bytes_per_element,
    tensor_n=tensor_devices(sizes),
  )


def mesh_levels(mesh: int | Sequence[int]) -> tuple[int, ...]:
  """The levels of a mesh: its axis sizes larger than 1, outer first ((1,): one device)."""
  sizes = (mesh,) if isinstance(mesh, int) else tuple(int(s) for s in mesh)
  return tuple(s for s in sizes if s > 1) or (1,)


def tensor_devices(mesh: int | Sequence[int]) -> int:
  """Over how many devices split (tensor-parallel) leaves are split: the innermost level.

  One axis: all devices (the paper's model parallelism). node x local: the devices of a
  node, so the FC activations never cross nodes; the nodes are data parallel.
  """
  return mesh_levels(mesh)[-1]


def stored_fraction(layout: Layout, n: int) -> float:
  """The fraction of a parameter one of n devices stores and updates (lazy, split: 1/N)."""
  return 1.0 if layout.kind == "replicated" or n == 1 else 1.0 / n


def fc_micro_batches(configured: int, overlapping_collectives: bool, local_batch: int) -> int:
  """In how many parts the tensor-parallel FC head runs (`fc_block`, parallel.fc_micro_batches).

  0 (auto): 2 where collectives overlap compute (GPUs), so one part's collectives hide
  behind the other's products; 1 elsewhere: on CPU every collective is a synchronous
  rendezvous, so twice the collectives only cost (BENCHMARKS.md, "Gradient pipeline").
  A local batch the parts do not divide (e.g. 3 images per device) runs whole.
  """
  parts = configured or (2 if overlapping_collectives else 1)
  return parts if local_batch % parts == 0 else 1


def fc_split(strategy: str, conv: str) -> bool:
  """Whether the strategy splits FC weights (tensor-parallel head, activation collectives)."""
  return any(layout.kind == "split" for _, layout in RULES[(strategy, conv)])
