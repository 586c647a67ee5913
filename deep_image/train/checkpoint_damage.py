"""Damaged checkpoints: telling a checkpoint's unreadable files from bugs, and agreeing on it.

One concept apart from `checkpoint.py` (which saves and restores): what counts as
damage. Only the reading errors of TensorStore (missing, cut short or corrupt files),
JSON and the file system do (`unreadable_reason`); anything else is a bug and propagates,
so a good checkpoint is never taken for a damaged one. An item's Orbax handler made
`tolerant` returns the failure as `Unreadable` instead of raising, so that every process
of a multi-process run still reaches Orbax's barrier after a restore, and `agree` then
makes them all see the damage that one of them found (its own shards). Before any array
is read, `ocdbt_files_reason` checks that every file of the state's OCDBT databases that
this process wrote is there and as long as the save wrote it (a walk of the databases'
small manifests and B+tree nodes, no array data).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse

import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils
from tensorstore import ocdbt

from deep_image.config_error import ConfigError


class DamagedCheckpoint(ConfigError):
  """A checkpoint whose files cannot be read back (names the step and what is wrong)."""


# TensorStore's status codes for files that are missing, cut short or corrupt. Others
# (INVALID_ARGUMENT: e.g. a requested shape or dtype that does not fit) are our bugs.
_TENSORSTORE_READ_FAILURES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")


def _first_line(text: str, limit: int = 300) -> str:
  text = text.split(" [tensorstore_spec")[0].splitlines()[0] if text else text
  return text if len(text) <= limit else text[: limit - 3] + "..."


def unreadable_reason(error: BaseException) -> str | None:
  """What is wrong with the files, when `error` is a failure to read them; None otherwise.

  Orbax wraps TensorStore's error of an array read in a bare Exception whose cause is
  TensorStore's ValueError ('OUT_OF_RANGE: Error reading ...').
  """
  if type(error) is Exception and str(error).startswith("Encountered error while reading"):
    error = error.__cause__ or error
  if isinstance(error, json.JSONDecodeError):
    return f"not JSON ({error.msg} at line {error.lineno} column {error.colno})"
  if isinstance(error, UnicodeDecodeError):
    return f"not text ({error.reason})"
  if isinstance(error, OSError):
    return _first_line(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
  if isinstance(error, ValueError):
    text = str(error)
    if text.startswith(_TENSORSTORE_READ_FAILURES) or (
      text.startswith("File ") and text.endswith("does not exist.")  # Grain's input item
    ):
      return _first_line(text)
  return None


class Unreadable:
  """What a handler's restore returns instead of raising a read failure (`tolerant`)."""

  def __init__(self, reason: str):
    self.reason = reason


def tolerant(handler):
  """`handler` (an item's Orbax handler), whose restore returns `Unreadable` instead of
  raising when its files cannot be read, so that every process still reaches Orbax's
  barrier after the restore (a process that raised would leave the others waiting there)
  and all can then vote on the step. Any other error propagates. (The instance's method is
  replaced: Orbax finds a handler's argument types by its exact class.)"""
  read = handler.restore

  def restore(*args, **kwargs):
    try:
      return read(*args, **kwargs)
    except Exception as e:  # narrowed: only read failures are kept, the rest re-raised
      reason = unreadable_reason(e)
      if reason is None:
        raise
      _silence_closed_loop_callbacks()
      return Unreadable(reason)

  handler.restore = restore
  return handler


def _silence_closed_loop_callbacks() -> None:
  """Drop the unraisable exceptions of a failed array restore (`_dropped_read_of_damaged`).

  When one read of a restore fails, Orbax's event loop closes while TensorStore still
  completes the other reads; each completion's callback then fails on the closed loop,
  and each other read's coroutine, closed when collected, raises too: both reported as
  unraisable exceptions, thousands of traceback lines, mostly at exit.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return

  def hook(unraisable):
    if not _dropped_read_of_damaged(unraisable):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _dropped_read_of_damaged(unraisable) -> bool:
  """Whether `unraisable` is the noise of a restore that already failed (and was reported
  as damaged): "Event loop is closed" from TensorStore's completions, or one of Orbax's
  other array reads, left suspended when the first read's failure ended the restore and
  closed when collected: it turns the GeneratorExit into "Encountered error while reading
  array index" (a traceback per read, after the one line). Anything else still shows."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  return (
    type(error) is Exception
    and str(error).startswith("Encountered error while reading array index")
    and isinstance(error.__cause__, GeneratorExit)
    and getattr(unraisable.object, "__name__", None) == "_read_array_index_and_device_put"
  )


