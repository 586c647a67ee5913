"""Grain's worker processes for the input pipelines: their setup, their threads, their end.

`pipeline.make_train_iterator` / `make_eval_iterator` hand their dataset to `iterate`: in
process (`data.num_workers` 0, `READ_THREADS` threads) or over `mp_prefetch` worker
processes, each set up by `init_worker` (one OpenCV thread, glibc malloc tuned for images)
and owned by a `WorkerIterator` that ends them with it, also at interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import weakref
from typing import Any

import cv2
import grain
from absl import flags

# glibc mallopt parameters (malloc.h): the env vars MALLOC_TRIM_THRESHOLD_ /
# MALLOC_MMAP_THRESHOLD_ set the same, but only for processes started after they are set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def init_worker(worker_index: int, worker_count: int) -> None:
  """Grain worker setup: one OpenCV thread per worker, and glibc malloc tuned for images."""
  del worker_index, worker_count
  # The workers are the parallelism; OpenCV's own threads would oversubscribe the cores.
  cv2.setNumThreads(1)
  # Image-sized buffers sit above glibc's default mmap threshold, so every image paid page
  # faults for fresh mmaps (up to 2.2x slower, DESIGN.md); keep them on the heap instead.
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # Not glibc (macOS, musl): nothing to tune.
    return
  libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
  libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def ensure_grain_flags() -> None:
  """Lets Grain's worker processes start outside an absl app (a notebook, another script).

  Grain reads its settings from absl flags (`--grain_*`) when it starts workers; in a program
  that never ran `absl.app.run`, reading them raises UnparsedFlagAccessError. Marking the
  flags parsed keeps every flag at its default, as `app.run` with no arguments would; a
  program that parses its flags (or does so later) is unaffected.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class WorkerIterator:
  """A Grain iterator with worker processes, that ends them when it ends.

  Same interface as the Grain iterator it owns (`next`, `get_state`, `set_state`, `close`),
  plus a context manager. The workers stop on `close()`, when the iterator is garbage
  collected, or at interpreter exit, including after an uncaught exception or a
  KeyboardInterrupt: an atexit hook closes every open one while the interpreter is still
  whole. (Left to Grain's own `__del__` at shutdown, the close fails half-way because
  Grain's modules are already torn down, and leaks shared memory.)
  """

  def __init__(self, it: grain.DatasetIterator):
    self._it = it
    _open_iterators.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> Any:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    """Stops the worker processes; idempotent. The iterator yields nothing after it."""
    it, self._it = self._it, None
    if it is not None:  # Also keeps a late __del__ off module globals torn down at exit.
      _open_iterators.discard(self)
      it.close()

  def __enter__(self) -> WorkerIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self.close()


# Open WorkerIterators; closed at interpreter exit (`_close_open`).
_open_iterators: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open() -> None:
  for it in list(_open_iterators):
    it.close()


def worker_count(data_cfg: Any, num_workers: int | None) -> int:
  """Worker processes to start: `num_workers`, or data.num_workers when it is None."""
  return max(0, int(data_cfg.num_workers if num_workers is None else num_workers))


def iterate(ds: grain.IterDataset, data_cfg: Any, num_workers: int | None):
  """iter(ds) in process, or a `WorkerIterator` over `mp_prefetch` worker processes."""
  workers = worker_count(data_cfg, num_workers)
  if workers <= 0:
    return iter(ds)
  ensure_grain_flags()
  options = grain.MultiprocessingOptions(
    num_workers=workers, per_worker_buffer_size=int(data_cfg.worker_buffer_size)
  )
  return WorkerIterator(iter(ds.mp_prefetch(options, worker_init_fn=init_worker)))


# Threads that run the per-record map (`to_iter_dataset`'s ReadOptions) in each process.
# Grain's default, 16 threads and 500 records read ahead, is tuned for remote storage; for
# decode + augment, which hold the GIL between OpenCV / libjpeg calls, 16 threads cost more
# in contention than they overlap (BENCHMARKS.md, input profile). A worker process runs its
# records synchronously, one core each; in process, READ_THREADS threads (the heavy calls
# release the GIL) use up to that many cores and overlap the input with the caller's work.
READ_THREADS = min(4, os.cpu_count() or 1)
READ_AHEAD = 64


def read_options(data_cfg: Any, num_workers: int | None) -> grain.ReadOptions:
  """The per-record map's threads: none in a worker process, READ_THREADS in process."""
  if worker_count(data_cfg, num_workers):
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(
    num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD if READ_THREADS else 0
  )
