"""The scaling study's report: the JSON of all rows, the markdown and Figure 3 drawn from it.

`save` writes the JSON beside `--out`, the markdown (`report_markdown`) and the PNG of the
measured rows (`write_figure`); `merge` replaces one part's rows in it; `load` reads it
back (`--redraw`). `write_model_figure` draws Figure 3 as the cost model predicts it
(`--model_only --plot`). The rows' fields are `experiments.scaling_measure`'s; the checks
drawn in are `experiments.scaling_checks`'.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Iterable, Sequence

from deep_image.parallel import clusters, scaling_model
from deep_image.parallel.layout_policy import STRATEGIES
from experiments.markdown import mib, table
from experiments.scaling_checks import crossover_lines, time_error_summary
from experiments.scaling_measure import DEFAULT_ALGORITHM


def _bytes_cells(r: dict) -> tuple:
  return (r["ops"], mib(r["bytes_sent"]), mib(r["weight_bytes"]), mib(r["activation_bytes"]))


BYTES_HEAD = ("collective ops", "MiB sent / device", "of it: weights (2 (N-1)/N x synced)",
              "rest (activations)")  # fmt: skip


def cpu_table(rows: Sequence[dict]) -> str:
  """Measured rows: one line per program."""
  return table(
    ("model", "strategy", "algorithm", "N", "batch / device", "global batch", "step ms",
     "images/s", "ms / image", "memory MiB / device", *BYTES_HEAD),
    [
      (r["model"], r["strategy"], r["algorithm"], r["devices"], r["per_device_batch"],
       r["global_batch"], f"{r['step_ms']:.0f}", f"{r['images_per_s']:.1f}",
       f"{r['ms_per_image']:.2f}", mib(r["memory_bytes"]), *_bytes_cells(r))
      for r in rows
    ],
  )  # fmt: skip


def compile_table(rows: Sequence[dict], gpu: bool) -> str:
  """Compile-only rows (CPU at 224 px, or H100)."""
  head = ("model", "strategy", "algorithm", "GPUs" if gpu else "N")
  head += ("hosts",) if gpu else ()
  head += ("batch / device", "global batch", "argument MiB", "temp MiB", "memory MiB / device",
           *BYTES_HEAD)  # fmt: skip
  head += ("async overlapped (count)", "(bytes)") if gpu else ()
  head += ("compile s",)
  out = []
  for r in rows:
    cells = (r["model"], r["strategy"], r["algorithm"], r["devices"])
    cells += (r["hosts"],) if gpu else ()
    cells += (r["per_device_batch"], r["global_batch"], mib(r["argument_bytes"]),
              mib(r["temp_bytes"]), mib(r["memory_bytes"]), *_bytes_cells(r))  # fmt: skip
    if gpu:
      cells += (f"{100 * r['overlapped']:.0f}%", f"{100 * r['overlapped_bytes']:.0f}%")
    out.append(cells + (f"{r['compile_s']:.0f}",))
  return table(head, out)


def speedup_rows(rows: Sequence[dict]) -> list[dict]:
  """Speedup rows: time(N=1) / time(N) at each fixed global batch."""
  out = []
  for batch in sorted({r["global_batch"] for r in rows}):
    same = {r["devices"]: r for r in rows if r["global_batch"] == batch}
    if 1 not in same:
      continue
    for n in sorted(same):
      out.append(dict(global_batch=batch, devices=n, step_ms=same[n]["step_ms"],
                      speedup=same[1]["step_ms"] / same[n]["step_ms"]))  # fmt: skip
  return out


def cost_model_markdown(errors: Sequence[dict]) -> str:
  """One line per (part, model, strategy, algorithm): the relative byte error over N."""
  keys = dict.fromkeys((e["part"], e["model"], e["strategy"], e["algorithm"]) for e in errors)
  lines = []
  for key in keys:
    es = sorted((e["devices"], e["error"]) for e in errors
                if (e["part"], e["model"], e["strategy"], e["algorithm"]) == key)  # fmt: skip
    lines.append((*key, ", ".join(f"N={n}: {100 * x:+.1f}%" for n, x in es)))
  return table(("part", "model", "strategy", "algorithm", "(predicted - compiled) / compiled"),
               lines)  # fmt: skip


def report_markdown(data: dict) -> str:
  """The whole report from the JSON's contents (`data`: meta, rows, checks, skipped)."""
  rows, meta = data["rows"], data.get("meta", {})
  part = lambda name: [r for r in rows if r["part"] == name]  # noqa: E731
  out = ["## Scaling study (paper section 3.3, Figure 3)", ""]
  for key in ("cpu_header", "gpu_header"):
    if key in meta:
      out += [meta[key], ""]
  if part("cpu"):
    r0 = part("cpu")[0]
    out += [
      f"### Measured: simulated CPU devices, "
      f"{r0['image_size']}x{r0['image_size']} images (reduced from 224 so that a step runs "
      "on this machine), fixed batch per device",
      "",
      "The simulated devices share this machine's CPU cores: a step on N devices does N "
      "devices' work on the same cores, so step time grows with N and the absolute scaling "
      "is not a GPU's. Bytes and memory are those of the compiled program.",
      "",
      cpu_table(part("cpu")),
      "",
    ]
  if part("process"):
    out += ["### Over processes: the same step as processes x devices (jax.distributed, gloo)",
            "", table(("model", "strategy", "processes x devices", "global batch", "step ms",
                       "images/s", "vs 1 x 8"),
                      [(r["model"], r["strategy"],
                        f"{r['processes']} x {r['devices'] // r['processes']}",
                        r["global_batch"], f"{r['step_ms']:.0f}", f"{r['images_per_s']:.1f}",
                        f"{r['step_ms'] / _one_process(part('process'), r):.2f}x")
                       for r in part("process")]), ""]  # fmt: skip
  if part("speedup"):
    sp = speedup_rows(part("speedup"))
    r0 = part("speedup")[0]
    out += [f"### Speedup at fixed global batch: `{r0['model']}` {r0['strategy']} / "
            f"{r0['algorithm']}, {r0['image_size']} px, simulated CPU devices", "",
            table(("global batch", "N", "step ms", "speedup vs N=1"),
                  [(s["global_batch"], s["devices"], f"{s['step_ms']:.0f}",
                    f"{s['speedup']:.2f}") for s in sp]), ""]  # fmt: skip
  if part("cpu_compile"):
    r0 = part("cpu_compile")[0]
    out += [
      f"### Compile only on CPU devices at {r0['image_size']}x{r0['image_size']} "
      "(nothing executed)",
      "",
      compile_table(part("cpu_compile"), gpu=False),
      "",
    ]
  if part("gpu"):
    out += [
      "### Compile only for H100 SXM (deviceless XLA GPU compile, bf16, 8 GPUs per "
      "host, nothing executed)",
      "",
      compile_table(part("gpu"), gpu=True),
      "",
    ]
  checks = data.get("checks", {})
  if checks:
    out += ["### The paper's claims", ""]
    for key in sorted(checks):
      if not key.endswith(":crossover"):  # written by an earlier version; drawn below
        out += checks[key]
    out.append("")
  names = {"cpu": "measured CPU", "cpu_compile": "CPU compile", "gpu": "H100 compile"}
  cross = [line for name, label in names.items() for line in crossover_lines(part(name), label)]
  if cross:
    out += ["### Hybrid against data parallelism: bytes sent per device", ""] + cross + [""]
  if data.get("cost_model"):
    out += ["### Cost model against the compiled programs: bytes sent per device", "",
            "`deep_image.parallel.scaling_model.compare_bytes` (cluster h100 for the H100 rows, "
            "cpu for the others; activations of the rows' dtype):", "",
            cost_model_markdown(data["cost_model"]), ""]  # fmt: skip
  if data.get("cost_model_time"):
    out += ["### Cost model against the measured step times", "",
            "`deep_image.parallel.scaling_model.compare_step` with the `cpu` cluster (the N "
            "simulated devices share the host's FLOP/s, memory and copies; its one fitted number, "
            "the utilisation 0.11, is the model FLOP rate that gspmd / 8-conv / N=8 reached "
            "(18 GFLOP/s of 160; update and copies inside), so that row is not independent):", "",
            *time_error_summary(data["cost_model_time"]), "",
            cost_model_markdown(data["cost_model_time"]).replace("compiled", "measured"),
            ""]  # fmt: skip
  if data.get("skipped"):
    out += ["### Skipped", ""] + [f"- {s}" for s in data["skipped"]] + [""]
  return "\n".join(out)


