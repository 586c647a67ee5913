"""A process of a multi-process run dies: the others exit with an error in bounded time.

JAX's coordination service (started by `jax.distributed.initialize` on process 0) takes
heartbeats from every process; a process silent for `parallel.heartbeat_timeout_s` is
declared dead and every other process is terminated with "Terminating process because
the JAX distributed service detected fatal errors" (a background thread, so also when
the survivor is blocked in a gloo collective). These tests SIGKILL process 1 of a
`launch.local` run after its first step.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PATIENT_COLLECTIVES, TINY_JOB_FLAGS

HEARTBEAT_S = 5  # real clusters keep the default, 100 s
# Steps enough that the run cannot finish before the kill's consequences are seen.
JOB = (
  "--config.parallel.num_devices=4",
  "--config.train.num_steps=1000",
  "--config.train.log_every=1",
  "--config.train.batch_size=16",
  "--config.train.eval_batch_size=32",
)
JAX_TERMINATES = "Terminating process because the JAX distributed service detected fatal errors"


def _children(pid: int) -> list[int]:
  """Ids of the live child processes of `pid` (Linux /proc), in creation order."""
  children = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    if ppid == pid:
      children.append(int(entry))
  return sorted(children)


def _process_pid(launcher: subprocess.Popen, i: int, timeout_s: float = 60) -> int:
  """The pid of launch.local's process `i` (its children start in order 0..N-1)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    children = _children(launcher.pid)
    if len(children) == 2:
      return children[i]
    time.sleep(0.1)
  raise AssertionError(f"launch.local did not start 2 processes in {timeout_s} s")


def _wait_for(path, text: str, launcher: subprocess.Popen, timeout_s: float = 120) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if os.path.exists(path) and text in open(path).read():
      return
    assert launcher.poll() is None, f"launch.local ended early: {launcher.communicate()}"
    time.sleep(0.1)
  raise AssertionError(f"{text!r} not in {path} after {timeout_s} s")


def _launch(workdir, *flags, heartbeat_s: int) -> subprocess.Popen:
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      *flags,
      "--",
      f"--workdir={workdir}",
      *TINY_JOB_FLAGS,
      *JOB,
      f"--config.parallel.heartbeat_timeout_s={heartbeat_s}",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES),
  )


def _signal_process_1_after_its_first_step(launcher, workdir, sig=signal.SIGKILL):
  """Sends `sig` to launch.local's process 1 once it has logged step 1.

  Returns (the pids of processes 0 and 1, the time of the signal).
  """
  pids = [_process_pid(launcher, i) for i in range(2)]
  _wait_for(workdir / "process_1.log", "step 1/1000", launcher)
  os.kill(pids[1], sig)
  return pids, time.monotonic()


def _ended(pid: int) -> bool:
  """Whether `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True


def _abort(launcher: subprocess.Popen, message: str):
  """Kills the launcher and its processes; fails the test with `message`."""
  for pid in _children(launcher.pid):
    os.kill(pid, signal.SIGKILL)
  launcher.kill()
  launcher.communicate()
  raise AssertionError(message)


def _finish(launcher: subprocess.Popen, timeout_s: float) -> tuple[str, float]:
  """(launcher stderr, the time it ended); kills it and fails after `timeout_s`."""
  try:
    _, stderr = launcher.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    _abort(launcher, f"launch.local still running {timeout_s} s after the kill: a hang")
  return stderr, time.monotonic()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_survivor_of_a_dead_peer_exits_within_the_heartbeat_timeout(tmp_path, sig):
  """--keep_going: the launcher stops nobody, so process 0 ends by JAX's mechanism alone.

  SIGKILL closes the dead process's sockets (gloo then fails at once, and the exit
  waits for the coordination service's verdict); SIGSTOP keeps them open, as a lost
  node does: process 0 is blocked in a collective that never completes, and only
  the heartbeat timeout ends it.
  """
  launcher = _launch(tmp_path, "--keep_going", heartbeat_s=HEARTBEAT_S)
  victim = None
  try:
    (survivor, victim), signalled_at = _signal_process_1_after_its_first_step(
      launcher, tmp_path, sig
    )
    while not _ended(survivor) and time.monotonic() - signalled_at < HEARTBEAT_S + 30:
      time.sleep(0.1)
    took = time.monotonic() - signalled_at
  finally:
    if sig == signal.SIGSTOP and victim is not None:
      os.kill(victim, signal.SIGKILL)  # --keep_going waits for it too
  if not _ended(survivor):
    _abort(launcher, f"process 0 still running {took:.0f} s after process 1's {sig.name}")
  print(f"process 0 ended {took:.1f} s after process 1's {sig.name}")
  stderr, _ = _finish(launcher, timeout_s=30)
  log = (tmp_path / "process_0.log").read_text()
  assert "distributed: process 0 of 2 (heartbeat timeout 5 s)" in log
  # The coordination service names the dead process, then stops this one.
  assert "Task 1 heartbeat timeout" in log or "unhealthy (stopped sending heartbeats)" in log
  assert JAX_TERMINATES in log, log[-3000:]
  assert launcher.returncode == 1 and "all 2 processes finished" not in stderr
  assert "process 0 was killed by SIGABRT" in stderr, stderr[-2000:]
  assert "process 1 was killed by SIGKILL" in stderr, stderr[-2000:]
  assert "stopped by the launcher" not in stderr


def test_the_launcher_stops_the_others_and_names_the_dead_process(tmp_path):
  """Default launch.local, JAX's default 100 s heartbeat: the launcher ends the job first."""
  launcher = _launch(tmp_path, "--stop_grace_s=3", heartbeat_s=100)
  _, killed_at = _signal_process_1_after_its_first_step(launcher, tmp_path)
  stderr, ended_at = _finish(launcher, timeout_s=60)
  print(f"launch.local ended {ended_at - killed_at:.1f} s after process 1's SIGKILL")
  assert launcher.returncode == 1
  assert "process 1 was killed by SIGKILL; see" in stderr, stderr[-2000:]
  assert "stopped by the launcher after process 1 failed" in stderr, stderr[-2000:]
  # The first failure is reported first.
  assert stderr.index("process 1 was killed") < stderr.index("process 0 ")
  assert ended_at - killed_at < 60
