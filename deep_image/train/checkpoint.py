"""Orbax checkpoints of a training run: save asynchronously, resume exactly, restore anywhere.

One checkpoint is the folder `WORKDIR/checkpoints/<step>/`, written by
`orbax.checkpoint.CheckpointManager` into a temporary folder and renamed when
complete (Orbax's atomic finalisation), so a save cut off mid-write (SIGKILL,
a full disk, a lost node) is never seen as a checkpoint:

=========  ==================================================================
item       content
=========  ==================================================================
state      the `TrainState` (step, params, optimizer state, and with
           `parallel.overlap='deferred'` the pending update: the last step's
           reduced gradient chunks) in the strategy's *stored* layout, every
           array saved from its own shards (lazy: 1/N flat shards; hybrid:
           FC1/FC2 split; replicated: one copy)
input      the training input's position, one JSON file per process
           (`process_<i>-of-<n>.json`, Grain's checkpoint handler): a Grain
           iterator's `get_state()` or the device cache's step
meta       JSON: step, strategy, devices, processes, input kind, whether a
           pending update is saved, the stored shape of every state leaf, and
           the whole config
=========  ==================================================================

Which checkpoints stay: the latest `train.keep_checkpoints`, plus the best by
validation top-1 (checkpoints saved at an evaluation carry {'top1', 'top5'}
as Orbax metrics).

Restoring (`restore`):
- same layout (strategy, device count and stored shapes as saved): straight
  into the strategy's shardings, bit for bit; with the input state this makes
  a resumed run log exactly the losses of an uninterrupted one;
- another layout (e.g. `lazy` on 8 devices -> `gspmd` on 4): each leaf is
  read (split over the new devices where its leading dimension divides),
  turned into the model's layout (a lazy leaf is the flattened, zero-padded
  parameter: its first `size` elements), a saved pending update is applied,
  and the result laid out for the new strategy, optimizer state included.
  The input resumes from its saved per-process positions when the process and
  worker counts are as saved; otherwise it is positioned at the saved step of
  its stream (`TrainInput.start_at`), which for Grain is exactly the stream the
  saved run read (it is global: a function of seed and global position).
In both cases the model and optimizer fields of the saved config must equal
the current ones (`RESUME_FIELDS`); `IncompatibleCheckpoint` names the first
that differs.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
from typing import Any

import grain
import jax
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers

from deep_image.config_error import ConfigError
from deep_image.parallel.train_state import PendingUpdate, TrainState

# Fields that fix the shapes and the meaning of the saved state: a checkpoint
# restores only into a config that agrees on all of them.
RESUME_FIELDS = (
  "model.name",
  "model.num_classes",
  "model.image_size",
  "model.in_channels",
  "train.momentum",
  "train.weight_decay",
)


class IncompatibleCheckpoint(ConfigError):
  """A checkpoint that cannot restore into the current config (names the field)."""


def _field(config_dict: dict, dotted: str) -> Any:
  value = config_dict
  for name in dotted.split("."):
    if not isinstance(value, dict) or name not in value:
      return None
    value = value[name]
  return value


def check_compatible(saved_config: dict, config, where: str) -> None:
  """Raise IncompatibleCheckpoint naming the first RESUME_FIELDS entry that differs."""
  current = json.loads(config.to_json_best_effort())
  for dotted in RESUME_FIELDS:
    was, now = _field(saved_config, dotted), _field(current, dotted)
    if was != now:
      raise IncompatibleCheckpoint(
        f"{where} was written with {dotted}={was!r}, but the config says {dotted}={now!r}; "
        f"the model and optimizer fields ({', '.join(RESUME_FIELDS)}) must match to restore "
        "(use another --workdir for a new run)"
      )


class InputState:
  """Adapter: a training input's state as the bytes Grain's checkpoint handler stores.

  `source` has get_state() -> JSON-able dict and set_state(dict), e.g.
  `deep_image.train.train_input.TrainInput`.
  """

  def __init__(self, source):
    self.source = source

  def get_state(self) -> bytes:
    return json.dumps(self.source.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.source.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    # Called by Grain's handler after set_state; a Grain iterator starts lazily anyway.
    pass


def _top1(metrics: dict) -> float:
  return metrics["top1"]


class _QuietOrbax(std_logging.Filter):
  """Keeps Orbax's warnings and errors, drops its INFO chatter (~60 lines per save).

  Also drops its warning on every save without metrics: only evaluations have them.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if str(record.msg).startswith("Requested `tracked_metric`"):
      return False
    return record.levelno >= std_logging.WARNING


