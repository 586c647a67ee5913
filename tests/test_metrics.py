"""metrics.jsonl and TensorBoard files across resumes, the tolerant reader, the training curves."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deep_image.train import curves, metrics
from deep_image.train.metrics import MetricsWriter, read_metrics


def write_run(workdir, steps, *, resume_step=0, loss_offset=0.0, eval_every=5):
  """Train records at `steps` (loss = offset + 1/step), a validation eval every `eval_every`."""
  with MetricsWriter(str(workdir), resume_step=resume_step) as writer:
    for step in steps:
      writer.write_train(step, {"loss": loss_offset + 1.0 / step, "learning_rate": 0.1})
      if step % eval_every == 0:
        writer.write_eval(step, {"split": "validation", "top1": step / 100, "top5": 0.9})


def jsonl_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tb_scalars(workdir):
  """{tag: [(step, value), ...]} as TensorBoard's own (Python) reader shows it."""
  accumulator = EventAccumulator(os.path.join(workdir, "tensorboard"))
  accumulator.Reload()
  return {
    tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
    for tag in accumulator.Tags()["scalars"]
  }


def test_records_and_tensorboard_scalars(tmp_path):
  with MetricsWriter(str(tmp_path)) as writer:
    writer.write_train(3, {"loss": np.float32(0.5), "top1": 0.25, "images_per_sec": 1e3})
    writer.write_eval(3, {"split": "validation", "top1": 0.75, "top5": 1.0, "count": 8})
    with pytest.raises(ValueError, match="split"):
      writer.write_train(4, {"split": "validation", "top1": 0.5})
    with pytest.raises(ValueError, match="split"):
      writer.write_eval(4, {"top1": 0.5})
  assert jsonl_records(tmp_path) == [
    {"step": 3, "loss": 0.5, "top1": 0.25, "images_per_sec": 1e3},
    {"step": 3, "split": "validation", "top1": 0.75, "top5": 1.0, "count": 8},
  ]
  train, evals = read_metrics(str(tmp_path))
  assert [r["step"] for r in train] == [3] and [r["split"] for r in evals] == ["validation"]
  assert tb_scalars(tmp_path) == {
    "train/loss": [(3, 0.5)],
    "train/top1": [(3, 0.25)],
    "train/images_per_sec": [(3, 1e3)],
    "validation/top1": [(3, 0.75)],
    "validation/top5": [(3, 1.0)],
    "validation/count": [(3, 8.0)],
  }


def test_resume_keeps_each_step_once(tmp_path):
  write_run(tmp_path, range(1, 11))  # killed run: logged steps 1..10, evals at 5 and 10
  write_run(tmp_path, [7, 8], resume_step=6, loss_offset=100.0)  # restored the step-6 checkpoint
  records = jsonl_records(tmp_path)
  assert [(r["step"], "split" in r) for r in records] == [
    *[(s, False) for s in range(1, 6)],
    (5, True),
    (6, False),
    (7, False),
    (8, False),
  ]
  assert [r["loss"] for r in records if r["step"] > 6] == [100.0 + 1 / 7, 100.0 + 1 / 8]

  # TensorBoard's reader drops every point past step 6 of the first event file (the
  # purge_step START event), the eval at step 10 included though no new one replaced it.
  scalars = tb_scalars(tmp_path)
  assert len(os.listdir(tmp_path / "tensorboard")) == 2  # append-only: one file per run
  expected_loss = [(s, 1.0 / s) for s in range(1, 7)] + [(7, 100 + 1 / 7), (8, 100 + 1 / 8)]
  assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in expected_loss]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in expected_loss])
  assert scalars["validation/top1"] == [(5, pytest.approx(0.05))]


def test_fresh_run_empties_previous_metrics(tmp_path):
  write_run(tmp_path, range(1, 11))
  # As if written long ago (event file names start with the creation second).
  (old,) = os.listdir(tmp_path / "tensorboard")
  os.rename(tmp_path / "tensorboard" / old, tmp_path / "tensorboard" / "events.out.tfevents.1")
  write_run(tmp_path, [1, 2], loss_offset=100.0)
  assert [r["step"] for r in jsonl_records(tmp_path)] == [1, 2]
  assert len(os.listdir(tmp_path / "tensorboard")) == 1
  assert tb_scalars(tmp_path)["train/loss"] == [(1, 101.0), (2, 100.5)]


def test_records_reach_disk_before_close(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write_train(1, {"loss": 2.0})
  assert jsonl_records(tmp_path) == [{"step": 1, "loss": 2.0}]  # what a SIGKILL would leave
  writer.close()
  writer.close()  # idempotent


def test_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
  write_run(tmp_path, range(1, 5))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"loss": 0.1, "st')  # killed mid-write
  train, evals = read_metrics(str(tmp_path))
  assert [r["step"] for r in train] == [1, 2, 3, 4] and evals == []
  write_run(tmp_path, [5], resume_step=4, eval_every=100)
  assert [r["step"] for r in jsonl_records(tmp_path)] == [1, 2, 3, 4, 5]


def test_unparsable_middle_line_names_file_and_line(tmp_path):
  write_run(tmp_path, range(1, 3))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2: unparsable"):
    read_metrics(str(tmp_path))
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2: unparsable"):
    MetricsWriter(str(tmp_path), resume_step=1)  # would silently lose records otherwise


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  write_run(tmp_path / "run", range(1, 6))
  assert not (tmp_path / "run").exists()


def test_plot_two_runs(tmp_path):
  write_run(tmp_path / "a" / "run", range(1, 21))
  write_run(tmp_path / "b" / "run", range(1, 11), loss_offset=0.5)
  assert curves.run_labels([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]) == [
    "a/run",
    "b/run",
  ]
  out = tmp_path / "curves.png"
  curves.plot_runs([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")], str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_missing_metrics_names_the_directory(tmp_path):
  write_run(tmp_path / "good", range(1, 6))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in workdir .*empty"):
    curves.plot_runs([str(tmp_path / "good"), str(tmp_path / "empty")], str(tmp_path / "x.png"))
  assert not (tmp_path / "x.png").exists()


def test_plot_command_line(tmp_path):
  for name in ("a", "b", "c"):
    write_run(tmp_path / name, range(1, 11))
  out = tmp_path / "curves.png"
  dirs = [str(tmp_path / name) for name in ("a", "b", "c")]
  result = subprocess.run(
    [sys.executable, "-m", "experiments.plot", f"--workdir={dirs[0]},{dirs[1]}"]
    + [f"--workdir={dirs[2]}", f"--out={out}"],
    check=True,
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert result.stdout.strip() == f"wrote {out}: a, b, c"
  assert out.stat().st_size > 10_000
