"""deep_image.train.sweep and its main experiments.sweep: point names and overrides, resumable
runs, summaries; one real tiny sweep."""

import json
import logging
import os
import subprocess
import sys

import pytest

from deep_image.data import pipeline
from deep_image.train import sweep
from experiments.configs import default, table2

CONFIG = "experiments/configs/default.py"


def test_sweeps_of_the_config_files():
  module = sweep.load_config_module(f"{CONFIG}:tiny")
  assert sweep.sweep_names(module) == ["collectives", "strategies"]
  config = default.get_config("tiny")
  points = sweep.build_points(config, sweep.get_sweep(module, "strategies")(config))
  assert [p["name"] for p in points] == [
    "strategy=gspmd",
    "strategy=data",
    "strategy=lazy",
    "strategy=hybrid",
  ]
  assert [p["config"].parallel.strategy for p in points] == ["gspmd", "data", "lazy", "hybrid"]
  assert config.parallel.strategy == "hybrid"  # points are copies
  names = [p["name"] for p in sweep.build_points(config, default.sweep_collectives(config))]
  assert names == ["collective=butterfly", "collective=ring", "collective=direct", "collective=xla"]
  scales = sweep.build_points(table2.get_config(), table2.sweep_train_scale(table2.get_config()))
  assert [p["name"] for p in scales] == ["train_scale=256", "train_scale=512"]
  # eval_scale is left at 0, so each point is tested at its own training scale.
  assert [
    (p["config"].data.train_scale, pipeline.eval_scale(p["config"].data)) for p in scales
  ] == [(256, 256), (512, 512)]
  with pytest.raises(ValueError, match=r"'nope'.*\['collectives', 'strategies'\]"):
    sweep.get_sweep(module, "nope")


def test_point_names_are_readable_and_filesystem_safe():
  assert sweep.point_name({"parallel.strategy": "lazy"}) == "strategy=lazy"
  assert sweep.point_name({"model.image_size": 16, "data.image_size": 24}) == (
    "model.image_size=16,data.image_size=24"
  )
  name = sweep.point_name({"parallel.mesh": (("data", 4), ("model", 2)), "data.data_dir": "/a b"})
  assert name == "mesh=datax4xmodelx2,data_dir=_a_b" and "/" not in name


def test_bad_overrides_name_the_field():
  config = default.get_config("tiny")
  with pytest.raises(ValueError, match="'parallel.strategyy'"):
    sweep.build_points(config, [{"parallel.strategyy": "lazy"}])
  with pytest.raises(ValueError, match="'train.nope.x'"):
    sweep.build_points(config, [{"train.nope.x": 1}])
  with pytest.raises(ValueError, match="train.num_steps='many'"):
    sweep.build_points(config, [{"train.num_steps": "many"}])
  with pytest.raises(ValueError, match="same name"):
    sweep.build_points(config, [{"seed": 1}, {"seed": 1}])
  with pytest.raises(ValueError, match="parallel.num_devices"):
    sweep.build_points(config, [{"parallel.num_devices": 4}])


