"""What `experiments.reproduce` trains and measures (its docstring says what and why): the
runs of `configs/highres.py` (RUNS: low, high, low_noaug and one ablation per augmentation),
the protocols at each model's scale (PROTOCOLS, protocol_names) and `measure`: train or
reuse the runs in OUT/runs/<name>, evaluate, fuse low and high, the train - validation
gaps, every low-scale model under each test-time perturbation, and the runs' time to
accuracy. `measure` returns the one dict (results.json) that every table and the figure
are drawn from (`experiments/reproduction_report.py`).
"""

from __future__ import annotations

import os

from experiments.configs.highres import AUGMENTATIONS

# name -> (highres.py variants, what it is). The ablations: `ablation_run(a)`.
BASE_RUNS = {
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
# Top-1 that `time_to_accuracy` measures each run's steps and train seconds to (the
# paper's Figure 4 reads 80%).
TIME_TO_ACCURACY_TARGET = 0.8
# The preset and GPU counts of the predicted Figure 4 (the paper's 1 to 32 GPUs).
PREDICT_CLUSTER = "minwa"
PREDICT_GPUS = (1, 2, 4, 8, 16, 32)
# The run the prediction takes its steps to target from (the paper's Figure 4 model is
# its high-resolution one).
PREDICT_RUN = "high"


def ablation_run(augmentation: str) -> str:
  """The run name of the low model trained without `augmentation`."""
  return f"low_no_{augmentation}"


def check_ablations(text: str) -> tuple[str, ...]:
  """--ablations: comma-separated augmentation names ('all': every one; '': none)."""
  from deep_image.config_error import ConfigError

  if text.strip() == "all":
    return AUGMENTATIONS
  names = tuple(n.strip() for n in text.split(",") if n.strip())
  unknown = [n for n in names if n not in AUGMENTATIONS]
  if unknown:
    raise ConfigError(
      f"--ablations: unknown augmentation(s) {unknown}; choose from {list(AUGMENTATIONS)}, "
      "'all' or ''"
    )
  return tuple(a for a in AUGMENTATIONS if a in names)  # the table's order


def runs(ablations: tuple[str, ...]) -> dict[str, tuple[str, str]]:
  """name -> (highres.py variants, description): BASE_RUNS, then one per ablation."""
  out = dict(BASE_RUNS)
  for a in ablations:
    out[ablation_run(a)] = (f"no_{a}", f"train scale S, augmentations but {a}")
  return out


def run_configs(tiny: bool, ablations: tuple[str, ...] = AUGMENTATIONS) -> dict:
  """name -> the run's config (`runs(ablations)`, each `tiny` when asked)."""
  from experiments.configs import highres

  return {
    name: highres.get_config(",".join(v for v in (variant, "tiny" if tiny else "") if v))
    for name, (variant, _) in runs(ablations).items()
  }


def protocol_names(scale: int) -> dict[str, str]:
  """Row label -> protocol name at a model's scale S (scales rounded to multiples of 8)."""
  lo, hi = (max(8, round(scale * f / 8) * 8) for f in (5 / 6, 7 / 6))
  return {label: p.format(lo=lo, s=scale, hi=hi) for label, p in PROTOCOLS}


def _time_to_accuracy(workdirs: dict[str, str]) -> dict:
  """Each run's curve (step, train seconds, validation top-1), when it first reached
  TIME_TO_ACCURACY_TARGET, and the cost model's prediction for PREDICT_RUN's steps."""
  from deep_image.config_error import ConfigError
  from deep_image.train import time_to_accuracy as tta

  out = {"target": TIME_TO_ACCURACY_TARGET, "runs": {}, "predicted": None}
  reached = {}
  for name, workdir in workdirs.items():
    run = tta.read_run(workdir)
    r = reached[name] = tta.reach(run, TIME_TO_ACCURACY_TARGET)
    out["runs"][name] = {
      "steps": list(run.steps),
      "train_seconds": [round(s, 2) for s in run.seconds],
      "top1": list(run.top1),
      "step_to_target": r.step,
      "seconds_to_target": None if r.seconds is None else round(r.seconds, 2),
    }
  if PREDICT_RUN in reached:
    try:
      predicted = tta.predict(reached[PREDICT_RUN], PREDICT_CLUSTER, PREDICT_GPUS)
    except ConfigError as e:  # e.g. the tiny run never reaches the target
      out["predicted"] = {"run": PREDICT_RUN, "cluster": PREDICT_CLUSTER, "error": str(e)}
    else:
      out["predicted"] = {
        "run": PREDICT_RUN,
        "cluster": PREDICT_CLUSTER,
        "rows": [
          {
            "gpus": p.gpus,
            "strategy": p.strategy,
            "step_s": p.step_s,
            "steps": p.steps,
            "seconds": p.seconds,
          }  # fmt: skip
          for p in predicted
        ],
      }
  return out


def measure(configs: dict, out: str, log=print) -> dict:
  """Train (or reuse) every run, then evaluate, fuse and collect the numbers.

  Args:
    configs: `run_configs(...)`: name -> config, 'low', 'high' and 'low_noaug' first.
    out: the folder; runs in OUT/runs/<name>.
    log: progress lines (one per run and per measurement).

  Returns:
    the results.json dict: runs, protocols (low and high: every PROTOCOLS row; the
    others: the centre crop), fused, gap (every low-scale run: train vs validation
    top-1, centre crop), robustness ({perturbation label: {run: top1}} plus 'clean'),
    time_to_accuracy.
  """
  from deep_image.data import pipeline
  from deep_image.data.perturb import PERTURBATIONS, PerturbedSource, parse_perturbation
  from deep_image.data.sources import make_source
  from deep_image.evaluate.accuracy import accuracy, fuse
  from deep_image.evaluate.protocol import parse_protocol
  from deep_image.train import train_and_evaluate
  from deep_image.train.trained_model import load_trained_model

  descriptions = {name: d for name, (_, d) in runs(AUGMENTATIONS).items()}
  perturbations = [parse_perturbation(name) for name in PERTURBATIONS]
  results = {"runs": {}, "protocols": {}, "fused": {}, "gap": {}, "robustness": {"clean": {}}}
  scores, workdirs = {}, {}
  for i, (name, config) in enumerate(configs.items()):
    workdir = workdirs[name] = os.path.join(out, "runs", name)
    log(f"reproduce: run {i + 1}/{len(configs)} {name} ({descriptions[name]})")
    final = train_and_evaluate(config, workdir)
    if final.get("preempted"):
      raise SystemExit(f"{workdir} was preempted: rerun the same command to continue")
    scale = pipeline.eval_scale(config.data)
    results["runs"][name] = {
      "description": descriptions[name],
      "train_scale": scale,
      "steps": config.train.num_steps,
      # None for a run resumed from its final checkpoint (no step was timed).
      "images_per_sec": final["images_per_sec"] and round(final["images_per_sec"], 1),
    }
    trained = load_trained_model(workdir, "latest")
    evaluator = trained.evaluator()
    names = protocol_names(scale)
    wanted = names if name in ("low", "high") else {"centre crop": names["centre crop"]}
    protocols = [parse_protocol(p, scale) for p in wanted.values()]
    evaluation = evaluator.run(trained.params, protocols, split="validation")
    results["protocols"][name] = {
      label: {**evaluation.results[p], "protocol": p} for label, p in wanted.items()
    }
    scores[name] = (evaluation.scores, evaluation.labels, names)
    if name == "high":
      continue
    # The low-scale models: overfitting (train vs validation) and robustness.
    center = parse_protocol(names["centre crop"], scale)
    on_train = evaluator.run(trained.params, [center], split="train").results[center.name]
    held_out = evaluation.results[center.name]
    results["gap"][name] = {
      "train_top1": on_train["top1"],
      "validation_top1": held_out["top1"],
      "gap": on_train["top1"] - held_out["top1"],
    }
    results["robustness"]["clean"][name] = held_out["top1"]
    validation = make_source(config.data, "validation")
    for p in perturbations:
      source = PerturbedSource(validation, p)
      got = evaluator.run(trained.params, [center], split="validation", source=source)
      results["robustness"].setdefault(p.label, {})[name] = got.results[center.name]["top1"]
    log(f"reproduce: {name}: validation top-1 {held_out['top1']:.4f}, {len(perturbations)} "
        "perturbations measured")  # fmt: skip
  for label in FUSED:
    fused = [scores[n][0][scores[n][2][label]] for n in ("low", "high")]
    results["fused"][label] = accuracy(fuse(fused), scores["low"][1])
  results["time_to_accuracy"] = _time_to_accuracy(workdirs)
  return results
