r"""Plot training loss and held-out top-1 of one or several runs from their metrics.jsonl.

  python -m experiments.plot --workdir=runs/a --workdir=runs/b --out=curves.png
  python -m experiments.plot --workdir=runs/a,runs/b --out=curves.png

Left panel: training loss vs step, one line per run. Right panel: top-1 of each
evaluation vs step, one series per run and eval split. Runs are labelled by their
directory name, or parent/name where two names clash. The figure:
`deep_image/train/curves.py`.
"""

from absl import app, flags

from deep_image.train.curves import plot_runs, run_labels


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module defines no flags.
  flags.DEFINE_multi_string(
    "workdir", None, "Run directories holding metrics.jsonl (repeat the flag or comma-separate)."
  )
  flags.DEFINE_string("out", None, "Output image path, e.g. curves.png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = flags.FLAGS.out
  workdirs = [w for value in flags.FLAGS.workdir or [] for w in value.split(",") if w]
  if not workdirs or not out:
    raise app.UsageError("need --workdir=DIR [--workdir=DIR ...] and --out=FILE.png")
  labels = run_labels(workdirs)
  plot_runs(workdirs, out, labels)
  print(f"wrote {out}: {', '.join(labels)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
