"""launch.local: one job as 2 processes on this machine, through jax.distributed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PATIENT_COLLECTIVES, TINY_JOB_FLAGS, train_cli

JOB = (
  "--config.train.num_steps=6",
  "--config.train.log_every=3",
  "--config.train.batch_size=16",
  "--config.train.eval_batch_size=32",
)


def _losses(workdir) -> list[float]:
  with open(workdir / "metrics.jsonl") as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("strategy", ["gspmd", "data", "lazy", "hybrid"])
def test_two_processes_train_one_job_like_one_process(tmp_path, strategy):
  env = dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES)  # each process simulates its devices
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      "--",
      f"--workdir={tmp_path / 'two'}",
      "--config.parallel.num_devices=4",
      *TINY_JOB_FLAGS,
      *JOB,
      f"--config.parallel.strategy={strategy}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=400,
  )
  logs = [(tmp_path / "two" / f"process_{i}.log").read_text() for i in range(2)]
  assert run.returncode == 0, run.stderr[-1500:] + logs[0][-1500:] + logs[1][-1500:]
  for i, log in enumerate(logs):
    assert f"distributed: process {i} of 2" in log
    assert "mesh {'data': 4} on 4 cpu devices" in log
  # Both processes evaluate the same global arrays: the same final line.
  finals = [next(line for line in log.splitlines() if "validation: top1" in line) for log in logs]
  assert finals[0].split("validation:")[1] == finals[1].split("validation:")[1]
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r.get("step") for r in records] == [3, 6, 6] and records[-1]["split"] == "validation"
  # 2 processes x 4 devices read the global sample stream one process x 8 devices reads:
  # the same batches, augmentations and dropout masks, so the same losses.
  one = train_cli(
    tmp_path / "one",
    "--config.parallel.num_devices=8",
    *JOB,
    f"--config.parallel.strategy={strategy}",
  )
  assert one.returncode == 0, one.stderr[-2000:]
  two_losses, one_losses = _losses(tmp_path / "two"), _losses(tmp_path / "one")
  assert len(one_losses) == 2, one_losses
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)


def test_a_failing_process_fails_the_launch(tmp_path):
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      "--",
      f"--workdir={tmp_path}",
      "--config.parallel.num_devices=3",
    ],
    capture_output=True,
    text=True,
    env=dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES),
    timeout=200,
  )
  assert run.returncode != 0
  assert "parallel.num_devices=3 does not divide over parallel.num_processes=2" in (
    (tmp_path / "process_0.log").read_text()
  )


def test_a_two_process_run_resumes_on_one_process_exactly(tmp_path):
  """2 processes x 4 devices for 3 steps, then 1 process x 8 devices to step 6 in the same
  workdir: the same losses as 1 x 8 from the start (the global stream resumes at step 3)."""
  env = dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES)
  first = [f"--workdir={tmp_path / 'run'}", "--config.parallel.num_devices=4", *TINY_JOB_FLAGS]
  job = [a for a in JOB if "num_steps" not in a and "log_every" not in a]
  run = subprocess.run(
    [sys.executable, "-m", "launch.local", "--num_processes=2", "--", *first, *job,
     "--config.train.num_steps=3", "--config.train.log_every=1"],
    capture_output=True, text=True, env=env, timeout=400,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-2000:]
  later = ("--config.train.num_steps=6", "--config.train.log_every=1", *job)
  resumed = train_cli(tmp_path / "run", "--config.parallel.num_devices=8", *later)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step 3" in resumed.stderr
  assert "resumes at global batch 3 of the same stream" in resumed.stderr
  whole = train_cli(tmp_path / "whole", "--config.parallel.num_devices=8", *later)
  assert whole.returncode == 0, whole.stderr[-2000:]
  got, want = _losses(tmp_path / "run"), _losses(tmp_path / "whole")
  assert len(got) == len(want) == 6
  np.testing.assert_allclose(got, want, rtol=1e-5)
