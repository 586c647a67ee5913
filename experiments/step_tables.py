"""The four tables of `experiments.benchmark_step`: what each program is, how it is
measured, and the markdown.

1. step time of every strategy x collective (`STEP_CONFIGS`) as a ratio to gspmd;
2. SPMD overhead: N-device step / 1-device step at the same global batch;
3. achieved FLOP/s against a large 3x3 convolution (`CONV_SHAPE`) on one device;
4. per-device memory (compile only) and the check that `lazy` keeps about 1/N of the state.

The programs come from `experiments.step_programs` and are timed round-robin
(`experiments.round_robin`); collective ops are counted in the compiled HLO
(`deep_image.analysis.hlo.count_collectives`).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from deep_image.analysis.hlo import count_collectives
from deep_image.parallel.collectives import ALGORITHMS
from experiments.markdown import mib, table
from experiments.round_robin import paired_ratio, time_round_robin
from experiments.step_programs import (
  abstract_batch,
  make_config,
  make_strategy,
  random_batch,
  step_runner,
)

# (label, strategy, conv mode of hybrid); every shard_map strategy runs with every algorithm.
SHARD_MAP = (
  ("data", "data", "data"),
  ("lazy", "lazy", "data"),
  ("hybrid(conv=data)", "hybrid", "data"),
  ("hybrid(conv=lazy)", "hybrid", "lazy"),
)


# (label, strategy, collective, conv); gspmd first: it is the baseline of every ratio.
STEP_CONFIGS = (("gspmd", "gspmd", "xla", "data"),) + tuple(
  (f"{label} / {alg}", strategy, alg, conv)
  for label, strategy, conv in SHARD_MAP
  for alg in ALGORITHMS
)


MEMORY_CONFIGS = (
  ("gspmd", "gspmd", "xla", "data"),
  ("data", "data", "butterfly", "data"),
  ("lazy", "lazy", "butterfly", "data"),
  ("hybrid(conv=data)", "hybrid", "butterfly", "data"),
  ("hybrid(conv=lazy)", "hybrid", "butterfly", "lazy"),
)


# Reference convolution: a VGG mid-network layer, big enough to run near the CPU's peak.
CONV_SHAPE = dict(batch=32, size=56, cin=128, cout=128)


LAZY_STATE_TOLERANCE = 1.05


def build_step_runner(config, devices) -> tuple[Callable[[], None], float]:
  """(run one step and wait for it, FLOPs of one step over all devices).

  The runner's `collectives` attribute counts the collective ops of the step.

  Times the public `strategy.train_step`, carrying the donated state from call to
  call as in training. The FLOPs come from `lower_train_step(...).compile()` after
  the first step: jit's compilation cache returns the very executable being timed.
  """
  strategy = make_strategy(config, devices)
  images_abs, labels_abs = abstract_batch(strategy, config)
  images, labels = random_batch(
    strategy, config.train.batch_size, config.model.image_size, config.model.num_classes
  )
  run = step_runner(strategy.train_step, strategy.init(jax.random.key(config.seed)), images, labels)
  run()  # compiles
  compiled = strategy.lower_train_step(strategy.abstract_state(), images_abs, labels_abs).compile()
  # cost_analysis() is per device (DESIGN.md); every device runs the same SPMD program.
  flops = float(compiled.cost_analysis()["flops"]) * len(devices)
  run.collectives = count_collectives(compiled.as_text())
  return run, flops


def build_conv_runner(device, batch, size, cin, cout) -> tuple[Callable[[], None], float]:
  """(run a SAME 3x3 conv [batch, size, size, cin] -> cout on `device`, its FLOPs)."""
  x = jax.device_put(
    jax.random.normal(jax.random.key(0), (batch, size, size, cin), jnp.float32), device
  )
  w = jax.device_put(
    jax.random.normal(jax.random.key(1), (3, 3, cin, cout), jnp.float32) * 0.05, device
  )
  conv = jax.jit(
    lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  compiled = conv.lower(x, w).compile()
  flops = 2.0 * batch * size * size * 9 * cin * cout  # multiply-adds x 2, SAME padding

  def run():
    jax.block_until_ready(compiled(x, w))

  return run, flops


def measure_steps(
  model: str,
  image_size: int,
  batch: int,
  configs: Iterable[tuple[str, str, str, str]],
  devices,
  repeats: int,
  one_device: bool = True,
  conv_shape: dict | None = None,
  overlap: str | None = None,
) -> dict:
  """Time every config on `devices`, plus gspmd on one device and the reference conv.

  Returns {'times': {name: [s]}, 'flops': {name: FLOPs per call}, 'configs': [names],
  'loss': {name: last loss}}; names are the config labels, '1 device' and 'conv'.
  """
  runners, flops, names = {}, {}, []
  for label, strategy, collective, conv in configs:
    logging.info("compiling %s", label)
    cfg = make_config(model, image_size, batch, strategy, collective, conv, overlap=overlap)
    runners[label], flops[label] = build_step_runner(cfg, devices)
    names.append(label)
  if one_device:
    cfg = make_config(model, image_size, batch, "gspmd")
    runners["1 device"], flops["1 device"] = build_step_runner(cfg, devices[:1])
  if conv_shape:
    runners["conv"], flops["conv"] = build_conv_runner(devices[0], **conv_shape)
  times = time_round_robin(runners, repeats)
  loss = {k: r.loss() for k, r in runners.items() if hasattr(r, "loss")}
  ops = {k: r.collectives for k, r in runners.items() if hasattr(r, "collectives")}
  return {"times": times, "flops": flops, "configs": names, "loss": loss, "collectives": ops}


def measure_two_level(
  model: str,
  image_size: int,
  batch: int,
  mesh_spec,
  devices,
  repeats: int,
  overlap: str | None = None,
  collective: str = "butterfly",
) -> list[dict]:
  """Each shard_map strategy on the one-axis mesh and on `mesh_spec` (e.g. node x local),
  timed round-robin together: rows {config, one_axis_ms, two_level_ms, paired}.

  paired: median over rounds of the two-level step / the one-axis step of the same round.
  """
  runners = {}
  for label, strategy, conv in SHARD_MAP:
    for mesh in (None, mesh_spec):
      cfg = make_config(model, image_size, batch, strategy, collective, conv, overlap=overlap)
      if mesh is not None:
        cfg.parallel.mesh = mesh
      logging.info("compiling %s on %s", label, mesh or cfg.parallel.mesh)
      runners[(label, mesh is not None)], _ = build_step_runner(cfg, devices)
  times = time_round_robin(runners, repeats)
  return [
    dict(
      config=f"{label} / {collective}",
      one_axis_ms=1e3 * statistics.median(times[(label, False)]),
      two_level_ms=1e3 * statistics.median(times[(label, True)]),
      paired=paired_ratio(times[(label, True)], times[(label, False)]),
    )
    for label, _, _ in SHARD_MAP
  ]


def two_level_markdown(
  rows: list[dict], mesh_spec, model: str, image_size: int, batch: int, n: int
) -> str:
  """Table 5: node x local against one axis, same devices (target: paired <= 1.10)."""
  body = table(
    ["config", "one axis (ms)", f"{mesh_spec} (ms)", "paired ratio"],
    [
      [r["config"], f"{r['one_axis_ms']:.1f}", f"{r['two_level_ms']:.1f}", f"{r['paired']:.3f}"]
      for r in rows
    ],
  )
  return (
    f"### Two-level mesh against one axis ({model}, {image_size} px, batch {batch}, "
    f"{n} devices)\n\n"
    f"{body}\n\nTarget: paired ratio <= 1.10 (the hierarchical collectives cost no more than\n"
    "the flat ones where there is no slow link: simulated devices share one host)."
  )


def ratio_rows(result: dict, baseline: str = "gspmd") -> list[dict]:
  """One row per config: median ms, ratio of medians and paired ratio to `baseline`."""
  times = result["times"]
  base = times[baseline]
  rows = []
  for name in result["configs"]:
    rows.append(
      dict(
        config=name,
        median_ms=1e3 * statistics.median(times[name]),
        min_ms=1e3 * min(times[name]),
        ratio=statistics.median(times[name]) / statistics.median(base),
        paired=paired_ratio(times[name], base),
        collectives=result.get("collectives", {}).get(name, -1),
      )
    )
  return rows


def memory_rows(
  model: str,
  image_size: int,
  classes: int,
  batch: int,
  configs: Iterable[tuple[str, str, str, str]],
  devices,
  overlap: str | None = None,
) -> list[dict]:
  """Per-device bytes of one compiled step per config, never allocating the state.

  Each row: argument / output / temp bytes from `memory_analysis()`, state bytes per
  device (from the shard shapes of `abstract_state()`) and the global state bytes
  (parameters + optimizer state, counted once).
  """
  rows = []
  for label, strategy_name, collective, conv in configs:
    logging.info("compiling %s (memory)", label)
    t0 = time.perf_counter()
    cfg = make_config(
      model, image_size, batch, strategy_name, collective, conv, classes, overlap=overlap
    )
    strategy = make_strategy(cfg, devices)
    state = strategy.abstract_state()
    images, labels = abstract_batch(strategy, cfg)
    mem = strategy.lower_train_step(state, images, labels).compile().memory_analysis()
    leaves = jax.tree.leaves(state)
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
    per_device = sum(
      math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves
    )
    rows.append(
      dict(
        config=label,
        argument=int(mem.argument_size_in_bytes),
        output=int(mem.output_size_in_bytes),
        alias=int(mem.alias_size_in_bytes),
        temp=int(mem.temp_size_in_bytes),
        state_per_device=int(per_device),
        state_total=int(total),
        compile_s=time.perf_counter() - t0,
      )
    )
  return rows


def step_markdown(result: dict, model: str, image_size: int, batch: int, n: int) -> str:
  """Tables 1-3 from one `measure_steps` result."""
  rows = ratio_rows(result)
  times, flops = result["times"], result["flops"]
  reps = len(times["gspmd"])
  out = [
    f"### 1. Step time on {n} devices, `{model}` {image_size}x{image_size}, global batch "
    f"{batch} ({reps} round-robin rounds; target: hand-written <= 1.05x gspmd)",
    "",
    table(
      [
        "strategy / collective",
        "median ms",
        "min ms",
        "ratio (medians)",
        "ratio (paired)",
        "met",
        "collective ops in HLO",
      ],
      [
        (
          r["config"],
          f"{r['median_ms']:.1f}",
          f"{r['min_ms']:.1f}",
          f"{r['ratio']:.3f}",
          f"{r['paired']:.3f}",
          "" if r["config"] == "gspmd" else ("yes" if r["paired"] <= 1.05 else "no"),
          r["collectives"],
        )
        for r in rows
      ],
    ),
  ]
  if "1 device" in times:
    one = statistics.median(times["1 device"])
    best = min((r for r in rows if r["config"] != "gspmd"), key=lambda r: r["median_ms"])
    out += [
      "",
      f"### 2. SPMD overhead: {n}-device step / 1-device step, global batch {batch} "
      "(target <= 1.10)",
      "",
      table(
        ["program", "median ms", f"{n}-dev / 1-dev (medians)", "paired", "met"],
        [
          ("gspmd, 1 device", f"{1e3 * one:.1f}", "1.000", "1.000", ""),
        ]
        + [
          (
            f"{name}, {n} devices",
            f"{1e3 * statistics.median(times[name]):.1f}",
            f"{statistics.median(times[name]) / one:.3f}",
            f"{paired_ratio(times[name], times['1 device']):.3f}",
            "yes" if paired_ratio(times[name], times["1 device"]) <= 1.10 else "no",
          )
          for name in dict.fromkeys(["gspmd", best["config"]])
        ],
      ),
    ]
  if "conv" in times:
    conv_rate = flops["conv"] / statistics.median(times["conv"])
    shape = CONV_SHAPE
    progs = ["1 device", "gspmd"] + [r["config"] for r in rows if r["config"] != "gspmd"]
    progs = [p for p in progs if p in times]
    out += [
      "",
      "### 3. Achieved FLOP/s (XLA cost analysis FLOPs / median step time) vs. a 3x3 conv "
      f"[{shape['batch']}, {shape['size']}, {shape['size']}, {shape['cin']}] -> {shape['cout']}"
      f" at {conv_rate / 1e9:.1f} GFLOP/s on one device (target >= 0.8)",
      "",
      table(
        [
          "program",
          "GFLOP / step (all devices)",
          "median ms",
          "GFLOP/s",
          "fraction of conv",
          "met",
        ],
        [
          (
            p if p == "1 device" else f"{p}, {n} devices",
            f"{flops[p] / 1e9:.2f}",
            f"{1e3 * statistics.median(times[p]):.1f}",
            f"{flops[p] / statistics.median(times[p]) / 1e9:.1f}",
            f"{flops[p] / statistics.median(times[p]) / conv_rate:.3f}",
            "yes" if flops[p] / statistics.median(times[p]) / conv_rate >= 0.8 else "no",
          )
          for p in progs
        ],
      ),
    ]
  return "\n".join(out)


def memory_markdown(rows: list[dict], model: str, batch: int, n: int) -> str:
  """Table 4 and the lazy-state check."""
  total = rows[0]["state_total"]
  out = [
    f"### 4. Per-device memory, `{model}` 224x224, 1000 classes, global batch {batch}, "
    f"{n} devices (compile only, MiB)",
    "",
    f"Parameters + optimizer state, all devices together: {mib(total)} MiB; / {n} = "
    f"{mib(total // n)} MiB.",
    "",
    table(
      [
        "strategy",
        "argument",
        "output",
        "alias (donated)",
        "temp",
        "state / device",
        f"state / (total/{n})",
        "compile s",
      ],
      [
        (
          r["config"],
          mib(r["argument"]),
          mib(r["output"]),
          mib(r["alias"]),
          mib(r["temp"]),
          mib(r["state_per_device"]),
          f"{r['state_per_device'] / (r['state_total'] / n):.3f}",
          f"{r['compile_s']:.0f}",
        )
        for r in rows
      ],
    ),
  ]
  lazy = [r for r in rows if r["config"] == "lazy"]
  if lazy:
    ratio = lazy[0]["state_per_device"] / (lazy[0]["state_total"] / n)
    ok = ratio <= LAZY_STATE_TOLERANCE
    out += [
      "",
      f"Check: `lazy` state bytes per device = {ratio:.4f} x total/{n} "
      f"(<= {LAZY_STATE_TOLERANCE}): {'met' if ok else 'MISSED'}.",
    ]
  return "\n".join(out)
