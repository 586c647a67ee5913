"""Damaged checkpoints: telling a checkpoint's unreadable files from bugs, and agreeing on it.

One concept apart from `checkpoint.py` (which saves and restores): what counts as
damage. Only the reading errors of TensorStore (missing, cut short or corrupt files),
JSON and the file system do (`unreadable_reason`); anything else is a bug and propagates,
so a good checkpoint is never taken for a damaged one. An item's Orbax handler made
`tolerant` returns the failure as `Unreadable` instead of raising, so that every process
of a multi-process run still reaches Orbax's barrier after a restore, and `agree` then
makes them all see the damage that one of them found (its own shards).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

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
  """Drop the "Event loop is closed" RuntimeErrors of a failed array restore.

  When one read of a restore fails, Orbax's event loop closes while TensorStore still
  completes the other reads; each completion's callback then fails on the closed loop,
  reported as an unraisable exception: thousands of traceback lines, mostly at exit.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


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
