"""Smoke test of experiments/benchmark_step.py's measurements (experiments.step_tables,
step_programs; not a timing test).

vgg_tiny at 8x8 on the 8 simulated devices of conftest.py: two configurations,
two round-robin rounds, a small reference conv, and the compile-only memory table.
"""

import jax

from experiments import step_programs, step_tables
from experiments.configs import base

CONFIGS = (("gspmd", "gspmd", "xla", "data"), ("data / butterfly", "data", "butterfly", "data"))
MEMORY_CONFIGS = (("gspmd", "gspmd", "xla", "data"), ("lazy", "lazy", "butterfly", "data"))


def test_step_tables_have_every_row_and_positive_times():
  devices = jax.devices()
  result = step_tables.measure_steps(
    "vgg_tiny",
    8,
    16,
    CONFIGS,
    devices,
    repeats=2,
    conv_shape=dict(batch=2, size=8, cin=8, cout=8),
  )
  assert result["configs"] == [label for label, *_ in CONFIGS]
  assert set(result["times"]) == {"gspmd", "data / butterfly", "1 device", "conv"}
  for name, times in result["times"].items():
    assert len(times) == 2 and all(t > 0 for t in times), name
    assert result["flops"][name] > 0, name

  rows = step_tables.ratio_rows(result)
  assert [r["config"] for r in rows] == result["configs"]
  assert rows[0]["ratio"] == 1.0 and all(r["paired"] > 0 for r in rows)

  md = step_tables.step_markdown(result, "vgg_tiny", 8, 16, len(devices))
  for label, *_ in CONFIGS:
    assert f"| {label} |" in md
  assert "### 2. SPMD overhead" in md and "### 3. Achieved FLOP/s" in md


def test_memory_rows_are_positive_for_a_tiny_model():
  devices = jax.devices()
  rows = step_tables.memory_rows("vgg_tiny", 8, 10, 16, MEMORY_CONFIGS, devices)
  assert [r["config"] for r in rows] == ["gspmd", "lazy"]
  for r in rows:
    for key in ("argument", "output", "state_per_device", "state_total"):
      assert r[key] > 0, (r["config"], key)
    assert r["temp"] >= 0
  # Every layer of vgg_tiny splits evenly or pads a little: lazy keeps about 1/N of the state.
  lazy = rows[1]
  assert lazy["state_per_device"] < lazy["state_total"]
  md = step_tables.memory_markdown(rows, "vgg_tiny", 16, len(devices))
  assert "| lazy |" in md and "Check: `lazy`" in md


def test_make_config_is_the_base_config_with_the_program_fields():
  c = step_programs.make_config("vgg_tiny", 64, 16, "lazy", "ring", classes=7)
  reference = base.get_config()
  assert set(c.to_dict()) == set(reference.to_dict())
  assert c.data.keys() == reference.data.keys() and c.train.keys() == reference.train.keys()
  assert (c.model.name, c.model.image_size, c.model.num_classes) == ("vgg_tiny", 64, 7)
  assert c.data.augment.crop_size == 64 and c.data.train_scale >= 64
  assert (c.parallel.strategy, c.parallel.collective, c.train.batch_size) == ("lazy", "ring", 16)
