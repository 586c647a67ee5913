"""A damaged checkpoint is moved aside and the run resumes from the one before, exactly.

One uninterrupted tiny run keeps three checkpoints (4, 8, 12). Copies of its workdir,
as if the run had died after its last save (no result.json), get their latest checkpoint
damaged the ways a disk or a user damages one: an array file truncated, one deleted,
garbage in the meta. The same train command then resumes from step 8, logs one line
naming step 12 and what is wrong, moves it to checkpoints/damaged/12, and logs exactly
the uninterrupted run's losses. Readers (experiments.evaluate) fall back the same way
without moving anything; a damaged step asked for by number is a one-line error. In a
2-process run the damage one process alone sees makes both restore the same older step.

A truncated or deleted file is found before any array is read, whichever file it is
(`ocdbt_files_reason`): a restore reads only some byte ranges of the data files (the
largest one may end with this process's own B+tree node, which a restore of the merged
database never reads), so leaving it to the restore would find half of a file cut short
only sometimes.
"""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
from conftest import TINY_JOB_FLAGS, run_cli, train_cli

from deep_image.parallel.mesh import PATIENT_COLLECTIVES
from deep_image.train.checkpoint_damage import (
  _dropped_read_of_damaged,
  ocdbt_files_reason,
  unreadable_reason,
)
from deep_image.train.metrics import read_metrics

JOB = (
  "--config.train.num_steps=12",
  "--config.train.checkpoint_every=4",
  "--config.train.keep_checkpoints=3",
  "--config.train.eval_every=0",
  "--config.train.log_every=1",
)


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir))[0]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference") / "run"
  done = train_cli(workdir, *JOB)
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]
  return workdir


def _died_after_last_save(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  os.remove(workdir / "result.json")
  return workdir


def _largest_array_file(step_dir):
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(step_dir / "state" / "ocdbt.process_0" / "d")
    for name in names
  ]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _delete(step_dir):
  os.remove(_largest_array_file(step_dir))


def _garbage_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"step": 12, "stored_sh\x00\x00 garbage')


@pytest.mark.parametrize("damage", [_truncate, _delete, _garbage_meta], ids=lambda f: f.__name__)
def test_the_run_resumes_from_the_checkpoint_before_a_damaged_one(finished, tmp_path, damage):
  workdir = _died_after_last_save(finished, tmp_path)
  damage(workdir / "checkpoints" / "12")

  done = train_cli(workdir, *JOB)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
  lines = [line for line in done.stderr.splitlines() if "is damaged" in line]
  assert len(lines) == 1 and "checkpoint of step 12" in lines[0], done.stderr[-3000:]
  assert "moved to" in lines[0] and "trying step 8" in lines[0]
  assert "resumed from step 8" in done.stderr
  # Moved aside, never deleted; the run saved step 12 again beside it.
  assert (workdir / "checkpoints" / "damaged" / "12" / "meta").is_dir()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8", "damaged"]
  assert _losses(workdir) == _losses(finished)  # every step once, bit-identical
  with open(workdir / "result.json") as f, open(finished / "result.json") as g:
    got, want = json.load(f), json.load(g)
  assert {k: got[k] for k in ("step", "top1", "top5")} == {
    k: want[k] for k in ("step", "top1", "top5")
  }


def test_with_no_readable_checkpoint_the_run_starts_afresh_and_says_so(finished, tmp_path):
  workdir = _died_after_last_save(finished, tmp_path)
  for step in ("4", "8", "12"):
    _garbage_meta(workdir / "checkpoints" / step)
  done = train_cli(workdir, *JOB)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "no readable checkpoint" in done.stderr and "starting from step 0" in done.stderr
  assert "resumed from step" not in done.stderr
  assert sorted(os.listdir(workdir / "checkpoints" / "damaged")) == ["12", "4", "8"]
  assert _losses(workdir) == _losses(finished)