def write_model_figure(rows: Sequence[dict], preset: str, path: str) -> None:
  """Figure 3 as the cost model predicts it (`scaling_model.predict_rows` rows): left, time
  per image of each strategy at a fixed batch per device; right, speedup at fixed
  mini-batches. On Minwa the paper's crossover (16) and 47x at 64 are marked."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  lefts = [r for r in rows if r["figure"] == "left"]
  for strategy in dict.fromkeys(r["strategy"] for r in lefts):
    pts = sorted((r["num_devices"], r["time_per_image_s"] * 1e3) for r in lefts
                 if r["strategy"] == strategy)  # fmt: skip
    left.plot(*zip(*pts, strict=True), marker="o", label=strategy)
  b = lefts[0]["batch_per_device"]
  left.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="ms / image",
           title=f"time per image, {b} images per GPU")  # fmt: skip
  rights = [r for r in rows if r["figure"] == "right"]
  for batch in sorted({r["global_batch"] for r in rights}):
    pts = sorted((r["num_devices"], r["speedup"]) for r in rights if r["global_batch"] == batch)
    right.plot(*zip(*pts, strict=True), marker="o", label=f"mini-batch {batch}")
  ns = sorted({r["num_devices"] for r in rights})
  right.plot(ns, ns, "k:", label="linear")
  right.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="speedup",
            title="speedup over one GPU (faster of hybrid / data)")  # fmt: skip
  if preset == "minwa":
    paper = scaling_model.PAPER
    left.axvline(paper["crossover"], color="grey", ls="--", label="paper: crossover")
    right.plot([64], [paper["speedup@64"]], "k*", ms=12, label="paper: 47x, mini-batch 1024")
  for ax in (left, right):
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(
    f"cost model: {rows[0]['model']} on {preset} ({clusters.PRESETS[preset].description})"
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _one_process(rows: Sequence[dict], r: dict) -> float:
  same = [x for x in rows if x["processes"] == 1 and x["model"] == r["model"]
          and x["strategy"] == r["strategy"] and x["devices"] == r["devices"]]  # fmt: skip
  return same[0]["step_ms"] if same else float("nan")


def write_figure(data: dict, path: str) -> bool:
  """Figure 3's two panels from the measured rows; False (nothing written) without them."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

  cpu = [
    r
    for r in data["rows"]
    if r["part"] == "cpu"
    and r["algorithm"] in (DEFAULT_ALGORITHM, "xla")
    and (r["strategy"] == "gspmd") == (r["algorithm"] == "xla")
  ]
  speed = speedup_rows([r for r in data["rows"] if r["part"] == "speedup"])  # fmt: skip
  if not cpu and not speed:
    return False
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  styles = dict(zip(sorted({r["model"] for r in cpu}), ("-", "--", ":"), strict=False))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for model, style in styles.items():
    for k, strategy in enumerate(STRATEGIES):
      pts = sorted((r["devices"], r["ms_per_image"]) for r in cpu
                   if r["model"] == model and r["strategy"] == strategy)  # fmt: skip
      if pts:
        left.plot(*zip(*pts, strict=True), style, marker="o", color=colors[k],
                  label=f"{strategy} ({model})")  # fmt: skip
  size = cpu[0]["image_size"] if cpu else "?"
  left.set(title=f"time per image, fixed batch per device ({size} px)\nsimulated CPU devices "
                 f"sharing {os.cpu_count()} cores: not a GPU's scaling", xlabel="devices",
           ylabel="ms / image", yscale="log")  # fmt: skip
  for batch in sorted({s["global_batch"] for s in speed}):
    pts = [(s["devices"], s["speedup"]) for s in speed if s["global_batch"] == batch]
    right.plot(*zip(*pts, strict=True), marker="o", label=f"mini-batch {batch}")
  if speed:
    ns = sorted({s["devices"] for s in speed})
    right.plot(ns, ns, "k:", label="linear")
  right.set(
    title="speedup vs 1 device at a fixed global batch\n(hybrid, simulated CPU devices)",
    xlabel="devices",
    ylabel="speedup",
    yscale="log",
  )
  ticks = sorted({r["devices"] for r in cpu} | {s["devices"] for s in speed})
  for ax in (left, right):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def paths(out: str | None) -> tuple[str, str, str]:
  """(markdown, JSON, PNG) paths: --out or benchmarks/scaling_<UTC date>.md, and beside it."""
  md = out or f"benchmarks/scaling_{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.md"
  stem = md[:-3] if md.endswith(".md") else md
  return md, stem + ".json", stem + ".png"