def ocdbt_files_reason(item_dir: str, process_index: int) -> str | None:
  """What is wrong with the files of the OCDBT databases in `item_dir` (an Orbax array
  item) that process `process_index` wrote, when a file is missing or shorter than the
  save wrote it; None when all are whole (or `item_dir` holds no OCDBT database).

  Reads only the databases' manifests and B+tree nodes: the merged root database (its
  own nodes, and the values in this process's files) and every version of this process's
  own database `ocdbt.process_<i>`. Together they refer to every byte of those data files
  (values, B+tree nodes, version tree nodes), so any file cut short or deleted is found
  here, whether or not a restore would read its lost bytes. Other processes' files are
  theirs to check (`agree` then shares what they find).
  """
  own = f"ocdbt.process_{process_index}"
  if not os.path.exists(os.path.join(item_dir, "manifest.ocdbt")) and not any(
    name.startswith("ocdbt.process_") for name in os.listdir(item_dir)
  ):
    return None  # not an OCDBT item: Orbax's own read tells

  sizes: dict[str, int | None] = {}

  def short(path: str, end: int) -> str | None:
    if path not in sizes:
      try:
        sizes[path] = os.path.getsize(os.path.join(item_dir, path))
      except FileNotFoundError:
        sizes[path] = None
    if sizes[path] is None:
      return f"NOT_FOUND: {path} does not exist (the checkpoint's OCDBT database refers to it)"
    if sizes[path] < end:
      return (
        f"OUT_OF_RANGE: {path} is {sizes[path]} bytes, but the checkpoint's OCDBT database "
        f"refers to its bytes up to {end}"
      )
    return None

  def located(db: str, reference: str) -> tuple[str, int]:
    # "<kind>:<base path>:<relative path>:<offset>:<length>", paths percent-encoded
    _, base, relative, offset, length = reference.split(":")
    path = os.path.normpath(
      os.path.join(db, urllib.parse.unquote(base), urllib.parse.unquote(relative))
    )
    return path, int(offset) + int(length)

  def walk(db: str, store, reference: str, mine: bool) -> str | None:
    """Check the node `reference` of database `db` and everything it refers to."""
    path, end = located(db, reference)
    if mine or not path.startswith("ocdbt.process_"):
      reason = short(path, end)
      if reason is not None:
        return reason
    node = ocdbt.dump(store, reference).result()
    for entry in node["entries"]:
      if "indirect_value" in entry:
        path, end = located(db, entry["indirect_value"])
        if path.startswith(own + os.sep) or (mine and not path.startswith("ocdbt.process_")):
          reason = short(path, end)
          if reason is not None:
            return reason
      elif "location" in entry:  # an interior B+tree node's child, or a version tree node
        reason = walk(db, store, entry["location"], mine)
        if reason is not None:
          return reason
      elif "root" in entry and "location" in entry["root"]:  # a version tree's version
        reason = walk(db, store, entry["root"]["location"], mine)
        if reason is not None:
          return reason
    return None

  def database(db: str, mine: bool) -> str | None:
    """Check every version of database `db` (its manifest, version and B+tree nodes)."""
    if not os.path.exists(os.path.join(item_dir, db, "manifest.ocdbt")):
      return f"NOT_FOUND: {os.path.join(db, 'manifest.ocdbt')} does not exist"
    store = ts.KvStore.open({"driver": "file", "path": os.path.join(item_dir, db, "")}).result()
    manifest = ocdbt.dump(store).result()
    references = [v["root"]["location"] for v in manifest["versions"] if "location" in v["root"]]
    references += [v["location"] for v in manifest["version_tree_nodes"]]
    for reference in references:
      reason = walk(db, store, reference, mine)
      if reason is not None:
        return reason
    return None

  reason = database("", mine=process_index == 0)
  if reason is None and os.path.isdir(os.path.join(item_dir, own)):
    reason = database(own, mine=True)
  return reason


_REASON_BYTES = 512  # of a damage reason sent to the other processes


def agree(reason: str | None) -> str | None:
  """This process's reason, or another's ('process i: ...'); None only when every process
  read its part.

  A damaged file may be read by one process only (its shards); every process must then
  treat the step as damaged, or they would restore different steps.
  """
  if jax.process_count() == 1:
    return reason
  text = (reason or "").encode()[:_REASON_BYTES]
  row = np.zeros(1 + _REASON_BYTES, np.uint8)
  row[0] = reason is not None
  row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(row))  # [processes, 1 + _REASON_BYTES]
  if reason is not None:
    return reason
  for i, other in enumerate(rows):
    if other[0]:
      return f"process {i}: " + bytes(other[1:]).rstrip(b"\0").decode(errors="replace")
  return None
