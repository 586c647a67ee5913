"""Config files: one set of fields (base.py, all documented), variants, command-line overrides."""

import ast
import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from deep_image.config_error import ConfigError
from deep_image.data import pipeline
from experiments.configs import base, default, highres, image_folder, scaling, table2

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = {
  "base": base,
  "default": default,
  "table2": table2,
  "scaling": scaling,
  "highres": highres,
  "image_folder": image_folder,
}


def _leaves(cfg, prefix=""):
  out = {}
  for key, value in cfg.items():
    if hasattr(value, "items"):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _documented_fields() -> dict[str, str]:
  """{field: default text} from the table of base.py's docstring."""
  lines = base.__doc__.splitlines()
  start = next(
    i for i, line in enumerate(lines) if line.split()[:3] == ["field", "default", "meaning"]
  )
  table = {}
  for line in lines[start + 1 :]:
    if not line.strip():
      break
    field, rest = line.split(None, 1)
    table[field] = re.split(r"\s{2,}", rest.strip(), maxsplit=1)[0]
  return table


@pytest.mark.parametrize("arg", [None, "tiny"])
@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_every_config_and_variant_loads_with_the_base_fields(name, arg):
  config = CONFIG_FILES[name].get_config(arg)
  # Config files change values only: every config has exactly base's fields.
  assert set(_leaves(config)) == set(_leaves(base.get_config()))
  assert config.model.image_size == config.data.augment.crop_size
  assert config.data.augment.crop_size <= min(
    config.data.train_scale, pipeline.eval_scale(config.data)
  )
  assert config.train.batch_size % config.parallel.num_devices == 0
  if arg == "tiny":
    assert config.model.name == "vgg_tiny" and config.train.num_steps <= 20
    # Nothing to download: generated data, or the generated scenes exported as a folder.
    assert config.data.source in ("digits", "highres") or name == "image_folder"
    assert 0 < config.train.eval_every < config.train.num_steps
    assert 0 < config.train.checkpoint_every < config.train.num_steps


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_every_config_file_gives_its_run_commands(name):
  doc = CONFIG_FILES[name].__doc__
  assert "python -m experiments.train --config=experiments/configs/" in doc
  if name != "base":
    assert f"configs/{name}.py:tiny" in doc, "the tiny variant's command"


def test_eval_scale_follows_the_training_scale_of_each_variant():
  assert [pipeline.eval_scale(table2.get_config(v).data) for v in (None, "s512")] == [256, 512]
  low, high = highres.get_config(), highres.get_config("high")
  assert pipeline.eval_scale(low.data) == 48 and pipeline.eval_scale(high.data) == 96
  assert low.data.augment.crop_size == high.data.augment.crop_size  # same model
  noaug = highres.get_config("noaug").data.augment
  assert not any(noaug[k].enabled for k in ("flip", "rotation", "color_cast", "vignetting"))
  assert noaug.crop.enabled


def test_base_docstring_documents_every_field_with_its_default():
  documented = _documented_fields()
  fields = _leaves(base.get_config())
  assert sorted(set(fields) - set(documented)) == [], "fields missing from base.py's docstring"
  assert sorted(set(documented) - set(fields)) == [], "documented fields that do not exist"
  for field, value in fields.items():
    assert ast.literal_eval(documented[field]) == value, field


def test_default_sets_the_issue_values_and_table2_reads_val():
  c = default.get_config()
  assert (c.train.num_steps, c.train.eval_every, c.train.checkpoint_every) == (600, 200, 200)
  assert base.get_config().train.keep_checkpoints == 3
  assert table2.get_config().data.splits.validation == "val"
  assert table2.get_config("tiny").data.splits.validation == "validation"


def test_unknown_variant_names_it_and_the_known_ones():
  with pytest.raises(ConfigError, match=r"'huge'.*\['tiny'\]"):
    default.get_config("tiny,huge")
  with pytest.raises(ConfigError, match="'huge'"):
    table2.get_config("huge")


def _parse(*argv):
  values = flags.FlagValues()
  argv = ["prog", *argv]
  # Override flags are registered from the argv seen at definition time.
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_command_line_overrides_reach_every_declared_field():
  c = _parse(
    "--config=experiments/configs/default.py",
    "--config.data.data_dir=/x",
    "--config.data.name=imagenette",
    "--config.data.splits.validation=test",
    "--config.data.highres.num_classes=4",
    "--config.data.highres.object_size=(6, 9)",
    "--config.parallel.model_axes=('data',)",
    "--config.train.checkpoint_every=7",
    "--config.train.eval_every=0",
  )
  assert (c.data.data_dir, c.data.name, c.data.splits.validation) == ("/x", "imagenette", "test")
  assert c.data.highres.num_classes == 4 and tuple(c.data.highres.object_size) == (6, 9)
  assert tuple(c.parallel.model_axes) == ("data",)
  assert (c.train.checkpoint_every, c.train.eval_every) == (7, 0)
  tiny = _parse("--config=experiments/configs/default.py:tiny", "--config.train.num_steps=3")
  assert tiny.model.name == "vgg_tiny" and tiny.train.num_steps == 3
  with pytest.raises(flags.IllegalFlagValueError, match="'huge'"):
    _parse("--config=experiments/configs/default.py:huge")


def test_the_scaling_batch_follows_a_device_count_given_on_the_command_line():
  """64 images per device whatever --config.parallel.num_devices says, unless the batch is
  given outright (it used to be computed before the command line applied: 512 on 16)."""
  assert _parse("--config=experiments/configs/scaling.py").train.batch_size == 64 * 8
  c = _parse("--config=experiments/configs/scaling.py", "--config.parallel.num_devices=16")
  assert c.train.batch_size == 64 * 16
  tiny = _parse("--config=experiments/configs/scaling.py:tiny", "--config.parallel.num_devices=2")
  assert tiny.train.batch_size == 4 * 2
  c = _parse(
    "--config=experiments/configs/scaling.py",
    "--config.parallel.num_devices=16",
    "--config.train.batch_size=128",
  )
  assert c.train.batch_size == 128 and c.parallel.num_devices == 16


# `.get(name, default)` on a config: a second set of defaults hidden in library code.
_CONFIG_GET = re.compile(r"\b(config|cfg|\w+_cfg|\w+_config|par|parallel)\b(\.\w+)*\.get\(")


def test_library_code_reads_config_fields_directly():
  offenders = [
    f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
    for path in sorted((ROOT / "deep_image").rglob("*.py"))
    for i, line in enumerate(path.read_text().splitlines(), 1)
    if _CONFIG_GET.search(line)
  ]
  assert offenders == []
