"""`experiments.reproduce`'s tables and figure, drawn from its results.json alone
(`experiments.reproduction.measure` makes the dict), and RESULTS.md's tables rendered
from the committed JSON.

| table (TABLES)          | rows                              | cells                              |
|-------------------------|-----------------------------------|------------------------------------|
| fusion                  | test protocol                     | top-1 error %: low, high, fused    |
| protocols               | test protocol                     | protocol, top-1 / top-5 error %    |
| overfitting             | low, low_noaug                    | train / validation top-1, gap      |
| ablation                | low, each low_no_<aug>, low_noaug | validation top-1, vs low, gap      |
| robustness              | clean, each perturbation          | top-1 % (drop from clean) per run  |
| time_to_accuracy        | every run                         | steps and train s to the target    |
| predicted_time_to_accuracy | GPUs of the preset             | the cost model's time to target    |

RESULTS.md holds each table between `<!-- reproduce:NAME -->` and `<!-- /reproduce:NAME -->`
lines, and names the JSON it was rendered from in a `<!-- reproduce:results PATH -->` line
(PATH relative to the file). `render_blocks` rewrites every block from a results dict;
`experiments.reproduce --results_md=RESULTS.md` does that after a run, and
tests/test_reproduce.py checks that the committed file equals its rendering.
"""

from __future__ import annotations

import re

from experiments.configs.highres import AUGMENTATIONS
from experiments.markdown import table
from experiments.reproduction import FUSED, PROTOCOLS, ablation_run

# A block: its opening line, anything (an old table, or nothing), its closing line.
_BLOCK = re.compile(r"<!-- reproduce:(\w+) -->\n(.*?)<!-- /reproduce:\1 -->", re.DOTALL)
_SOURCE = re.compile(r"<!-- reproduce:results (\S+) -->")


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _points(x: float) -> str:
  return f"{100 * x:+.2f}"


def run_order(results: dict) -> list[str]:
  """Every run in `results`: low, high, the ablations, low_noaug (JSON key order aside)."""
  order = ["low", "high", *(ablation_run(a) for a in AUGMENTATIONS), "low_noaug"]
  return [name for name in order if name in results["runs"]]


def low_scale_runs(results: dict) -> list[str]:
  """`run_order` without high: the runs with a train - validation gap measured."""
  return [name for name in run_order(results) if name in results["gap"]]


def perturbation_order(results: dict) -> list[str]:
  """The perturbation labels of results['robustness'] in `perturb.PERTURBATIONS` order."""
  from deep_image.data.perturb import PERTURBATIONS

  names = list(PERTURBATIONS)
  labels = [label for label in results["robustness"] if label != "clean"]
  return sorted(labels, key=lambda label: names.index(label.split(":")[0]))


def _turned_off(name: str) -> str:
  if name == "low":
    return "none (all the paper's augmentations)"
  if name == "low_noaug":
    return "all but the random crop"
  return name.removeprefix("low_no_")


def fusion_table(results: dict) -> str:
  runs, protocols = results["runs"], results["protocols"]
  rows = [
    (
      label,
      *(_pct(1 - protocols[name][label]["top1"]) for name in ("low", "high")),
      _pct(1 - results["fused"][label]["top1"]),
    )
    for label in FUSED
  ]
  header = (
    "test protocol",
    f"low (S={runs['low']['train_scale']})",
    f"high (S={runs['high']['train_scale']})",
    "fused (posteriors averaged)",
  )
  return table(header, rows)


def protocols_table(results: dict) -> str:
  protocols = results["protocols"]
  rows = []
  for label, _ in PROTOCOLS:
    cells = []
    for name in ("low", "high"):
      r = protocols[name][label]
      cells += [r["protocol"], _pct(1 - r["top1"]), _pct(1 - r["top5"])]
    rows.append((label, *cells))
  header = ("protocol", "low", "top-1 err %", "top-5 err %", "high", "top-1 err %", "top-5 err %")
  return table(header, rows)


