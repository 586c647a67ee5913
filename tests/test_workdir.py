"""The workdir is the user's data: one writer, nothing overwritten by a failed start, a
preemption that claims only saves it made, and a full disk as one line.

The lock tests run trainers as subprocesses (as tests/test_resume.py does): two trainers
on one workdir, a SIGKILLed holder, and `experiments.evaluate` reading a held workdir.
"""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest
from conftest import logged_steps, run_cli, subprocess_env
from conftest import tiny_config as tiny

from deep_image.config_error import ConfigError
from deep_image.train import run_config, train_and_evaluate
from deep_image.train import workdir as workdir_layout
from deep_image.train.checkpoint import Checkpointer, IncompatibleCheckpoint
from deep_image.train.metrics import MetricsWriter, read_metrics
from deep_image.train.workdir import OutOfSpace, WorkdirBusy, WorkdirLock

JOB = (
  "--config=experiments/configs/default.py:tiny",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=4",
  "--config.train.eval_every=0",
)


def _command(workdir, num_steps):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    f"--workdir={workdir}",
    *JOB,
    f"--config.train.num_steps={num_steps}",
  ]


def _env():
  return subprocess_env()


def _wait_for_steps(workdir, steps, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while logged_steps(workdir) < steps:
    assert proc.poll() is None, "the trainer exited early"
    assert time.monotonic() < deadline, "the trainer never reached the step"
    time.sleep(0.02)


def _train_steps(workdir):
  return [r["step"] for r in read_metrics(str(workdir))[0]]


# --- one writer per workdir ----------------------------------------------------------
def test_a_second_trainer_stops_at_once_naming_the_holder(tmp_path):
  work = tmp_path / "run"
  num_steps = 48
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(_command(work, num_steps), stdout=log, stderr=log, env=_env())
    try:
      _wait_for_steps(work, 2, first)
      second = subprocess.run(
        _command(work, num_steps), capture_output=True, text=True, env=_env(), timeout=120
      )
      first_still_running = first.poll() is None
      assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
      if first.poll() is None:
        first.kill()
  assert first_still_running, "the first trainer ended before the second reached the lock"
  assert second.returncode == 1
  last_line = second.stderr.strip().splitlines()[-1]
  assert last_line.startswith("config error: --workdir=")
  assert f"pid {first.pid}," in last_line and "host " in last_line and "started " in last_line
  assert "Traceback" not in second.stderr
  # The first run is intact: every step once, its result written, no lock left behind.
  assert _train_steps(work) == list(range(1, num_steps + 1))
  assert (work / "result.json").exists()
  assert not (work / workdir_layout.LOCK_NAME).exists()


def test_a_sigkilled_holder_never_blocks_and_the_rerun_resumes(tmp_path):
  work = tmp_path / "run"
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(_command(work, 12), stdout=log, stderr=log, env=_env())
    _wait_for_steps(work, 5, proc)
    deadline = time.monotonic() + 120
    while not (work / "checkpoints" / "4").is_dir():  # committed (Orbax renames it then)
      assert proc.poll() is None and time.monotonic() < deadline
      time.sleep(0.02)
    proc.kill()
    proc.wait()
  assert (work / workdir_layout.LOCK_NAME).exists()  # left behind, but no longer locked
  rerun = subprocess.run(
    _command(work, 12), capture_output=True, text=True, env=_env(), timeout=300
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step" in rerun.stderr
  assert _train_steps(work) == list(range(1, 13))
  assert not (work / workdir_layout.LOCK_NAME).exists()


def test_readers_work_while_a_trainer_holds_the_workdir(tmp_path):
  work = tmp_path / "run"
  train_and_evaluate(tiny(**{"train.num_steps": 4, "train.log_every": 1}), str(work))
  with WorkdirLock(str(work)):  # as a trainer holds it
    with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()},"):
      train_and_evaluate(tiny(**{"train.num_steps": 8}), str(work))
    evaluation = run_cli(
      "experiments.evaluate", f"--workdir={work}", f"--out={tmp_path / 'eval.json'}"
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert (tmp_path / "eval.json").exists()
    assert read_metrics(str(work))[0]
  assert _train_steps(work) == [1, 2, 3, 4]  # the refused trainer wrote nothing


# --- a failed start overwrites nothing -------------------------------------------------
def _hashes(root):
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.parametrize(
  "overrides,error,message",
  [
    (
      {"train.num_steps": 8, "model.num_classes": 12},
      IncompatibleCheckpoint,
      r"model.num_classes=10, but the config says model.num_classes=12",
    ),
    ({"train.num_steps": 2}, ConfigError, r"train.num_steps=2 is below step 4"),
  ],
)
def test_a_refused_resume_leaves_the_workdir_byte_for_byte(tmp_path, overrides, error, message):
  work = str(tmp_path / "run")
  train_and_evaluate(tiny(**{"train.num_steps": 4}), work)
  before = _hashes(work)
  assert "config.json" in before and "result.json" in before
  with pytest.raises(error, match=message) as e:
    train_and_evaluate(tiny(**overrides), work)
  assert "\n" not in str(e.value)
  assert _hashes(work) == before


# --- preemption tells the truth --------------------------------------------------------
def test_a_sigterm_after_the_save_decision_is_acted_on_at_the_next_step(
  tmp_path, monkeypatch, caplog
):
  # SIGTERM lands at step 3 after the loop decided not to save (it logs the step then);
  # the claim in the log and the return value must name a checkpoint that exists.
  write_train = MetricsWriter.write_train

  def write_train_then_sigterm(self, step, record):
    write_train(self, step, record)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(MetricsWriter, "write_train", write_train_then_sigterm)
  caplog.set_level("INFO")
  config = tiny(**{"train.num_steps": 12, "train.checkpoint_every": 8, "train.log_every": 1})
  result = train_and_evaluate(config, str(tmp_path))
  assert result == {"step": 4, "preempted": True}
  assert "preempted: checkpoint of step 4 saved" in caplog.text
  assert Checkpointer(str(tmp_path), 2, read_only=True).latest_step() == 4
  assert (tmp_path / "checkpoints" / "4").is_dir()


# --- out of space ----------------------------------------------------------------------
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  save_json = ocp.JsonCheckpointHandler._save_fn

  def full_at_step_8(self, item, directory):
    if isinstance(item, dict) and item.get("step") == 8:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return save_json(self, item, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_at_step_8)
  # The subprocess JOB's settings.
  config = tiny(
    **{
      "train.num_steps": 12,
      "train.checkpoint_every": 4,
      "train.log_every": 1,
      "train.eval_every": 0,
    }
  )
  with pytest.raises(OutOfSpace) as e:
    train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert f"no space left on the device of {tmp_path / 'checkpoints'}" in message
  assert "bytes free" in message
  assert f"the last complete checkpoint is step 4 ({tmp_path / 'checkpoints' / '4'}), kept" in (
    message
  )
  # The checkpoint of step 4 restores: rerun as a new process, as a user would (this
  # one's abandoned write of step 8 is left to the rerun's clean-up of unfinished saves).
  rerun = subprocess.run(
    _command(tmp_path, 12), capture_output=True, text=True, env=_env(), timeout=300
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 4" in rerun.stderr
  assert _train_steps(tmp_path) == list(range(1, 13))


def test_a_full_disk_at_the_config_write_is_one_line(tmp_path, monkeypatch):
  replace = os.replace

  def full_for_the_config(src, dst):
    if str(dst).endswith(workdir_layout.CONFIG_NAME):
      raise OSError(errno.ENOSPC, "No space left on device")
    return replace(src, dst)

  monkeypatch.setattr(run_config.os, "replace", full_for_the_config)
  with pytest.raises(OutOfSpace, match=r"no space left on the device of .*config.json writing"):
    train_and_evaluate(tiny(**{"train.num_steps": 4}), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # no config.json, no .tmp, no lock


def test_preflight_refuses_a_workdir_without_room_for_one_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_layout, "free_bytes", lambda path: 1000)
  with pytest.raises(ConfigError, match=r"has 1000 bytes free on its device, fewer than the"):
    train_and_evaluate(tiny(**{"train.num_steps": 4}), str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing written
