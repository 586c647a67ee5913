"""launch.local: one job as 2 processes on this machine, through jax.distributed."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import PATIENT_COLLECTIVES, TINY_JOB_FLAGS, tiny_config, train_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deep_image.train.checkpoint import Checkpointer
from deep_image.train.metrics import read_metrics

JOB = (
  "--config.train.num_steps=6",
  "--config.train.log_every=3",
  "--config.train.batch_size=16",
  "--config.train.eval_batch_size=32",
)


# sitecustomize for a launched job: every Python-level open for writing of a path under
# $AUDIT_WRITES_UNDER is printed to the process's stderr (its process_i.log).
_WRITE_AUDIT = """
import os, sys
_under = os.environ["AUDIT_WRITES_UNDER"]
_writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
def _hook(event, args):
  if event == "open" and isinstance(args[0], str) and args[0].startswith(_under):
    mode, flags = args[1] or "", args[2] or 0
    if any(c in mode for c in "wax+") or flags & _writing:
      os.write(2, f"AUDIT write-open {args[0]}\\n".encode())
sys.addaudithook(_hook)
"""


def _audit_writes_env(hook_dir, workdir) -> dict:
  """os.environ plus what makes the launched processes log their writes under `workdir`."""
  hook_dir.mkdir()
  (hook_dir / "sitecustomize.py").write_text(_WRITE_AUDIT)
  path = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, AUDIT_WRITES_UNDER=str(workdir))


def _written(log: str, name: str) -> list[str]:
  """Paths under the workdir's `name` (file or folder) that a process opened for writing."""
  paths = re.findall(r"^AUDIT write-open (\S+)$", log, flags=re.M)
  return [p for p in paths if f"/{name}" in p]


def _assert_process_0_logged_and_all_checkpointed(workdir, steps, processes) -> None:
  """Metrics and TensorBoard written once (by process 0), the last checkpoint by all.

  A second writer would double metrics.jsonl's records (each process appends) and
  TensorBoard's points; a process that skipped the checkpoint would leave its input
  position (Orbax writes one file per process) or its shards missing.
  """
  train, evals = read_metrics(str(workdir))
  assert [r["step"] for r in train] == steps and [r["step"] for r in evals] == steps[-1:]
  events = EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("train/loss")] == steps
  assert [e.step for e in events.Scalars("validation/top1")] == steps[-1:]
  # images_per_sec is timed by each process: the records must hold process 0's numbers,
  # as its progress lines show them (`Progress.log`: 4 significant digits).
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(processes)]
  # Who opened the files (the `_WRITE_AUDIT` lines): process 0, and no other.
  for name in ("metrics.jsonl", "tensorboard/", "config.json", "result.json"):
    assert _written(logs[0], name), f"process 0 did not write {name}"
    for i in range(1, processes):
      assert not _written(logs[i], name), f"process {i} wrote {_written(logs[i], name)}"
  assert all(_written(log, "checkpoints/") for log in logs)
  shown = dict(re.findall(r"step (\d+)/\d+ .* images_per_sec (\S+) ", logs[0]))
  timed = {r["step"]: r["images_per_sec"] for r in train if "images_per_sec" in r}
  assert timed and {str(k): f"{v:.4g}" for k, v in timed.items()} == shown, (timed, shown)
  tb = {e.step: e.value for e in events.Scalars("train/images_per_sec")}
  np.testing.assert_allclose([tb[k] for k in timed], list(timed.values()), rtol=1e-6)
  step_dir = workdir / "checkpoints" / str(steps[-1])
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(steps[-1])]  # no unfinished tmp
  # Every process wrote its input position and its shards (Orbax: an OCDBT store each).
  inputs = sorted(f for f in os.listdir(step_dir / "input") if f.endswith(".json"))
  assert inputs == [f"process_{i}-of-{processes}.json" for i in range(processes)]
  stores = sorted(f for f in os.listdir(step_dir / "state") if f.startswith("ocdbt.process_"))
  assert stores == [f"ocdbt.process_{i}" for i in range(processes)]
  meta = Checkpointer(str(workdir), keep=1, read_only=True).meta(steps[-1])
  assert meta["process_count"] == processes


def _losses(workdir) -> list[float]:
  with open(workdir / "metrics.jsonl") as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("strategy", ["gspmd", "data", "lazy", "hybrid"])
