"""The train loop and CLI: metrics, determinism, device counts, errors, the default job."""

import os

import pytest
from conftest import tiny_config, train_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deep_image.train import train_and_evaluate
from deep_image.train.metrics import read_metrics
from experiments.configs import default


def short_config(**overrides):
  return tiny_config(
    **{
      "train.num_steps": 12,
      "train.log_every": 4,
      "train.batch_size": 32,
      "train.eval_every": 8,
      "train.checkpoint_every": 4,
      **overrides,
    }
  )


def test_metrics_file_and_determinism(tmp_path):
  final = train_and_evaluate(short_config(), str(tmp_path / "a"))
  steps, evals = read_metrics(str(tmp_path / "a"))
  assert [r["step"] for r in steps] == [4, 8, 12]
  for r in steps:
    assert {"loss", "top1", "top5", "learning_rate", "images_per_sec", "step_time"} <= set(r)
    assert {"grad_norm", "param_norm", "update_norm"} <= set(r)
    assert r["images_per_sec"] > 0
  # Evaluated during training (train.eval_every=8) and at the end.
  assert [(r["step"], r["split"]) for r in evals] == [(8, "validation"), (12, "validation")]
  assert {k: final[k] for k in evals[-1]} == evals[-1]
  assert final["split"] == "validation" and 0.0 <= final["top1"] <= final["top5"] <= 1.0
  assert final["images_per_sec"] > 0
  # Checkpoints every 4 steps, the latest 3 kept.
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["12", "4", "8"]
  # TensorBoard, read back by TensorBoard's own reader: the same numbers.
  events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  for key in ("loss", "top1", "learning_rate", "images_per_sec", "step_time", "grad_norm"):
    assert f"train/{key}" in tags
  assert [(e.step, e.value) for e in events.Scalars("validation/top1")] == [
    (r["step"], pytest.approx(r["top1"])) for r in evals
  ]
  assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
    [r["loss"] for r in steps]
  )

  train_and_evaluate(short_config(), str(tmp_path / "b"))
  again, _ = read_metrics(str(tmp_path / "b"))
  assert [r["loss"] for r in again] == [r["loss"] for r in steps]  # bit-identical


def test_images_per_sec_leaves_out_compilation(tmp_path):
  train_and_evaluate(short_config(**{"train.log_every": 1}), str(tmp_path))
  steps, _ = read_metrics(str(tmp_path))
  # Step 1 is compilation: it is never timed; every later step is.
  assert "images_per_sec" not in steps[0]
  assert all(r["images_per_sec"] > 0 for r in steps[1:])


@pytest.mark.parametrize(
  "overrides",
  [{"data.augment_on": "device"}, {"data.cache_on_device": True}],
  ids=["augment-on-device", "device-cache"],
)
def test_other_input_paths_train(tmp_path, overrides):
  final = train_and_evaluate(short_config(**overrides), str(tmp_path))
  steps, _ = read_metrics(str(tmp_path))
  assert len(steps) == 3 and all(r["loss"] == r["loss"] for r in steps)
  assert 0.0 <= final["top1"] <= 1.0


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
  with pytest.raises(
    FloatingPointError, match=r"non-finite .*loss=nan.* at step 4; no checkpoint was saved yet"
  ):
    train_and_evaluate(short_config(**{"train.learning_rate": 1e12}), str(tmp_path))


def _cli(tmp_path, *args, xla_flags=""):
  return train_cli(
    tmp_path,
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    *args,
    xla_flags=xla_flags,
  )


def test_cli_respects_xla_flags_device_count(tmp_path):
  run = _cli(tmp_path, xla_flags="--xla_force_host_platform_device_count=1")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "mesh {'data': 1} on 1 cpu devices" in run.stderr


def test_cli_simulates_the_configured_device_count(tmp_path):
  run = _cli(tmp_path, "--config.parallel.num_devices=4", "--config.train.batch_size=16")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "mesh {'data': 4} on 4 cpu devices" in run.stderr
  assert len(read_metrics(str(tmp_path))[0]) == 2


def test_cli_trains_with_two_grain_worker_processes(tmp_path):
  run = _cli(tmp_path, "--config.data.num_workers=2", "--config.train.batch_size=16")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "training input: grain (2 workers" in run.stderr
  assert len(read_metrics(str(tmp_path))[0]) == 2


def test_cli_rejects_a_bad_config_before_training(tmp_path):
  run = _cli(tmp_path, "--config.train.batch_size=60")  # 60 over 8 devices
  assert run.returncode != 0
  assert "train.batch_size=60 does not divide over the 8 devices" in run.stderr


def test_default_job_reaches_97_percent(tmp_path):
  """The README's default job, as is: digits, vgg_small, hybrid, 8 devices."""
  final = train_and_evaluate(default.get_config(), str(tmp_path))
  assert final["top1"] >= 0.97
