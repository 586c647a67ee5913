"""Time to accuracy (paper 3.3, Figure 4): how long runs train to reach a validation top-1.

Reads each run's `metrics.jsonl` (`deep_image.train.metrics.read_metrics`): its eval
records on one split, each with `step`, `top1` and `train_seconds` (the run clock the
loop records: seconds of training since step 0, compilation, evaluation and saving not
counted, continued over resumes; `deep_image.train.loop`). For a target top-1 T:

- `reach(run, T)`: the first evaluation with top1 >= T (its step and train seconds), or
  not reached (the best top-1, its step and seconds);
- `table(...)`: a markdown table, one row per run, and the speedups against the first
  run: its seconds to T / this run's (time), its steps to T / this run's (steps);
- `figure(...)`: Figure 4, top-1 against train seconds, one curve per run, the target as
  a dotted line; the time axis is logarithmic when the runs' times differ by more than
  `LOG_SPREAD`x.

Runs are labelled "<devices> devices, <strategy>": devices as the eval records say (the
size of the run's mesh, recorded since runs wrote it), else as config.json says (the
product of `parallel.mesh`'s sizes where they are all given, else `parallel.num_devices`,
what a CPU run simulates), with the directory name where two labels clash.

Where no cluster is at hand, `predict(...)` makes the predicted figure: for each GPU
count G of a cluster preset (`parallel.clusters.PRESETS`), the cost model's step time
(`parallel.cost_model.predict`: the first run's model, strategy and collective, its
global batch B over G devices, B / G images each, one mesh axis) times each evaluation's
step of the first run; the same global batch takes the same steps to T on any G.
Everything it returns is labelled "predicted".

The command line: `experiments/time_to_accuracy.py`. Flag-free: errors are ConfigErrors
naming the flag or workdir.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from deep_image.config_error import ConfigError
from deep_image.train.metrics import read_metrics
from deep_image.train.run_config import read_run_config
from deep_image.train.workdir import METRICS_FILE

# The time axis is logarithmic when the slowest run's last time is this many times the
# fastest one's (Figure 4 spans 1 to 32 GPUs: a linear axis squeezes the fast runs).
LOG_SPREAD = 10.0

# The GPU counts of Figure 4.
PAPER_GPUS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Run:
  """One run's evaluations on one split, in step order (each step once)."""

  workdir: str
  label: str
  devices: int
  strategy: str
  config: object  # the run's config.json (ml_collections.ConfigDict)
  steps: tuple[int, ...]
  seconds: tuple[float, ...]  # train_seconds at each evaluation
  top1: tuple[float, ...]  # fractions in [0, 1]


@dataclasses.dataclass(frozen=True)
class Reached:
  """When `run` first reached `target` (step / seconds None: never); its best evaluation."""

  run: Run
  target: float
  step: int | None
  seconds: float | None
  best_top1: float
  best_step: int
  best_seconds: float

  @property
  def reached(self) -> bool:
    return self.step is not None


@dataclasses.dataclass(frozen=True)
class Predicted:
  """The predicted time to target on `gpus` devices of `cluster` (every label says so)."""

  gpus: int
  cluster: str
  strategy: str
  step_s: float  # the cost model's step time, seconds
  steps: int  # steps to target (the first run's)
  seconds: float  # steps x step_s
  label: str


def check_target(target: float) -> float:
  """`target` as a float; ConfigError naming --target outside (0, 1]."""
  if not (isinstance(target, int | float) and 0.0 < target <= 1.0):
    raise ConfigError(f"--target={target!r} must be a top-1 fraction in (0, 1] (e.g. 0.8 for 80%)")
  return float(target)


def _devices(config) -> int:
  """The run's device count as its config says (module docstring)."""
  sizes = [int(size) for _, size in config.parallel.mesh]
  if sizes and all(s > 0 for s in sizes):
    return math.prod(sizes)
  return int(config.parallel.num_devices)