def test_two_processes_train_one_job_like_one_process(tmp_path, strategy):
  env = dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES)  # each process simulates its devices
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      "--",
      f"--workdir={tmp_path / 'two'}",
      "--config.parallel.num_devices=4",
      *TINY_JOB_FLAGS,
      *JOB,
      f"--config.parallel.strategy={strategy}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=400,
  )
  logs = [(tmp_path / "two" / f"process_{i}.log").read_text() for i in range(2)]
  assert run.returncode == 0, run.stderr[-1500:] + logs[0][-1500:] + logs[1][-1500:]
  for i, log in enumerate(logs):
    assert f"distributed: process {i} of 2" in log
    assert "mesh {'data': 4} on 4 cpu devices" in log
  # Both processes evaluate the same global arrays: the same final line.
  finals = [next(line for line in log.splitlines() if "validation: top1" in line) for log in logs]
  assert finals[0].split("validation:")[1] == finals[1].split("validation:")[1]
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r.get("step") for r in records] == [3, 6, 6] and records[-1]["split"] == "validation"
  # 2 processes x 4 devices read the global sample stream one process x 8 devices reads:
  # the same batches, augmentations and dropout masks, so the same losses.
  one = train_cli(
    tmp_path / "one",
    "--config.parallel.num_devices=8",
    *JOB,
    f"--config.parallel.strategy={strategy}",
  )
  assert one.returncode == 0, one.stderr[-2000:]
  two_losses, one_losses = _losses(tmp_path / "two"), _losses(tmp_path / "one")
  assert len(one_losses) == 2, one_losses
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)


def test_a_failing_process_fails_the_launch(tmp_path):
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      "--",
      f"--workdir={tmp_path}",
      "--config.parallel.num_devices=3",
    ],
    capture_output=True,
    text=True,
    env=dict(os.environ, XLA_FLAGS=PATIENT_COLLECTIVES),
    timeout=200,
  )
  assert run.returncode != 0
  # The launcher names the failed processes and their logs. Both fail on the config, and
  # which one it sees first is a race: the other may already be stopped by its SIGTERM.
  named = re.findall(
    r"process (\d) (exited with 1|was killed by SIGTERM .*?); see (\S+)", run.stderr
  )
  assert sorted(i for i, _, _ in named) == ["0", "1"], run.stderr[-1000:]
  assert named[0][1] == "exited with 1", run.stderr[-1000:]
  for i, _, log in named:
    assert log == str(tmp_path / f"process_{i}.log"), run.stderr[-1000:]
  # The one that failed first says why in its log.
  assert "parallel.num_devices=3 does not divide over parallel.num_processes=2" in (
    (tmp_path / f"process_{named[0][0]}.log").read_text()
  )


def test_a_two_process_run_resumes_on_one_process_exactly(tmp_path):
  """2 processes x 4 devices for 3 steps, then 1 process x 8 devices to step 6 in the same
  workdir: the same losses as 1 x 8 from the start (the global stream resumes at step 3).

  The 2-process run's metrics and TensorBoard events come from process 0 alone, and its
  checkpoint, written by both, is complete; the resume shows that it restores."""
  env = dict(_audit_writes_env(tmp_path / "hook", tmp_path / "run"), XLA_FLAGS=PATIENT_COLLECTIVES)
  first = [f"--workdir={tmp_path / 'run'}", "--config.parallel.num_devices=4", *TINY_JOB_FLAGS]
  job = [a for a in JOB if "num_steps" not in a and "log_every" not in a]
  run = subprocess.run(
    [sys.executable, "-m", "launch.local", "--num_processes=2", "--", *first, *job,
     "--config.train.num_steps=3", "--config.train.log_every=1"],
    capture_output=True, text=True, env=env, timeout=400,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-2000:]
  _assert_process_0_logged_and_all_checkpointed(tmp_path / "run", steps=[1, 2, 3], processes=2)
  later = ("--config.train.num_steps=6", "--config.train.log_every=1", *job)
  resumed = train_cli(tmp_path / "run", "--config.parallel.num_devices=8", *later)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step 3" in resumed.stderr
  assert "resumes at global batch 3 of the same stream" in resumed.stderr
  whole = train_cli(tmp_path / "whole", "--config.parallel.num_devices=8", *later)
  assert whole.returncode == 0, whole.stderr[-2000:]
  got, want = _losses(tmp_path / "run"), _losses(tmp_path / "whole")
  assert len(got) == len(want) == 6
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _slurm_dry_run(*args, **env):
  return subprocess.run(
    ["bash", "launch/slurm.sbatch", *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, DRY_RUN="1", **env),
    timeout=30,
  )


