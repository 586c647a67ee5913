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
           pending update is saved, the stored shape of every state leaf, the
           run clock (`train_seconds`: seconds of training up to this step,
           what a resumed run continues from), and the whole config
=========  ==================================================================

Which checkpoints stay: the latest `train.keep_checkpoints`, plus the best by
validation top-1 (checkpoints saved at an evaluation carry {'top1', 'top5'}
as Orbax metrics).

Restoring (`restore` is `restore_state`, then `restore_input`; the training loop calls
the two apart, so that its input, the device cache and its free-memory reading included,
is built once the state is on the devices: `restore_state(hold_input=True)` reads the
saved input position together with the state, so that an unreadable one is damage of that
step before the run commits to it, and `restore_input` applies it to the built input):
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
the current ones (`checkpoint_compat.RESUME_FIELDS`); `IncompatibleCheckpoint` names the first
that differs.

A checkpoint whose files cannot be read back (an array file truncated or
deleted, its meta or Orbax metadata not JSON, stored shapes that disagree
with its own meta) is *damaged*: `restore` raises `DamagedCheckpoint` naming
the step and what is wrong, and `restore_first_readable` / `restore_latest`
log that in one line and try the next older step, down to None (a fresh
start). A writable Checkpointer moves a damaged step to
`checkpoints/damaged/<step>` (never deleted; Orbax lists only step-number
folders, so neither resume nor retention sees it), which also frees the step
number for the run to save again. Damage is found before any array is read
(every file of the state's OCDBT databases present and as long as saved; the
meta's stored shapes equal to Orbax's array metadata) and by the restore itself
(no second read of the arrays); what counts as damage, and how the processes of a
multi-process run agree on it after each read, is `checkpoint_damage`. Only
process 0 moves folders.

One concept at ~570 lines: the life of a run's checkpoints (save, what is kept,
restore into any layout, the fallback past damaged ones); whether a checkpoint fits
a config is `checkpoint_compat`.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers

from deep_image.parallel.train_state import PendingUpdate, TrainState
from deep_image.train.checkpoint_compat import (  # noqa: F401 (IncompatibleCheckpoint: public here)
  IncompatibleCheckpoint,
  check_compatible,
)
from deep_image.train.checkpoint_damage import (
  DamagedCheckpoint,
  Unreadable,
  agree,
  ocdbt_files_reason,
  tolerant,
  unreadable_reason,
)
from deep_image.train.workdir import CHECKPOINTS_DIR, DAMAGED_DIR


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


class _HeldInput:
  """Receives a saved input position (the bytes `InputState` stores) and keeps it, parsed,
  for an input that is built later (`Checkpointer.restore_input`). Parsed here, inside the
  read, so that a position that is not JSON is a read failure (damage) as with
  `InputState`."""

  def __init__(self):
    self.state: dict | None = None

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state.decode())

  def start_prefetch(self) -> None:
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


def _saved_tree(meta: dict, strategy) -> TrainState:
  """The tree a checkpoint was saved as: the strategy's abstract state, with or without a
  pending update as the meta says (its leaves in the order of meta['stored_shapes'])."""
  current = strategy.abstract_state()
  valid = jax.ShapeDtypeStruct((), bool, sharding=strategy.replicated)
  pending = PendingUpdate(current.params, valid) if meta.get("pending", False) else None
  return TrainState(current.step, current.params, current.opt_state, pending)


def _path_key(path) -> tuple[str, ...]:
  """A tree path as names, alike for our TrainState and Orbax's metadata tree of it
  (attribute, dict key and index all become strings)."""
  return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


