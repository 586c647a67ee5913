"""Device mesh from config, logical-axis rules, and multi-host initialisation.

`config.parallel.mesh` is a sequence of `(axis_name, size)` pairs; one size
may be -1, meaning "all remaining devices" (as big_vision's
`create_device_mesh`). The default `(('data', -1),)` puts every device on one
axis: conv layers split the batch over it and the FC layers split their
weights over the same devices, as in the paper's model-data parallelism.

Two axes larger than 1 are node x local (outer first; consecutive device ids,
i.e. the devices of one process, share a node): the shard_map strategies then
run their collectives level by level and hybrid splits its FC layers inside a
node (`deep_image.parallel.shard_map_strategy`). With `parallel.mesh_by_host`
(the default), a run on several processes with accelerators turns the one-axis
default into `(('node', hosts), ('local', devices per host))` (`host_devices`:
processes grouped by host name, one process per host or per GPU); on CPU, or
with one process, the mesh is as configured.

The logical axis names on parameters (see `deep_image.models.vgg`) map to
mesh axes through `logical_rules`: ``'model'`` (the split FC dimension) goes to
`config.parallel.model_axes` (empty, the default: every mesh axis), or nowhere when
`config.parallel.shard_fc` is False.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import socket

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from deep_image.config_error import ConfigError

_distributed_initialized = False


def maybe_initialize_distributed(parallel_cfg) -> None:
  """Start JAX's distributed runtime when the config asks for several processes.

  The one place multi-host is switched on. With `parallel.distributed = 'explicit'`
  (coordinator, process count and id from the config) or `'auto'` (JAX's cluster
  auto-detection, e.g. SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_NODELIST)
  it calls `jax.distributed.initialize` before any device is touched; `'off'` does
  nothing.

  Timeouts (`parallel.*_timeout_s`) bound every wait on a peer: the coordination
  service declares a process dead after `heartbeat_timeout_s` without a heartbeat
  and then stops every other process (XLA logs "Terminating process because the
  JAX distributed service detected fatal errors"); `init_timeout_s` bounds the wait
  for all processes to connect; `shutdown_timeout_s` bounds the exit barrier.
  """
  global _distributed_initialized
  mode = parallel_cfg.distributed
  if _distributed_initialized or mode == "off":
    return
  timeouts = {
    "heartbeat_timeout_seconds": _positive_int(parallel_cfg, "heartbeat_timeout_s"),
    "initialization_timeout": _positive_int(parallel_cfg, "init_timeout_s"),
    "shutdown_timeout_seconds": _positive_int(parallel_cfg, "shutdown_timeout_s"),
  }
  # Cross-process collectives on CPU need a transport; gloo ships with jaxlib.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode == "auto":
    jax.distributed.initialize(**timeouts)
  elif mode == "explicit":
    jax.distributed.initialize(
      coordinator_address=parallel_cfg.coordinator_address,
      num_processes=parallel_cfg.num_processes,
      process_id=parallel_cfg.process_id,
      **timeouts,
    )
  else:
    raise ConfigError(f"parallel.distributed={mode!r} must be one of 'off', 'auto', 'explicit'")
  _distributed_initialized = True
  logging.info(
    "distributed: process %d of %d (heartbeat timeout %d s)",
    jax.process_index(),
    jax.process_count(),
    timeouts["heartbeat_timeout_seconds"],
  )


def _positive_int(parallel_cfg, field: str) -> int:
  """`parallel.<field>` (an int field: JAX takes whole seconds), checked to be >= 1."""
  value = parallel_cfg[field]
  if value < 1:
    raise ConfigError(f"parallel.{field}={value!r} must be a whole number of seconds >= 1")
  return int(value)


def forced_host_device_count() -> int | None:
  """The device count set by XLA_FLAGS=--xla_force_host_platform_device_count=N, if any."""
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_force_host_platform_device_count="):
      return int(flag.split("=", 1)[1])
  return None


NODE_AXIS, LOCAL_AXIS = "node", "local"


def host_devices(parallel_cfg) -> int | None:
  """Devices per host where `parallel.mesh_by_host` makes the mesh node x local, else None.

  Only for several processes with accelerators (one per host, or one per GPU): simulated
  CPU devices share one host's links, and one process has no second level.
  """
  if not parallel_cfg.mesh_by_host or jax.process_count() == 1 or jax.default_backend() == "cpu":
    return None
  return _devices_per_host_of_this_job()


@functools.cache
def _devices_per_host_of_this_job() -> int | None:
  """Every process's host name (one all-gather of a hash), then `devices_per_host`."""
  from jax.experimental import multihost_utils

  digest = hashlib.sha1(socket.gethostname().encode()).digest()[:4]
  mine = np.frombuffer(digest, np.int32)
  hosts = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1).tolist()
  per_host = devices_per_host(hosts, jax.local_device_count())
  if per_host is None:
    logging.warning(
      "parallel.mesh_by_host: the processes of a host do not have consecutive ids or the "
      "hosts differ in size; the mesh stays as configured (one axis)"
    )
  return per_host


