r"""The paper's section 4.2 and 5 results in miniature, on generated data, on a CPU.

  python -m experiments.reproduce --out=/tmp/reproduce            # ~10 min on 2 cores
  python -m experiments.reproduce --out=/tmp/reproduce_tiny --tiny  # seconds: the machinery

Trains three models of one architecture (`configs/highres.py`: vgg_small on 40 px crops
of generated 96 px scenes whose class is carried by 6-10 px objects; the code:
`experiments/reproduction.py`):

  low         train scale 48, the paper's augmentations   (the paper's 256 model)
  high        train scale 96, the paper's augmentations   (the paper's 512 model)
  low_noaug   train scale 48, random crops only

then measures, at each model's own scale S:
  1. low, high and the two fused (softmax posteriors averaged) under each protocol of 3
     (the paper: 7.96% / 7.42% top-5 error alone, 6.97% fused);
  2. low with and without augmentations: top-1 on the training images (centre crops,
     no augmentation) against validation, the gap the augmentations attack;
  3. centre crop, dense, dense + flip, dense + flip at scales (5S/6, S, 7S/6).

Writes OUT/results.json, OUT/results.md (the tables) and OUT/reproduce.png (validation
curves and the protocol bars). Runs live in OUT/runs/<name>: a rerun reuses finished runs
(and resumes interrupted ones), and every seed is fixed, so it prints the same tables.
"""

import json
import os
import time

from absl import app, flags, logging

from experiments import cli
from experiments.reproduction import draw, markdown, measure, run_configs


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module defines no flags.
  flags.DEFINE_string("out", None, "Folder for the runs, tables and figure.")
  flags.DEFINE_bool("tiny", False, "The `tiny` variants: seconds, numbers meaningless.")
  flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  configs = run_configs(flags.FLAGS.tiny)
  cli.configure_devices(configs["low"])
  out = flags.FLAGS.out
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  results = measure(configs, out)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  text = markdown(results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  draw(results, out, os.path.join(out, "reproduce.png"))
  print(text)
  logging.info("reproduce: %.0f s; %s/results.md, reproduce.png", time.perf_counter() - start, out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
