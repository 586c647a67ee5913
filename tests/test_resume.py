"""Runs that never lose work: kill -9 / SIGTERM and resume exactly, cut-off saves, NaN stops.

The central test runs the tiny job once uninterrupted, then again interrupted
three ways (SIGTERM, SIGKILL during a checkpoint save, SIGKILL at a random
step) and resumed each time with the same command: metrics.jsonl must then
hold every step exactly once, with bit-identical losses.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import logged_steps, subprocess_env
from conftest import tiny_config as tiny
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deep_image.config_error import ConfigError
from deep_image.data.sources import make_source
from deep_image.train import train_and_evaluate
from deep_image.train.checkpoint import Checkpointer
from deep_image.train.metrics import read_metrics
from deep_image.train.train_input import TrainInput

NUM_STEPS = 24
JOB = (
  "--config=experiments/configs/default.py:tiny",
  f"--config.train.num_steps={NUM_STEPS}",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=4",
  "--config.train.eval_every=12",
  "--config.train.keep_checkpoints=2",
)


def _command(workdir):
  return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *JOB]


def _env():
  return subprocess_env()


def _run(workdir, timeout=300):
  run = subprocess.run(
    _command(workdir), capture_output=True, text=True, env=_env(), timeout=timeout
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return run


def _start(workdir, log):
  return subprocess.Popen(_command(workdir), stdout=log, stderr=log, env=_env())


def _train_losses(workdir):
  train, _ = read_metrics(str(workdir))
  return [(r["step"], r["loss"]) for r in train]


def _wait_for(predicate, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.005)
  raise TimeoutError("condition not reached")


def _saving(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any("tmp" in name for name in os.listdir(ckpt))


def test_interrupted_runs_resume_exactly(tmp_path):
  reference = tmp_path / "reference"
  _run(reference)
  want = _train_losses(reference)
  assert [s for s, _ in want] == list(range(1, NUM_STEPS + 1))
  with open(reference / "result.json") as f:
    want_result = json.load(f)

  work = tmp_path / "interrupted"
  rng = random.Random(0)
  log_path = tmp_path / "interrupted.log"
  with open(log_path, "w") as log:
    # 1. SIGTERM (preemption) at a random step: a checkpoint, exit status 0.
    proc = _start(work, log)
    stop_at = rng.randint(2, 8)
    _wait_for(lambda: logged_steps(work) >= stop_at, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    preempted = Checkpointer(str(work), 2).latest_step()
    assert preempted is not None and preempted >= stop_at

    # 2. SIGKILL while a checkpoint is being written.
    proc = _start(work, log)
    assert _wait_for(lambda: _saving(work), proc), "never saw a save in progress"
    proc.kill()
    proc.wait()

    # 3. SIGKILL at a random moment.
    proc = _start(work, log)
    kill_at = rng.randint(preempted + 2, NUM_STEPS - 2)
    _wait_for(lambda: logged_steps(work) >= kill_at, proc)
    time.sleep(rng.random() * 0.5)
    proc.kill()
    proc.wait()

  run = _run(work)
  assert "resumed from step" in run.stderr
  log_text = log_path.read_text()
  assert "preempted: checkpoint of step" in log_text
  assert log_text.count("resumed from step") >= 2
  assert _train_losses(work) == want  # every step once, bit-identical
  with open(work / "result.json") as f:
    got_result = json.load(f)
  for key in ("top1", "top5", "count", "step"):
    assert got_result[key] == want_result[key]
  assert not any("tmp" in n for n in os.listdir(work / "checkpoints"))


def test_a_save_cut_off_mid_write_is_never_restored(tmp_path, caplog):
  config = tiny(**{"train.num_steps": 8, "train.checkpoint_every": 4, "train.log_every": 1})
  train_and_evaluate(config, str(tmp_path))
  os.remove(tmp_path / "result.json")  # as if the run had died after its last save
  ckpt = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpt)) == ["4", "8"]
  # What a SIGKILL leaves mid-save: the temporary folder Orbax renames only when complete.
  partial = ckpt / "12.orbax-checkpoint-tmp-1764000000000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 7)

  caplog.set_level("INFO")
  result = train_and_evaluate(
    tiny(**{"train.num_steps": 12, "train.checkpoint_every": 4, "train.log_every": 1}),
    str(tmp_path),
  )
  assert "resumed from step 8" in caplog.text
  assert result["step"] == 12
  assert not partial.exists()
  steps = [r["step"] for r in read_metrics(str(tmp_path))[0]]
  assert steps == list(range(1, 13))


def test_a_finished_workdir_is_not_trained_again(tmp_path, caplog):
  config = tiny(**{"train.num_steps": 4})
  first = train_and_evaluate(config, str(tmp_path))
  caplog.set_level("INFO")
  again = train_and_evaluate(config, str(tmp_path))
  assert again == first
  assert "finished run" in caplog.text
  with pytest.raises(ConfigError, match=r"train.num_steps=2 is below step 4 of the latest"):
    train_and_evaluate(tiny(**{"train.num_steps": 2}), str(tmp_path))


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny(
    **{
      "train.learning_rate": 1e6,
      "train.warmup_steps": 4,
      "train.checkpoint_every": 2,
      "train.log_every": 1,
      "train.num_steps": 40,
    }
  )
  with pytest.raises(
    FloatingPointError, match=r"at step (\d+); the last good checkpoint is step"
  ) as e:
    train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  bad_step = int(message.split("at step ")[1].split(";")[0])
  good = int(message.split("checkpoint is step ")[1].split(" ")[0])
  assert 0 < good < bad_step
  assert (tmp_path / "checkpoints" / str(good)).is_dir()
  losses = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path))[0]}
  assert all(abs(losses[s]) < float("inf") for s in range(1, good + 1))


def test_a_run_continues_under_another_strategy_and_device_count(tmp_path, caplog):
  # lazy on 8 devices for 4 steps, then 4 more steps as gspmd on 4 devices, same workdir.
  train_and_evaluate(
    tiny(**{"train.num_steps": 4, "parallel.strategy": "lazy", "train.log_every": 1}),
    str(tmp_path),
  )
  caplog.set_level("INFO")
  result = train_and_evaluate(
    tiny(
      **{
        "train.num_steps": 8,
        "parallel.strategy": "gspmd",
        "parallel.mesh": (("data", 4),),
        "train.log_every": 1,
      }
    ),
    str(tmp_path),
  )
  assert "resumed from step 4" in caplog.text
  assert "restoring the lazy layout on 8 devices into gspmd on 4 devices" in caplog.text
  train, evals = read_metrics(str(tmp_path))
  assert [r["step"] for r in train] == list(range(1, 9))
  assert [r["step"] for r in evals] == [4, 8] and result["step"] == 8
  # The restored weights are the trained ones: the loss goes on from where it was.
  assert abs(train[4]["loss"] - train[3]["loss"]) < 0.5


def test_a_run_resumed_on_fewer_devices_reads_the_same_stream(tmp_path):
  """8 devices for 3 steps, then 4 devices to step 6: the losses of 8 devices from the start
  (the input resumes exactly; the state changes layout; reductions reorder, hence rtol)."""
  job = {"train.num_steps": 6, "train.log_every": 1}
  train_and_evaluate(tiny(**job), str(tmp_path / "whole"))
  train_and_evaluate(tiny(**{**job, "train.num_steps": 3}), str(tmp_path / "run"))
  train_and_evaluate(tiny(**job, **{"parallel.mesh": (("data", 4),)}), str(tmp_path / "run"))
  got, _ = read_metrics(str(tmp_path / "run"))
  want, _ = read_metrics(str(tmp_path / "whole"))
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4)


def test_a_stream_positioned_at_a_step_saves_and_resumes_its_absolute_position():
  """start_at(3), 2 batches, save; a fresh input restored from that state reads batch 5 of
  the stream, as an input read from the start does (a state relative to the start_at
  offset would replay batch 2)."""
  config = tiny()
  sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
  source = make_source(config.data, "train")

  def labels(batch):
    return np.asarray(batch[1])

  whole = TrainInput(config, sharding, source)
  want = [labels(next(whole)) for _ in range(6)]
  moved = TrainInput(config, sharding, source)
  assert moved.start_at(3)
  np.testing.assert_array_equal(labels(next(moved)), want[3])
  next(moved)
  restored = TrainInput(config, sharding, source)
  restored.set_state(moved.get_state())
  np.testing.assert_array_equal(labels(next(restored)), want[5])
