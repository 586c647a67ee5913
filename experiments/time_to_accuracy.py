r"""Time to accuracy (paper Figure 4): train seconds and steps each run took to a top-1.

  python -m experiments.time_to_accuracy --workdirs=runs/g1,runs/g8 --target=0.8 \
      [--split=validation] [--out=fig4.png]
  # no cluster at hand: the cost model's step time x the first run's steps to target
  python -m experiments.time_to_accuracy --workdirs=runs/g1 --target=0.8 \
      --predict=minwa --gpus=1,2,4,8,16,32 --out=fig4_predicted.png

Prints a markdown table: per run, the steps and train seconds (the run clock of its eval
records: compilation and evaluation not counted) to the first evaluation at or above
--target, or "not reached" with the best top-1 and when; the speedups against the first
run (time and steps). --out draws Figure 4: top-1 against train time, one curve per run,
labelled "<devices> devices, <strategy>" (the devices its eval records name, its strategy
from config.json). With --predict the
predicted table follows and the figure is the predicted one (every label says
"predicted"). The logic: `deep_image/train/time_to_accuracy.py`.
"""

from __future__ import annotations

from absl import app, flags

from deep_image.config_error import ConfigError
from deep_image.train import time_to_accuracy as tta
from experiments import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: importing the module defines no flags."""
  flags.DEFINE_string("workdirs", None, "Comma-separated run directories; the first is the base.")
  flags.DEFINE_float("target", 0.8, "Top-1 to reach, a fraction in (0, 1].")
  flags.DEFINE_string("split", None, "Eval split (default: each run's data.eval_split).")
  flags.DEFINE_string("out", None, "Figure path, e.g. fig4.png (default: no figure).")
  flags.DEFINE_string(
    "predict", None, "Cluster preset (minwa | h100 | cpu): predict the times on --gpus."
  )
  flags.DEFINE_string(
    "gpus", None, "With --predict: comma-separated GPU counts (default 1,2,4,8,16,32)."
  )


def _gpus(text: str | None) -> list[int]:
  if text is None:
    return list(tta.PAPER_GPUS)
  try:
    return [int(g) for g in cli.split_list(text, "gpus")]
  except ValueError:
    raise ConfigError(f"--gpus={text!r}: expected comma-separated integers, e.g. 1,2,4") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdirs:
    raise ConfigError("--workdirs is required: comma-separated run directories")
  if FLAGS.gpus is not None and not FLAGS.predict:
    raise ConfigError(f"--gpus={FLAGS.gpus!r} needs --predict=PRESET (a cluster preset)")
  target = tta.check_target(FLAGS.target)
  runs = tta.read_runs(cli.split_list(FLAGS.workdirs, "workdirs"), FLAGS.split)
  reached = [tta.reach(run, target) for run in runs]
  print(tta.table(reached))
  predicted = None
  if FLAGS.predict:
    predicted = tta.predict(reached[0], FLAGS.predict, _gpus(FLAGS.gpus))
    print()
    print(tta.predicted_table(predicted, target))
  if FLAGS.out:
    tta.figure(reached, predicted, FLAGS.out)
    print(f"\nwrote {FLAGS.out}{' (predicted)' if predicted else ''}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
