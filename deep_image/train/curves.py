"""Training curves of runs: loss and held-out top-1 against step, from each workdir's
metrics.jsonl (`deep_image.train.metrics.read_metrics`).

Left panel: training loss vs step, one line per run. Right panel: top-1 of each
evaluation vs step (markers: evaluations are sparse), one series per run and eval
split. Runs are labelled by their directory name, or parent/name where two names clash.
The command line: `experiments/plot.py`.
"""

from __future__ import annotations

import os

from deep_image.train.metrics import read_metrics


def run_labels(workdirs: list[str]) -> list[str]:
  """Directory names, or parent/name for every run whose name is shared with another."""
  paths = [os.path.normpath(os.path.abspath(w)) for w in workdirs]
  names = [os.path.basename(p) for p in paths]
  return [
    os.path.join(os.path.basename(os.path.dirname(p)), n) if names.count(n) > 1 else n
    for p, n in zip(paths, names, strict=True)
  ]


def plot_runs(workdirs: list[str], out_path: str, labels: list[str] | None = None) -> None:
  """Writes a two-panel figure (train loss, eval top-1 vs step) of the runs to `out_path`.

  Raises FileNotFoundError naming the workdir when one has no metrics.jsonl.
  """
  # matplotlib's Figure without pyplot: no backend is chosen (or changed for a caller
  # that has one), and nothing needs a display on training machines or CI.
  import matplotlib
  from matplotlib.figure import Figure

  if not workdirs:
    raise ValueError("no workdirs to plot (--workdir)")
  labels = labels or run_labels(workdirs)
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  runs = [read_metrics(w) for w in workdirs]  # all read first: fail before drawing
  fig = Figure(figsize=(12, 4.5), constrained_layout=True)
  ax_loss, ax_top1 = fig.subplots(1, 2)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  any_eval = False
  for i, ((train, evals), label) in enumerate(zip(runs, labels, strict=True)):
    color = colors[i % len(colors)]  # one color per run in both panels
    train = [r for r in train if "loss" in r]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=label)
    splits = sorted({r["split"] for r in evals})
    for split, marker in zip(splits, "osD^v<>", strict=False):
      points = [r for r in evals if r["split"] == split and "top1" in r]
      name = label if splits == ["validation"] else f"{label} ({split})"
      ax_top1.plot(
        [r["step"] for r in points],
        [100.0 * r["top1"] for r in points],
        marker=marker,
        linestyle="--",
        color=color,
        label=name,
      )
      any_eval = any_eval or bool(points)
  ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
  ax_top1.set(title="validation top-1", xlabel="step", ylabel="top-1 (%)")
  ax_top1.set_xlim(ax_loss.get_xlim())  # same step axis, so the panels line up
  if not any_eval:
    ax_top1.text(0.5, 0.5, "no evaluations yet", ha="center", transform=ax_top1.transAxes)
  for ax in (ax_loss, ax_top1):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  fig.savefig(out_path, dpi=120)
