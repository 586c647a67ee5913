r"""Input-pipeline throughput and where its time goes (issue 9), all rows in one run.

  python -m experiments.benchmark_input --repeats=5 > benchmarks/input_DATE.md

All rows run on the same `--num_images` 512x512 JPEGs (quality 90), made from
scikit-image's bundled photos (crops, resizes, flips), written to a temp dir:

  decoders  each JPEG decoder a user could pick, 1 process, full size and reduced DCT scale;
  profile   per-stage cost of one training example on 1 core (decode, resize, Grain's
            per-record rng, sampling, resample, photometric, batching), and for each worker
            count the CPU seconds per image of the workers and of the main process
            (/proc/<pid>/stat), whose excess over the stages is Grain's and the transfer's;
  (a)       decode only, the pipeline's reduced-DCT decode (`decode_image(min_side=S)`), in
            `--workers` pool processes: the ceiling for any decoding pipeline;
  (b)       ours, host augmentation (`make_train_iterator`, augment_on='host'), for each of
            `--worker_counts`; decode -> shorter side S -> random c crop -> all augmentations;
  (b')      ours, augment_on='device', same worker counts: the host side only (workers decode
            and cut the S x S window; the augmentation runs in the train step on the device);
  (c)       the plain alternative: `multiprocessing.Pool(--workers)`, OpenCV reduced decode
            (IMREAD_REDUCED_COLOR_2) + albumentations 2.0.8 (SmallestMaxSize, RandomCrop,
            HorizontalFlip, Rotate, OpticalDistortion, RGBShift) + a numpy vignette;
  (d)       augmentation only, 1 core, decoded S x S inputs: ours vs (c)'s;
  (e)       `augment_device.apply_batch` jitted on this machine's default JAX backend;
  projection  the per-core rates scaled to a 16-core host, next to what one H100 consumes
            training the Table 2 model (its FLOPs, `deep_image.models.summary`).

Each number is the median over `--repeats` runs. albumentations is a dev-only requirement
of this script (requirements-dev.txt). The decoders, the alternative and the pool workers
are `experiments.input_baselines`; the JPEGs and the timers `experiments.input_timing`.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time

import cv2
import numpy as np
from absl import app, flags

from deep_image.data import augment, augment_host, data_config, grain_workers, pipeline
from deep_image.data.sources import decode_image
from experiments import input_baselines
from experiments.input_timing import (
  JpegSource,
  cpu_seconds,
  make_jpegs,
  median_rate,
  per_item_us,
  table2_train_flops,
)
from experiments.markdown import cpu_model

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 64, "Distinct JPEGs to generate.")
flags.DEFINE_integer("passes", 8, "Passes over the JPEGs per timed run of the pool rows.")
flags.DEFINE_integer("workers", 2, "Processes for (a) and (c), the worker count of the targets.")
flags.DEFINE_list("worker_counts", ["0", "1", "2", "3"], "Worker counts of (b) and (b').")
flags.DEFINE_integer("repeats", 5, "Timed runs per row; the median is reported.")
flags.DEFINE_integer("batch_size", 32, "Batch of (b), (b') and (e).")
flags.DEFINE_integer("scale", 256, "Training scale S.")
flags.DEFINE_integer("crop", 224, "Crop side c.")
flags.DEFINE_float("h100_tflops", 989.0, "H100 SXM bf16 dense peak, TFLOP/s.")
flags.DEFINE_float("h100_utilization", 0.4, "Assumed model FLOP utilization of the H100.")
flags.DEFINE_integer("host_cores", 16, "Cores of the projected host.")

# --- JPEG decoders, each to RGB uint8; `reduced` asks for a shorter side >= S.


class PipelineRow:
  """One `make_train_iterator` configuration; each `time` call builds a fresh iterator.

  An iterator left open while other rows run keeps its workers alive and its buffers full,
  which skewed the next timing of it (2 workers read as slower than 1); built, warmed,
  timed and closed per round, every row sees only its own processes.
  """

  def __init__(
    self, paths: list[str], workers: int, augment_on: str, read_threads: int | None = None
  ):
    self.paths, self.workers, self.augment_on = paths, workers, augment_on
    self.read_threads = read_threads
    self.rates, self.main_us, self.worker_us = [], [], []

  def time(self, count: int) -> float:
    """Images/s over `count` images in steady state; records CPU per image."""
    default_threads = grain_workers.READ_THREADS
    if self.read_threads is not None:  # Read when the iterator is built.
      grain_workers.READ_THREADS = self.read_threads
    cfg = data_config.default_config()
    cfg.train_scale, cfg.num_workers, cfg.augment_on = FLAGS.scale, self.workers, self.augment_on
    cfg.augment.crop_size = FLAGS.crop
    before = {p.pid for p in multiprocessing.active_children()}
    it = pipeline.make_train_iterator(
      cfg, global_batch_size=FLAGS.batch_size, seed=0, source=JpegSource(self.paths)
    )
    grain_workers.READ_THREADS = default_threads
    # Worker start-up and the batches Grain buffers meanwhile (up to ~6 per worker: 2 in
    # data.worker_buffer_size, the rest in its transfer queues) are not throughput.
    for _ in range(8 * max(self.workers, 1) + 2):
      next(it)
    children = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    batches = max(count // FLAGS.batch_size, 1)
    w0 = sum(map(cpu_seconds, children))
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed, images = time.perf_counter() - t0, batches * FLAGS.batch_size
    self.main_us.append(1e6 * (time.process_time() - c0) / images)
    self.worker_us.append(1e6 * (sum(map(cpu_seconds, children)) - w0) / images)
    self.rates.append(images / elapsed)
    if self.workers:
      it.close()
    return self.rates[-1]


def stage_profile(paths: list[str], repeats: int) -> dict[str, float]:
  """Microseconds per training example of each stage, 1 core, host augmentation."""
  cv2.setNumThreads(1)
  blobs = [open(p, "rb").read() for p in paths]
  s, c, b = FLAGS.scale, FLAGS.crop, FLAGS.batch_size
  decoded = [decode_image(x, min_side=s) for x in blobs]
  resized = [pipeline.resize_shorter_side(x, s) for x in decoded]
  space = augment.SamplingSpace.from_config(_aug_config())
  rng = np.random.default_rng(0)
  params = [augment.sample_params(rng, space, x.shape[:2]) for x in resized]
  pairs = list(zip(resized, params, strict=True))
  crops = [augment_host.apply(x, p) for x, p in pairs]
  stages = {
    "decode (reduced DCT)": per_item_us(lambda x: decode_image(x, min_side=s), blobs, repeats),
    "resize shorter side to S": per_item_us(
      lambda x: pipeline.resize_shorter_side(x, s), decoded, repeats
    ),
    "Grain per-record rng (Philox Generator)": per_item_us(
      lambda i: np.random.Generator(np.random.Philox(key=i)), list(range(len(paths))), repeats
    ),
    "sample_params": per_item_us(
      lambda x: augment.sample_params(rng, space, x.shape[:2]), resized, repeats
    ),
    "resample (crop, flip, rotation, lens)": per_item_us(
      lambda xp: augment_host.resample(*xp), pairs, repeats
    ),
  }
  stages["photometric (vignette, cast) + RGB"] = (
    per_item_us(lambda xp: augment_host.apply(*xp), pairs, repeats)
    - stages["resample (crop, flip, rotation, lens)"]
  )
  batch = [crops[i % len(crops)] for i in range(b)]
  stages["batching (np.stack)"] = per_item_us(lambda _: np.stack(batch), [0] * 8, repeats) / b
  stages["device mode: S x S window"] = per_item_us(
    lambda xp: pipeline.square_window(*xp), pairs, repeats
  )
  del c
  return stages


def augment_only_rates(paths: list[str], repeats: int) -> tuple[list[float], list[float]]:
  """Per repeat, (ours, albumentations + numpy vignette) images/s on one core, decoded S x S
  inputs; the two alternate so each pair sees the same machine load."""
  cv2.setNumThreads(1)
  images = [decode_image(open(p, "rb").read(), min_side=FLAGS.scale) for p in paths]
  images = [pipeline.resize_shorter_side(x, FLAGS.scale) for x in images]
  space = augment.SamplingSpace.from_config(_aug_config())
  compose, _ = input_baselines.albumentations_transform(FLAGS.scale, FLAGS.crop)
  count = len(images) * 4

  def ours():
    rng = np.random.default_rng(0)
    for i in range(count):
      image = images[i % len(images)]
      augment_host.apply(image, augment.sample_params(rng, space, image.shape[:2]))

  def albu():
    rng = np.random.default_rng(0)
    for i in range(count):
      input_baselines.numpy_vignette(compose(image=images[i % len(images)])["image"], rng)

  ours(), albu()  # Warm up.
  pairs = [(median_rate(ours, count, 1), median_rate(albu, count, 1)) for _ in range(repeats)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _aug_config():
  cfg = augment.default_config()
  cfg.crop_size = FLAGS.crop
  return cfg


def device_rate(paths: list[str], repeats: int) -> tuple[float, str]:
  import jax

  from deep_image.data import augment_device

  b = FLAGS.batch_size
  images = np.stack(
    [
      cv2.resize(decode_image(open(paths[i % len(paths)], "rb").read()), (FLAGS.scale,) * 2)
      for i in range(b)
    ]
  )
  rng = np.random.default_rng(0)
  space = augment.SamplingSpace.from_config(_aug_config())
  params = augment.stack_params(
    [augment.sample_params(rng, space, (FLAGS.scale, FLAGS.scale)) for _ in range(b)]
  )
  x = jax.device_put(images)
  augment_device.apply_batch_jit(x, params).block_until_ready()
  steps = 8

  def run():
    for _ in range(steps):
      out = augment_device.apply_batch_jit(x, params)
    out.block_until_ready()

  return median_rate(run, steps * b, repeats), str(jax.devices()[0].device_kind)


def main(argv):
  del argv
  count = FLAGS.num_images * FLAGS.passes
  w, s, c, reps = FLAGS.workers, FLAGS.scale, FLAGS.crop, FLAGS.repeats
  counts = [int(x) for x in FLAGS.worker_counts]
  with tempfile.TemporaryDirectory() as tmp:
    paths = make_jpegs(tmp, FLAGS.num_images)
    blobs = [open(p, "rb").read() for p in paths]
    cv2.setNumThreads(1)
    decoders = {
      name: (
        per_item_us(lambda x, fn=fn: fn(x, None), blobs, reps),
        per_item_us(lambda x, fn=fn: fn(x, s), blobs, reps),
      )
      for name, fn in input_baselines.decoders().items()
    }
    cv2.setNumThreads(0)  # Back to OpenCV's default, what an in-process user gets.
    ctx = multiprocessing.get_context("spawn")
    pool1 = ctx.Pool(1, initializer=input_baselines.worker_setup, initargs=(paths, s, c))
    pool = ctx.Pool(w, initializer=input_baselines.worker_setup, initargs=(paths, s, c))
    for p in (pool1, pool):  # Warm the workers (imports, first decode).
      p.map(input_baselines.albumentations_one, range(2 * w))
    pools = {
      "decode1": lambda: pool1.map(input_baselines.decode_ours, range(count), chunksize=8),
      "decode": lambda: pool.map(input_baselines.decode_ours, range(count), chunksize=8),
      "albu": lambda: pool.map(input_baselines.albumentations_one, range(count), chunksize=8),
    }
    rows = {"serial": PipelineRow(paths, 0, "host", read_threads=0)}
    rows |= {("host", n): PipelineRow(paths, n, "host") for n in counts}
    rows |= {("device", n): PipelineRow(paths, n, "device") for n in counts}
    # Every row once per round, in a rotating order: ratios of one round share the load
    # of the (shared) machine, and are reported as medians over the rounds.
    names = list(pools) + list(rows)
    rates = {name: [] for name in names}
    for r in range(reps):
      for name in names[r % len(names) :] + names[: r % len(names)]:
        if name in pools:
          rates[name].append(median_rate(pools[name], count, 1))
        else:
          rates[name].append(rows[name].time(count))
    pool1.terminate(), pool.terminate()
    stages = stage_profile(paths, reps)
    ours_aug, albu_aug = augment_only_rates(paths, reps)
    jit_rate, kind = device_rate(paths, reps)
  flops = table2_train_flops()
  med = statistics.median

  def summary(row: PipelineRow) -> dict:
    return {"rate": med(row.rates), "main_us": med(row.main_us), "worker_us": med(row.worker_us)}

  def ratio(a, b) -> float:
    """Median over rounds of rate a / rate b (same-round pairs)."""
    return med([x / y for x, y in zip(rates[a], rates[b], strict=True)])

  serial = summary(rows["serial"])
  host = {n: summary(rows["host", n]) for n in counts}
  device = {n: summary(rows["device", n]) for n in counts}
  decode_one, ceiling, albu_all = (med(rates[k]) for k in ("decode1", "decode", "albu"))
  aug_ratio = med([x / y for x, y in zip(ours_aug, albu_aug, strict=True)])
  ours_aug, albu_aug = med(ours_aug), med(albu_aug)

  print(
    f"Machine: {os.cpu_count()} cores (`nproc` {len(os.sched_getaffinity(0))}), {cpu_model()}; "
    f"{FLAGS.num_images} distinct 512x512 JPEGs (q90), S={s}, c={c}, batch {FLAGS.batch_size}; "
    f"median of {reps} rounds; a round times every throughput row once, in rotating order, "
    "and ratios are medians of same-round ratios.\n"
  )
  print("JPEG decoders, 1 process, microseconds per 512x512 image (lower is better):\n")
  print(f"| decoder | full 512 | reduced DCT (shorter side >= {s}) |")
  print("|---|---:|---:|")
  for name, (full, reduced) in decoders.items():
    print(f"| {name} | {full:.0f} | {reduced:.0f} |")

  print("\nPer-stage cost of one host-augmented example, 1 core, microseconds:\n")
  print("| stage | us / image |")
  print("|---|---:|")
  train_stages = [k for k in stages if not k.startswith("device")]
  for name in stages:
    print(f"| {name} | {stages[name]:.0f} |")
  stage_sum = sum(stages[k] for k in train_stages)
  print(f"| **sum of the host-mode stages** | **{stage_sum:.0f}** |")

  print(
    "\nCPU per image with workers (from /proc), microseconds; overhead = workers + main - stages:\n"
  )
  print("| mode | workers | img/s | workers CPU | main CPU | overhead vs stage sum |")
  print("|---|---:|---:|---:|---:|---:|")
  print(
    f"| host | 0, serial | {serial['rate']:.0f} | 0 | {serial['main_us']:.0f} | "
    f"{serial['main_us'] - stage_sum:+.0f} |"
  )
  for mode, rows, base in (
    ("host", host, stage_sum),
    ("device", device, stages["decode (reduced DCT)"] + stages["device mode: S x S window"]),
  ):
    for n, r in rows.items():
      total = r["worker_us"] + r["main_us"]
      print(
        f"| {mode} | {n} | {r['rate']:.0f} | {r['worker_us']:.0f} | {r['main_us']:.0f} | "
        f"{total - base:+.0f} |"
      )

  ours0 = serial["rate"]
  threads = grain_workers.READ_THREADS
  rows = [
    ("(a1) decode only, reduced DCT (`decode_image`), 1 proc", decode_one, ""),
    (
      f"(a) decode only, reduced DCT (`decode_image`), {w} procs",
      ceiling,
      f"the ceiling; {ratio('decode', 'decode1'):.2f} x (a1): this machine's {w}-process scaling",
    ),
    ("(b) ours, host augmentation, 0 workers, serial (READ_THREADS=0: 1 core)", ours0, ""),
    *[
      (
        f"(b) ours, host augmentation, {n} workers"
        + (f" (in process, READ_THREADS={threads})" if n == 0 else ""),
        host[n]["rate"],
        f"{ratio(('host', n), 'serial'):.2f} x serial",
      )
      for n in counts
    ],
    *[
      (
        f"(b') ours, augment on device (host side), {n} workers",
        device[n]["rate"],
        f"{ratio(('device', n), 'decode'):.2f} x (a)",
      )
      for n in counts
    ],
    (f"(c) Pool({w}), OpenCV reduced decode + albumentations 2.0.8 + numpy vignette", albu_all, ""),
    (f"(d) augment only, ours, 1 core, {s}x{s} in", ours_aug, ""),
    ("(d) augment only, albumentations + numpy vignette, 1 core", albu_aug, ""),
    (f"(e) augment_device.apply_batch jit, batch {FLAGS.batch_size}, {kind}", jit_rate, ""),
  ]
  print("\nThroughput, images/s:\n")
  print("| measurement | images/s | ratio |")
  print("|---|---:|---|")
  for name, rate, note in rows:
    print(f"| {name} | {rate:.0f} | {note} |")

  # Per-core rates: images per CPU-second of workers + main process at `--workers`.
  per_core_host = 1e6 / (host[w]["worker_us"] + host[w]["main_us"])
  per_core_device = 1e6 / (device[w]["worker_us"] + device[w]["main_us"])
  cores = FLAGS.host_cores - 1  # One core left to the training process itself.
  h100 = FLAGS.h100_tflops * 1e12 * FLAGS.h100_utilization / flops
  print("\nTargets:\n")
  print("| target | measured | met |")
  print("|---|---|---|")
  targets = [
    (f"(b) {w} workers >= 1.3 x (c)", ratio(("host", w), "albu"), 1.3),
    (f"(b) {w} workers >= 1.5 x (b) serial in process", ratio(("host", w), "serial"), 1.5),
    (
      f"(b) {w} workers >= 1.5 x (b) in process, READ_THREADS={threads}",
      ratio(("host", w), ("host", 0)) if 0 in host else float("nan"),
      1.5,
    ),
    ("(d) ours >= 3 x albumentations", aug_ratio, 3.0),
    (f"(b') {w} workers >= 0.8 x (a)", ratio(("device", w), "decode"), 0.8),
  ]
  for name, ratio, goal in targets:
    print(f"| {name} | {ratio:.2f} x | {'yes' if ratio >= goal else 'no'} |")
  print(
    f"\nProjection to a {FLAGS.host_cores}-core host ({cores} cores for input, 1 for training; "
    f"per-core rate = images per CPU-second of workers + main at {w} workers): host "
    f"augmentation {per_core_host:.0f} img/s/core -> {cores * per_core_host:,.0f} img/s; "
    f"augmentation on device {per_core_device:.0f} img/s/core -> "
    f"{cores * per_core_device:,.0f} img/s. One H100 training Table 2 "
    f"({flops / 1e9:.1f} GFLOP per image, 3 x forward) at {FLAGS.h100_tflops:.0f} TFLOP/s "
    f"x {FLAGS.h100_utilization:.0%} consumes {h100:,.0f} img/s: host / H100 = "
    f"{cores * per_core_host / h100:.2f}, device-augment / H100 = "
    f"{cores * per_core_device / h100:.2f}."
  )


if __name__ == "__main__":
  app.run(main)
