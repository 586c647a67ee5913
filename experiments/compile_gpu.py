r"""Compile the train step deviceless for H100s and measure how its collectives overlap compute.

  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu /tmp/gpu-aot/bin/python \
    -m experiments.compile_gpu [--devices=8] [--hosts=1] [--model=deep_image_16] \
    [--image_size=224] [--batch=256] [--dtype=bfloat16] [--strategies=gspmd,data,lazy,hybrid] \
    [--collectives=butterfly,xla] [--overlaps=none,deferred] [--bucket_mb=25] [--nogpu_flags] \
    [--mesh="(('node',8),('local',8))"] [--node_collective=ring] [--dump_hlo=DIR] [--out=FILE.md]

XLA's GPU compiler runs on a CPU-only machine (deviceless, `experiments/gpu/h100_sxm.pbtxt`
describes the GPU): every
configuration's step is lowered and compiled for `--devices` H100 SXM GPUs
(`--hosts` hosts), nothing runs. For each configuration the script prints, in
one markdown table, the per-device argument and temp bytes (`memory_analysis`)
and, from the scheduled HLO (`compiled.as_text()`), the asynchronous
collectives: every `<kind>-start` / `<kind>-done` pair (and `async-start` /
`async-done` wrapping a collective) per kind, and how many of them have compute
(a fusion, convolution, cuDNN / cuBLAS custom-call, dot, loop, ...) scheduled
between start and done, by count and by bytes (the collective's output shape).
A second table lists the collectives with nothing to hide behind, with the
compute just before and after them in the schedule (which layer they sit at).

Bytes across hosts: the devices are the topology `1x<hosts>x<devices/hosts>` (node-major:
GPU d on host d // (devices/hosts)); for every configuration the table gives the MiB per
GPU per step sent to GPUs on other hosts (`deep_image.analysis.cross_host`: exact for the
hand-written collectives' permutes, a ring in group order for XLA's collectives), the max
over GPUs and the mean, beside the cost model's `cross_node_bytes` for the same config
(deep_image.parallel.cost_model, H100 preset), and after the tables one line per
configuration:
  cross_host_mib_per_gpu <configuration, spaces removed> <max MiB per GPU per step>
`--mesh` sets parallel.mesh for every configuration (default: the config's one axis over
all devices), e.g. `--mesh="(('node',8),('local',8))"` for 8 hosts of 8: the two-level
strategies; `--node_collective` the algorithm of its node level (parallel.node_collective).

The GPU overlap flags come from `deep_image.parallel.mesh.GPU_OVERLAP_FLAGS`,
added to XLA_FLAGS before JAX starts, as in training.

Needs the CUDA wheels, kept out of requirements.txt; set them up once with
  python3 -m venv /tmp/gpu-aot && /tmp/gpu-aot/bin/pip install "jax[cuda12]==0.10.2" \
    -r requirements.txt && /tmp/gpu-aot/bin/pip install -e . --no-deps
The HLO analysis (`deep_image.analysis.overlap`) needs neither CUDA nor JAX; the
configurations, the compile and the tables are `experiments.gpu_overlap`.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags

from deep_image.parallel.layout_policy import STRATEGIES
from deep_image.parallel.validation import OVERLAPS
from experiments.configs import base
from experiments.gpu_overlap import (
  compile_one,
  configurations,
  cross_host_lines,
  make_config,
  report,
)
from experiments.gpu_target import cuda_missing, h100_devices, setup_hint
from experiments.step_programs import PAPER_CLASSES

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: importing the module defines no flags."""
  flags.DEFINE_integer("devices", 8, "GPUs in all.")
  flags.DEFINE_integer("hosts", 1, "Hosts the GPUs are spread over.")
  flags.DEFINE_string("model", "deep_image_16", "Model name (deep_image.models.vgg).")
  flags.DEFINE_integer("image_size", 224, "Training crop side.")
  flags.DEFINE_integer("classes", PAPER_CLASSES, "Output classes.")
  flags.DEFINE_integer("batch", 256, "Global batch.")
  flags.DEFINE_string("dtype", "bfloat16", "model.dtype (compute).")
  flags.DEFINE_list("strategies", list(STRATEGIES), "Strategies (parallel.strategy).")
  flags.DEFINE_list(
    "collectives", ["butterfly", "xla"], "parallel.collective of the shard_map strategies."
  )
  flags.DEFINE_list("overlaps", list(OVERLAPS), "parallel.overlap values.")
  parallel = base.get_config().parallel
  flags.DEFINE_string("conv", parallel.conv, "parallel.conv of hybrid.")
  flags.DEFINE_float("bucket_mb", parallel.bucket_mb, "parallel.bucket_mb.")
  flags.DEFINE_string(
    "mesh", "", "parallel.mesh, a Python literal, e.g. \"(('node',8),('local',8))\" ('': default)."
  )
  flags.DEFINE_string(
    "node_collective", "", "parallel.node_collective of a two-axis mesh ('': = collective)."
  )
  flags.DEFINE_string("out", None, "Also write the markdown report to this file.")
  flags.DEFINE_string("dump_hlo", None, "Write each scheduled HLO into this folder.")
  flags.DEFINE_bool(
    "gpu_flags",
    True,
    "Add mesh.GPU_OVERLAP_FLAGS to XLA_FLAGS (--nogpu_flags: XLA_FLAGS as given, to compare).",
  )