def overfitting_table(results: dict) -> str:
  rows = [
    (
      name,
      results["runs"][name]["description"],
      _pct(g["train_top1"]),
      _pct(g["validation_top1"]),
      f"{100 * g['gap']:.2f}",
    )  # fmt: skip
    for name, g in ((n, results["gap"][n]) for n in ("low", "low_noaug"))
  ]
  return table(("run", "training", "train top-1 %", "validation top-1 %", "gap, points"), rows)


def ablation_table(results: dict) -> str:
  gap, low = results["gap"], results["gap"]["low"]["validation_top1"]
  rows = [
    (
      f"`{name}`",
      _turned_off(name),
      _pct(gap[name]["validation_top1"]),
      "" if name == "low" else _points(gap[name]["validation_top1"] - low),
      _pct(gap[name]["train_top1"]),
      f"{100 * gap[name]['gap']:.2f}",
    )
    for name in low_scale_runs(results)
  ]
  header = ("run", "turned off", "validation top-1 %", "vs `low`, points", "train top-1 %",
            "gap, points")  # fmt: skip
  return table(header, rows)


def robustness_table(results: dict) -> str:
  robustness = results["robustness"]
  names = low_scale_runs(results)
  clean = robustness["clean"]
  rows = [("clean", *(_pct(clean[n]) for n in names))]
  for label in perturbation_order(results):
    got = robustness[label]
    rows.append((label, *(f"{_pct(got[n])} ({_points(got[n] - clean[n])})" for n in names)))
  return table(("test images", *(f"`{n}`" for n in names)), rows)


def time_to_accuracy_table(results: dict) -> str:
  tta = results["time_to_accuracy"]
  target, base = tta["target"], tta["runs"].get("low", {}).get("seconds_to_target")
  rows = []
  for name in run_order(results):
    r, run = tta["runs"][name], results["runs"][name]
    seconds = r["seconds_to_target"]
    rows.append(
      (
        f"`{name}`",
        r["steps"][-1],
        f"{r['train_seconds'][-1]:.1f}",
        "-" if run["images_per_sec"] is None else f"{run['images_per_sec']:.0f}",
        "not reached" if seconds is None else r["step_to_target"],
        "not reached" if seconds is None else f"{seconds:.1f}",
        f"{base / seconds:.2f}x" if base and seconds else "-",
      )
    )
  header = ("run", "steps", "train s", "images/s", f"step to {target:g}",
            f"train s to {target:g}", "vs `low` (time)")  # fmt: skip
  return table(header, rows)


def predicted_time_to_accuracy_table(results: dict) -> str:
  from deep_image.train import time_to_accuracy as tta

  tta_results = results["time_to_accuracy"]
  predicted = tta_results["predicted"]
  if not predicted:
    return "(no prediction: the high-resolution run was not measured)"
  if "error" in predicted:
    return f"(no prediction: {predicted['error']})"
  rows = [tta.Predicted(cluster=predicted["cluster"], label="", **row) for row in predicted["rows"]]
  return tta.predicted_table(rows, tta_results["target"])


TABLES = {
  "fusion": fusion_table,
  "protocols": protocols_table,
  "overfitting": overfitting_table,
  "ablation": ablation_table,
  "robustness": robustness_table,
  "time_to_accuracy": time_to_accuracy_table,
  "predicted_time_to_accuracy": predicted_time_to_accuracy_table,
}
_HEADINGS = {
  "fusion": "Low and high resolution, alone and fused (paper section 4.2): top-1 error %",
  "protocols": "Test protocols (paper section 5)",
  "overfitting": "The paper's augmentations against overfitting (low resolution)",
  "ablation": "Each augmentation turned off in turn (low resolution, centre crop)",
  "robustness": "Validation top-1 % under each test-time perturbation (centre crop)",
  "time_to_accuracy": "Time to accuracy (paper Figure 4), measured on this machine",
  "predicted_time_to_accuracy": "Time to accuracy on a cluster, predicted by the cost model",
}


def markdown(results: dict) -> str:
  """Every table under its heading (OUT/results.md)."""
  parts = []
  for name, render in TABLES.items():
    parts += [f"### {_HEADINGS[name]}", "", render(results), ""]
  return "\n".join(parts)


