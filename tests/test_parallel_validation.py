"""Parallel setups that cannot run stop before step 1 with one line naming the field.

`deep_image.parallel.validation` (and `mesh.check_device_counts`, which runs
before JAX starts its backends) checked through the training command, as a
user meets them.
"""

import pytest
from conftest import tiny_config as tiny
from conftest import train_cli

from deep_image.config_error import ConfigError
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import validation


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--config.parallel.num_devices=0", "parallel.num_devices=0 must be a whole number >= 1"),
    ("--config.train.batch_size=-8", "train.batch_size=-8 must be >= 1"),
  ],
  ids=["no-devices", "negative-batch"],
)
def test_cli_refuses_device_counts_and_batches_below_one(tmp_path, flag, message):
  run = train_cli(tmp_path / "w", flag)
  assert run.returncode == 1, run.stderr[-2000:]
  assert "Traceback" not in run.stderr, run.stderr[-2000:]
  errors = [line for line in run.stderr.splitlines() if line.startswith("config error:")]
  assert errors == [f"config error: {message}"], run.stderr[-2000:]
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("parallel.num_processes", 0, r"parallel.num_processes=0 must be a whole number >= 1"),
    ("parallel.mesh", (("data", 0),), r"parallel.mesh=\(\('data', 0\),\): sizes must be"),
    ("train.batch_size", -8, r"train.batch_size=-8 must be >= 1"),
    ("train.batch_size", 0, r"train.batch_size=0 must be >= 1"),
  ],
)
def test_validation_names_the_field_and_value(field, value, message):
  with pytest.raises(ConfigError, match=message):
    validation.validate_parallel_config(tiny(**{field: value}), 8)


@pytest.mark.parametrize("value", [0, -2, 2.5, True])
def test_device_counts_below_one_or_not_whole_are_refused(value):
  # What configure_host_devices checks before JAX starts (the CLI case above: 0).
  with pytest.raises(ConfigError, match=rf"parallel.num_devices={value!r} must be a whole number"):
    mesh_lib.check_device_counts(value, 1)


def test_auto_validates_once_and_lists_what_can_run():
  c = tiny(**{"parallel.strategy": "auto"})
  plan = validation.validate_parallel_config(c, 8)
  assert plan.strategy == "auto" and plan.num_devices == 8
  assert set(plan.runnable) <= set(validation.STRATEGIES) and plan.runnable
  named = validation.validate_parallel_config(tiny(**{"parallel.strategy": "data"}), 8)
  assert named.runnable == ("data",)


def test_make_strategy_builds_from_a_plan_without_validating_again(monkeypatch):
  import jax

  from deep_image.models.vgg import make_model
  from deep_image.parallel import strategies
  from deep_image.train.optimizer import make_optimizer

  c = tiny(**{"parallel.strategy": "auto"})
  mesh = mesh_lib.make_mesh(c.parallel, jax.devices()[:8])
  plan = validation.validate_parallel_config(c, mesh.size)
  calls = []
  monkeypatch.setattr(strategies, "validate_parallel_config", lambda *a: calls.append(a))
  s = strategies.make_strategy(c, make_model(c.model), make_optimizer(c.train), mesh, plan=plan)
  assert s.name in plan.runnable and calls == []
  with pytest.raises(ValueError, match=r"plan for 'auto' on mesh axes \{'data': 8\}"):
    small = mesh_lib.make_mesh(c.parallel, jax.devices()[:4])
    strategies.make_strategy(c, make_model(c.model), make_optimizer(c.train), small, plan=plan)