def test_slurm_script_runs_one_process_per_gpu_or_per_node():
  """The sbatch script's srun command (DRY_RUN=1), from a fake allocation's variables."""
  assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"]).returncode == 0
  train = ["--config.train.batch_size=1024", "--workdir=/shared/a", "--config=c.py:tiny"]
  per_gpu = _slurm_dry_run(*train, SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8")
  assert per_gpu.returncode == 0, per_gpu.stderr
  cmd = per_gpu.stdout.split()
  assert cmd[:5] == [
    "srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "--export=ALL"
  ]  # fmt: skip
  # --config=FILE first (ml_collections rejects an override before it), then the rest;
  # jax.distributed.initialize finds the process id, count and coordinator in SLURM_*.
  assert cmd[5].endswith("/.venv/bin/python")  # VENV unset: the submit directory's
  assert cmd[6:] == [
    "-m",
    "experiments.train",
    "--config=c.py:tiny",
    "--config.train.batch_size=1024",
    "--workdir=/shared/a",
    "--config.parallel.distributed=auto",
  ]
  per_node = _slurm_dry_run(
    *train, PER="node", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="8", GPUS_PER_NODE="4"
  )
  assert per_node.returncode == 0, per_node.stderr
  cmd = per_node.stdout.split()
  # One process a node sees all its GPUs: JAX_LOCAL_DEVICE_IDS overrides JAX's SLURM
  # default of GPU SLURM_LOCALID alone (printf %q escapes the commas).
  assert cmd[1:3] == ["--nodes=3", "--ntasks-per-node=1"]
  assert cmd[4].replace("\\", "") == "--export=ALL,JAX_LOCAL_DEVICE_IDS=0,1,2,3"
  no_workdir = _slurm_dry_run("--config=c.py", SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="8")
  assert no_workdir.returncode == 2 and "--workdir=DIR" in no_workdir.stderr
  outside = _slurm_dry_run(*train, SLURM_JOB_NUM_NODES="", GPUS_PER_NODE="8")
  assert outside.returncode != 0 and "SLURM_JOB_NUM_NODES" in outside.stderr


def test_kubernetes_job_wires_process_ids_coordinator_and_workdir():
  import yaml  # pinned in requirements.txt

  with open("launch/k8s/job.yaml") as f:
    docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
  service, claim, job = docs["Service"], docs["PersistentVolumeClaim"], docs["Job"]
  spec, pod = job["spec"], job["spec"]["template"]["spec"]
  (container,) = pod["containers"]
  args = dict(a.split("=", 1) for a in container["args"])
  # N processes: N pods at once, ids 0..N-1 from the completion index.
  assert spec["completionMode"] == "Indexed"
  n = int(args["--config.parallel.num_processes"])
  assert spec["completions"] == spec["parallelism"] == n > 1
  assert args["--config.parallel.distributed"] == "explicit"
  assert args["--config.parallel.process_id"] == "$(JOB_COMPLETION_INDEX)"
  (index,) = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
  assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
    "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  )
  # The coordinator is pod 0 under the headless Service: <job>-0.<subdomain>:<port>.
  host, port = args["--config.parallel.coordinator_address"].rsplit(":", 1)
  assert service["spec"]["clusterIP"] == "None"
  assert pod["subdomain"] == service["metadata"]["name"]
  assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
  assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
  assert int(port) in [p["port"] for p in service["spec"]["ports"]]
  # The workdir is on the shared (ReadWriteMany) volume.
  (mount,) = container["volumeMounts"]
  (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
  assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
  assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
  assert args["--workdir"].startswith(mount["mountPath"].rstrip("/") + "/")
  # --config=FILE first, and every override names a field of the config.
  assert container["args"][0].startswith("--config=")
  config = tiny_config()
  for key in (k.removeprefix("--config.") for k in args if k.startswith("--config.")):
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    assert leaf in node, f"{key} is not a config field"


@pytest.mark.parametrize("value", [0, -5])
def test_distributed_timeouts_must_be_whole_seconds(value):
  from deep_image.config_error import ConfigError
  from deep_image.parallel.mesh import maybe_initialize_distributed

  config = tiny_config(**{
    "parallel.distributed": "explicit",
    "parallel.coordinator_address": "127.0.0.1:1",
    "parallel.num_processes": 2,
    "parallel.init_timeout_s": value,
  })  # fmt: skip
  # Refused before jax.distributed.initialize would wait for a coordinator.
  with pytest.raises(ConfigError, match=rf"parallel.init_timeout_s={value} must be a whole"):
    maybe_initialize_distributed(config.parallel)