def read_run(workdir: str, split: str | None = None) -> Run:
  """The evaluations of the run in `workdir` on `split` (None: its `data.eval_split`).

  Raises:
    ConfigError (naming the workdir): not a run's workdir (no config.json or no
      metrics.jsonl), no eval records on the split, or eval records without
      `train_seconds` (written before runs recorded their clock).
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdirs: {workdir!r} is not a directory")
  try:
    config = read_run_config(workdir)
  except ConfigError as e:
    raise ConfigError(f"--workdirs: {e}") from None
  try:
    _, evals = read_metrics(workdir)
  except FileNotFoundError:
    raise ConfigError(
      f"--workdirs: {workdir!r} has no {METRICS_FILE}: the run has logged nothing yet"
    ) from None
  split = split or config.data.eval_split
  on_split = [r for r in evals if r.get("split") == split and "top1" in r]
  if not on_split:
    found = sorted({r.get("split") for r in evals})
    raise ConfigError(
      f"--workdirs: {workdir!r} has no eval records on split {split!r} in {METRICS_FILE} "
      f"(splits evaluated: {found or 'none'}; --split picks one)"
    )
  missing = [r["step"] for r in on_split if "train_seconds" not in r]
  if missing:
    raise ConfigError(
      f"--workdirs: {workdir!r}: the eval records of steps {missing[:5]} have no "
      "train_seconds (the run was trained before runs recorded their clock)"
    )
  by_step = {int(r["step"]): r for r in on_split}  # a step evaluated twice: the last record
  steps = tuple(sorted(by_step))
  # A run resumed on another mesh records two counts: the last one finished it.
  devices = int(by_step[steps[-1]].get("devices", 0)) or _devices(config)
  strategy = str(config.parallel.strategy)
  return Run(
    workdir=workdir,
    label=f"{devices} device{'s' if devices != 1 else ''}, {strategy}",
    devices=devices,
    strategy=strategy,
    config=config,
    steps=steps,
    seconds=tuple(float(by_step[s]["train_seconds"]) for s in steps),
    top1=tuple(float(by_step[s]["top1"]) for s in steps),
  )


def read_runs(workdirs: Sequence[str], split: str | None = None) -> list[Run]:
  """`read_run` of each workdir; labels that clash get the directory name appended."""
  if not workdirs:
    raise ConfigError("--workdirs: expected a comma-separated list of run directories")
  runs = [read_run(w, split) for w in workdirs]
  labels = [r.label for r in runs]
  return [
    dataclasses.replace(r, label=f"{r.label} ({os.path.basename(os.path.normpath(r.workdir))})")
    if labels.count(r.label) > 1
    else r
    for r in runs
  ]


def reach(run: Run, target: float) -> Reached:
  """The first evaluation of `run` with top1 >= `target`, and its best one."""
  target = check_target(target)
  best = max(range(len(run.steps)), key=lambda i: (run.top1[i], -run.steps[i]))
  first = next((i for i, t in enumerate(run.top1) if t >= target), None)
  return Reached(
    run=run,
    target=target,
    step=None if first is None else run.steps[first],
    seconds=None if first is None else run.seconds[first],
    best_top1=run.top1[best],
    best_step=run.steps[best],
    best_seconds=run.seconds[best],
  )


def speedups(reached: Sequence[Reached]) -> list[tuple[float | None, float | None]]:
  """(time, steps) speedup of each run against the first: the first's seconds / steps to
  target over this run's; None where either did not reach it (or took 0 seconds)."""
  first = reached[0]
  out = []
  for r in reached:
    if not (first.reached and r.reached):
      out.append((None, None))
      continue
    time_x = first.seconds / r.seconds if r.seconds > 0 else None
    out.append((time_x, first.step / r.step))
  return out


def _x(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}x"


