r"""Train a Deep Image model.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/run \
      [--config.parallel.strategy=data --config.train.num_steps=100 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir
(`resumed from step N`); a finished workdir is left as it is. SIGTERM saves a
checkpoint and exits 0. A config that cannot run stops before the first step
with one line naming the field, and so does a second trainer on a --workdir that
another one is training (it names the holder: host, pid, start time); a failed
start leaves the workdir as it was. A full disk is one line naming the path and
the free bytes (the last complete checkpoint is kept). Every file of a workdir:
`deep_image/train/workdir.py`.

On a CPU-only machine, unless XLA_FLAGS already sets
--xla_force_host_platform_device_count, the run simulates
`config.parallel.num_devices` host devices (8 by default), so the default job
exercises the multi-device code paths anywhere.
"""

from absl import app, flags, logging

from experiments import cli

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.configure_devices(config)  # before anything asks JAX for its devices
  from deep_image.train import train_and_evaluate

  logging.info("config:\n%s", config)
  result = train_and_evaluate(config, _WORKDIR.value)
  if result.get("preempted"):
    logging.info("preempted at step %d; rerun the same command to resume", result["step"])


if __name__ == "__main__":
  cli.run(main)
