"""What `experiments.reproduce` trains and measures (its docstring says what and why): the
three runs of `configs/highres.py` (RUNS), the protocols at each model's scale
(PROTOCOLS, protocol_names), `measure` (train or reuse the runs in OUT/runs/<name>,
evaluate, fuse low and high), the tables (`markdown`) and the figure (`draw`).
"""

import os

from experiments.markdown import table

# name -> (highres.py variants, what it is)
RUNS = {
  "low": ("", "train scale S, augmentations"),
  "high": ("high", "train scale 2S, augmentations"),
  "low_noaug": ("noaug", "train scale S, random crops only"),
}
# (row label, protocol with {lo}, {s}, {hi} for 5S/6, S, 7S/6)
PROTOCOLS = (
  ("centre crop", "center@{s}"),
  ("dense", "dense@{s}"),
  ("dense + flip", "dense+flip@{s}"),
  ("dense + flip + 3 scales", "dense+flip@{lo},{s},{hi}"),
)
FUSED = tuple(label for label, _ in PROTOCOLS)


def run_configs(tiny: bool) -> dict:
  from experiments.configs import highres

  return {
    name: highres.get_config(",".join(v for v in (variant, "tiny" if tiny else "") if v))
    for name, (variant, _) in RUNS.items()
  }


def protocol_names(scale: int) -> dict[str, str]:
  """Row label -> protocol name at a model's scale S (scales rounded to multiples of 8)."""
  lo, hi = (max(8, round(scale * f / 8) * 8) for f in (5 / 6, 7 / 6))
  return {label: p.format(lo=lo, s=scale, hi=hi) for label, p in PROTOCOLS}


def measure(configs: dict, out: str) -> dict:
  """Train (or reuse) every run, then evaluate, fuse and collect the numbers."""
  from deep_image.data import pipeline
  from deep_image.evaluate.accuracy import accuracy, fuse
  from deep_image.evaluate.protocol import parse_protocol
  from deep_image.train import train_and_evaluate
  from deep_image.train.trained_model import load_trained_model

  results = {"runs": {}, "protocols": {}, "fused": {}, "gap": {}}
  scores = {}
  for name, config in configs.items():
    workdir = os.path.join(out, "runs", name)
    final = train_and_evaluate(config, workdir)
    if final.get("preempted"):
      raise SystemExit(f"{workdir} was preempted: rerun the same command to continue")
    scale = pipeline.eval_scale(config.data)
    results["runs"][name] = {
      "description": RUNS[name][1],
      "train_scale": scale,
      "steps": config.train.num_steps,
      "images_per_sec": round(final["images_per_sec"], 1),
    }
    trained = load_trained_model(workdir, "latest")
    evaluator = trained.evaluator()
    names = protocol_names(scale)
    wanted = names if name != "low_noaug" else {"centre crop": names["centre crop"]}
    protocols = [parse_protocol(p, scale) for p in wanted.values()]
    evaluation = evaluator.run(trained.params, protocols, split="validation")
    results["protocols"][name] = {
      label: {**evaluation.results[p], "protocol": p} for label, p in wanted.items()
    }
    scores[name] = (evaluation.scores, evaluation.labels, names)
    if name in ("low", "low_noaug"):
      center = parse_protocol(names["centre crop"], scale)
      on_train = evaluator.run(trained.params, [center], split="train").results[center.name]
      held_out = evaluation.results[center.name]
      results["gap"][name] = {
        "train_top1": on_train["top1"],
        "validation_top1": held_out["top1"],
        "gap": on_train["top1"] - held_out["top1"],
      }
  for label in FUSED:
    fused = [scores[n][0][scores[n][2][label]] for n in ("low", "high")]
    results["fused"][label] = accuracy(fuse(fused), scores["low"][1])
  return results


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def markdown(results: dict) -> str:
  """The three tables of the module docstring."""
  runs, protocols = results["runs"], results["protocols"]
  parts = ["### Low and high resolution, alone and fused (paper section 4.2)", ""]
  rows = []
  for label in FUSED:
    for name in ("low", "high"):
      r = protocols[name][label]
      rows.append((label, f"{name} (S={runs[name]['train_scale']})", r["protocol"],
                   _pct(1 - r["top1"]), _pct(1 - r["top5"])))  # fmt: skip
    f = results["fused"][label]
    rows.append(
      (label, "fused (posteriors averaged)", "", _pct(1 - f["top1"]), _pct(1 - f["top5"]))
    )
  parts.append(table(("test", "model", "protocol", "top-1 error %", "top-5 error %"), rows))
  parts += ["", "### The paper's augmentations against overfitting (low resolution)", ""]
  rows = [
    (
      name,
      runs[name]["description"],
      _pct(g["train_top1"]),
      _pct(g["validation_top1"]),
      _pct(g["gap"]),
    )  # fmt: skip
    for name, g in results["gap"].items()
  ]
  parts.append(
    table(("model", "training", "train top-1 %", "validation top-1 %", "gap, points"), rows)
  )
  parts += ["", "### Test protocols (paper section 5)", ""]
  rows = []
  for label, _ in PROTOCOLS:
    cells = []
    for name in ("low", "high"):
      r = protocols[name][label]
      cells += [r["protocol"], _pct(1 - r["top1"]), _pct(1 - r["top5"])]
    rows.append((label, *cells))
  parts.append(
    table(
      ("protocol", "low", "top-1 err %", "top-5 err %", "high", "top-1 err %", "top-5 err %"),
      rows,
    )
  )
  return "\n".join(parts) + "\n"


def draw(results: dict, out: str, path: str) -> None:
  """Left: validation top-1 against step per run. Right: top-1 error per protocol."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from deep_image.train.metrics import read_metrics

  fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.2))
  for name in RUNS:
    _, evals = read_metrics(os.path.join(out, "runs", name))
    evals = [r for r in evals if r["split"] == "validation"]
    curves.plot([r["step"] for r in evals], [100 * r["top1"] for r in evals], "o-", label=name)
  curves.set_xlabel("step")
  curves.set_ylabel("validation top-1 % (centre crop)")
  curves.set_title("training")
  curves.grid(alpha=0.3)
  curves.legend()
  labels = [label for label, _ in PROTOCOLS]
  x = np.arange(len(labels))
  for i, name in enumerate(("low", "high")):
    errors = [100 * (1 - results["protocols"][name][label]["top1"]) for label in labels]
    bars.bar(x + (i - 1) * 0.27, errors, 0.27, label=name)
  fused = [100 * (1 - results["fused"][label]["top1"]) for label in labels]
  bars.bar(x + 0.27, fused, 0.27, label="fused")
  bars.set_xticks(x, labels, fontsize=8)
  bars.set_ylabel("validation top-1 error %")
  bars.set_title("test protocols (lower is better)")
  bars.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
