"""Time to accuracy (paper Figure 4): the run clock in metrics.jsonl, continued over a
resume; the table, the figure and the predicted mode from hand-written runs; the errors."""

import json
import os

import jax
import pytest
from conftest import run_cli, tiny_config

from deep_image.config_error import ConfigError
from deep_image.parallel import cost_model
from deep_image.train import time_to_accuracy as tta
from deep_image.train import train_and_evaluate
from deep_image.train.checkpoint import Checkpointer
from deep_image.train.metrics import read_metrics
from deep_image.train.run_config import write_run_config


# --- the clock, from a tiny run and its resume -------------------------------------------
def _clock_config(num_steps):
  return tiny_config(
    **{
      "train.num_steps": num_steps,
      "train.log_every": 1,
      "train.eval_every": 3,
      "train.checkpoint_every": 3,
    }
  )


def test_the_clock_is_written_monotone_and_continued_over_a_resume(tmp_path):
  workdir = str(tmp_path / "run")
  train_and_evaluate(_clock_config(6), workdir)
  train, evals = read_metrics(workdir)
  clock = {r["step"]: r["train_seconds"] for r in train}
  assert sorted(clock) == list(range(1, 7))
  # Step 1 is compilation: the clock starts at its end; then it only grows.
  assert clock[1] == 0.0
  assert all(clock[s + 1] > clock[s] for s in range(1, 6))
  # An evaluation carries the clock of its step (evaluating is not training time), and
  # the checkpoint of a step the same value: what a resume continues from.
  assert [(r["step"], r["train_seconds"]) for r in evals] == [(3, clock[3]), (6, clock[6])]
  # and the size of the mesh that trained it (what the label says, whatever config.json's).
  assert {r["devices"] for r in evals} == {jax.device_count()}
  checkpoints = Checkpointer(workdir, 3, read_only=True)
  try:
    assert checkpoints.train_seconds(6) == clock[6]
  finally:
    checkpoints.close()
  with open(os.path.join(workdir, "result.json")) as f:
    assert json.load(f)["train_seconds"] == clock[6]

  # Train on to step 9: a resume from step 6. Its first step compiles again and is not
  # counted, so it logs the checkpoint's value exactly: the clock neither restarts at 0 nor
  # counts the time the run was down (here, the whole first run's teardown and this start).
  train_and_evaluate(_clock_config(9), workdir)
  train, evals = read_metrics(workdir)
  resumed = {r["step"]: r["train_seconds"] for r in train}
  assert {s: resumed[s] for s in range(1, 7)} == clock  # the kept records, unchanged
  assert resumed[7] == clock[6]
  assert resumed[8] > resumed[7] and resumed[9] > resumed[8]
  assert [r["step"] for r in evals] == [3, 6, 9] and evals[-1]["train_seconds"] == resumed[9]


# --- the table and the figure, from hand-written runs ------------------------------------
def _run(tmp_path, name, evals, *, devices=8, strategy="hybrid", batch=32, split="validation"):
  """A workdir with config.json and a metrics.jsonl of (step, seconds, top1) evaluations."""
  workdir = tmp_path / name
  workdir.mkdir()
  config = tiny_config(
    **{
      "parallel.num_devices": devices,
      "parallel.strategy": strategy,
      "train.batch_size": batch,
    }
  )
  write_run_config(str(workdir), config)
  with open(workdir / "metrics.jsonl", "w") as f:
    for step, seconds, top1 in evals:
      f.write(json.dumps({"step": step, "loss": 1.0, "train_seconds": seconds}) + "\n")
      record = {"step": step, "split": split, "top1": top1, "top5": 1.0}
      f.write(json.dumps({**record, "train_seconds": seconds}) + "\n")
  return str(workdir)


@pytest.fixture
def runs(tmp_path):
  one = _run(
    tmp_path,
    "one",
    [(100, 50.0, 0.5), (200, 100.0, 0.79), (300, 150.0, 0.81)],
    devices=1,
    strategy="data",
  )
  eight = _run(tmp_path, "eight", [(100, 8.0, 0.6), (200, 16.0, 0.85), (300, 24.0, 0.9)])
  never = _run(
    tmp_path,
    "never",
    [(100, 4.0, 0.3), (200, 8.0, 0.7), (300, 12.0, 0.65)],
    devices=4,
    strategy="lazy",
  )
  return one, eight, never


def test_the_table_gives_exact_steps_seconds_and_speedups(runs):
  reached = [tta.reach(run, 0.8) for run in tta.read_runs(list(runs))]
  one, eight, never = reached
  assert (one.step, one.seconds) == (300, 150.0)
  assert (eight.step, eight.seconds) == (200, 16.0)
  assert not never.reached
  assert (never.best_top1, never.best_step, never.best_seconds) == (0.7, 200, 8.0)
  assert tta.speedups(reached) == [(1.0, 1.0), (150.0 / 16.0, 1.5), (None, None)]
  text = tta.table(reached)
  rows = text.splitlines()
  assert len(rows) == 5 and "steps to 0.8" in rows[0]
  assert f"| {runs[0]} | 1 | data | 300 | 150.0 | 1.00x | 1.00x |" == rows[2]
  assert f"| {runs[1]} | 8 | hybrid | 200 | 16.0 | 9.38x | 1.50x |" == rows[3]
  assert "not reached (best 0.7000 at step 200, 8.0 s)" in rows[4] and rows[4].endswith("| - | - |")
  # The target is reached at exactly the target value too.
  assert tta.reach(tta.read_run(runs[0]), 0.81).step == 300


