"""Fail fast: what would stop a run later stops it before the first step, naming the field."""

import numpy as np
import pytest
from conftest import tiny_config as tiny
from conftest import train_cli
from PIL import Image

from deep_image.config_error import ConfigError
from deep_image.data import prepare
from deep_image.train import train_and_evaluate
from deep_image.train.preflight import preflight


def _prepared(root, split, classes=("a", "b")):
  for k, name in enumerate(classes):
    for i in range(4):
      path = root / "src" / split / name / f"{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((20, 24, 3), 40 * k + i, np.uint8)).save(path)
  prepare.prepare(str(root / "src" / split), str(root / "data" / split))
  return str(root / "data")


def test_eval_batch_that_does_not_divide_over_the_devices(tmp_path):
  # The measured failure: 6 devices, data parallel, batch 60: training ran, evaluation died.
  c = tiny(**{"parallel.strategy": "data", "train.batch_size": 60})
  with pytest.raises(ConfigError, match=r"train.eval_batch_size=128 does not divide over the 6"):
    preflight(c, str(tmp_path), num_devices=6)


def test_missing_data_dir(tmp_path):
  c = tiny(**{"data.source": "array_record", "data.data_dir": str(tmp_path / "nowhere")})
  with pytest.raises(ConfigError, match=r"data.data_dir.*nowhere"):
    preflight(c, str(tmp_path / "w"), num_devices=8)


def test_unprepared_eval_split(tmp_path):
  data_dir = _prepared(tmp_path, "train")
  c = tiny(**{"data.source": "array_record", "data.data_dir": data_dir, "train.batch_size": 8})
  with pytest.raises(ConfigError, match=r"data.eval_split='validation'"):
    preflight(c, str(tmp_path / "w"), num_devices=8)


def test_prepared_data_passes_and_opens_both_splits(tmp_path):
  data_dir = _prepared(tmp_path, "train")
  _prepared(tmp_path, "validation")
  c = tiny(**{"data.source": "array_record", "data.data_dir": data_dir, "train.batch_size": 8})
  plan = preflight(c, str(tmp_path / "w"), num_devices=8)
  assert len(plan.train_source) == 8 and len(plan.eval_source) == 8


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match=r"--workdir=.*a_file/run.* is not writable"):
    preflight(tiny(), str(blocker / "run"), num_devices=8)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("model.num_classes", 5, r"model.num_classes=5 is smaller than the 10 classes"),
    ("data.augment.crop_size", 12, r"model.image_size=16 must equal data.augment.crop_size=12"),
    ("data.eval_scale", 12, r"crop_size=16 exceeds data.eval_scale=12"),
    ("train.eval_every", -1, r"train.eval_every=-1 must be >= 0"),
    ("train.keep_checkpoints", 0, r"train.keep_checkpoints=0 must be positive"),
    ("model.dtype", "float16", r"model.dtype='float16'"),
    ("parallel.strategy", "pipeline", r"parallel.strategy='pipeline'"),
    ("train.batch_size", 4000, r"train.batch_size=4000: the training split has"),
    ("train.warmup_steps", -1, r"train.warmup_steps=-1 must be >= 0"),
    ("data.augment.flip.probability", 1.5, r"data.augment.flip.probability=1.5 must be a prob"),
    ("data.augment_on", "gpu", r"data.augment_on='gpu'"),
  ],
)
def test_field_errors(tmp_path, field, value, message):
  with pytest.raises(ConfigError, match=message):
    preflight(tiny(**{field: value}), str(tmp_path), num_devices=8)


def test_train_and_evaluate_checks_before_the_first_step(tmp_path):
  with pytest.raises(ConfigError, match="train.eval_batch_size=100"):
    train_and_evaluate(tiny(**{"train.eval_batch_size": 100}), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
  "flag,message",
  [
    (
      "--config.train.eval_batch_sise=64",
      "config error: --config.train.eval_batch_sise=64: the config has no field 'eval_batch_sise'",
    ),
    (
      "--config.train.eval_batch_size=100",
      "config error: train.eval_batch_size=100 does not divide over the 8 devices",
    ),
  ],
  ids=["unknown-field", "eval-batch"],
)
def test_cli_config_errors_are_one_line_without_traceback(tmp_path, flag, message):
  run = train_cli(tmp_path, flag)
  assert run.returncode == 1
  assert message in run.stderr
  assert "Traceback" not in run.stderr


def test_what_preflight_builds_is_built_once_per_run(tmp_path, monkeypatch):
  # The sampling space, the learning-rate schedule and the parallel validation: preflight
  # builds them and the loop, its input and the strategy use its Plan.
  from deep_image.data import augment
  from deep_image.parallel import strategies, validation
  from deep_image.train import optimizer
  from deep_image.train import preflight as preflight_module

  calls = {"space": 0, "schedule": 0, "validate": 0}

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return fn(*args, **kwargs)

    return wrapper

  from_config = augment.SamplingSpace.from_config.__func__
  monkeypatch.setattr(
    augment.SamplingSpace,
    "from_config",
    classmethod(counted("space", from_config)),
  )
  schedule = counted("schedule", optimizer.learning_rate_schedule)
  monkeypatch.setattr(optimizer, "learning_rate_schedule", schedule)
  monkeypatch.setattr(preflight_module, "learning_rate_schedule", schedule)
  validate = counted("validate", validation.validate_parallel_config)
  monkeypatch.setattr(validation, "validate_parallel_config", validate)
  monkeypatch.setattr(strategies, "validate_parallel_config", validate)
  for data_option in ({"data.cache_on_device": False}, {"data.cache_on_device": True}):
    calls.update(space=0, schedule=0, validate=0)
    work = tmp_path / str(data_option["data.cache_on_device"])
    train_and_evaluate(tiny(**{"train.num_steps": 2, **data_option}), str(work))
    assert calls == {"space": 1, "schedule": 1, "validate": 1}, data_option
