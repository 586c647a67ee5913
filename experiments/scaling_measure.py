"""The programs of the scaling study compiled and measured: rows of the JSON report.

`compile_program` compiles one `step_programs.Program` and reads its memory and the bytes
each device sends (`deep_image.analysis.bytes_sent`); `measure` times programs round-robin
in groups that fit a host memory budget; `run_processes` times the same step as P processes
x D devices (each process runs `python -m experiments.scaling --worker=SPEC`, i.e.
`process_worker`); `gpu_compile_rows` compiles for H100s deviceless
(`experiments.gpu_target`) and reads how the async collectives overlap
(`deep_image.analysis.overlap`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import jax
import portpicker
from absl import logging

from deep_image.analysis.bytes_sent import bytes_summary, collective_ops
from deep_image.analysis.overlap import async_collectives, overlap_summary
from deep_image.parallel.mesh import PATIENT_COLLECTIVES
from experiments.configs import base
from experiments.gpu_target import h100_devices
from experiments.round_robin import time_round_robin
from experiments.step_programs import (
  Program,
  abstract_batch,
  make_strategy,
  random_batch,
  step_runner,
)

MODELS = ("scaling_8conv_3fc", "deep_image_16")
# The study's defaults are the base config's: its strategy and its collective.
DEFAULT_STRATEGY = base.get_config().parallel.strategy
DEFAULT_ALGORITHM = base.get_config().parallel.collective


def make_runner(strategy, compiled, p: Program) -> Callable[[], None]:
  """Run the compiled step on a fresh state and `p`'s random batch; carries the state."""
  images, labels = random_batch(strategy, p.global_batch, p.image_size, p.classes)
  return step_runner(
    lambda state, x, y: compiled(state, x, y, None),
    strategy.init(jax.random.key(0)),
    images,
    labels,
  )


