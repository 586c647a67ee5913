"""The scaling study's checks of the paper's claims, and the cost model held against the rows.

`claim_checks`: data-parallel bytes per device flat in N (`flat_check`), hybrid's FC
traffic following activations, not weights (`activation_check`); `crossover_lines`: where
hybrid would send more than data parallelism; `cost_model_rows` / `cost_model_time_rows`:
`deep_image.parallel.scaling_model`'s predicted bytes and step times against the compiled and
measured rows; `recheck`: all of them again over a report's rows (`--redraw`).

A row without 'classes' was written before rows carried it, compiled with PAPER_CLASSES.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from deep_image.parallel import scaling_model
from experiments.scaling_measure import DEFAULT_ALGORITHM
from experiments.step_programs import PAPER_CLASSES, param_bytes

# Bytes sent per device of data parallelism may grow from N=2 to N=8 by at most the ring
# factor ((8-1)/8) / ((2-1)/2) = 1.75 (plus this slack), and stay under 2 x gradient bytes.
FLAT_SLACK = 1.10
# Hybrid FC traffic per image of the global batch, over (N-1)/N, may vary this much in N.
ACTIVATION_TOLERANCE = 0.25


def _series(rows: Sequence[dict], model: str, strategy: str) -> list[dict]:
  """The multi-device rows of `model` / `strategy` with the default algorithm, by N."""
  return sorted(
    (r for r in rows if r["model"] == model and r["strategy"] == strategy and r["devices"] > 1
     and r["algorithm"] == DEFAULT_ALGORITHM),
    key=lambda r: r["devices"],
  )  # fmt: skip


def flat_check(rows: Sequence[dict], grad_bytes: dict[str, int], part: str) -> list[str]:
  """Data-parallel bytes per device flat in N: <= 2 x gradient bytes, and from the smallest
  N >= 2 to the largest grown by at most the ring factor ((N-1)/N over (n-1)/n) x slack."""
  lines = []
  for model in sorted({r["model"] for r in rows}):
    data = _series(rows, model, "data")
    if len(data) < 2:
      continue
    lo, hi = data[0], data[-1]
    ring = ((hi["devices"] - 1) / hi["devices"]) / ((lo["devices"] - 1) / lo["devices"])
    growth = hi["bytes_sent"] / lo["bytes_sent"]
    bound = 2 * grad_bytes[model]
    ok = growth <= ring * FLAT_SLACK and all(r["bytes_sent"] <= bound * 1.01 for r in data)
    per = ", ".join(f"N={r['devices']}: {r['bytes_sent'] / 2**20:,.1f}" for r in data)
    lines.append(
      f"- {'PASS' if ok else 'FAIL'} ({part}, {model}): data-parallel MiB sent / device {per}; "
      f"N={hi['devices']} / N={lo['devices']} = {growth:.2f} (ring factor {ring:.2f}); "
      f"bound 2 x gradient bytes = {bound / 2**20:,.1f} MiB"
    )
  return lines


def activation_check(rows: Sequence[dict], fc_bytes: dict[str, int], part: str) -> list[str]:
  """Hybrid's FC traffic follows activations, not weights.

  Its FC traffic is `activation_bytes`: what the program sends beyond synchronising its
  replicated weights (conv, FC3). Per image of the global batch and over (N-1)/N it must
  be constant in N (within ACTIVATION_TOLERANCE) and grow from the smallest N to the
  largest; the split FC weights (`fc_bytes`, never sent) are printed beside it."""
  lines = []
  for model in sorted({r["model"] for r in rows}):
    hyb = _series(rows, model, "hybrid")
    if len(hyb) < 2:
      continue
    per_image = [
      r["activation_bytes"] / (r["global_batch"] * (r["devices"] - 1) / r["devices"]) for r in hyb
    ]
    spread = max(per_image) / min(per_image) - 1 if min(per_image) > 0 else float("inf")
    grows = hyb[-1]["activation_bytes"] > hyb[0]["activation_bytes"]
    ok = spread <= ACTIVATION_TOLERANCE and grows
    per = ", ".join(
      f"N={r['devices']} B={r['global_batch']}: {r['activation_bytes'] / 2**20:,.2f}" for r in hyb
    )
    lines.append(
      f"- {'PASS' if ok else 'FAIL'} ({part}, {model}): hybrid FC (non-weight) MiB sent / "
      f"device {per}; "
      f"per image x N/(N-1): {', '.join(f'{x / 2**10:,.1f}' for x in per_image)} KiB "
      f"(spread {100 * spread:.0f}%, tolerance {100 * ACTIVATION_TOLERANCE:.0f}%); "
      f"FC weights {fc_bytes[model] / 2**20:,.1f} MiB (a weight all-reduce would send "
      f"~2x that per device at every N)"
    )
  return lines


def crossover_lines(rows: Sequence[dict], part: str) -> list[str]:
  """Per model: hybrid / data bytes sent per device at each N, and where hybrid passes data.

  Where it never does, the N where it would on a straight line: with a fixed batch per
  device, hybrid's non-weight bytes grow by the same amount per added device
  (activation_bytes / (N-1) at the largest N) while data's stay at their largest-N value.
  """
  lines = []
  for model in sorted({r["model"] for r in rows}):
    pairs = {}
    for r in rows:
      if r["model"] == model and r["strategy"] == "hybrid" and r["algorithm"] == DEFAULT_ALGORITHM:
        d = [x for x in rows if x["model"] == model and x["strategy"] == "data"
             and x["devices"] == r["devices"] and x["algorithm"] == r["algorithm"]]  # fmt: skip
        if d and d[0]["bytes_sent"]:
          pairs[r["devices"]] = (r, d[0])
    if not pairs:
      continue
    ratio = {n: h["bytes_sent"] / d["bytes_sent"] for n, (h, d) in pairs.items()}
    above = [n for n in sorted(ratio) if ratio[n] > 1]
    text = ", ".join(f"N={n}: {ratio[n]:.2f}" for n in sorted(ratio))
    if above:
      where = f"hybrid sends more than data from N={above[0]}"
    else:
      where = "hybrid sends less than data at every N measured"
      n = max(pairs)
      h, d = pairs[n]
      step = h["activation_bytes"] / (n - 1)
      if step > 0:
        at = 1 + (d["bytes_sent"] - h["weight_bytes"]) / step
        where += (
          f"; on a line through N={n} (+{step / 2**20:,.1f} MiB of activations per added "
          f"device) it would at N ~ {at:.0f}"
        )
    lines.append(f"- {part}, {model}: hybrid / data bytes sent per device {text}; {where}")
  return lines


def claim_checks(rows: Sequence[dict], part: str, label: str) -> dict[str, list[str]]:
  """The stored checks of one part: {'<part>:flat': lines, '<part>:activations': lines}."""
  models = sorted({r["model"] for r in rows})
  size = {r["model"]: (r["image_size"], r.get("classes", PAPER_CLASSES)) for r in rows}
  grad = {m: param_bytes(m, *size[m]) for m in models}
  return {
    f"{part}:flat": flat_check(rows, {m: g[0] for m, g in grad.items()}, label),
    f"{part}:activations": activation_check(rows, {m: g[1] for m, g in grad.items()}, label),
  }


def cost_model_rows(rows: Sequence[dict]) -> list[dict]:
  """(predicted - compiled) / compiled bytes sent per device of every multi-device row, by
  `deep_image.parallel.scaling_model.compare_bytes` (h100 cluster for H100 rows, cpu else)."""
  out = []
  for r in rows:
    if r["devices"] < 2 or not r["bytes_sent"] or r["part"] not in ("cpu", "cpu_compile", "gpu"):
      continue
    error = scaling_model.compare_bytes(
      r["model"], r["strategy"], r["algorithm"], r["devices"], r["per_device_batch"],
      r["bytes_sent"], cluster="h100" if r["part"] == "gpu" else "cpu",
      image_size=r["image_size"], activation_bytes=2 if r["dtype"] == "bfloat16" else 4,
    )  # fmt: skip
    out.append(dict(part=r["part"], model=r["model"], strategy=r["strategy"],
                    algorithm=r["algorithm"], devices=r["devices"], error=error))  # fmt: skip
  return out


def cost_model_time_rows(rows: Sequence[dict]) -> list[dict]:
  """(predicted - measured) / measured step time of every measured CPU row, by
  `scaling_model.compare_step` on its `cpu` cluster (N devices sharing this host)."""
  out = []
  for r in rows:
    if r["part"] != "cpu" or not r.get("step_ms"):
      continue
    error = scaling_model.compare_step(
      r["model"], r["strategy"], r["algorithm"], r["devices"], r["per_device_batch"],
      r["step_ms"] / 1e3, cluster="cpu", image_size=r["image_size"],
      num_classes=r.get("classes", PAPER_CLASSES),
    )  # fmt: skip
    out.append(dict(part="cpu step time", model=r["model"], strategy=r["strategy"],
                    algorithm=r["algorithm"], devices=r["devices"], error=error))  # fmt: skip
  return out


def time_error_summary(errors: Sequence[dict]) -> list[str]:
  """One line per strategy: the median and largest |error| of the step-time rows."""
  lines = []
  for s in dict.fromkeys(e["strategy"] for e in errors):
    xs = sorted(abs(e["error"]) for e in errors if e["strategy"] == s)
    median = statistics.median(xs)
    lines.append(f"- {s}: median |error| {100 * median:.0f}%, largest {100 * xs[-1]:.0f}% "
                 f"({len(xs)} rows)")  # fmt: skip
  return lines


def recheck(data: dict) -> dict:
  """`data` with the checks of its cpu and gpu rows computed again (after a code change)."""
  checks = dict(data.get("checks", {}))
  for part, label in (("cpu", "measured CPU"), ("gpu", "H100 compile")):
    rows = [r for r in data["rows"] if r["part"] == part]
    if rows:
      checks.update(claim_checks(rows, part, label))
  return dict(
    data,
    checks=checks,
    cost_model=cost_model_rows(data["rows"]),
    cost_model_time=cost_model_time_rows(data["rows"]),
  )
