r"""Benchmark one training step: strategies x collectives, SPMD overhead, FLOP/s, memory.

  python -m experiments.benchmark_step [--quick] [--overlap=deferred|none]
      [--out=benchmarks/step_YYYY-MM-DD.md]

Four markdown tables (printed, and written to --out):

1. Step time of every strategy x collective on 8 (simulated) devices, small model,
   as a ratio to `gspmd` measured in the same run. Target: hand-written <= 1.05x.
2. SPMD overhead: 8-device step / 1-device step at the same global batch (target <= 1.10).
3. Achieved FLOP/s: XLA's FLOPs of one step / measured step time, as a fraction of a
   large 3x3 convolution's FLOP/s measured in the same run (target >= 0.8).
4. Per-device memory of the paper's Table 2 model (`deep_image_16`, 224x224, 1000
   classes) on 8 devices, compile only (`memory_analysis`), and the check that
   `lazy` keeps <= 1.05 x (parameter + optimizer bytes) / 8 per device.

Every timed program (the step of each configuration, the 1-device step and the
reference convolution) is compiled and warmed up first, then timed round-robin,
one call each per round with the starting point rotated, so that noise from other
processes on the machine hits all of them alike. Ratios are of medians; the
"paired" ratio is the median over rounds of the per-round ratio.

On a CPU-only machine the run simulates 8 host devices unless XLA_FLAGS already
sets --xla_force_host_platform_device_count.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Iterable, Sequence

# Importing jax does not start its backends: main can still set the device count.
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import lax

from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.parallel.collectives import ALGORITHMS
from deep_image.train.optimizer import make_optimizer
from experiments.compile_gpu import COLLECTIVE_KINDS
from experiments.configs import base
from experiments.markdown import machine_markdown, table

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script (tests and experiments.benchmark_gpu import this)."""
  flags.DEFINE_bool("quick", False, "Fewer repeats (a smoke run, not a measurement).")
  flags.DEFINE_string("out", None, "Also write the markdown report to this file.")
  flags.DEFINE_integer("repeats", 30, "Timed rounds per program (--quick: 4).")
  flags.DEFINE_string("model", "vgg_small", "Model of the step-time tables.")
  flags.DEFINE_integer("image_size", 32, "Training crop side of --model.")
  flags.DEFINE_integer("batch", 64, "Global batch of the step-time tables.")
  flags.DEFINE_integer("devices", 8, "Simulated devices (ignored if XLA_FLAGS sets it).")
  flags.DEFINE_string("memory_model", "deep_image_16", "Model of the memory table.")
  flags.DEFINE_integer("memory_batch", 64, "Global batch of the memory table.")
  flags.DEFINE_bool("skip_memory", False, "Skip the (slow) memory table.")
  flags.DEFINE_enum(
    "overlap", "deferred", ["none", "deferred"], "parallel.overlap of data / lazy / hybrid."
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


def make_config(
  model, image_size, batch, strategy, collective="xla", conv="data", classes=10, overlap=None
):
  """The base config with the model, batch and parallel strategy of one benchmark program.

  Every other field keeps its base value (experiments/configs/base.py), so the config is a
  complete, trainable one; the training crop follows the model's input side.
  """
  c = base.get_config()
  c.model.name, c.model.image_size, c.model.num_classes = model, image_size, classes
  c.data.augment.crop_size = image_size
  c.data.train_scale = c.data.eval_scale = max(c.data.train_scale, image_size)
  c.train.batch_size = batch
  c.parallel.strategy, c.parallel.collective, c.parallel.conv = strategy, collective, conv
  if overlap is not None:  # else the base config's
    c.parallel.overlap = overlap
  return c


def make_strategy(config, devices):
  """The strategy of `config` on a one-axis mesh over `devices`."""
  mesh = mesh_lib.make_mesh(config.parallel, devices)
  return strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )


def _batch_abstract(strategy, config, dtype="uint8"):
  """ShapeDtypeStructs of a global (images, labels) batch on the strategy's batch sharding."""
  s, b = config.model.image_size, config.train.batch_size
  return (
    jax.ShapeDtypeStruct((b, s, s, 3), np.dtype(dtype), sharding=strategy.batch_sharding),
    jax.ShapeDtypeStruct((b,), np.int32, sharding=strategy.batch_sharding),
  )


def count_collectives(hlo_text: str) -> int:
  """Collective ops in compiled HLO text (async -start/-done pairs count once)."""
  ops = "|".join(COLLECTIVE_KINDS)  # on CPU each one is a rendezvous of all devices
  return len(re.findall(rf"= \S+ (?:{ops})(?:-start)?\(", hlo_text))


