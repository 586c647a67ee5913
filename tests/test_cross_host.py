"""Bytes that cross hosts (deep_image.analysis.cross_host): hand-written HLO whose answers
are computed by hand, the replica-group forms they are read from (deep_image.analysis.hlo),
and a real CPU-compiled shard_map program on a 2 x 4 mesh of 8 simulated devices (tests/
conftest.py) as 2 pretend hosts of 4."""

# ruff: noqa: E501  (HLO instruction lines are long, as XLA prints them)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from deep_image.analysis import cross_host, hlo

# f32[64]: B = 256 bytes per device for every op below.
B = 256


def _module(n: int, line: str) -> str:
  """A scheduled module of `n` devices with one collective `line` (its operand %p)."""
  return f"""\
HloModule jit_step, is_scheduled=true, num_partitions={n}

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}}

ENTRY %main (p: f32[64]) -> f32[64] {{
  %p = f32[64]{{0}} parameter(0)
  {line}
  ROOT %r = f32[64]{{0}} copy(%p)
}}
"""


# (devices, hosts of 2 or 4 devices, the collective's line, bytes each device sends across).
CASES = {
  # Pairs inside host 0 and inside host 1: nothing crosses.
  "permute within a host": (
    4,
    2,
    "%cp = f32[64]{0} collective-permute(%p), channel_id=1, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}",
    [0, 0, 0, 0],
  ),
  # 0 <-> 2 cross (hosts 0, 1); 1 -> 1 is no transfer; 3 sends nowhere.
  "permute to another host": (
    4,
    2,
    "%cp = f32[64]{0} collective-permute-start(%p), channel_id=1, source_target_pairs={{0,2},{2,0},{1,1}}",
    [B, 0, B, 0],
  ),
  # Ring 0 -> 1 -> 2 -> 3 -> 0 over hosts (0, 0, 1, 1): 1 -> 2 and 3 -> 0 cross, each
  # carrying all G - 1 = 3 shards of B.
  "all-gather spanning two hosts": (
    4,
    2,
    "%ag = f32[256]{0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}",
    [0, 3 * B, 0, 3 * B],
  ),
  # [2,4]<=[4,2]T(1,0): groups (0,2,4,6) and (1,3,5,7); hosts of 4: the rings cross at
  # 2 -> 4, 6 -> 0, 3 -> 5, 7 -> 1, each 2 x B x 3/4.
  "iota groups, transposed": (
    8,
    4,
    "%ar = f32[64]{0} all-reduce-start(%p), channel_id=1, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add",
    [0, 0, 1.5 * B, 1.5 * B, 0, 0, 1.5 * B, 1.5 * B],
  ),
  # [2,4]<=[8]: groups (0..3), (4..7), each inside a host of 4.
  "iota groups, one per host": (
    8,
    4,
    "%rs = f32[16]{0} reduce-scatter(%p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add",
    [0] * 8,
  ),
  # The 'x' axis of a 2 x 4 mesh: groups (0,4), (1,5), ..: every member on the other host,
  # the node level of a two-level mesh. Each sends (G-1)/G = 1/2 of B across.
  "mesh groups across hosts": (
    8,
    4,
    "%rs = f32[32]{0} reduce-scatter(%p), channel_id=1, replica_groups=mesh['x'=2,'y'=4] {'x'}, dimensions={0}, to_apply=%add",
    [B / 2] * 8,
  ),
  # Direct: B / 4 to each of the 2 members on the other host.
  "all-to-all": (
    4,
    2,
    "%a2a = f32[64]{0} all-to-all(%p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}",
    [B / 2] * 4,
  ),
  # Empty groups: all 4 devices, one ring 0 -> 1 -> 2 -> 3 -> 0, 2 x B x 3/4 at 1 and 3.
  "empty groups": (
    4,
    2,
    "%ar = f32[64]{0} all-reduce(%p), channel_id=1, replica_groups={}, to_apply=%add",
    [0, 1.5 * B, 0, 1.5 * B],
  ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_written_ops(name):
  n, per_host, line, want = CASES[name]
  got = cross_host.cross_host_bytes(_module(n, line), cross_host.node_major_hosts(n, per_host))
  assert list(got.per_device) == pytest.approx(want)
  assert got.max == pytest.approx(max(want))
  assert got.mean == pytest.approx(sum(want) / n)


def test_one_host_crosses_nothing_and_sizes_must_match():
  n, _, line, _ = CASES["all-gather spanning two hosts"]
  assert cross_host.cross_host_bytes(_module(n, line), [0] * n).max == 0
  with pytest.raises(ValueError, match="4 devices but hosts maps 8"):
    cross_host.cross_host_bytes(_module(n, line), [0] * 8)
  with pytest.raises(ValueError, match="do not divide"):
    cross_host.node_major_hosts(6, 4)


def test_replica_group_forms():
  assert hlo.replica_groups("replica_groups={{0,1,2},{3,4,5}}", 6) == [(0, 1, 2), (3, 4, 5)]
  assert hlo.replica_groups("replica_groups=[2,4]<=[8]", 8) == [(0, 1, 2, 3), (4, 5, 6, 7)]
  assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [
    (0, 4),
    (1, 5),
    (2, 6),
    (3, 7),
  ]
  # A 3-D iota: [2,2,2] transposed (2,0,1), groups of 4.
  assert hlo.replica_groups("replica_groups=[2,4]<=[2,2,2]T(2,0,1)", 8) == [
    (0, 2, 4, 6),
    (1, 3, 5, 7),
  ]
  assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b'}", 8) == [
    (0, 1, 2, 3),
    (4, 5, 6, 7),
  ]
  assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a','b'}", 8) == [tuple(range(8))]
  assert hlo.replica_groups("replica_groups={}", 3) == [(0, 1, 2)]
  assert hlo.replica_groups("all-reduce(%p), to_apply=%add", 2) == [(0, 1)]
  assert hlo.source_target_pairs("source_target_pairs={{0,1},{1,0}}") == [(0, 1), (1, 0)]


def _program(x):
  """On a ('node' 2, 'local' 4) mesh, every op on the same f32[64] shard x (B bytes)."""
  a = lax.ppermute(x, "local", [(i, (i + 1) % 4) for i in range(4)])  # inside a host: 0
  b = lax.ppermute(x, "node", [(0, 1), (1, 0)])  # every device sends B across
  c = lax.psum_scatter(x, "local", tiled=True)  # groups of one host: 0
  d = lax.psum_scatter(x, "node", tiled=True)  # groups (l, 4 + l): B / 2 each
  e = lax.psum_scatter(x, ("node", "local"), tiled=True)  # ring 0..7: 3 and 7 send 7/8 B
  return jnp.concatenate([a, b, c, d, e])


def test_compiled_shard_map_on_two_pretend_hosts():
  """CPU-compiled shard_map on a 2 x 4 mesh; its devices are jax.devices() reversed, so
  the program's ids (positions in mesh.devices.flat) differ from every device.id: the
  host map is built from mesh.devices.flat, as compile_gpu builds it."""
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py simulates 8 CPU devices"
  mesh = Mesh(np.array(devices[:8])[::-1].reshape(2, 4), ("node", "local"))
  spec = P(("node", "local"))
  step = jax.jit(jax.shard_map(_program, mesh=mesh, in_specs=spec, out_specs=spec))
  text = step.lower(jax.ShapeDtypeStruct((8 * 64,), jnp.float32)).compile().as_text()
  # The program numbers devices by position: the 'local' shift is {0,1}, .. not {7,6}, ..
  assert "source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5}" in text
  position = {dev.id: p for p, dev in enumerate(mesh.devices.flat)}
  hosts = [position[dev.id] // 4 for dev in mesh.devices.flat]
  assert hosts == cross_host.node_major_hosts(8, 4)
  got = cross_host.cross_host_bytes(text, hosts)
  kinds = sorted(op.kind for op in got.ops)
  assert kinds == ["collective-permute"] * 2 + ["reduce-scatter"] * 3
  across = B + B / 2  # b and d, on every device
  want = [across] * 8
  want[3] += 7 / 8 * B  # e: the ring's two host boundaries, 3 -> 4 and 7 -> 0
  want[7] += 7 / 8 * B
  assert list(got.per_device) == pytest.approx(want)
  assert got.max == pytest.approx(across + 7 / 8 * B)
  assert got.mean == pytest.approx(across + 2 * (7 / 8 * B) / 8)
  assert got.by_kind() == pytest.approx(
    {"collective-permute": B, "reduce-scatter": B / 2 + 2 * (7 / 8 * B) / 8}
  )
