"""The train loop and CLI: metrics, determinism, device counts, errors, the default job."""

import json
import os
import subprocess
import sys

import pytest
from conftest import PATIENT_COLLECTIVES, TINY_JOB_FLAGS

from deep_image.train import train_and_evaluate
from experiments.configs import default


def short_config(**overrides):
  c = default.get_config()
  c.model.name = "vgg_tiny"
  c.data.image_size = c.model.image_size = c.data.augment.crop_size = 16
  c.data.train_scale = c.data.eval_scale = 18
  c.train.num_steps, c.train.log_every, c.train.batch_size = 12, 4, 32
  c.train.warmup_steps = 2
  for key, value in overrides.items():
    *sections, field = key.split(".")
    target = c
    for name in sections:
      target = target[name]
    target[field] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_metrics_file_and_determinism(tmp_path):
  final = train_and_evaluate(short_config(), str(tmp_path / "a"))
  records = read_metrics(tmp_path / "a")
  steps = [r for r in records if "split" not in r]
  assert [r["step"] for r in steps] == [4, 8, 12]
  for r in steps:
    assert {"step", "loss", "top1", "top5", "learning_rate", "images_per_sec"} <= set(r)
    assert r["images_per_sec"] > 0
  assert records[-1] == final
  assert final["split"] == "validation" and 0.0 <= final["top1"] <= final["top5"] <= 1.0

  train_and_evaluate(short_config(), str(tmp_path / "b"))
  again = read_metrics(tmp_path / "b")
  assert [r["loss"] for r in again[:-1]] == [r["loss"] for r in steps]  # bit-identical


@pytest.mark.parametrize(
  "overrides",
  [{"data.augment_on": "device"}, {"data.cache_on_device": True}],
  ids=["augment-on-device", "device-cache"],
)
def test_other_input_paths_train(tmp_path, overrides):
  final = train_and_evaluate(short_config(**overrides), str(tmp_path))
  steps = [r for r in read_metrics(tmp_path) if "split" not in r]
  assert len(steps) == 3 and all(r["loss"] == r["loss"] for r in steps)
  assert 0.0 <= final["top1"] <= 1.0


def test_crop_and_model_size_must_agree(tmp_path):
  with pytest.raises(ValueError, match="model.image_size=16 must equal data.augment.crop_size=12"):
    train_and_evaluate(short_config(**{"data.augment.crop_size": 12}), str(tmp_path))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
  with pytest.raises(FloatingPointError, match="loss is .* at step 4"):
    train_and_evaluate(short_config(**{"train.learning_rate": 1e12}), str(tmp_path))


def _cli(tmp_path, *args, xla_flags=""):
  env = dict(os.environ, XLA_FLAGS=f"{PATIENT_COLLECTIVES} {xla_flags}")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      f"--workdir={tmp_path}",
      *TINY_JOB_FLAGS,
      "--config.train.num_steps=2",
      "--config.train.log_every=1",
      *args,
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )


def test_cli_respects_xla_flags_device_count(tmp_path):
  run = _cli(tmp_path, xla_flags="--xla_force_host_platform_device_count=1")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "mesh {'data': 1} on 1 cpu devices" in run.stderr


def test_cli_simulates_the_configured_device_count(tmp_path):
  run = _cli(tmp_path, "--config.parallel.num_devices=4", "--config.train.batch_size=16")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "mesh {'data': 4} on 4 cpu devices" in run.stderr
  assert len(read_metrics(tmp_path)) == 3  # 2 steps + the final record


def test_cli_trains_with_two_grain_worker_processes(tmp_path):
  run = _cli(tmp_path, "--config.data.num_workers=2", "--config.train.batch_size=16")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "training input: grain (2 workers" in run.stderr
  assert len(read_metrics(tmp_path)) == 3


def test_cli_rejects_a_bad_config_before_training(tmp_path):
  run = _cli(tmp_path, "--config.train.batch_size=60")  # 60 over 8 devices
  assert run.returncode != 0
  assert "train.batch_size=60 does not divide over the 8 devices" in run.stderr


def test_default_job_reaches_97_percent(tmp_path):
  """The README's default job, as is: digits, vgg_small, hybrid, 8 devices."""
  final = train_and_evaluate(default.get_config(), str(tmp_path))
  assert final["top1"] >= 0.97
