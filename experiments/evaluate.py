r"""Evaluate a trained run under the paper's test protocols (section 5).

  python -m experiments.evaluate --workdir=/tmp/run [--checkpoint=best|latest|STEP] \
      [--scales=256,384,512] [--flip] [--dense] [--split=validation] \
      [--perturb=NAME[:STRENGTH]]

From the checkpoint and the config saved in --workdir: the centre crop at each scale, and
with --dense the FC layers run as convolutions over the whole resized image (class
posteriors averaged over the score map), with --flip the mirrored views too, each scale
alone and (for several) fused. One line per protocol in a markdown table (top-1 / top-5
and their errors), also written to WORKDIR/eval.json as {protocol: {top1, top5, count,
step, split}} (`--out` elsewhere; protocols of an earlier call at the same step and split
are kept). Protocol names: `deep_image/evaluate/protocol.py`. The centre-crop row at the
run's eval scale is the run's own final evaluation, recomputed.

--perturb tests images changed first by one test-time perturbation (color_cast,
vignetting, lens_distortion, rotation, blur, noise, jpeg; strengths and what is drawn per
image: `deep_image/data/perturb.py`), e.g. --perturb=rotation:10 or --perturb=jpeg (its
default strength). Its results are keyed 'PROTOCOL/perturb=NAME:STRENGTH', beside the
clean ones; when eval.json holds the clean result of the same protocol, step and split,
the table adds the top-1 drop.

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
  flags.DEFINE_string(
    "perturb", "", "Perturb the test images first: NAME[:STRENGTH], e.g. rotation:10."
  )
  flags.mark_flag_as_required("workdir")


def results_table(results: dict, clean_top1: dict | None = None) -> str:
  """protocol -> {top1, top5, count} as a markdown table with the error rates.

  clean_top1: row name -> the unperturbed top-1 of the same protocol; when given, a
  'top-1 drop' column (clean minus this row's top-1; blank where a row has none).
  """
  header = ("protocol", "top-1", "top-5", "top-1 error", "top-5 error", "images")
  rows = []
  for name, r in results.items():
    row = (
      name,
      f"{r['top1']:.2%}",
      f"{r['top5']:.2%}",
      f"{1 - r['top1']:.2%}",
      f"{1 - r['top5']:.2%}",
      r["count"],
    )
    if clean_top1 is not None:
      clean = clean_top1.get(name)
      row += ("" if clean is None else f"{clean - r['top1']:.2%}",)
    rows.append(row)
  return table(header + (("top-1 drop",) if clean_top1 is not None else ()), rows)


def read_results(path: str, *, step: int, split: str) -> dict:
  """The entries of the JSON at `path` for this step and split ({} without a file)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {
      k: v for k, v in json.load(f).items() if v.get("step") == step and v.get("split") == split
    }


def write_results(path: str, results: dict, *, step: int, split: str) -> None:
  """Merge `results` into the JSON at `path` (entries of another step or split are dropped)."""
  kept = read_results(path, step=step, split=split)
  kept.update({k: {**v, "step": step, "split": split} for k, v in results.items()})
  with open(path + ".tmp", "w") as f:
    json.dump(kept, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  (config,) = cli.configure_devices_for_runs([flags.FLAGS.workdir])
  from deep_image.data import pipeline
  from deep_image.data.perturb import PerturbedSource, parse_perturbation
  from deep_image.data.sources import make_source
  from deep_image.evaluate.protocol import protocol_grid
  from deep_image.train.trained_model import load_trained_model

  scales = (
    tuple(int(s) for s in cli.split_list(flags.FLAGS.scales, "scales"))
    if flags.FLAGS.scales
    else (pipeline.eval_scale(config.data),)
  )
  protocols = protocol_grid(scales, flip=flags.FLAGS.flip, dense=flags.FLAGS.dense)
  perturbation = parse_perturbation(flags.FLAGS.perturb) if flags.FLAGS.perturb else None
  trained = load_trained_model(flags.FLAGS.workdir, flags.FLAGS.checkpoint)
  split = flags.FLAGS.split or config.data.eval_split
  evaluator = trained.evaluator()
  out = flags.FLAGS.out or os.path.join(flags.FLAGS.workdir, EVAL_NAME)
  clean_top1 = None
  if perturbation is None:
    evaluation = evaluator.run(trained.params, protocols, split=split)
    results = evaluation.results
  else:
    source = PerturbedSource(make_source(config.data, split), perturbation)
    evaluation = evaluator.run(trained.params, protocols, split=split, source=source)
    earlier = read_results(out, step=trained.step, split=split)
    results, clean_top1 = {}, {}
    for name, result in evaluation.results.items():
      key = f"{name}/perturb={perturbation.label}"  # beside the clean `name`
      results[key] = result
      if name in earlier:
        clean_top1[key] = earlier[name]["top1"]
  write_results(out, results, step=trained.step, split=split)
  print(f"{flags.FLAGS.workdir}, step {trained.step}, split {split!r}:\n")
  print(results_table(results, clean_top1 or None))
  logging.info("wrote %s", out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
