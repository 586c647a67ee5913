"""Smoke test of experiments/benchmark_checkpoint.py on a tiny model (a script, not a timing)."""

import os
import subprocess
import sys

from conftest import PATIENT_COLLECTIVES


def test_benchmark_checkpoint_reports_every_operation(tmp_path):
  out = tmp_path / "report.md"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.benchmark_checkpoint",
      "--model=vgg_tiny",
      "--image_size=8",
      "--classes=10",
      "--strategy=lazy",
      "--restore_as=hybrid",
      "--repeats=1",
      f"--dir={tmp_path / 'ckpt'}",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    env=dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES),
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  report = out.read_text()
  for row in ("save, blocking", "save, total", "restore, same layout", "restore as `hybrid`"):
    assert row in report
  assert "on 8 cpu devices" in report
