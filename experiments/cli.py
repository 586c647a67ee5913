"""What every experiment script shares: flag parsing that reports config mistakes in one line.

`run(main)` is `absl.app.run(main)` except that

* an override of a field the config does not have (`--config.train.typo=1`),
  which ml_collections reports as a bare AttributeError from inside flag
  parsing, becomes `config error: --config.train.typo=1: no field 'typo' ...`;
* `ConfigError` (a config that cannot run, found before the first step) and
  `FloatingPointError` (a diverged run, naming its last good checkpoint) end
  the process with their one-line message and exit status 1, no traceback.

Anything else still shows its traceback: those are bugs.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from deep_image.config_error import ConfigError

BASE_CONFIG = "experiments/configs/base.py"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(
      f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags."
    )
  except (AttributeError, KeyError) as e:
    # ml_collections' override of an unknown field; its message is just the field name.
    name = str(e).strip("'\"")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and name in a.split("=", 1)[0]]
    shown = culprits[0] if culprits else f"--config...{name}"
    sys.exit(f"config error: {shown}: the config has no field {name!r} (fields: {BASE_CONFIG})")


def run(main) -> None:
  """absl.app.run(main) with one-line config errors (see the module docstring)."""

  def guarded(argv):
    try:
      return main(argv)
    except ConfigError as e:
      logging.error("config error: %s", e)
      sys.exit(f"config error: {e}")
    except FloatingPointError as e:
      logging.error("%s", e)
      sys.exit(f"stopped: {e}")

  app.run(guarded, flags_parser=_parse_flags)
