"""Whether a parallel setup can run, checked once before anything is compiled.

`validate_parallel_config(config, num_devices)` raises `ConfigError` with one
line naming the field and its value, or returns a `ParallelPlan`: what it
found (the mesh's axis sizes, and the strategies that can run this config on
these devices). `strategies.make_strategy(..., plan=plan)` builds from that
plan without checking again; `parallel.strategy='auto'` chooses among
`plan.runnable`.
"""

from __future__ import annotations

import dataclasses
import math

from deep_image.config_error import ConfigError
from deep_image.models.vgg import MODELS
from deep_image.parallel import buckets, collectives, layout_policy
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.layout_policy import CONV_MODES, STRATEGIES

# parallel.strategy='auto': make_strategy builds the one of STRATEGIES that
# `strategies.choose_strategy` predicts fastest for the model, batch and mesh.
AUTO = "auto"
STRATEGY_CHOICES = (*STRATEGIES, AUTO)
OVERLAPS = ("none", "deferred")


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
  """A parallel setup that passed `validate_parallel_config`.

  Attributes:
    strategy: `parallel.strategy` as configured (maybe 'auto').
    num_devices: the devices it was checked against (the mesh's size).
    axis_sizes: the mesh's axis name -> size, the -1 resolved.
    runnable: the strategies that can run it: (strategy,) for a named one;
      for 'auto', every one of STRATEGIES that passes in full.
  """

  strategy: str
  num_devices: int
  axis_sizes: dict[str, int]
  runnable: tuple[str, ...]


def validate_parallel_config(
  config, num_devices: int, devices_per_host: int | None = None
) -> ParallelPlan:
  """Raise ConfigError naming the config field for a setup that cannot run.

  Runs before anything is compiled: device counts below 1, unknown strategy /
  algorithm / conv mode, a mesh larger than the devices, a batch that is not
  positive or does not divide over them, FC widths that do not split over them.
  For 'auto' the checks every strategy shares, once; then the runnable
  strategies are those whose own checks pass. devices_per_host: as
  `mesh.make_mesh` will split the mesh by host (`mesh.host_devices`), None: as configured.
  """
  par = config.parallel
  mesh_lib.check_device_counts(par.num_devices, par.num_processes)
  if par.strategy not in STRATEGY_CHOICES:
    raise ConfigError(
      f"parallel.strategy={par.strategy!r} is not a known strategy; choose from {STRATEGY_CHOICES}"
    )
  collectives.check_algorithm(par.collective)
  if par.node_collective:
    collectives.check_algorithm(par.node_collective, "parallel.node_collective")
  if par.grad_dtype not in buckets.GRAD_DTYPES:
    raise ConfigError(
      f"parallel.grad_dtype={par.grad_dtype!r} must be one of {tuple(buckets.GRAD_DTYPES)}"
    )
  if not par.prefetch_mb >= 0:
    raise ConfigError(
      f"parallel.prefetch_mb={par.prefetch_mb!r} must be >= 0 (0: one bucket ahead)"
    )
  if par.strategy in ("hybrid", AUTO) and par.conv not in CONV_MODES:
    raise ConfigError(f"parallel.conv={par.conv!r} must be one of {CONV_MODES}")
  if par.overlap not in OVERLAPS:
    raise ConfigError(f"parallel.overlap={par.overlap!r} must be one of {OVERLAPS}")
  if not (isinstance(par.fc_micro_batches, int) and par.fc_micro_batches >= 0):
    raise ConfigError(
      f"parallel.fc_micro_batches={par.fc_micro_batches!r} must be an int >= 0 (0: auto)"
    )
  if not par.bucket_mb >= 0:
    raise ConfigError(f"parallel.bucket_mb={par.bucket_mb!r} must be >= 0 (0: a bucket per layer)")
  names, sizes = mesh_lib.resolve_mesh_shape(par.mesh, num_devices, devices_per_host)
  axis_sizes = dict(zip(names, sizes, strict=True))
  n = math.prod(sizes)
  batch = config.train.batch_size
  if batch < 1:
    raise ConfigError(f"train.batch_size={batch} must be >= 1")
  if batch % n:
    raise ConfigError(
      f"train.batch_size={batch} does not divide over the {n} devices of parallel.mesh={axis_sizes}"
    )
  if par.strategy != AUTO:
    problem = _strategy_problem(config, par.strategy, axis_sizes)
    if problem:
      raise ConfigError(problem)
    return ParallelPlan(par.strategy, num_devices, axis_sizes, (par.strategy,))
  runnable = tuple(s for s in STRATEGIES if not _strategy_problem(config, s, axis_sizes))
  if not runnable:
    raise ConfigError(
      f"parallel.strategy='auto': no strategy can run this config on {num_devices} devices"
    )
  return ParallelPlan(AUTO, num_devices, axis_sizes, runnable)


def _strategy_problem(config, strategy: str, axis_sizes: dict[str, int]) -> str | None:
  """Why `strategy` cannot run on this mesh (the one-line error), or None."""
  par = config.parallel
  if strategy != "gspmd" and sum(s > 1 for s in axis_sizes.values()) > 2:
    return (
      f"parallel.strategy={strategy!r} runs over one axis or two (node x local), but "
      f"parallel.mesh={tuple(par.mesh)} has more than two axes larger than 1"
    )
  split_over = fc_split_devices(par, strategy, axis_sizes)
  h1 = MODELS[config.model.name]["fc"][0] if config.model.name in MODELS else None
  if h1 is not None and split_over > 1 and h1 % split_over:
    return (
      f"parallel.strategy={strategy!r} splits FC1's {h1} outputs over {split_over} "
      f"devices; model.name={config.model.name!r} needs a device count that divides {h1} "
      f"(or, for gspmd, parallel.shard_fc=False)"
    )
  return None


def fc_split_devices(par, strategy: str, axis_sizes: dict[str, int]) -> int:
  """Over how many devices `strategy` splits the FC1/FC2 weights (1: not split)."""
  if strategy == "hybrid":
    return layout_policy.tensor_devices(tuple(axis_sizes.values()))
  if strategy != "gspmd" or not par.shard_fc:
    return 1
  model_axes = par.model_axes or tuple(axis_sizes)
  model_axes = (model_axes,) if isinstance(model_axes, str) else model_axes
  return math.prod(axis_sizes[a] for a in model_axes)