class Checkpointer:
  """The checkpoints of one workdir (process-wide: every process makes one).

  Args:
    workdir: the run's folder; checkpoints go to WORKDIR/checkpoints.
    keep: how many of the latest checkpoints to keep (`train.keep_checkpoints`).
    read_only: only read (evaluation, prediction): never save, delete or clean up, so a
      run still training in `workdir` is left alone.
  """

  def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
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
        "state": tolerant(ocp.StandardCheckpointHandler()),
        "input": tolerant(grain.checkpoint.CheckpointHandler()),
        "meta": tolerant(ocp.JsonCheckpointHandler()),
      },
    )
    self.read_only = read_only
    # (step, meta, this process's saved input position or None): what
    # `restore_state(hold_input=True)` read for `restore_input`.
    self._held_input: tuple[int, dict, dict | None] | None = None

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
    """The step's meta item (DamagedCheckpoint when it cannot be read)."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    reason = None
    if isinstance(meta, Unreadable):
      reason = f"meta: {meta.reason}"
    elif not (isinstance(meta, dict) and isinstance(meta.get("stored_shapes"), list)):
      reason = "meta: JSON, but not a checkpoint's meta (no stored_shapes)"
    reason = agree(reason)
    if reason is not None:
      raise DamagedCheckpoint(
        f"checkpoint of step {step} ({self.step_dir(step)}) is damaged: {reason}"
      )
    return meta

  def train_seconds(self, step: int) -> float | None:
    """The run clock saved with the step (seconds of training up to it; `loop`), or None
    for a checkpoint saved before checkpoints held it."""
    value = self.meta(step).get("train_seconds")
    return None if value is None else float(value)

  # --- save ------------------------------------------------------------------
  def save(
    self,
    state: TrainState,
    input_source,
    *,
    strategy,
    config,
    metrics: dict | None = None,
    train_seconds: float = 0.0,
  ) -> None:
    """Start an asynchronous save of the state after `state.step` steps.

    Returns once the arrays are copied off the devices (the step may then
    donate `state`); the files are written in the background and committed
    atomically. `input_source` must be positioned after the same step;
    `train_seconds` is the run clock at that step (seconds), stored in the meta.
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
      "train_seconds": float(train_seconds),
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
  def restore_latest(
    self, strategy, config, input_source=None, *, hold_input: bool = False
  ) -> tuple[int, TrainState] | None:
    """(step, state) of the newest readable checkpoint (`restore_first_readable`)."""
    return self.restore_first_readable(
      sorted(self.manager.all_steps(), reverse=True),
      strategy,
      config,
      input_source,
      hold_input=hold_input,
    )

  def restore_first_readable(
    self, steps: Sequence[int], strategy, config, input_source=None, *, hold_input: bool = False
  ) -> tuple[int, TrainState] | None:
    """(step, state) of the first of `steps` that can be read back (`restore`).

    A damaged one is logged in one line and, unless read-only, moved to
    checkpoints/damaged/<step>; then the next is tried. None when none is readable (with
    `input_source` or `hold_input`, i.e. training: logged as a fresh start, the input at
    step 0). `hold_input`: the input is not built yet; the step's saved input position is
    read with its state (its damage is the step's) and kept for `restore_input(step, ...)`.
    IncompatibleCheckpoint and every error that is not a read failure propagate.
    """
    for i, step in enumerate(steps):
      try:
        if hold_input and input_source is None:
          return step, self.restore_state(step, strategy, config, hold_input=True)
        return step, self.restore(step, strategy, config, input_source)
      except DamagedCheckpoint as e:
        moved = "" if self.read_only else f"; moved to {self._move_aside(step)}"
        nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
        logging.warning("%s%s; %s", e, moved, nxt)
    if steps and input_source is not None:
      input_source.start_at(0)  # a process may have read a damaged step's position
    if steps and (input_source is not None or hold_input):
      logging.warning(
        "no readable checkpoint in %s (%s damaged): starting from step 0",
        self.directory,
        ", ".join(map(str, steps)),
      )
    return None

  def _move_aside(self, step: int) -> str:
    """checkpoints/<step> -> checkpoints/damaged/<step> (by process 0; every process waits)."""
    damaged = os.path.join(self.directory, DAMAGED_DIR)
    target, n = os.path.join(damaged, str(step)), 1
    while os.path.exists(target):  # the same step damaged again after a later save
      n += 1
      target = os.path.join(damaged, f"{step}-{n}")
    if jax.process_index() == 0:
      os.makedirs(damaged, exist_ok=True)
      os.rename(self.step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()  # forget the step: it is neither restored nor kept nor deleted
    return target

  def restore(self, step: int, strategy, config, input_source=None) -> TrainState:
    """The state saved at `step`, laid out for `strategy`; positions `input_source` (None:
    the state only, e.g. to evaluate): `restore_state`, then `restore_input`.

    Raises IncompatibleCheckpoint when the model / optimizer fields differ,
    DamagedCheckpoint (every process alike) when its files cannot be read back.
    """
    state = self.restore_state(step, strategy, config)
    if input_source is not None:
      self.restore_input(step, strategy, config, input_source)
    return state

  def restore_state(self, step: int, strategy, config, *, hold_input: bool = False) -> TrainState:
    """The state saved at `step`, laid out for `strategy` (on its devices).

    hold_input: also read this process's saved input position now, as part of the step's
    damage check (where the process and worker counts are as saved, i.e. where it can
    apply), and keep it for `restore_input(step, ...)` on an input built afterwards.
    Raises as `restore`.
    """
    meta = self.meta(step)
    where = f"checkpoint {self.step_dir(step)}"
    check_compatible(meta["config"], config, where)
    self._check_state_files_and_shapes(step, meta, strategy)
    target = strategy.abstract_state()
    same_layout = (
      meta["strategy"] == strategy.name
      and meta["num_devices"] == strategy.mesh.size
      and meta["stored_shapes"] == _stored_shapes(target)
    )
    if same_layout:
      state = self._read(step, "state", ocp.args.StandardRestore(target))
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
    if hold_input:
      self._held_input = (step, meta, self._saved_input(step, meta, config))
    return state

  def _saved_input(self, step: int, meta: dict, config) -> dict | None:
    """This process's saved input position (Grain's handler reads
    `process_<i>-of-<n>.json`), or None where the process or worker count differs from the
    saved one (the positions are per process: they do not apply). DamagedCheckpoint when it
    cannot be read (every process alike)."""
    if meta["process_count"] != jax.process_count() or meta["num_workers"] != int(
      config.data.num_workers
    ):
      return None
    return self._read(step, "input", grain.checkpoint.CheckpointRestore(_HeldInput())).state

  def restore_input(self, step: int, strategy, config, input_source) -> None:
    """Position `input_source` after `step`, as the checkpoint of that step says.

    Its saved per-process position where the input kind, process and worker counts are as
    saved (the one `restore_state(step, hold_input=True)` read, or read now); otherwise
    `input_source.start_at(step)`, logged. Raises DamagedCheckpoint when a position it
    reads now cannot be read.
    """
    held, self._held_input = self._held_input, None
    if held is not None and held[0] == step:
      meta, saved = held[1], held[2]
    else:
      meta = self.meta(step)
      # Read only where it applies (as before the restore was split in two).
      as_saved = meta["input"] == input_source.kind
      saved = self._saved_input(step, meta, config) if as_saved else None
    where = f"checkpoint {self.step_dir(step)}"
    if saved is not None and meta["input"] == input_source.kind:
      input_source.set_state(saved)
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

  def _read(self, step: int, item: str, args) -> Any:
    """One item of the step, read on every process; DamagedCheckpoint when any could not."""
    value = self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    reason = agree(f"{item}: {value.reason}" if isinstance(value, Unreadable) else None)
    if reason is not None:
      raise DamagedCheckpoint(
        f"checkpoint of step {step} ({self.step_dir(step)}) is damaged: {reason}"
      )
    return value

  def _check_state_files_and_shapes(self, step: int, meta: dict, strategy) -> None:
    """DamagedCheckpoint when a file of the state's OCDBT databases is missing or cut short
    (`ocdbt_files_reason`: this process's files, whether or not a restore would read the
    lost bytes) or Orbax's array metadata of the state disagrees with the meta's stored
    shapes (cheap reads of small files, before any array is read).

    Arrays that only one of them names are left to the restore: that is another
    optimizer (IncompatibleCheckpoint), not damage.
    """
    reason = None
    try:
      files = ocdbt_files_reason(os.path.join(self.step_dir(step), "state"), jax.process_index())
    except Exception as e:  # narrowed: only read failures, the rest re-raised
      files = unreadable_reason(e)
      if files is None:
        raise
    if files is not None:
      reason, stored = f"state: {files}", None
    else:
      try:
        stored = self.manager.item_metadata(step)["state"]
      except Exception as e:  # narrowed: only read failures, the rest re-raised
        reason = unreadable_reason(e)
        if reason is None:
          raise
        reason = f"state metadata: {reason}"
    if reason is None and stored is not None:
      saved = _saved_tree(meta, strategy)
      by_path = {
        _path_key(path): tuple(shape)
        for (path, _), shape in zip(
          jax.tree_util.tree_flatten_with_path(saved)[0], meta["stored_shapes"], strict=False
        )
      }
      for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]:
        key, shape = _path_key(path), tuple(getattr(leaf, "shape", ()) or ())
        if key in by_path and by_path[key] != shape:
          reason = (
            f"state {'/'.join(key)} is stored as {list(shape)} but its meta says "
            f"{list(by_path[key])}"
          )
          break
    reason = agree(reason)
    if reason is not None:
      raise DamagedCheckpoint(
        f"checkpoint of step {step} ({self.step_dir(step)}) is damaged: {reason}"
      )

  def _restore_other_layout(self, step: int, meta: dict, strategy) -> TrainState:
    """Read every leaf, convert stored -> model layout -> the new strategy's stored layout."""
    leaves, treedef = jax.tree.flatten(_saved_tree(meta, strategy))
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
    saved = self._read(step, "state", ocp.args.StandardRestore(saved_abstract))

    def to_model_layout(x, full):
      if x.shape != full.shape and (x.ndim != 1 or x.size < math.prod(full.shape)):
        raise IncompatibleCheckpoint(
          f"checkpoint {self.step_dir(step)}: a stored array of shape {x.shape} cannot hold a "
          f"parameter of shape {full.shape}"
        )
      return x.reshape(-1)[: math.prod(full.shape)].reshape(full.shape)

    shapes = strategy.param_shapes
    pending = None
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