def test_readers_fall_back_without_moving_anything(finished, tmp_path):
  workdir = _died_after_last_save(finished, tmp_path)
  _truncate(workdir / "checkpoints" / "12")
  before = sorted(os.listdir(workdir / "checkpoints"))

  done = run_cli("experiments.evaluate", f"--workdir={workdir}", "--checkpoint=latest")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"{workdir}, step 8," in done.stdout
  assert "restored step 8 (latest; step 12 is damaged)" in done.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == before  # read-only: nothing moved
  with open(workdir / "eval.json") as f:
    assert {r["step"] for r in json.load(f).values()} == {8}

  # Asked for by number, a damaged step is one line naming it and what is wrong.
  done = run_cli("experiments.evaluate", f"--workdir={workdir}", "--checkpoint=12")
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert "checkpoint of step 12" in last and "is damaged" in last and "OUT_OF_RANGE" in last
  assert "Traceback" not in done.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_two_processes_agree_on_the_step_when_only_one_cannot_read(tmp_path):
  """2 processes x 4 devices, `lazy` (each process stores and reads its own shards): a
  damaged file of process 1's shards is seen by process 1 alone, yet both restore step 4."""
  job = [
    "--config.parallel.num_devices=4",
    "--config.parallel.strategy=lazy",
    "--config.train.num_steps=8",
    "--config.train.checkpoint_every=4",
    "--config.train.keep_checkpoints=3",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
  ]
  workdir = tmp_path / "run"

  def launch():
    return subprocess.run(
      [sys.executable, "-m", "launch.local", "--num_processes=2", "--", f"--workdir={workdir}",
       *TINY_JOB_FLAGS, *job],
      capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES),
      timeout=400,
    )  # fmt: skip

  first = launch()
  assert first.returncode == 0, first.stderr[-3000:]
  want = _losses(workdir)
  os.remove(workdir / "result.json")
  shards = workdir / "checkpoints" / "8" / "state" / "ocdbt.process_1" / "d"
  largest = max(shards.iterdir(), key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)

  again = launch()
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
  assert again.returncode == 0, again.stderr[-1500:] + logs[0][-1500:] + logs[1][-1500:]
  damaged = [[line for line in log.splitlines() if "is damaged" in line] for log in logs]
  assert len(damaged[0]) == len(damaged[1]) == 1, damaged
  assert "checkpoint of step 8" in damaged[1][0] and "state: " in damaged[1][0]
  assert "is damaged: process 1: state: " in damaged[0][0] and "moved to" in damaged[0][0]
  for log in logs:
    assert "resumed from step 4" in log
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8", "damaged"]
  assert _losses(workdir) == want


def test_only_failures_to_read_files_count_as_damage():
  """A bug (a wrong shape asked for, a TypeError) must propagate, not move a good checkpoint."""
  read = ValueError('OUT_OF_RANGE: Error reading "params.fc1.kernel/0.5" in OCDBT database')
  wrapped = Exception("Encountered error while reading array index: (slice(0, 128, 1),)")
  wrapped.__cause__ = read
  assert unreadable_reason(wrapped).startswith("OUT_OF_RANGE: Error reading")
  assert unreadable_reason(json.JSONDecodeError("Expecting value", "x", 0)).startswith("not JSON")
  assert "No such file" in unreadable_reason(FileNotFoundError(2, "No such file", "/a/b"))
  assert unreadable_reason(ValueError("File /w/input/process_1-of-2.json does not exist."))
  bugs = [
    TypeError("unsupported operand"),
    KeyError("params"),
    ValueError("Requested shape: (24, 128) is not compatible with the stored shape: (128, 24)"),
    ValueError("INVALID_ARGUMENT: Error aligning dimensions"),
    Exception("something else"),
  ]
  for bug in bugs:
    assert unreadable_reason(bug) is None, bug


def test_every_file_of_the_state_cut_short_or_deleted_is_found(finished, tmp_path):
  """Any one data file, manifest or B+tree node of the state's OCDBT databases, cut to half
  or deleted, is named before any array is read; the intact checkpoint passes."""
  state = finished / "checkpoints" / "12" / "state"
  assert ocdbt_files_reason(str(state), 0) is None
  files = sorted(
    os.path.relpath(os.path.join(root, name), state)
    for root, _, names in os.walk(state)
    for name in names
    if name == "manifest.ocdbt" or os.path.basename(root) == "d"
  )
  assert any(f.startswith("ocdbt.process_0/d/") for f in files)
  assert any(f.startswith("d/") for f in files)  # the merged database's own B+tree
  for name in files:
    for damage in ("truncate", "delete"):
      copy = tmp_path / f"{damage}-{name.replace('/', '_')}"
      shutil.copytree(state, copy)
      if damage == "truncate":
        os.truncate(copy / name, os.path.getsize(copy / name) // 2)
      else:
        os.remove(copy / name)
      try:
        reason = ocdbt_files_reason(str(copy), 0)
      except ValueError as e:  # a manifest cut short does not decode: a read failure
        reason = unreadable_reason(e)
      assert reason is not None, (damage, name)
      if os.path.basename(os.path.dirname(name)) == "d":  # a data file: named, and how
        want = "NOT_FOUND" if damage == "delete" else "OUT_OF_RANGE"
        assert reason.startswith(want) and name in reason, (damage, name, reason)


def test_only_the_noise_of_a_failed_restore_is_silenced():
  """After a read failure: the closed loop's errors and the other reads' closed coroutines
  are dropped; a read that failed on its own, or any other error, still shows."""

  def unraisable(error, cause=None, name="_read_array_index_and_device_put"):
    error.__cause__ = cause
    return types.SimpleNamespace(exc_value=error, object=types.SimpleNamespace(__name__=name))

  closed = Exception("Encountered error while reading array index: (slice(0, 8, 1),)")
  assert _dropped_read_of_damaged(unraisable(RuntimeError("Event loop is closed")))
  assert _dropped_read_of_damaged(unraisable(closed, GeneratorExit()))
  failed = ValueError("OUT_OF_RANGE: Error reading")
  assert not _dropped_read_of_damaged(unraisable(closed, failed))
  assert not _dropped_read_of_damaged(unraisable(closed, GeneratorExit(), name="other"))
  assert not _dropped_read_of_damaged(unraisable(RuntimeError("something else")))
  assert not _dropped_read_of_damaged(unraisable(TypeError("a bug"), GeneratorExit()))
