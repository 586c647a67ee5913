"""The bytes a config's step sends across nodes (hosts), as the cost model predicts.

`cross_node_bytes(config, num_devices, hosts)` is what `experiments.compile_gpu`'s
`cross_host_mib_per_gpu <configuration> <MiB>` lines (`analysis.cross_host`: the max over
the GPUs; its tables also give the mean) read from the compiled program, predicted by
`cost_model.predict` on the config's mesh: the same configuration, the same numbers
(`tests/test_cost_model.py` compares them on CPU-compiled programs).
"""

from __future__ import annotations

import dataclasses

from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel.clusters import Cluster, get_cluster
from deep_image.parallel.cost_model import StepSetup, predict


@dataclasses.dataclass(frozen=True)
class NodeBytes:
  """Bytes per device per step sent to devices on other nodes (hosts), the mean over the
  devices and the device that sends the most, and the mean sent inside its node."""

  mean: float
  max: float
  inside: float


def cross_node_bytes(config, num_devices: int, hosts: int, cluster: str | Cluster = "h100"):
  """`NodeBytes` of `config`'s step on `num_devices` devices over `hosts` hosts, as the
  cost model predicts: what `experiments.compile_gpu`'s `cross_host_mib_per_gpu` lines
  (`analysis.cross_host`, the max) read from the compiled program.

  Read from the config: model (name, image_size, num_classes, in_channels, dtype: the
  activation bytes), train.batch_size (global), parallel.strategy, collective,
  node_collective, mesh (its -1 resolved against num_devices), conv, overlap,
  bucket_mb, fc_micro_batches, prefetch_mb, grad_dtype. The cluster preset's links
  with devices_per_node = num_devices / hosts, ranks node-major (host h holds
  devices h D .. h D + D - 1). Exact for the hand-written algorithms; for
  'xla' the bytes are those of the algorithm it is modelled as (the faster of
  ring and butterfly), where compile_gpu assumes a ring in group order.
  """
  if hosts < 1 or num_devices % hosts:
    raise ValueError(f"hosts={hosts} must divide num_devices={num_devices}")
  par = config.parallel
  _, sizes = mesh_lib.resolve_mesh_shape(par.mesh, num_devices)
  per_node = num_devices // hosts
  cl = get_cluster(cluster)
  cl = dataclasses.replace(
    cl,
    devices_per_node=per_node,
    num_nodes=hosts,
    devices_per_nic=min(cl.devices_per_nic, per_node),
  )
  setup = StepSetup.from_config(config)
  batch = config.train.batch_size // num_devices
  p = predict(
    config.model.name, par.strategy, par.collective, num_devices, batch, cl, setup, mesh=sizes
  )
  return NodeBytes(
    p.bytes_across_per_device, p.bytes_across_max_per_device, p.bytes_inside_per_device
  )
