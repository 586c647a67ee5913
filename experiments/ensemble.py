r"""Fuse trained models by averaging their softmax posteriors (paper section 4.2).

  python -m experiments.ensemble --workdirs=/tmp/hr_low,/tmp/hr_high [--protocol=dense+flip] \
      [--checkpoint=best] --out=/tmp/fused.json

Each model is tested under --protocol (`deep_image/evaluate/protocol.py`; without '@scales'
at its own eval scale, so a 256 and a 512 model are each tested at their scale) on the
eval split they share; then their posteriors are averaged per image. Prints each model's
and the fused top-1 / top-5; --out gets {"models": {workdir: {top1, top5, count, step,
protocol}}, "fused": {top1, top5, count}}. Models must test on the same images (same
source and split) and predict the same classes. The fusion: `deep_image/train/ensemble.py`.
"""

import json
import os

from absl import app, flags, logging

from deep_image.train.ensemble import ensemble
from experiments import cli
from experiments.markdown import table


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module defines no flags.
  flags.DEFINE_string("workdirs", None, "Comma-separated --workdir of each run.")
  flags.DEFINE_string("protocol", "center", "Test protocol, e.g. dense+flip@256.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_string("split", "", "Split to test (default: the first run's eval split).")
  flags.DEFINE_string("out", "", "Write the JSON here.")
  flags.mark_flag_as_required("workdirs")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdirs = cli.split_list(flags.FLAGS.workdirs, "workdirs")
  configs = cli.configure_devices_for_runs(workdirs)
  models, fused = ensemble(
    workdirs, configs, flags.FLAGS.protocol, flags.FLAGS.checkpoint, flags.FLAGS.split
  )
  rows = [
    (w, r["protocol"], r["step"], f"{r['top1']:.2%}", f"{r['top5']:.2%}", f"{1 - r['top5']:.2%}")
    for w, r in models.items()
  ]
  rows.append(
    (
      "fused",
      flags.FLAGS.protocol,
      "",
      f"{fused['top1']:.2%}",
      f"{fused['top5']:.2%}",
      f"{1 - fused['top5']:.2%}",
    )
  )
  print(table(("model", "protocol", "step", "top-1", "top-5", "top-5 error"), rows))
  if flags.FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
    with open(flags.FLAGS.out, "w") as f:
      json.dump({"models": models, "fused": fused}, f, indent=1, sort_keys=True)
    logging.info("wrote %s", flags.FLAGS.out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