def load(json_path: str) -> dict:
  if os.path.exists(json_path):
    with open(json_path) as f:
      return json.load(f)
  return {"meta": {}, "rows": [], "checks": {}, "skipped": []}


def save(data: dict, out: str | None) -> None:
  """Write the JSON, the markdown and the PNG of `data`."""
  md, js, png = paths(out)
  os.makedirs(os.path.dirname(md) or ".", exist_ok=True)
  with open(js, "w") as f:
    json.dump(data, f, indent=1)
  with open(md, "w") as f:
    f.write(report_markdown(data) + "\n")
  drew = write_figure(data, png)
  text = report_markdown(data)
  if "### The paper's claims" in text:  # the checks and the hybrid / data lines, on stdout too
    print(text[text.index("### The paper's claims") :], flush=True)
  print(f"wrote {md}, {js}" + (f", {png}" if drew else ""), flush=True)


def merge(data: dict, parts: Iterable[str], rows: list[dict], checks: dict, skipped: list):
  """Replace the rows of `parts` (and checks / skipped notes of those parts) in `data`."""
  parts = set(parts)
  data["rows"] = [r for r in data["rows"] if r["part"] not in parts] + rows
  data["checks"] = {k: v for k, v in data.get("checks", {}).items()
                    if k.split(":")[0] not in parts} | checks  # fmt: skip
  data["skipped"] = [s for s in data.get("skipped", []) if s.split(":")[0] not in parts] + skipped
  return data