class FakeTrain:
  """Writes result.json as the loop does; fails at the point named `fail_at`."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, config, workdir):
    name = os.path.basename(workdir)
    self.calls.append(name)
    if name == self.fail_at:
      raise KeyboardInterrupt  # a killed sweep
    os.makedirs(workdir, exist_ok=True)
    result = {
      "step": config.train.num_steps,
      "split": "validation",
      "top1": len(config.parallel.strategy) / 10,
      "top5": 1.0,
      "images_per_sec": 100.0 + len(name),
    }
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f)
    return result


def _read_summary(root):
  with open(root / "summary.json") as f:
    return json.load(f), (root / "summary.md").read_text()


def test_sweep_runs_each_point_summarizes_and_skips_finished_points(tmp_path, caplog):
  config = default.get_config("tiny")
  points = sweep.build_points(config, default.sweep_strategies(config))
  names = [p["name"] for p in points]
  killed = FakeTrain(fail_at="strategy=lazy")
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(points, str(tmp_path), killed)
  # Killed at the third point: a partial summary of the two finished ones.
  entries, _ = _read_summary(tmp_path)
  assert [e["status"] for e in entries] == ["finished", "finished", "pending", "pending"]
  assert entries[2]["top1"] is None

  fake = FakeTrain()
  with caplog.at_level(logging.INFO):
    sweep.run_sweep(points, str(tmp_path), fake, title="strategies")
  assert fake.calls == ["strategy=lazy", "strategy=hybrid"]  # finished points not retrained
  assert "skipping strategy=gspmd: finished" in caplog.text
  assert "point 4/4: strategy=hybrid" in caplog.text
  entries, md = _read_summary(tmp_path)
  assert [e["name"] for e in entries] == names
  for e, strategy in zip(entries, ["gspmd", "data", "lazy", "hybrid"], strict=True):
    assert e["status"] == "finished" and e["overrides"] == {"parallel.strategy": strategy}
    assert e["workdir"] == str(tmp_path / f"strategy={strategy}")
    assert e["top1"] == len(strategy) / 10 and e["step"] == 12 and e["split"] == "validation"
    assert e["images_per_sec"] == 100.0 + len(e["name"]) and e["top5"] == 1.0
  assert md.startswith("# strategies") and "| strategy=lazy | finished | 12 | 0.4000 |" in md

  again = FakeTrain()
  sweep.run_sweep(points, str(tmp_path), again)
  assert again.calls == []


def test_a_run_without_result_json_is_an_error(tmp_path):
  points = sweep.build_points(default.get_config("tiny"), [{"seed": 1}])
  with pytest.raises(RuntimeError, match="without writing .*seed=1/result.json"):
    sweep.run_sweep(points, str(tmp_path), lambda config, workdir: {"step": 12})


def test_a_preempted_point_stops_the_sweep(tmp_path):
  points = sweep.build_points(default.get_config("tiny"), [{"seed": 1}, {"seed": 2}])
  calls = []

  def preempted(config, workdir):
    calls.append(workdir)
    return {"step": 3, "preempted": True}

  sweep.run_sweep(points, str(tmp_path), preempted)
  assert calls == [str(tmp_path / "seed=1")]  # the second point is left for the rerun
  entries, _ = _read_summary(tmp_path)
  assert [e["status"] for e in entries] == ["pending", "pending"]


def test_cli_reports_an_unknown_sweep():
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.sweep",
      f"--config={CONFIG}:tiny",
      "--sweep=nope",
      "--workdir=x",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode != 0
  assert "--sweep='nope'" in run.stderr and "['collectives', 'strategies']" in run.stderr


def test_real_tiny_sweep_of_two_points(tmp_path):
  """Two 2-step runs of default.py:tiny through the real training loop."""
  config = default.get_config("tiny")
  config.train.num_steps, config.train.log_every = 2, 1
  overrides = [{"parallel.strategy": "data"}, {"parallel.strategy": "hybrid"}]
  points = sweep.build_points(config, overrides)
  try:
    sweep.run_sweep(points, str(tmp_path))
  except RuntimeError as e:
    # The loop's result.json contract may not have landed yet: skip on exactly that.
    if "without writing" in str(e) and os.path.exists(tmp_path / "strategy=data/metrics.jsonl"):
      pytest.skip(f"the training loop does not write result.json yet: {e}")
    raise
  entries, _ = _read_summary(tmp_path)
  assert [e["name"] for e in entries] == ["strategy=data", "strategy=hybrid"]
  for e in entries:
    assert e["status"] == "finished" and e["step"] == 2 and e["split"] == "validation"
    assert 0.0 <= e["top1"] <= e["top5"] <= 1.0 and e["images_per_sec"] > 0
    assert os.path.exists(os.path.join(e["workdir"], "result.json"))

  def must_not_train(config, workdir):
    raise AssertionError(f"retrained the finished {workdir}")

  assert sweep.run_sweep(points, str(tmp_path), must_not_train) == entries
