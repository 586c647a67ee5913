r"""Run one training job as N processes on this machine (JAX's distributed runtime).

  python -m launch.local --num_processes=2 -- \
      --config=experiments/configs/default.py --workdir=/tmp/mp
  python -m launch.local --num_processes=2 -- \
      --config=experiments/configs/default.py:tiny --workdir=/tmp/mp_tiny

Starts N copies of `python -m experiments.train ARGS` with
`--config.parallel.distributed=explicit`, a coordinator on 127.0.0.1 and
process ids 0..N-1. On a CPU-only machine each process simulates
`parallel.num_devices / N` devices, so the mesh and the global batch are
those of a 1-process run; each process reads its own shard of every epoch, so
the batches are composed differently. Collectives between processes (our
ppermute-based ones included) go through gloo. Only process 0 writes
metrics.jsonl. Output of process i goes to
WORKDIR/process_i.log; the launcher waits for all, and exits non-zero (after
stopping the rest) as soon as one fails.
"""

import os
import subprocess
import sys
import time

import portpicker
from absl import app, flags, logging

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: pick a free one).")


def _workdir(args: list[str]) -> str:
  for arg in args:
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  raise app.UsageError("pass the train script's --workdir=DIR after --")


def _config_first(args: list[str]) -> list[str]:
  """`args` with `--config=FILE[:variants]` moved to the front.

  ml_collections' config flag must come before any `--config.x=y` override (it rejects an
  override that precedes it), and this launcher appends overrides of its own; so the
  train arguments may come in any order.
  """
  first = [a for a in args if a.startswith("--config=")]
  return first + [a for a in args if not a.startswith("--config=")]


def main(argv):
  train_args = _config_first(argv[1:])
  workdir = _workdir(train_args)
  os.makedirs(workdir, exist_ok=True)
  n = _NUM_PROCESSES.value
  if n < 1:
    raise app.UsageError(f"--num_processes={n} must be >= 1")
  port = _PORT.value or portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(n):
    log = open(os.path.join(workdir, f"process_{i}.log"), "w")  # noqa: SIM115 (kept open)
    cmd = [
      sys.executable,
      "-m",
      "experiments.train",
      *train_args,
      "--config.parallel.distributed=explicit",
      f"--config.parallel.coordinator_address=127.0.0.1:{port}",
      f"--config.parallel.num_processes={n}",
      f"--config.parallel.process_id={i}",
    ]
    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  logging.info("started %d processes, coordinator 127.0.0.1:%d, logs in %s", n, port, workdir)
  failed = None
  while failed is None and any(p.poll() is None for p in procs):
    failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
    time.sleep(0.5)
  failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), failed)
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    p.wait()
  for log in logs:
    log.close()
  if failed is not None:
    logging.error(
      "process %d exited with %d; see %s",
      failed,
      procs[failed].returncode,
      os.path.join(workdir, f"process_{failed}.log"),
    )
    sys.exit(1)
  logging.info("all %d processes finished", n)


if __name__ == "__main__":
  app.run(main)
