"""The planner (deep_image/parallel/planner.py) and experiments.plan, without --compile."""

import dataclasses
import re
import subprocess
import sys

import pytest

from deep_image.config_error import ConfigError
from deep_image.parallel import clusters, planner
from experiments.configs import default, scaling

LAST_LINES = (
  r"flat: (gspmd|data|lazy|hybrid) [a-z/]+ \d+\.\dx",
  r"best: (gspmd|data|lazy|hybrid) \d+(x\d+)? [a-z/]+",
  r"speedup@\d+: \d+\.\dx",
)


def _check_plan(p, text):
  last = text.splitlines()[-3:]
  for line, pattern in zip(last, LAST_LINES, strict=True):
    assert re.fullmatch(pattern, line), (line, pattern)
  # The best row is the fastest (to the ranking's 4 digits), the flat one the fastest 1-D.
  fastest = min(r.step_s for r in p.rows)
  assert p.best.step_s <= fastest * (1 + 1e-3)
  assert p.flat.step_s <= min(r.step_s for r in p.rows if len(r.setup.mesh) == 1) * (1 + 1e-3)
  assert last == planner.summary_lines(p)
  assert last[1] == f"best: {p.best.setup.strategy} {p.best.setup.mesh_label} " + (
    p.best.setup.algorithm_label
  )
  assert last[2] == f"speedup@{p.gpus}: {p.best.speedup:.1f}x"
  assert "predicted by the cost model, not measured" in text


def test_plan_on_h100_has_both_meshes_every_algorithm_and_ranks_by_step_time():
  p = planner.plan(scaling.get_config(), "h100", 16, 16)
  text = planner.plan_text(p)
  _check_plan(p, text)
  assert p.batch_per_gpu == 16 and p.cluster.name == "h100"
  assert {r.setup.mesh for r in p.rows} == {(16,), (2, 8)}
  assert {r.setup.strategy for r in p.rows} == {"gspmd", "data", "lazy", "hybrid"}
  two = [r for r in p.rows if r.setup.mesh == (2, 8) and r.setup.strategy == "data"]
  assert len(two) == 16  # collective x node_collective
  assert all(r.memory_source == "model" and r.memory_bytes > 0 for r in p.rows)
  assert [planner.rank_key(r) for r in p.rows] == sorted(planner.rank_key(r) for r in p.rows)
  # Rows agree with the cost model's speedup over one GPU on the same mini-batch.
  for r in p.rows:
    assert r.efficiency == pytest.approx(r.speedup / 16)
    assert r.prediction.mesh == r.setup.mesh or r.setup.strategy == "gspmd"
  # The table holds every row; the recommendation names the flags that run it.
  assert text.count("\n| ") == len(p.rows) + 1
  assert p.best.setup.flags() in text


def test_plan_on_the_cpu_cluster_is_one_axis_and_leaves_out_what_does_not_split():
  config = default.get_config("tiny")
  p = planner.plan(config, "cpu", 5, 2)
  _check_plan(p, planner.plan_text(p))
  assert {r.setup.mesh for r in p.rows} == {(5,)}
  # vgg_tiny's 24 FC1 columns do not split over 5 devices: no hybrid, no gspmd.
  assert {r.setup.strategy for r in p.rows} == {"data", "lazy"}
  assert {s.strategy for s, _ in p.left_out} == {"gspmd", "hybrid"}
  assert all("24" in why for _, why in p.left_out)


def test_setups_that_do_not_fit_in_memory_are_left_out():
  tiny_memory = dataclasses.replace(clusters.PRESETS["minwa"], device_memory=1e9)
  with pytest.raises(ConfigError, match="no setup of this config fits 8 GPUs of minwa: needs"):
    planner.plan(scaling.get_config(), tiny_memory, 8, 64)


@pytest.mark.parametrize(
  "args,match",
  [
    (("dgx", 8, 64), r"--cluster='dgx' is not a known cluster"),
    (("minwa", 145, 64), r"--gpus=145 does not fit the minwa cluster: at most 144"),
    (("h100", 0, 64), r"--gpus=0 must be >= 1"),
    (("h100", 8, 0), r"--per_gpu_batch=0 must be >= 1"),
    (("h100", 7, None), r"train.batch_size=\d+ does not divide over --gpus=7"),
  ],
)
def test_a_bad_flag_is_a_config_error_naming_it(args, match):
  config = default.get_config("tiny")
  config.train.batch_size = 64
  with pytest.raises(ConfigError, match=match):
    planner.plan(config, *args)


def test_the_batch_follows_the_gpus_when_the_config_refers_to_them():
  p = planner.plan(scaling.get_config(), "minwa", 8)  # train.batch_size = 64 x devices
  assert p.batch_per_gpu == 64


def test_experiments_plan_prints_the_table_and_three_lines_and_one_line_errors():
  cmd = [sys.executable, "-m", "experiments.plan", "--config=experiments/configs/scaling.py"]
  out = subprocess.run(
    [*cmd, "--cluster=minwa", "--gpus=8", "--per_gpu_batch=16"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr
  last = out.stdout.splitlines()[-3:]
  for line, pattern in zip(last, LAST_LINES, strict=True):
    assert re.fullmatch(pattern, line), (line, pattern)
  assert "| rank | strategy | mesh |" in out.stdout and "2x4" in out.stdout
  bad = subprocess.run([*cmd, "--cluster=tpu", "--gpus=8"], capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("config error: --cluster='tpu'")


def test_compile_without_the_cuda_packages_says_so_and_plans_with_the_model():
  from experiments.gpu_target import cuda_missing

  if not cuda_missing():
    pytest.skip("the CUDA jax packages are installed: --compile would compile (not in CI)")
  cmd = [sys.executable, "-m", "experiments.plan", "--config=experiments/configs/scaling.py"]
  out = subprocess.run(
    [*cmd, "--cluster=h100", "--gpus=8", "--compile"], capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert "plan: --compile skipped: the CUDA plugin of jax" in out.stderr
  assert "(compiled)" not in out.stdout
  assert re.fullmatch(LAST_LINES[2], out.stdout.splitlines()[-1])
  bad = subprocess.run(
    [*cmd, "--cluster=minwa", "--gpus=8", "--compile"], capture_output=True, text=True
  )
  assert "config error: --compile compiles for H100 SXM: it needs --cluster=h100" in bad.stderr
