r"""Run one training job as N processes on this machine (JAX's distributed runtime).

  python -m launch.local --num_processes=2 -- \
      --config=experiments/configs/default.py --workdir=/tmp/mp
  python -m launch.local --num_processes=2 -- \
      --config=experiments/configs/default.py:tiny --workdir=/tmp/mp_tiny

Starts N copies of `python -m experiments.train ARGS` with
`--config.parallel.distributed=explicit`, a coordinator on 127.0.0.1 and
process ids 0..N-1. On a CPU-only machine each process simulates
`parallel.num_devices / N` devices, so the mesh and the global batch are
those of a 1-process run. The sample stream is global (a function of seed,
epoch and global index): every process loads the rows of each global batch
that its devices hold, so 2 processes x 4 devices log the losses of
1 process x 8 devices. Collectives between processes (our ppermute-based ones
included) go through gloo. Only process 0 writes metrics.jsonl and TensorBoard
events; every process writes its shards of each checkpoint (Orbax).
Output of process i goes to WORKDIR/process_i.log.

The launcher waits for all and exits non-zero, naming each process that failed
and how (exit status or signal), as soon as one fails; it first stops the rest
(SIGTERM, then SIGKILL after --stop_grace_s). With --keep_going it stops
nobody and waits for every process: a survivor then ends by JAX's own
mechanism, within `parallel.heartbeat_timeout_s` of a peer's death (the
coordination service stops every process of a job with a dead member).
"""

import os
import signal
import subprocess
import sys
import time

import portpicker
from absl import app, flags, logging

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: pick a free one).")
_KEEP_GOING = flags.DEFINE_bool(
  "keep_going",
  False,
  "When a process fails, do not stop the others: wait for all (JAX's heartbeat timeout "
  "ends the survivors of a dead peer).",
)
_STOP_GRACE_S = flags.DEFINE_float(
  "stop_grace_s", 30.0, "Seconds between SIGTERM and SIGKILL when stopping the others."
)


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
  failed = _wait(procs, keep_going=_KEEP_GOING.value)
  stopped = _stop(procs, _STOP_GRACE_S.value) if failed and not _KEEP_GOING.value else []
  for log in logs:
    log.close()
  # Every failure, the first one first (the others usually died of it).
  failed += [i for i, p in enumerate(procs) if p.returncode != 0 and i not in failed]
  if failed:
    for i in failed:
      logging.error(
        "process %d %s%s; see %s",
        i,
        describe_exit(procs[i].returncode),
        f" (stopped by the launcher after process {failed[0]} failed)" if i in stopped else "",
        os.path.join(workdir, f"process_{i}.log"),
      )
    sys.exit(1)
  logging.info("all %d processes finished", n)


def describe_exit(returncode: int) -> str:
  """How a process ended: 'exited with 1' or 'was killed by SIGKILL'."""
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with {returncode}"


def _wait(procs: list[subprocess.Popen], *, keep_going: bool) -> list[int]:
  """Polls until all have ended, or (unless `keep_going`) until one fails.

  Returns the ids of the failed processes in the order their failure was seen.
  """
  failed: list[int] = []
  while True:
    codes = [p.poll() for p in procs]  # every one polled: `any` would stop at the first
    failed += [i for i, c in enumerate(codes) if c not in (None, 0) and i not in failed]
    if None not in codes or (failed and not keep_going):
      return failed
    time.sleep(0.2)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> list[int]:
  """SIGTERM to the running processes, SIGKILL to those still running `grace_s` later.

  SIGTERM lets a process checkpoint and exit (the train loop's preemption
  handling); one stuck in a collective with a dead peer would end only at the
  heartbeat timeout, hence the SIGKILL. Returns the ids of the processes it stopped.
  """
  running = [p for p in procs if p.poll() is None]
  for p in running:
    p.terminate()
  deadline = time.monotonic() + grace_s
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  return [procs.index(p) for p in running]


if __name__ == "__main__":
  app.run(main)