_QUIET_ORBAX = _QuietOrbax()


def _stored_shapes(state) -> list[list[int]]:
  return [list(x.shape) for x in jax.tree.leaves(state)]


class Checkpointer:
  """The checkpoints of one workdir (process-wide: every process makes one).

  Args:
    workdir: the run's folder; checkpoints go to WORKDIR/checkpoints.
    keep: how many of the latest checkpoints to keep (`train.keep_checkpoints`).
    read_only: only read (evaluation, prediction): never save, delete or clean up, so a
      run still training in `workdir` is left alone.
  """

  def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    logging.get_absl_logger().addFilter(_QUIET_ORBAX)  # filters are a set: added once
    policy = checkpoint_managers.AnyPreservationPolicy(
      [
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_top1, n=1, keep_checkpoints_without_metrics=False),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      # best_fn also makes Orbax write each step's metrics to disk, so the best
      # checkpoint is still known (and kept) after a restart.
      best_fn=_top1,
      enable_async_checkpointing=True,
      # Leftovers of a save that was killed mid-write are removed, never read.
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "input": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  # --- what is there ---------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest validation top-1 (None: no evaluated checkpoint)."""
    best = None
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and (best is None or metrics["top1"] > best[1]):
        best = (step, metrics["top1"])
    return None if best is None else best[0]

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  # --- save ------------------------------------------------------------------
  def save(
    self, state: TrainState, input_source, *, strategy, config, metrics: dict | None = None
  ) -> None:
    """Start an asynchronous save of the state after `state.step` steps.

    Returns once the arrays are copied off the devices (the step may then
    donate `state`); the files are written in the background and committed
    atomically. `input_source` must be positioned after the same step.
    """
    step = int(jax.device_get(state.step))
    meta = {
      "step": step,
      "strategy": strategy.name,
      "num_devices": strategy.mesh.size,
      "process_count": jax.process_count(),
      "input": input_source.kind,
      "num_workers": int(config.data.num_workers),
      "pending": state.pending is not None,
      "stored_shapes": _stored_shapes(state),
      "config": json.loads(config.to_json_best_effort()),
    }
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        input=grain.checkpoint.CheckpointSave(InputState(input_source)),
        meta=ocp.args.JsonSave(meta),
      ),
      metrics=None if metrics is None else {k: float(metrics[k]) for k in ("top1", "top5")},
      force=True,
    )
    logging.info("checkpoint of step %d: saving to %s", step, self.step_dir(step))

  def wait(self) -> None:
    """Block until every started save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # --- restore ---------------------------------------------------------------
  def restore(self, step: int, strategy, config, input_source=None) -> TrainState:
    """The state saved at `step`, laid out for `strategy`; positions `input_source` (None:
    the state only, e.g. to evaluate).

    Raises IncompatibleCheckpoint when the model / optimizer fields differ.
    """
    meta = self.meta(step)
    where = f"checkpoint {self.step_dir(step)}"
    check_compatible(meta["config"], config, where)
    target = strategy.abstract_state()
    same_layout = (
      meta["strategy"] == strategy.name
      and meta["num_devices"] == strategy.mesh.size
      and meta["stored_shapes"] == _stored_shapes(target)
    )
    if same_layout:
      state = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )["state"]
    else:
      logging.info(
        "%s: restoring the %s layout on %d devices into %s on %d devices",
        where,
        meta["strategy"],
        meta["num_devices"],
        strategy.name,
        strategy.mesh.size,
      )
      state = self._restore_other_layout(step, meta, strategy)
    if input_source is None:
      return state
    same_input = (
      meta["input"] == input_source.kind
      and meta["process_count"] == jax.process_count()
      and meta["num_workers"] == int(config.data.num_workers)
    )
    if same_input:
      self.manager.restore(
        step,
        args=ocp.args.Composite(input=grain.checkpoint.CheckpointRestore(InputState(input_source))),
      )
    else:
      # Another process or worker count (or input kind): the saved positions are per
      # process, but the Grain stream is global, so it resumes at the saved step exactly.
      same_kind = meta["input"].split(" ")[0] == input_source.kind.split(" ")[0]
      any_devices = input_source.start_at(step)
      exact = same_kind and (any_devices or meta["num_devices"] == strategy.mesh.size)
      log = logging.info if exact else logging.warning
      log(
        "%s: the input was %s with %d processes and %d workers, now %s with %d and %d: it "
        "resumes at global batch %d %s",
        where,
        meta["input"],
        meta["process_count"],
        meta["num_workers"],
        input_source.kind,
        jax.process_count(),
        int(config.data.num_workers),
        step,
        "of the same stream"
        if exact
        else "of its own stream (not the batches the saved run would have read next)",
      )
    return state

  def _restore_other_layout(self, step: int, meta: dict, strategy) -> TrainState:
    """Read every leaf, convert stored -> model layout -> the new strategy's stored layout."""
    current = strategy.abstract_state()
    # The saved tree: the current one, with or without a pending update as saved.
    valid = jax.ShapeDtypeStruct((), bool, sharding=strategy.replicated)
    pending = PendingUpdate(current.params, valid) if meta.get("pending", False) else None
    leaves, treedef = jax.tree.flatten(
      TrainState(current.step, current.params, current.opt_state, pending)
    )
    if len(leaves) != len(meta["stored_shapes"]):
      raise IncompatibleCheckpoint(
        f"checkpoint {self.step_dir(step)} holds {len(meta['stored_shapes'])} arrays, the "
        f"current train state {len(leaves)}: the optimizer differs"
      )
    mesh, n = strategy.mesh, strategy.mesh.size

    def read_sharding(shape):
      # Split on the leading dimension where it divides over the devices, so no device
      # holds a whole copy of the state while it is converted; small or odd leaves whole.
      if shape and shape[0] % n == 0 and math.prod(shape) >= 1024:
        return NamedSharding(mesh, P(tuple(mesh.axis_names)))
      return strategy.replicated

    saved_abstract = jax.tree.unflatten(
      treedef,
      [
        jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=read_sharding(shape))
        for shape, leaf in zip(meta["stored_shapes"], leaves, strict=True)
      ],
    )
    saved = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved_abstract))
    )["state"]

    def to_model_layout(x, full):
      if x.shape != full.shape and (x.ndim != 1 or x.size < math.prod(full.shape)):
        raise IncompatibleCheckpoint(
          f"checkpoint {self.step_dir(step)}: a stored array of shape {x.shape} cannot hold a "
          f"parameter of shape {full.shape}"
        )
      return x.reshape(-1)[: math.prod(full.shape)].reshape(full.shape)

    shapes = strategy.param_shapes
    if saved.pending is not None:
      pending = PendingUpdate(
        jax.tree.map(to_model_layout, saved.pending.grads, shapes), saved.pending.valid
      )
    full = TrainState(
      saved.step,
      jax.tree.map(to_model_layout, saved.params, shapes),
      optax.tree_map_params(strategy.tx, to_model_layout, saved.opt_state, shapes),
      pending,
    )
    return strategy.state_from_model_layout(full)