def render_blocks(text: str, results: dict) -> str:
  """`text` with every `<!-- reproduce:NAME -->` block's table rendered from `results`.

  Raises:
    ValueError: a block names no table of TABLES.
  """

  def block(match: re.Match) -> str:
    name = match.group(1)
    if name not in TABLES:
      raise ValueError(f"<!-- reproduce:{name} -->: no such table; known: {sorted(TABLES)}")
    return f"<!-- reproduce:{name} -->\n{TABLES[name](results)}\n<!-- /reproduce:{name} -->"

  return _BLOCK.sub(block, text)


def block_names(text: str) -> list[str]:
  """The names of the reproduce blocks in `text`, in order."""
  return [m.group(1) for m in _BLOCK.finditer(text)]


def results_source(text: str) -> str | None:
  """The path of the `<!-- reproduce:results PATH -->` line, or None."""
  match = _SOURCE.search(text)
  return match.group(1) if match else None


def draw(results: dict, path: str) -> None:
  """Four panels from `results`: validation top-1 against train seconds (Figure 4 on this
  machine); top-1 error per protocol (low, high, fused); each ablation's validation top-1;
  each perturbation's drop for low, low_noaug and the ablation without its augmentation."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ((curves, bars), (ablation, robust)) = plt.subplots(2, 2, figsize=(13, 8.5))
  tta = results["time_to_accuracy"]
  for name in run_order(results):
    r = tta["runs"][name]
    style = "o-" if name in ("low", "high", "low_noaug") else ".--"
    curves.plot(r["train_seconds"], [100 * t for t in r["top1"]], style, label=name)
  curves.axhline(100 * tta["target"], linestyle=":", color="grey")
  curves.set(xlabel="train seconds (compile and evaluation not counted)",
             ylabel="validation top-1 % (centre crop)", title="time to accuracy")  # fmt: skip
  curves.grid(alpha=0.3)
  curves.legend(fontsize="small")

  labels = [label for label, _ in PROTOCOLS]
  x = np.arange(len(labels))
  for i, name in enumerate(("low", "high")):
    errors = [100 * (1 - results["protocols"][name][label]["top1"]) for label in labels]
    bars.bar(x + (i - 1) * 0.27, errors, 0.27, label=name)
  fused = [100 * (1 - results["fused"][label]["top1"]) for label in labels]
  bars.bar(x + 0.27, fused, 0.27, label="fused")
  bars.set_xticks(x, labels, fontsize=8)
  bars.set(ylabel="validation top-1 error %", title="test protocols (lower is better)")
  bars.legend()

  names = low_scale_runs(results)
  top1 = [100 * results["gap"][n]["validation_top1"] for n in names]
  ablation.barh(np.arange(len(names)), top1, color="tab:green")
  ticks = [n if n in ("low", "low_noaug") else f"without {_turned_off(n)}" for n in names]
  ablation.set_yticks(np.arange(len(names)), ticks, fontsize=8)
  ablation.invert_yaxis()
  ablation.axvline(top1[0], linestyle=":", color="grey")
  ablation.set(xlabel="validation top-1 % (centre crop)",
               title="augmentations turned off (low resolution)")  # fmt: skip

  robustness = results["robustness"]
  perturbations = perturbation_order(results)
  clean = robustness["clean"]
  x = np.arange(len(perturbations))
  shown = [n for n in ("low", "low_noaug") if n in clean]
  width = 0.8 / (len(shown) + 1)
  for i, name in enumerate(shown):
    drops = [100 * (robustness[p][name] - clean[name]) for p in perturbations]
    robust.bar(x + (i - 1) * width, drops, width, label=name)
  # The ablation that lacks the perturbation's augmentation, where there is one.
  own = [ablation_run(p.split(":")[0]) for p in perturbations]
  drops = [100 * (robustness[p][n] - clean[n]) if n in clean else np.nan
           for p, n in zip(perturbations, own, strict=True)]  # fmt: skip
  robust.bar(x + (len(shown) - 1) * width, drops, width, label="low without that augmentation")
  robust.axhline(0, color="black", linewidth=0.5)
  robust.set_xticks(x, perturbations, fontsize=8, rotation=20)
  robust.set(ylabel="top-1 change, points", title="test-time perturbations (higher is better)")
  robust.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