def parse_mesh(text: str) -> tuple:
  """`--mesh`: '' -> () (the config's default); "(('node',8),('local',8))" -> the pairs."""
  if not text.strip():
    return ()
  try:
    mesh = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"--mesh={text!r} is no Python literal of (name, size) pairs") from e
  if not all(
    isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)
    for p in mesh
  ):
    raise ValueError(f"--mesh={text!r}: want ((name, size), ...)")
  return tuple(mesh)


def main(argv):
  del argv
  missing = cuda_missing()
  if missing:
    sys.exit(f"compile_gpu: {missing}; set it up with: {setup_hint('experiments.compile_gpu')}")
  from deep_image.parallel import mesh as mesh_lib

  if FLAGS.gpu_flags:
    mesh_lib.add_gpu_overlap_flags()  # before JAX starts its backends
  if FLAGS.devices % FLAGS.hosts:
    sys.exit(f"compile_gpu: --devices={FLAGS.devices} does not divide over --hosts")
  try:
    mesh = parse_mesh(FLAGS.mesh)
  except ValueError as e:
    sys.exit(f"compile_gpu: {e}")
  devices = h100_devices(FLAGS.devices, FLAGS.hosts)
  configs = configurations(
    FLAGS.strategies,
    FLAGS.collectives,
    FLAGS.overlaps,
    FLAGS.conv,
    mesh=mesh,
    node_collective=FLAGS.node_collective,
  )
  results = []
  for cfg in configs:
    config = make_config(
      cfg,
      model=FLAGS.model,
      image_size=FLAGS.image_size,
      batch=FLAGS.batch,
      classes=FLAGS.classes,
      dtype=FLAGS.dtype,
      conv=FLAGS.conv,
      bucket_mb=FLAGS.bucket_mb,
    )
    r = compile_one(cfg, config, devices, FLAGS.dump_hlo)
    print(
      f"{cfg.label}: {r['summary'].line()}, across hosts {r['cross_host'].max / 2**20:,.1f} "
      f"MiB / GPU (compiled in {r['seconds']:.0f} s)",
      flush=True,
    )
    results.append(r)
  header = (
    f"Deviceless XLA GPU compile of `{FLAGS.model}` ({FLAGS.image_size}x{FLAGS.image_size}, "
    f"{FLAGS.classes} classes, {FLAGS.dtype}), global batch {FLAGS.batch}, "
    f"{FLAGS.devices} x H100 SXM on {FLAGS.hosts} host(s), parallel.bucket_mb="
    f"{FLAGS.bucket_mb:g}, parallel.mesh={mesh or 'default (one axis)'}.\n"
    f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`\n"
    f"command: `python -m experiments.compile_gpu {' '.join(sys.argv[1:])}`"
  )
  text = header + "\n\n" + report(results) + "\n\n" + "\n".join(cross_host_lines(results))
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
