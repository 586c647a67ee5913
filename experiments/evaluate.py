r"""Evaluate a trained run under the paper's test protocols (section 5).

  python -m experiments.evaluate --workdir=/tmp/run [--checkpoint=best|latest|STEP] \
      [--scales=256,384,512] [--flip] [--dense] [--split=validation]

From the checkpoint and the config saved in --workdir: the centre crop at each scale, and
with --dense the FC layers run as convolutions over the whole resized image (class
posteriors averaged over the score map), with --flip the mirrored views too, each scale
alone and (for several) fused. One line per protocol in a markdown table (top-1 / top-5
and their errors), also written to WORKDIR/eval.json as {protocol: {top1, top5, count,
step, split}} (`--out` elsewhere; protocols of an earlier call at the same step and split
are kept). Protocol names: `deep_image/evaluate/protocol.py`. The centre-crop row at the
run's eval scale is the run's own final evaluation, recomputed.

Batched over every device of the run's mesh (on a CPU, its simulated device count).
"""

import json
import os

from absl import app, flags, logging

from deep_image.train.workdir import EVAL_NAME
from experiments import cli
from experiments.markdown import table


def _define_flags() -> None:
  # Defined only when run as a script: tests import this module beside other
  # scripts that define flags of the same names.
  flags.DEFINE_string("workdir", None, "The run's --workdir.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_string("scales", "", "Test scales, e.g. 256,512 (default: eval scale).")
  flags.DEFINE_bool("flip", False, "Also test mirrored images.")
  flags.DEFINE_bool("dense", False, "Also test dense (FC layers as convolutions).")
  flags.DEFINE_string("split", "", "Split to test (default: the run's eval split).")
  flags.DEFINE_string("out", "", "Where to write the JSON (default: WORKDIR/eval.json).")
  flags.mark_flag_as_required("workdir")


def results_table(results: dict) -> str:
  """protocol -> {top1, top5, count} as a markdown table with the error rates."""
  rows = [
    (
      name,
      f"{r['top1']:.2%}",
      f"{r['top5']:.2%}",
      f"{1 - r['top1']:.2%}",
      f"{1 - r['top5']:.2%}",
      r["count"],
    )
    for name, r in results.items()
  ]
  return table(("protocol", "top-1", "top-5", "top-1 error", "top-5 error", "images"), rows)


def write_results(path: str, results: dict, *, step: int, split: str) -> None:
  """Merge `results` into the JSON at `path` (entries of another step or split are dropped)."""
  kept = {}
  if os.path.exists(path):
    with open(path) as f:
      kept = {
        k: v for k, v in json.load(f).items() if v.get("step") == step and v.get("split") == split
      }
  kept.update({k: {**v, "step": step, "split": split} for k, v in results.items()})
  with open(path + ".tmp", "w") as f:
    json.dump(kept, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  (config,) = cli.configure_devices_for_runs([flags.FLAGS.workdir])
  from deep_image.data import pipeline
  from deep_image.evaluate.protocol import protocol_grid
  from deep_image.train.trained_model import load_trained_model

  scales = (
    tuple(int(s) for s in cli.split_list(flags.FLAGS.scales, "scales"))
    if flags.FLAGS.scales
    else (pipeline.eval_scale(config.data),)
  )
  protocols = protocol_grid(scales, flip=flags.FLAGS.flip, dense=flags.FLAGS.dense)
  trained = load_trained_model(flags.FLAGS.workdir, flags.FLAGS.checkpoint)
  split = flags.FLAGS.split or config.data.eval_split
  evaluator = trained.evaluator()
  evaluation = evaluator.run(trained.params, protocols, split=split)
  out = flags.FLAGS.out or os.path.join(flags.FLAGS.workdir, EVAL_NAME)
  write_results(out, evaluation.results, step=trained.step, split=split)
  print(f"{flags.FLAGS.workdir}, step {trained.step}, split {split!r}:\n")
  print(results_table(evaluation.results))
  logging.info("wrote %s", out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
