r"""Run a named sweep of a config file: one training run per point, resumable, with a summary.

  python -m experiments.sweep --config=experiments/configs/default.py --sweep=strategies \
      --workdir=/tmp/strategies [--config.train.num_steps=300 ...]
  python -m experiments.sweep --config=experiments/configs/default.py:tiny --sweep=collectives \
      --workdir=/tmp/collectives_tiny

A sweep is a config file's `sweep_<NAME>(config) -> [overrides]`; each point trains in
`WORKDIR/<point>` (finished points skipped, unfinished ones resumed) and
`WORKDIR/summary.json` / `summary.md` are rewritten after every point. What a sweep is,
its point names, its resumption and its summary: `deep_image/train/sweep.py`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from deep_image.train.sweep import build_points, get_sweep, load_config_module, run_sweep
from experiments import cli


def _define_flags():
  # Defined only when run as a script, so tests can import this module next to other
  # scripts that define --config and --workdir.
  config = cli.define_config()
  sweep = flags.DEFINE_string("sweep", None, "Name of a sweep_<NAME> function of the config.")
  workdir = flags.DEFINE_string("workdir", None, "Sweep root: one subdirectory per point.")
  flags.mark_flags_as_required(["sweep", "workdir"])
  return config, sweep, workdir


def main(argv, config_flag, sweep_flag, workdir_flag):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = config_flag.value
  config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
  name = sweep_flag.value
  points = build_points(config, get_sweep(load_config_module(config_arg), name)(config))
  cli.configure_devices(config)  # before anything asks JAX for its devices
  logging.info("sweep %s of %s: %d points", name, config_arg, len(points))
  run_sweep(points, workdir_flag.value, title=f"Sweep `{name}` of `{config_arg}`")


if __name__ == "__main__":
  _flags = _define_flags()
  cli.run(lambda argv: main(argv, *_flags))
