"""What every experiment script shares: the --config flag and one-line config errors.

* `define_config()` defines `--config=FILE[:variants]` (ml_collections). An
  override of a field the config does not have (`--config.train.typo=1`),
  which ml_collections reports as a bare AttributeError / KeyError from inside
  flag parsing (or, without `--config`, at flag definition), becomes
  `config error: --config.train.typo=1: the config has no field 'typo' ...`.
* `run(main)` is `absl.app.run(main)`, except that `ConfigError` (a config
  that cannot run, found before the first step, or a workdir another trainer
  holds), `FloatingPointError` (a diverged run, naming its last good
  checkpoint) and `OutOfSpace` (a full disk, naming the path, the free bytes
  and the last complete checkpoint) end the process with their one-line
  message and exit status 1, no traceback.

Anything else still shows its traceback: those are bugs.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deep_image.config_error import ConfigError
from deep_image.train.workdir import OutOfSpace

BASE_CONFIG = "experiments/configs/base.py"
DEFAULT_CONFIG = "experiments/configs/default.py"


def unknown_field_message(error: Exception, argv: list[str]) -> str:
  """The one-line message for ml_collections' error on an override of an unknown field."""
  # Its text: "'name'", maybe followed by 'Did you mean "other" instead of "name"?'.
  text = str(error)
  words = re.findall(r"[A-Za-z0-9_]+", text.split("Did you mean")[0])
  name = words[0] if words else text
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  hint = f"did you mean {suggestion.group(1)!r}? " if suggestion else ""
  culprits = [a for a in argv[1:] if a.startswith("--config.") and name in a.split("=", 1)[0]]
  shown = culprits[0] if culprits else f"--config...{name}"
  return f"config error: {shown}: the config has no field {name!r} ({hint}fields: {BASE_CONFIG})"


def define_config(default: str = DEFAULT_CONFIG):
  """DEFINE_config_file('config', default), locked: overrides may change fields, not add them."""
  try:
    return config_flags.DEFINE_config_file(
      "config", default, "Config file[:variants], e.g. FILE.py:tiny.", lock_config=True
    )
  except (AttributeError, KeyError) as e:  # the default file parsed with an unknown override
    sys.exit(unknown_field_message(e, sys.argv))


def configure_devices(config) -> None:
  """Simulate `parallel.num_devices` CPU devices over this job's processes (before JAX starts).

  A device count that does not divide over `parallel.num_processes` is a ConfigError.
  """
  from deep_image.parallel.mesh import configure_host_devices

  par = config.parallel
  configure_host_devices(par.num_devices, par.num_processes if par.distributed == "explicit" else 1)


def configure_devices_for_runs(workdirs: list[str]):
  """`configure_devices` from the config of the first run in `workdirs` (before JAX starts);
  returns the runs' configs (`WORKDIR/config.json`), ConfigError for a folder that is not a
  run's workdir."""
  from deep_image.train.run_config import read_run_config

  configs = [read_run_config(w) for w in workdirs]
  configure_devices(configs[0])
  return configs


def split_list(text: str, flag: str) -> list[str]:
  """'a,b, c' -> ['a', 'b', 'c']; ConfigError naming `flag` when nothing is left."""
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise ConfigError(f"--{flag}={text!r}: expected a comma-separated list")
  return items


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(
      f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags."
    )
  except (AttributeError, KeyError) as e:
    sys.exit(unknown_field_message(e, argv))


def run(main) -> None:
  """absl.app.run(main) with one-line config errors (see the module docstring)."""

  def guarded(argv):
    try:
      return main(argv)
    except ConfigError as e:
      logging.error("config error: %s", e)
      sys.exit(f"config error: {e}")
    except (FloatingPointError, OutOfSpace) as e:
      logging.error("%s", e)
      sys.exit(f"stopped: {e}")

  app.run(guarded, flags_parser=_parse_flags)
