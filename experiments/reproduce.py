r"""The paper's section 3.3, 4 and 5 results in miniature, on generated data, on a CPU.

  python -m experiments.reproduce --out=/tmp/reproduce            # ~25 min on 2 cores
  python -m experiments.reproduce --out=/tmp/reproduce --results_md=RESULTS.md
  python -m experiments.reproduce --out=/tmp/reproduce_tiny --tiny --ablations=rotation

Trains models of one architecture (`configs/highres.py`: vgg_small on 40 px crops of
generated 96 px scenes whose class is carried by 6-10 px objects; the code:
`experiments/reproduction.py`):

  low               train scale 48, the paper's augmentations   (the paper's 256 model)
  high              train scale 96, the paper's augmentations   (the paper's 512 model)
  low_noaug         train scale 48, random crops only
  low_no_<aug>      train scale 48, every augmentation but <aug> (--ablations; default all:
                    flip, rotation, lens_distortion, vignetting, color_cast)

then measures, at each model's own scale S:
  1. low, high and the two fused (softmax posteriors averaged) under each protocol of 3
     (the paper: 7.96% / 7.42% top-5 error alone, 6.97% fused);
  2. every low-scale model: top-1 on the training images (centre crops, no augmentation)
     against validation, the gap the augmentations attack, and what turning each
     augmentation off costs or gains;
  3. centre crop, dense, dense + flip, dense + flip at scales (5S/6, S, 7S/6);
  4. every low-scale model on validation images under each test-time perturbation of
     `deep_image.data.perturb` at its default strength (Figures 8-9);
  5. each run's time to TIME_TO_ACCURACY_TARGET top-1 (Figure 4 on this machine) and the
     cost model's prediction of the high run's on 1-32 GPUs of the minwa preset.

Writes OUT/results.json, OUT/results.md (every table, `experiments/reproduction_report.py`,
drawn from results.json alone) and OUT/reproduce.png; with --results_md, rewrites that
file's `<!-- reproduce:NAME -->` tables from the same results (RESULTS.md: copy
results.json beside the figure and name it in its `<!-- reproduce:results PATH -->` line).
Runs live in OUT/runs/<name>: a rerun reuses finished runs (and resumes interrupted ones),
and every seed is fixed, so it prints the same accuracies.
"""

import json
import os
import time

from absl import app, flags, logging

from deep_image.config_error import ConfigError
from experiments import cli
from experiments.reproduction import check_ablations, measure, run_configs
from experiments.reproduction_report import TABLES, block_names, draw, markdown, render_blocks


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module defines no flags.
  flags.DEFINE_string("out", None, "Folder for the runs, tables and figure.")
  flags.DEFINE_bool("tiny", False, "The `tiny` variants: seconds, numbers meaningless.")
  flags.DEFINE_string(
    "ablations",
    "all",
    "Augmentations to train a low model without, one run each: "
    "comma-separated names, 'all' or '' (none).",
  )
  flags.DEFINE_string(
    "results_md", "", "A markdown file whose <!-- reproduce:NAME --> tables to rewrite."
  )
  flags.mark_flag_as_required("out")


def _check_page(path: str) -> None:
  """ConfigError naming --results_md: not a file, or a block that names no table."""
  if not os.path.isfile(path):
    raise ConfigError(f"--results_md={path!r} is not a file")
  with open(path) as f:
    unknown = sorted(set(block_names(f.read())) - set(TABLES))
  if unknown:
    raise ConfigError(
      f"--results_md={path!r}: <!-- reproduce:{unknown[0]} --> names no table; known: "
      f"{sorted(TABLES)}"
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  configs = run_configs(flags.FLAGS.tiny, check_ablations(flags.FLAGS.ablations))
  if flags.FLAGS.results_md:  # said before the runs train, not after
    _check_page(flags.FLAGS.results_md)
  cli.configure_devices(configs["low"])
  out = flags.FLAGS.out
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  results = measure(configs, out, log=logging.info)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  text = markdown(results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  draw(results, os.path.join(out, "reproduce.png"))
  if flags.FLAGS.results_md:
    with open(flags.FLAGS.results_md) as f:
      page = render_blocks(f.read(), results)  # before the file is touched: it may raise
    with open(flags.FLAGS.results_md + ".tmp", "w") as f:
      f.write(page)
    os.replace(flags.FLAGS.results_md + ".tmp", flags.FLAGS.results_md)
    logging.info("rewrote the tables of %s", flags.FLAGS.results_md)
  print(text)
  logging.info("reproduce: %.0f s; %s/results.md, reproduce.png", time.perf_counter() - start, out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
