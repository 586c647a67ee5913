r"""Top-k predictions of trained models for one image, each and fused (paper Figure 7).

  python -m experiments.predict --workdirs=/tmp/hr_low,/tmp/hr_high --image=photo.jpg \
      [--k=20] [--protocol=dense+flip] [--checkpoint=best] [--out=fig7.png]

The image (any format Pillow reads) is tested like an eval image under --protocol
(default: the centre crop at each model's eval scale); the table lists, per rank, each
model's class and posterior and those of the models' averaged posteriors, with the class
names of the dataset where it has them (classes.json, the generated scenes' shapes). With
--out, also a bar chart of each column's top-k, like the paper's Figure 7. The
predictions: `deep_image/train/ensemble.py:predict`.
"""

import os

import numpy as np
from absl import app, flags, logging

from deep_image.config_error import ConfigError
from deep_image.data.one_image import OneImage
from deep_image.train.ensemble import predict
from experiments import cli
from experiments.markdown import table


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module defines no flags.
  flags.DEFINE_string("workdirs", None, "Comma-separated --workdir of each run.")
  flags.DEFINE_string("image", None, "The image file to classify.")
  flags.DEFINE_integer("k", 20, "How many classes to list.")
  flags.DEFINE_string("protocol", "center", "Test protocol, e.g. dense+flip.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_string("out", "", "Also draw the top-k bars to this PNG.")
  flags.mark_flags_as_required(["workdirs", "image"])


def topk_table(columns: dict, names: list[str], k: int) -> str:
  """Rank | one 'class (p%)' cell per column, for the k best classes of each column."""
  tops = {c: np.argsort(-p, kind="stable")[:k] for c, p in columns.items()}
  rows = [
    [r + 1] + [f"{names[tops[c][r]]} ({columns[c][tops[c][r]]:.1%})" for c in columns]
    for r in range(min(k, len(names)))
  ]
  return table(["rank", *columns], rows)


def draw(columns: dict, names: list[str], k: int, title: str, path: str) -> None:
  """One horizontal bar chart of top-k posteriors per column, side by side (Figure 7)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = min(k, len(names))
  fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 0.3 * k + 1.2))
  for ax, (column, p) in zip(np.atleast_1d(axes), columns.items(), strict=True):
    top = np.argsort(-p, kind="stable")[:k]
    ax.barh(range(k), p[top][::-1], color="tab:blue")
    ax.set_yticks(range(k), [names[i] for i in top][::-1], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title(os.path.basename(column.split(" (")[0]) or column, fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.k < 1:
    raise ConfigError(f"--k={flags.FLAGS.k}: expected how many classes to list, at least 1")
  workdirs = cli.split_list(flags.FLAGS.workdirs, "workdirs")
  configs = cli.configure_devices_for_runs(workdirs)
  image = OneImage(flags.FLAGS.image)
  columns, names = predict(workdirs, configs, image, flags.FLAGS.protocol, flags.FLAGS.checkpoint)
  print(f"{flags.FLAGS.image}:\n")
  print(topk_table(columns, names, flags.FLAGS.k))
  if flags.FLAGS.out:
    draw(columns, names, flags.FLAGS.k, os.path.basename(flags.FLAGS.image), flags.FLAGS.out)
    logging.info("wrote %s", flags.FLAGS.out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
