"""The workdir: every file a run writes, who writes it, and the one-writer lock.

One run lives in one folder WORKDIR. The names below are the only spelling of
each file; the modules that write them import the names from here:

=======================  =======================================================
WORKDIR/                 written by
=======================  =======================================================
.lock                    `WorkdirLock` (process 0 of the trainer): held with
                         `fcntl.flock` for the run's life and removed at its end;
                         holds the holder's host, pid and start time. A SIGKILLed
                         holder leaves the file, but the OS has released its lock.
checkpoints/<step>/      `deep_image.train.checkpoint` (Orbax, every process):
                         every `train.checkpoint_every` steps, at each
                         evaluation, at the end and on SIGTERM
checkpoints/damaged/     `deep_image.train.checkpoint`: checkpoints that could
                         not be read, moved aside by a resuming trainer (never
                         deleted)
config.json              `deep_image.train.run_config` (process 0): the run's
                         config, written at each start once every check passed
metrics.jsonl            `deep_image.train.metrics` (process 0): one record per
                         logged step and per evaluation; on resume the records
                         past the restored step are dropped
tensorboard/             `deep_image.train.metrics` (process 0): the same numbers
                         as TensorBoard scalars
result.json              `deep_image.train.result` (process 0): the final
                         evaluation, written last: a finished run
eval.json                `experiments.evaluate` (default `--out`): the
                         evaluation protocols of a finished run
=======================  =======================================================

One writer at a time: a trainer (or a sweep point) holds the lock before it
writes anything, and a second one on the same workdir stops at once with
`WorkdirBusy` naming the holder. Readers (`experiments.evaluate`, `predict`,
`ensemble`, `plot`, TensorBoard) never take it and work during training.

Nothing good is overwritten by a failed start: the trainer writes its records
(config.json, the metrics.jsonl truncation, tensorboard/, result.json) only
after every check, the checkpoint's compatibility included, has passed.

A full disk is `OutOfSpace`: one line naming the path and the free bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time

from deep_image.config_error import ConfigError

LOCK_NAME = ".lock"
CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "damaged"  # inside CHECKPOINTS_DIR
CONFIG_NAME = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESULT_NAME = "result.json"
EVAL_NAME = "eval.json"


class WorkdirBusy(ConfigError):
  """Another trainer holds the workdir (the message names it)."""


class OutOfSpace(OSError):
  """A write failed for lack of space; the message names the path and the free bytes."""


# --- the lock ------------------------------------------------------------------
def _describe_holder(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    # The holder has opened the file but not yet written itself into it.
    return "a trainer that is just starting"


class WorkdirLock:
  """The exclusive right to write a workdir: `with WorkdirLock(workdir): ...`.

  `fcntl.flock` on WORKDIR/.lock, so the OS releases it when the holder dies
  however it dies; nothing stale ever blocks. The file is removed on release
  (a finished workdir holds no lock file); a locker checks that the file it
  locked is still the one at the path, since a releasing holder may have
  unlinked it between the open and the flock.

  Raises (on enter):
    WorkdirBusy: another live process holds it.
    ConfigError: the workdir cannot be created or written.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    try:
      os.makedirs(self.workdir, exist_ok=True)
      while True:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          os.close(fd)
          raise WorkdirBusy(
            f"--workdir={self.workdir!r} is being trained by another process "
            f"({_describe_holder(self.path)}); wait for it or use another --workdir"
          ) from None
        try:
          same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
          same_file = False
        if same_file:
          break
        os.close(fd)  # locked a file its releasing holder had just removed: try again
      self._fd = fd
      holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      }
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps(holder).encode())
    except OSError as e:
      self._release()
      if is_out_of_space(e):
        raise OutOfSpace(out_of_space_message(self.path)) from None
      raise ConfigError(f"--workdir={self.workdir!r} is not writable: {e.strerror or e}") from None
    return self

  def _release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)  # while still holding it: see the class docstring
    os.close(self._fd)
    self._fd = None

  def __exit__(self, *exc) -> None:
    self._release()


# --- a full disk ---------------------------------------------------------------
def is_out_of_space(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is ENOSPC (also TensorStore's text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error) or "[Errno 28]" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_bytes(path: str) -> int:
  """Free bytes on the file system of `path` (or of its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def out_of_space_message(path: str, what: str = "") -> str:
  return (
    f"no space left on the device of {path}{f' writing {what}' if what else ''}: "
    f"{free_bytes(path)} bytes free"
  )


@contextlib.contextmanager
def raising_out_of_space(path: str, what: str = ""):
  """Turns an ENOSPC raised inside the block into `OutOfSpace` naming `path`; others pass."""
  try:
    yield
  except Exception as e:
    if not is_out_of_space(e):
      raise
    raise OutOfSpace(out_of_space_message(path, what)) from None