def table(reached: Sequence[Reached]) -> str:
  """Markdown: per run, steps and train seconds to the target, speedups vs the first."""
  target = reached[0].target
  lines = [
    f"| run | devices | strategy | steps to {target:g} | train s to {target:g} | "
    "speedup (time) | speedup (steps) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r, (time_x, steps_x) in zip(reached, speedups(reached), strict=True):
    run = r.run
    if r.reached:
      steps, seconds = str(r.step), f"{r.seconds:.1f}"
    else:
      steps = f"not reached (best {r.best_top1:.4f} at step {r.best_step}, {r.best_seconds:.1f} s)"
      seconds = "not reached"
    lines.append(
      f"| {run.workdir} | {run.devices} | {run.strategy} | {steps} | {seconds} | "
      f"{_x(time_x)} | {_x(steps_x)} |"
    )
  return "\n".join(lines)


def _cluster(preset: str):
  from deep_image.parallel.clusters import PRESETS

  if preset not in PRESETS:
    raise ConfigError(
      f"--predict={preset!r} is not a cluster preset; choose from {sorted(PRESETS)}"
    )
  return PRESETS[preset]


def predict(first: Reached, preset: str, gpus: Sequence[int]) -> list[Predicted]:
  """The predicted time to target of the first run's job on each of `gpus` devices of
  `preset` (module docstring). Strategy 'auto': the strategy the cost model predicts
  fastest on each G.

  Raises:
    ConfigError naming --predict (an unknown preset; the first run never reached the
    target) or --gpus (a count < 1, or one the global batch does not divide over).
  """
  from deep_image.parallel import cost_model
  from deep_image.parallel.layout_policy import STRATEGIES

  cluster = _cluster(preset)
  if not first.reached:
    raise ConfigError(
      f"--predict={preset}: the first run ({first.run.workdir}) never reached "
      f"--target={first.target:g} (best {first.best_top1:.4f} at step {first.best_step}): "
      "no steps to target to predict from"
    )
  config = first.run.config
  batch = int(config.train.batch_size)
  setup = cost_model.StepSetup.from_config(config)
  out = []
  for g in gpus:
    if g < 1 or batch % g:
      raise ConfigError(
        f"--gpus: {g} GPUs: the first run's global batch train.batch_size={batch} does not "
        "divide over them (the prediction keeps the global batch, so the steps to target)"
      )
    strategy = first.run.strategy
    names = STRATEGIES if strategy == "auto" else (strategy,)
    predictions = [
      cost_model.predict(
        config.model.name,
        name,
        "xla" if name == "gspmd" else config.parallel.collective,
        g,
        batch // g,
        cluster,
        setup,
      )
      for name in names
    ]
    best = min(predictions, key=lambda p: p.step_s)
    shown = best.strategy if strategy != "auto" else f"auto -> {best.strategy}"
    out.append(
      Predicted(
        gpus=g,
        cluster=cluster.name,
        strategy=shown,
        step_s=best.step_s,
        steps=first.step,
        seconds=first.step * best.step_s,
        label=f"predicted: {g} GPU{'s' if g != 1 else ''} ({cluster.name}), {shown}",
      )
    )
  return out


def predicted_table(predicted: Sequence[Predicted], target: float) -> str:
  """Markdown: per GPU count, the predicted step, seconds to target and speedup vs the
  first row."""
  first = predicted[0]
  lines = [
    f"| predicted: GPUs ({first.cluster}) | strategy | predicted step (ms) | "
    f"steps to {target:g} | predicted s to {target:g} | predicted speedup |",
    "|---|---|---|---|---|---|",
  ]
  for p in predicted:
    lines.append(
      f"| {p.gpus} | {p.strategy} | {p.step_s * 1e3:.3g} | {p.steps} | {p.seconds:.4g} | "
      f"{first.seconds / p.seconds:.2f}x |"
    )
  return "\n".join(lines)


def _log_x(spans: Sequence[float]) -> bool:
  positive = [s for s in spans if s > 0]
  return len(positive) > 1 and max(positive) / min(positive) > LOG_SPREAD


def figure(reached: Sequence[Reached], predicted: Sequence[Predicted] | None = None, out_path=None):
  """Figure 4 as a matplotlib Figure (saved to `out_path` when given): top-1 (%) against
  train seconds, one curve per run (line labels: the runs' labels), or with `predicted`
  one curve per GPU count of the first run's evaluations at predicted times (every label
  and the title say "predicted"). The target is a dotted line labelled '_target' (no
  legend entry); the x axis is log where the times spread over `LOG_SPREAD`x."""
  # matplotlib's Figure without pyplot: no backend is chosen and no display is needed.
  from matplotlib.figure import Figure

  target = reached[0].target
  if predicted:
    first = reached[0].run
    curves = [(p.label, [s * p.step_s for s in first.steps], list(first.top1)) for p in predicted]
    title = f"predicted: validation top-1 against time ({predicted[0].cluster} preset)"
    xlabel = "predicted train time (s)"
  else:
    curves = [(r.run.label, list(r.run.seconds), list(r.run.top1)) for r in reached]
    title = "validation top-1 against train time"
    xlabel = "train time (s)"
  fig = Figure(figsize=(7, 4.5), constrained_layout=True)
  ax = fig.subplots()
  for label, seconds, top1 in curves:
    ax.plot(seconds, [100.0 * t for t in top1], marker="o", markersize=3, label=label)
  ax.axhline(100.0 * target, linestyle=":", color="grey", label="_target")
  if _log_x([max(seconds) for _, seconds, _ in curves]):
    ax.set_xscale("log")
  ax.set(title=title, xlabel=xlabel, ylabel="top-1 (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  if out_path:
    fig.savefig(out_path, dpi=120)
  return fig