def build_step_runner(config, devices) -> tuple[Callable[[], None], float]:
  """(run one step and wait for it, FLOPs of one step over all devices).

  The runner's `collectives` attribute counts the collective ops of the step.

  Times the public `strategy.train_step`, carrying the donated state from call to
  call as in training. The FLOPs come from `lower_train_step(...).compile()` after
  the first step: jit's compilation cache returns the very executable being timed.
  """
  strategy = make_strategy(config, devices)
  images_abs, labels_abs = _batch_abstract(strategy, config)
  rng = np.random.default_rng(0)
  images = jax.device_put(
    rng.integers(0, 256, images_abs.shape, dtype=np.uint8), strategy.batch_sharding
  )
  labels = jax.device_put(
    rng.integers(0, config.model.num_classes, labels_abs.shape).astype(np.int32),
    strategy.batch_sharding,
  )
  box = {"state": strategy.init(jax.random.key(config.seed))}

  def run():
    box["state"], metrics = strategy.train_step(box["state"], images, labels)
    jax.block_until_ready(metrics)
    box["loss"] = metrics["loss"]

  run()  # compiles
  compiled = strategy.lower_train_step(strategy.abstract_state(), images_abs, labels_abs).compile()
  # cost_analysis() is per device (DESIGN.md); every device runs the same SPMD program.
  flops = float(compiled.cost_analysis()["flops"]) * len(devices)
  run.last_loss = lambda: float(box["loss"])
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


def time_round_robin(runners: dict[str, Callable[[], None]], repeats: int, warmup: int = 2):
  """{name: [seconds per call]}: `warmup` untimed calls each, then `repeats` rounds.

  Each round calls every runner once, starting one further along than the last
  round, so slow spells on a shared machine spread over all programs alike.
  """
  names = list(runners)
  for name in names:
    for _ in range(warmup):
      runners[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    for i in range(len(names)):
      name = names[(r + i) % len(names)]
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
  return times


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
  """Median over rounds of times[r] / base[r]: robust to noise that spans a round."""
  return statistics.median([t / b for t, b in zip(times, base, strict=True)])


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
  loss = {k: r.last_loss() for k, r in runners.items() if hasattr(r, "last_loss")}
  ops = {k: r.collectives for k, r in runners.items() if hasattr(r, "collectives")}
  return {"times": times, "flops": flops, "configs": names, "loss": loss, "collectives": ops}


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
    images, labels = _batch_abstract(strategy, cfg)
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


# --- markdown ----------------------------------------------------------------


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


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
    f"Parameters + optimizer state, all devices together: {_mib(total)} MiB; / {n} = "
    f"{_mib(total // n)} MiB.",
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
          _mib(r["argument"]),
          _mib(r["output"]),
          _mib(r["alias"]),
          _mib(r["temp"]),
          _mib(r["state_per_device"]),
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Must run before anything asks JAX for its devices.
  mesh_lib.configure_host_devices(FLAGS.devices)
  devices = jax.devices()
  n = len(devices)
  repeats = 4 if FLAGS.quick else FLAGS.repeats
  command = " ".join(["python -m experiments.benchmark_step"] + sys.argv[1:])
  parts = ["## Step benchmark", "", machine_markdown(command)]

  t0 = time.perf_counter()
  result = measure_steps(
    FLAGS.model,
    FLAGS.image_size,
    FLAGS.batch,
    STEP_CONFIGS,
    devices,
    repeats,
    conv_shape=CONV_SHAPE,
    overlap=FLAGS.overlap,
  )
  logging.info("step tables took %.0f s", time.perf_counter() - t0)
  parts += ["", step_markdown(result, FLAGS.model, FLAGS.image_size, FLAGS.batch, n)]
  bad = {k: v for k, v in result["loss"].items() if not math.isfinite(v)}
  if bad:
    parts += ["", f"WARNING: non-finite loss after timing (timings suspect): {bad}"]
  print("\n".join(parts), flush=True)

  if not FLAGS.skip_memory:
    t0 = time.perf_counter()
    rows = memory_rows(
      FLAGS.memory_model,
      224,
      1000,
      FLAGS.memory_batch,
      MEMORY_CONFIGS,
      devices,
      overlap=FLAGS.overlap,
    )
    logging.info("memory table took %.0f s", time.perf_counter() - t0)
    mem = memory_markdown(rows, FLAGS.memory_model, FLAGS.memory_batch, n)
    parts += ["", mem]
    print("\n" + mem, flush=True)

  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