def compile_program(p: Program, devices) -> tuple[object, object, dict]:
  """(strategy, compiled step, row fields): memory and collectives of one program."""
  config = p.config()
  strategy = make_strategy(config, devices)
  images, labels = abstract_batch(strategy, config)
  t0 = time.perf_counter()
  compiled = strategy.lower_train_step(strategy.abstract_state(), images, labels).compile()
  seconds = time.perf_counter() - t0
  text = compiled.as_text()
  mem = compiled.memory_analysis()
  params = jax.tree.leaves(strategy.abstract_state().params)
  replicated = sum(x.size * x.dtype.itemsize for x in params if x.sharding.is_fully_replicated)
  if p.strategy == "lazy":  # its 1/N shards are gathered whole every step: all synchronised
    replicated = sum(x.size * x.dtype.itemsize for x in params)
  n = p.devices
  summary = bytes_summary(collective_ops(text, n))
  # Replicated weights are synchronised once per step (a ring all-reduce's 2 (N-1)/N of
  # their bytes); whatever else the program sends follows the batch: activations.
  weights = 2 * (n - 1) / n * replicated
  row = dict(
    model=p.model,
    strategy=p.strategy,
    algorithm=p.algorithm if p.strategy != "gspmd" else "xla",
    devices=p.devices,
    image_size=p.image_size,
    global_batch=p.global_batch,
    per_device_batch=p.global_batch // p.devices,
    dtype=p.dtype,
    classes=p.classes,
    argument_bytes=int(mem.argument_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    memory_bytes=int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
    compile_s=seconds,
    synced_param_bytes=int(replicated),
    split_param_bytes=int(sum(x.size * x.dtype.itemsize for x in params) - replicated),
    weight_bytes=weights,
    activation_bytes=max(0.0, summary["bytes_sent"] - weights),
    **summary,
  )
  return strategy, compiled, (row, text)


def memory_groups(rows: Sequence[dict], budget_bytes: float) -> list[list[int]]:
  """Indices of rows packed in order into groups whose host memory (memory_bytes x devices)
  fits `budget_bytes`; a program over budget is a group of its own."""
  groups, current, used = [], [], 0.0
  for i, r in enumerate(rows):
    need = r["memory_bytes"] * r["devices"]
    if current and used + need > budget_bytes:
      groups.append(current)
      current, used = [], 0.0
    current.append(i)
    used += need
  if current:
    groups.append(current)
  return groups


def measure(programs: Sequence[Program], devices, repeats: int, budget_gb: float) -> list[dict]:
  """Compile every program, then time them round-robin in groups that fit the memory budget.

  Each row: the `compile_program` fields, step_ms (median over rounds), images_per_s,
  ms_per_image, rounds, group (the round-robin group), loss (finite or not).
  """
  built = []
  for p in programs:
    logging.info("compiling %s", p.label)
    strategy, compiled, (row, _) = compile_program(p, devices[: p.devices])
    built.append((p, strategy, compiled, row))
  rows = [b[3] for b in built]
  for g, group in enumerate(memory_groups(rows, budget_gb * 2**30)):
    runners = {}
    for i in group:
      p, strategy, compiled, _ = built[i]
      runners[i] = make_runner(strategy, compiled, p)
    logging.info("timing group %d: %s", g, [built[i][0].label for i in group])
    times = time_round_robin(runners, repeats, warmup=1)
    for i in group:
      step = statistics.median(times[i])
      rows[i].update(
        step_ms=1e3 * step,
        images_per_s=rows[i]["global_batch"] / step,
        ms_per_image=1e3 * step / rows[i]["global_batch"],
        rounds=repeats,
        group=g,
        loss=runners[i].loss(),
      )
      runners[i].release()
  return rows


def process_worker(spec: dict) -> None:
  """One process of a P x D timing: spec has processes, process_id, port, devices_per_process,
  programs (Program fields), repeats, out (written by process 0)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", spec["devices_per_process"])
  if spec["processes"] > 1:
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{spec['port']}",
      num_processes=spec["processes"],
      process_id=spec["process_id"],
    )
  devices = jax.devices()
  programs = [Program(**p) for p in spec["programs"]]
  runners, rows = {}, []
  for i, p in enumerate(programs):
    strategy, compiled, (row, _) = compile_program(p, devices[: p.devices])
    runners[i] = make_runner(strategy, compiled, p)
    rows.append(row)
  times = time_round_robin(runners, spec["repeats"], warmup=1)
  for i, row in enumerate(rows):
    step = statistics.median(times[i])
    row.update(
      processes=spec["processes"],
      step_ms=1e3 * step,
      images_per_s=row["global_batch"] / step,
      ms_per_image=1e3 * step / row["global_batch"],
      rounds=spec["repeats"],
      loss=runners[i].loss(),
    )
  if spec["process_id"] == 0:
    with open(spec["out"], "w") as f:
      json.dump(rows, f)


def run_processes(
  programs: Sequence[Program], processes: int, devices: int, repeats: int, tmp: str
) -> list[dict]:
  """Start `processes` workers of `devices / processes` devices each; process 0's rows."""
  port = portpicker.pick_unused_port()
  out = os.path.join(tmp, f"processes_{processes}x{devices // processes}.json")
  env = dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES)  # each worker sets its device count
  procs, logs = [], []
  for i in range(processes):
    spec = dict(
      processes=processes,
      process_id=i,
      port=port,
      devices_per_process=devices // processes,
      programs=[dataclasses.asdict(p) for p in programs],
      repeats=repeats,
      out=out,
    )
    log = open(os.path.join(tmp, f"process_{processes}_{i}.log"), "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "experiments.scaling", f"--worker={json.dumps(spec)}"]
    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    logs.append(log)
  codes = [p.wait() for p in procs]
  for log in logs:
    log.close()
  if any(codes):
    raise RuntimeError(f"{processes}-process timing failed ({codes}); logs in {tmp}")
  with open(out) as f:
    return json.load(f)


def gpu_compile_rows(
  specs: Sequence[tuple[str, int]], strategies: Sequence[str], per_device_batch: int
) -> list[dict]:
  """Deviceless H100 compiles of every (model, GPUs) x strategy, default algorithm, bf16."""
  rows = []
  for model, gpus in specs:
    hosts = max(1, gpus // 8)
    devices = h100_devices(gpus, hosts)
    for strategy in strategies:
      p = Program(model, strategy, DEFAULT_ALGORITHM, gpus, 224, per_device_batch * gpus,
                  dtype="bfloat16")  # fmt: skip
      logging.info("GPU compile %s", p.label)
      _, _, (row, text) = compile_program(p, devices)
      summary = overlap_summary(async_collectives(text))
      row.update(
        hosts=hosts,
        async_collectives=summary.count,
        overlapped=summary.fraction,
        overlapped_bytes=summary.bytes_fraction,
      )
      print(f"{p.label}: {row['bytes_sent'] / 2**20:,.1f} MiB sent / GPU, "
            f"{summary.line()}, compiled in {row['compile_s']:.0f} s", flush=True)  # fmt: skip
      rows.append(row)
  return rows