def devices_per_host(host_of_process: list, local_devices: int) -> int | None:
  """Devices per host when every host runs the same number of consecutive processes
  (SLURM's block distribution), else None. host_of_process[p]: process p's host."""
  runs = [1]
  for a, b in zip(host_of_process, host_of_process[1:], strict=False):
    if a == b:
      runs[-1] += 1
    else:
      runs.append(1)
  if len(set(runs)) != 1 or len(runs) != len(set(host_of_process)):
    return None
  return runs[0] * local_devices


def by_host(mesh_spec, num_devices: int, devices_per_host: int | None):
  """The mesh spec the run uses: a one-axis mesh of every device (size -1) as node x local
  when `devices_per_host` (`host_devices`) is given and smaller than the devices."""
  spec = tuple(tuple(pair) for pair in mesh_spec)
  if (
    devices_per_host is None
    or len(spec) != 1
    or int(spec[0][1]) != -1
    or not 1 < devices_per_host < num_devices
    or num_devices % devices_per_host
  ):
    return spec
  return ((NODE_AXIS, num_devices // devices_per_host), (LOCAL_AXIS, devices_per_host))


def resolve_mesh_shape(
  mesh_spec, num_devices: int, devices_per_host: int | None = None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Axis names and sizes, with the one -1 replaced by the remaining devices.

  devices_per_host: `host_devices(...)`: split a one-axis default by host (`by_host`).
  Raises ValueError naming `parallel.mesh` when the sizes do not fit
  `num_devices`.
  """
  mesh_spec = by_host(mesh_spec, num_devices, devices_per_host)
  names = tuple(str(name) for name, _ in mesh_spec)
  sizes = [int(size) for _, size in mesh_spec]
  if len(set(names)) != len(names):
    raise ConfigError(f"parallel.mesh={tuple(mesh_spec)} repeats an axis name")
  if sizes.count(-1) > 1:
    raise ConfigError(f"parallel.mesh={tuple(mesh_spec)} has more than one -1 size")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"parallel.mesh={tuple(mesh_spec)}: sizes must be positive or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
        f"parallel.mesh={tuple(mesh_spec)}: {num_devices} devices do not divide by {fixed}"
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) > num_devices:
    raise ConfigError(
      f"parallel.mesh={tuple(mesh_spec)} needs {math.prod(sizes)} devices but only "
      f"{num_devices} are available (jax.devices())"
    )
  return names, tuple(sizes)


def make_mesh(parallel_cfg, devices=None) -> Mesh:
  """A `Mesh` over `devices` (default: all) shaped by `parallel_cfg.mesh`.

  Axes are `AxisType.Auto` so that jit's in/out shardings decide layouts
  (GSPMD) and shard_map inputs are resharded to their in_specs as needed.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = resolve_mesh_shape(parallel_cfg.mesh, len(devices), host_devices(parallel_cfg))
  used = devices[: math.prod(sizes)]
  if len(devices) == len(used):
    mesh_devices = mesh_utils.create_device_mesh(sizes, used)
  else:
    mesh_devices = np.asarray(used).reshape(sizes)
  return Mesh(mesh_devices, names, axis_types=(AxisType.Auto,) * len(names))


def logical_rules(parallel_cfg, mesh: Mesh) -> tuple[tuple[str, object], ...]:
  """Flax logical-axis rules: 'model' -> mesh axes of the split FC dim, 'batch' -> all."""
  # An empty `parallel.model_axes` (the default) means every mesh axis.
  model_axes = parallel_cfg.model_axes or mesh.axis_names
  if not parallel_cfg.shard_fc:
    model_axes = None
  elif isinstance(model_axes, str):
    model_axes = (model_axes,)
  else:
    model_axes = tuple(model_axes)
  return (("model", model_axes), ("batch", tuple(mesh.axis_names)))


# XLA CPU flags: minutes, not XLA's 40 s, before a stuck collective aborts the process.
PATIENT_COLLECTIVES = (
  "--xla_cpu_collective_timeout_seconds=900 --xla_cpu_collective_call_terminate_timeout_seconds=900"
)


# XLA GPU flags that let collectives run asynchronously and overlap compute (the
# deferred gradient pipeline, `deep_image.parallel.buckets`). The one place they are
# set: `add_gpu_overlap_flags`, called by `configure_host_devices` before JAX starts.
# They are DebugOptions every jaxlib parses, and only GPU compiles read them.
GPU_OVERLAP_FLAGS = (
  # Schedule async collective start/done pairs around independent compute.
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  # Gradient buckets are already sized (parallel.bucket_mb): combining the
  # reduce-scatters of several buckets would wait for the last of them.
  "--xla_gpu_reduce_scatter_combine_threshold_bytes=0",
  # The same for the permutes of the hand-written algorithms (butterfly, ring):
  # XLA's combiner otherwise merges stages of different buckets, which chains
  # them and leaves the merged permute synchronous. Deviceless H100 x 8 compile
  # of the Table 2 step, deferred (benchmarks/gpu_compile_2026-11-25.md): async
  # collectives with compute in their window, data / butterfly 92% -> 100%,
  # hybrid / butterfly 46% -> 78%.
  "--xla_gpu_collective_permute_combine_threshold_bytes=0",
  # And for the gathers of the xla algorithm: one all-gather per bucket, each
  # issued one bucket ahead of its layers (lazy / xla: 82% -> 85%).
  "--xla_gpu_all_gather_combine_threshold_bytes=0",
  # No all-reduce threshold: the shard_map strategies all-reduce only the metric
  # scalars, which =0 kept as 4 all-reduces (2-3 of them with nothing to overlap),
  # and gspmd's gradients went from 4 combined all-reduces to 41.
)


def add_gpu_overlap_flags(environ=os.environ) -> None:
  """Append `GPU_OVERLAP_FLAGS` to XLA_FLAGS, each unless XLA_FLAGS already sets it.

  Call before JAX initialises its backends (flags are read once).
  """
  flags = environ.get("XLA_FLAGS", "")
  present = {f.split("=")[0] for f in flags.split()}
  extra = [f for f in GPU_OVERLAP_FLAGS if f.split("=")[0] not in present]
  environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def check_device_counts(num_devices, num_processes) -> None:
  """ConfigError unless parallel.num_devices and parallel.num_processes are whole numbers >= 1."""
  for field, value in (("num_devices", num_devices), ("num_processes", num_processes)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"parallel.{field}={value!r} must be a whole number >= 1")


def configure_host_devices(num_devices: int, num_processes: int = 1) -> None:
  """Simulate `num_devices` CPU devices in all, unless XLA_FLAGS already fixes the count.

  Each of `num_processes` processes gets num_devices / num_processes. Call
  before JAX initialises its backends. It only changes the CPU backend's
  device count, so a GPU or TPU machine still runs on its accelerators.

  Simulated devices share the host's cores, and a CPU collective is a rendezvous
  of all of them: on a loaded machine one can wait longer than XLA's default 40 s
  and abort the process. Unless XLA_FLAGS sets them, the rendezvous timeouts are
  raised to `PATIENT_COLLECTIVES`; the GPU overlap flags are added
  (`add_gpu_overlap_flags`). (A collective that never completes is another
  matter: see `wait_each_step` in `deep_image/train/loop.py`.)
  """
  check_device_counts(num_devices, num_processes)
  add_gpu_overlap_flags()
  flags = os.environ.get("XLA_FLAGS", "")
  if "collective_call_terminate_timeout" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {PATIENT_COLLECTIVES}".strip()
  forced = forced_host_device_count()
  if forced is not None:
    logging.info("XLA_FLAGS sets %d host devices; parallel.num_devices is not used", forced)
    return
  if num_devices % num_processes:
    raise ConfigError(
      f"parallel.num_devices={num_devices} does not divide over "
      f"parallel.num_processes={num_processes}"
    )
  jax.config.update("jax_num_cpu_devices", int(num_devices) // int(num_processes))
