"""Every test process sees 8 simulated CPU devices (unless XLA_FLAGS already says otherwise).

Set before jax is imported anywhere, since the device count is fixed when the
CPU backend starts.
"""

import os

# XLA:CPU aborts the process when a collective's rendezvous waits longer than
# its termination timeout. Eight simulated devices per test worker, on two
# shared cores, can be that slow under load: give them minutes, not seconds.
# (Importing jax here is fine: only starting its backend fixes the flags.)
from deep_image.parallel.mesh import PATIENT_COLLECTIVES

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
  _flags += " " + PATIENT_COLLECTIVES
os.environ["XLA_FLAGS"] = _flags.strip()

# One JAX persistent compilation cache for the CLI subprocesses of a test session
# (`run_cli`): most of them compile the same tiny programs again (a resume, a rerun, a
# reader of the run just trained), and compiling is most of a tiny run's seconds. Made by
# the first process that loads this file (pytest, or the xdist controller, whose workers
# inherit the variable) and removed when it exits. The test processes themselves do not
# use it. XLA:CPU compiles deterministically, so a cached program is the one a fresh
# compile would give: bit-for-bit comparisons between runs still hold.
_COMPILE_CACHE = "DEEP_IMAGE_TEST_COMPILE_CACHE"
if _COMPILE_CACHE not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ[_COMPILE_CACHE] = tempfile.mkdtemp(prefix="deep-image-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ[_COMPILE_CACHE], ignore_errors=True)


def subprocess_env(xla_flags: str = "") -> dict:
  """os.environ for a CLI subprocess: patient collectives plus `xla_flags` in XLA_FLAGS
  (the test process's forced device count left out) and the session's compilation cache."""
  return dict(
    os.environ,
    XLA_FLAGS=f"{PATIENT_COLLECTIVES} {xla_flags}".strip(),
    JAX_COMPILATION_CACHE_DIR=os.environ[_COMPILE_CACHE],
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )


# `experiments.train` flags for a seconds-long job: the default config's `tiny` variant
# (vgg_tiny on 16 px digit crops; experiments/configs/base.py); CLI tests add their own
# steps and devices.
TINY_JOB_FLAGS = ("--config=experiments/configs/default.py:tiny",)


def tiny_config(**overrides):
  """`experiments/configs/default.py:tiny` with dotted-field overrides.

  E.g. `tiny_config(**{"train.num_steps": 4, "data.augment.crop_size": 12})`; an unknown
  field is an error (`deep_image.train.sweep.apply_overrides`, what sweep points use).
  """
  from deep_image.train.sweep import apply_overrides
  from experiments.configs import default

  return apply_overrides(default.get_config("tiny"), overrides)


def logged_steps(workdir) -> int:
  """How many training steps WORKDIR/metrics.jsonl holds so far (0 before the file exists)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if '"loss"' in line)


def run_cli(module, *args, xla_flags=""):
  """`python -m MODULE args...`, completed (stdout, stderr captured as text).

  Runs with patient collectives and `xla_flags` appended to XLA_FLAGS (e.g. a device
  count; without one the scripts simulate the config's `parallel.num_devices`), through
  the session's compilation cache (`subprocess_env`).
  """
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    env=subprocess_env(xla_flags),
    timeout=300,
  )


def train_cli(workdir, *args, xla_flags=""):
  """`python -m experiments.train --workdir=WORKDIR` on the tiny job + `args` (`run_cli`)."""
  return run_cli(
    "experiments.train", f"--workdir={workdir}", *TINY_JOB_FLAGS, *args, xla_flags=xla_flags
  )


def run_two_processes(script: str, out_dir, timeout: float = 240) -> list[dict]:
  """Run `python SCRIPT <process id> <port> <out_dir>` as 2 processes of one gloo job.

  Each worker simulates its own devices (no forced device count in XLA_FLAGS) and writes
  OUT_DIR/process_<i>.json; its output goes to OUT_DIR/process_<i>.log. Fails the test,
  with both logs' tails, unless both exit 0; returns the two JSON reports.
  """
  import json
  import subprocess
  import sys

  import portpicker

  port = portpicker.pick_unused_port()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
    os.environ,
    XLA_FLAGS=PATIENT_COLLECTIVES,
    PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
  )
  procs, logs = [], []
  for i in range(2):
    logs.append(open(os.path.join(out_dir, f"process_{i}.log"), "w"))  # noqa: SIM115
    procs.append(
      subprocess.Popen(
        [sys.executable, os.path.abspath(script), str(i), str(port), str(out_dir)],
        cwd=repo,
        env=env,
        stdout=logs[-1],
        stderr=subprocess.STDOUT,
      )
    )
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  read = lambda name: open(os.path.join(out_dir, name)).read()  # noqa: E731
  tails = "".join(read(f"process_{i}.log")[-2000:] for i in range(2))
  assert codes == [0, 0], tails
  return [json.loads(read(f"process_{i}.json")) for i in range(2)]
