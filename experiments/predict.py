r"""Top-k predictions of trained models for one image, each and fused (paper Figure 7).

  python -m experiments.predict --workdirs=/tmp/hr_low,/tmp/hr_high --image=photo.jpg \
      [--k=20] [--protocol=dense+flip] [--checkpoint=best] [--out=fig7.png]

The image (any format Pillow reads) is tested like an eval image under --protocol
(default: the centre crop at each model's eval scale); the table lists, per rank, each
model's class and posterior and those of the models' averaged posteriors, with the class
names of the dataset where it has them (classes.json, the generated scenes' shapes). With
--out, also a bar chart of each column's top-k, like the paper's Figure 7.
"""

import io
import os

import numpy as np
from absl import app, flags, logging
from PIL import Image, UnidentifiedImageError

from experiments import cli
from experiments.markdown import table


class OneImage:
  """A one-record source: the encoded file as the pipeline's eval input (label unknown: 0)."""

  def __init__(self, path: str):
    from deep_image.config_error import ConfigError

    if not os.path.isfile(path):
      raise ConfigError(f"--image={path!r}: no such file")
    with open(path, "rb") as f:
      self.data = f.read()
    try:
      with Image.open(io.BytesIO(self.data)) as img:
        img.load()
    except Image.DecompressionBombError as e:
      # Raised from the header alone, before any pixel is decoded.
      raise ConfigError(
        f"--image={path!r}: refused by Pillow's decompression-bomb guard "
        f"(PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {e}"
      ) from e
    except (UnidentifiedImageError, OSError) as e:
      raise ConfigError(f"--image={path!r} is not an image Pillow can read: {e}") from e
    self.path = path

  def __len__(self) -> int:
    return 1

  def __getitem__(self, index: int) -> dict:
    return {"image": self.data, "label": 0}

  def __repr__(self) -> str:
    return f"OneImage({self.path!r})"


def _define_flags() -> None:
  # Defined only when run as a script: tests import this module beside other
  # scripts that define flags of the same names.
  flags.DEFINE_string("workdirs", None, "Comma-separated --workdir of each run.")
  flags.DEFINE_string("image", None, "The image file to classify.")
  flags.DEFINE_integer("k", 20, "How many classes to list.")
  flags.DEFINE_string("protocol", "center", "Test protocol, e.g. dense+flip.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_string("out", "", "Also draw the top-k bars to this PNG.")
  flags.mark_flags_as_required(["workdirs", "image"])


def predict(workdirs, configs, image: OneImage, protocol_text: str, checkpoint: str):
  """{column name: posteriors float [classes]} for each model and 'fused'; class names."""
  import jax

  from deep_image.config_error import ConfigError
  from deep_image.data import pipeline, sources
  from deep_image.evaluate.accuracy import fuse, posteriors
  from deep_image.evaluate.protocol import parse_protocol
  from deep_image.train.trained_model import load_trained_model

  columns, scores = {}, []
  for workdir, config in zip(workdirs, configs, strict=True):
    protocol = parse_protocol(protocol_text, pipeline.eval_scale(config.data))
    trained = load_trained_model(workdir, checkpoint)
    # One image, padded to one row per device.
    evaluation = trained.evaluator(global_batch_size=jax.device_count()).run(
      trained.params, [protocol], split="-", source=image
    )
    score = evaluation.scores[protocol.name]
    if scores and score.shape != scores[0].shape:
      raise ConfigError(f"{workdir} predicts {score.shape[1]} classes, {workdirs[0]} another count")
    scores.append(score)
    columns[f"{workdir} ({protocol.name})"] = posteriors(score[0])
  if len(scores) > 1:
    columns["fused"] = posteriors(fuse(scores)[0])
  try:
    names = sources.make_source(configs[0].data, configs[0].data.eval_split).class_names
  except (AttributeError, OSError, ValueError) as e:  # e.g. a dataset no longer on this host
    logging.warning("no class names (%s): showing class ids", e)
    names = None
  names = list(names) if names else [str(i) for i in range(len(scores[0][0]))]
  return columns, names


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
    from deep_image.config_error import ConfigError

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