def test_the_label_counts_the_devices_the_eval_records_name(tmp_path):
  # A GPU run's config.json says mesh (('data', -1),): the records say how many it used.
  workdir = _run(tmp_path, "gpus", [(100, 5.0, 0.5), (200, 9.0, 0.9)], devices=1)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    records = [json.loads(line) for line in f]
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps({**r, "devices": 32} if "top1" in r else r) + "\n")
  run = tta.read_run(workdir)
  assert (run.devices, run.label) == (32, "32 devices, hybrid")


def test_the_figure_has_one_curve_per_run(runs, tmp_path):
  reached = [tta.reach(run, 0.8) for run in tta.read_runs(list(runs))]
  out = tmp_path / "fig4.png"
  fig = tta.figure(reached, out_path=str(out))
  assert out.stat().st_size > 0
  (ax,) = fig.axes
  curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
  assert [c.get_label() for c in curves] == [
    "1 device, data",
    "8 devices, hybrid",
    "4 devices, lazy",
  ]
  assert list(curves[1].get_xdata()) == [8.0, 16.0, 24.0]
  assert list(curves[1].get_ydata()) == pytest.approx([60.0, 85.0, 90.0])
  assert ax.get_xscale() == "log"  # 150 s against 12 s: a spread over LOG_SPREAD
  close = tta.figure([reached[1], reached[2]])
  assert close.axes[0].get_xscale() == "linear"


def test_predicted_mode_is_labelled_predicted(runs, tmp_path):
  first = tta.reach(tta.read_run(runs[0]), 0.8)
  predicted = tta.predict(first, "minwa", [1, 2, 4, 8, 16, 32])
  assert [p.gpus for p in predicted] == [1, 2, 4, 8, 16, 32]
  assert all(p.steps == 300 and p.seconds == pytest.approx(300 * p.step_s) for p in predicted)
  assert all(p.label.startswith("predicted: ") and "(minwa)" in p.label for p in predicted)
  # The cost model's step for the run's model, strategy, collective and B / G images each.
  config = first.run.config
  want = cost_model.predict(
    config.model.name,
    "data",
    config.parallel.collective,
    8,
    32 // 8,
    "minwa",
    cost_model.StepSetup.from_config(config),
  )
  assert predicted[3].step_s == want.step_s and predicted[3].strategy == "data"
  text = tta.predicted_table(predicted, 0.8)
  assert text.splitlines()[0].startswith("| predicted: GPUs (minwa)")
  assert len(text.splitlines()) == 2 + 6
  fig = tta.figure([first], predicted, str(tmp_path / "predicted.png"))
  ax = fig.axes[0]
  curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
  assert len(curves) == 6 and all("predicted" in c.get_label() for c in curves)
  assert "predicted" in ax.get_title() and "predicted" in ax.get_xlabel()
  assert list(curves[0].get_xdata()) == pytest.approx(
    [s * predicted[0].step_s for s in (100, 200, 300)]
  )


# --- errors --------------------------------------------------------------------------------
def test_errors_name_the_flag_or_the_workdir(runs, tmp_path):
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ConfigError, match=r"--target="):
      tta.check_target(bad)
  tta.check_target(1.0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"--workdirs: .*empty.*not the --workdir of a"):
    tta.read_run(str(tmp_path / "empty"))
  with pytest.raises(ConfigError, match=r"--workdirs: .*missing.* is not a directory"):
    tta.read_run(str(tmp_path / "missing"))
  no_evals = _run(tmp_path, "no_evals", [(100, 1.0, 0.5)], split="train_subset")
  with pytest.raises(ConfigError, match=r"no_evals.*no eval records on split 'validation'"):
    tta.read_run(no_evals)
  assert tta.read_run(no_evals, "train_subset").steps == (100,)
  never = tta.reach(tta.read_run(runs[2]), 0.8)
  with pytest.raises(ConfigError, match=r"--predict=minwa: the first run .* never reached"):
    tta.predict(never, "minwa", [1, 2])
  first = tta.reach(tta.read_run(runs[0]), 0.8)
  with pytest.raises(ConfigError, match=r"--predict='nowhere' is not a cluster preset"):
    tta.predict(first, "nowhere", [1])
  with pytest.raises(ConfigError, match=r"--gpus: 3 GPUs: .*train.batch_size=32"):
    tta.predict(first, "minwa", [1, 3])


def test_the_main_prints_the_table_and_one_line_errors(runs, tmp_path):
  out = tmp_path / "fig.png"
  done = run_cli(
    "experiments.time_to_accuracy",
    f"--workdirs={runs[0]},{runs[1]}",
    "--target=0.8",
    f"--out={out}",
    "--predict=minwa",
    "--gpus=1,8,32",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| 200 | 16.0 | 9.38x | 1.50x |" in done.stdout
  assert "| predicted: GPUs (minwa)" in done.stdout and "(predicted)" in done.stdout
  assert out.stat().st_size > 0
  done = run_cli("experiments.time_to_accuracy", f"--workdirs={runs[0]}", "--target=2")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("config error: --target=2.0")
