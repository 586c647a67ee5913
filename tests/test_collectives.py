"""Hand-written collectives against the lax builtins, values, gradients and traffic."""

import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from deep_image.analysis import bytes_sent
from deep_image.parallel import collectives
from deep_image.parallel.mesh import PATIENT_COLLECTIVES

TESTS = pathlib.Path(__file__).resolve().parent

HAND_WRITTEN = ("butterfly", "ring", "direct")


def _mesh(n):
  return Mesh(np.asarray(jax.devices()[:n]), ("x",), axis_types=(AxisType.Auto,))


def _run(fn, n, x):
  """Run fn on each device's block of x ([n * rows, ...], split over 'x')."""
  mapped = jax.shard_map(fn, mesh=_mesh(n), in_specs=P("x"), out_specs=P("x"), check_vma=False)
  return np.asarray(jax.jit(mapped)(x))


def _rank_coded(n, rows, cols=3):
  """Per-device blocks that encode (device, row, col) so any misplacement shows."""
  rng = np.random.default_rng(n)
  dev = np.arange(n)[:, None, None] * 1000.0
  row = np.arange(rows)[None, :, None] * 10.0
  noise = rng.standard_normal((n, rows, cols))
  return jnp.asarray((dev + row + noise).reshape(n * rows, cols).astype(np.float32))


# Butterfly on every count the 8 simulated devices allow; counts above 8 run in
# one subprocess (`test_butterfly_on_more_devices_than_conftest_gives`).
BUTTERFLY_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8)
LARGE_COUNTS = (10, 11, 12)
CASES = [("butterfly", n) for n in BUTTERFLY_COUNTS] + [
  (a, n) for a in ("ring", "direct") for n in (1, 2, 3, 4, 6, 8)
]


def check_reduce_scatter(algorithm, n):
  x = _rank_coded(n, rows=2 * n)
  got = _run(lambda b: collectives.reduce_scatter(b, "x", algorithm=algorithm), n, x)
  want = _run(lambda b: lax.psum_scatter(b, "x", scatter_dimension=0, tiled=True), n, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def check_all_gather(algorithm, n):
  x = _rank_coded(n, rows=2)
  got = _run(lambda b: collectives.all_gather(b, "x", algorithm=algorithm), n, x)
  want = _run(lambda b: lax.all_gather(b, "x", axis=0, tiled=True), n, x)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("algorithm,n", CASES)
def test_reduce_scatter_matches_psum_scatter(algorithm, n):
  check_reduce_scatter(algorithm, n)


@pytest.mark.parametrize("algorithm,n", CASES)
def test_all_gather_matches_lax(algorithm, n):
  check_all_gather(algorithm, n)


@pytest.mark.parametrize("algorithm,n", [(a, n) for a in HAND_WRITTEN for n in (2, 6, 8)])
def test_all_reduce_of_odd_shape_is_psum(algorithm, n):
  x = _rank_coded(n, rows=5, cols=7)  # 35 elements per device: padding needed
  got = _run(lambda b: collectives.all_reduce(b, "x", algorithm=algorithm), n, x)
  want = _run(lambda b: lax.psum(b, "x"), n, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def check_gradients(algorithm, n):
  """d/dx of sum(w * collective(x)) through our VJPs equals the builtins' autodiff."""
  x = _rank_coded(n, rows=2 * n)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))

  def grad_of(gather, scatter):
    def local(xb, wb):
      def f(v):
        full = gather(scatter(v))  # [2n, 3] -> [2, 3] -> [2n, 3]
        return jnp.sum(wb * full)

      return jax.grad(f)(xb)

    mapped = jax.shard_map(
      local, mesh=_mesh(n), in_specs=(P("x"), P("x")), out_specs=P("x"), check_vma=False
    )
    return np.asarray(jax.jit(mapped)(x, w))

  ours = grad_of(
    lambda v: collectives.all_gather_with_scatter_grad(v, "x", algorithm),
    lambda v: collectives.reduce_scatter_with_gather_grad(v, "x", algorithm),
  )
  builtin = grad_of(
    lambda v: lax.all_gather(v, "x", axis=0, tiled=True),
    lambda v: lax.psum_scatter(v, "x", scatter_dimension=0, tiled=True),
  )
  np.testing.assert_allclose(ours, builtin, rtol=1e-5, atol=1e-4)


GRADIENT_CASES = [("butterfly", n) for n in BUTTERFLY_COUNTS if n > 1] + [
  (a, n) for a in ("ring", "direct") for n in (4, 6)
]


@pytest.mark.parametrize("algorithm,n", GRADIENT_CASES)
def test_gradients_match_lax(algorithm, n):
  check_gradients(algorithm, n)


def test_indivisible_leading_dimension_is_a_clear_error():
  x = jnp.zeros((4 * 5, 3))  # 5 rows per device, 4 devices
  with pytest.raises(ValueError, match=r"leading dimension 5 .* does not divide over the 4"):
    _run(lambda b: collectives.reduce_scatter(b, "x"), 4, x)


def test_unknown_algorithm_is_a_clear_error():
  with pytest.raises(ValueError, match="parallel.collective='tree'"):
    _run(lambda b: collectives.all_gather(b, "x", algorithm="tree"), 2, jnp.zeros((4, 3)))


def test_every_algorithm_runs_on_any_device_count():
  for algorithm in collectives.ALGORITHMS:
    collectives.check_algorithm(algorithm)
  with pytest.raises(ValueError, match="parallel.collective='tree'"):
    collectives.check_algorithm("tree")


def _chunks(n, kind="reduce_scatter"):
  return [r.chunks for r in collectives.butterfly_rounds(n, kind)]


def test_butterfly_rounds_are_the_docstring_table():
  """The module docstring's examples, and its rules for every N up to 300."""
  assert _chunks(8) == [4, 2, 1]
  assert _chunks(6) == [3, 1, 1]
  assert _chunks(12) == [6, 3, 1, 1]
  assert _chunks(5) == [2, 1, 1]
  assert _chunks(7) == [3, 2, 1]
  assert _chunks(144) == [72, 36, 18, 9, 4, 2, 1, 1]
  assert [(r.how, r.distance) for r in collectives.butterfly_rounds(12)] == [
    ("xor", 1), ("xor", 2), ("shift", 4), ("shift", 8)
  ]  # fmt: skip
  assert [(r.how, r.distance) for r in collectives.butterfly_rounds(12, "all_gather")] == [
    ("shift", -8), ("shift", -4), ("xor", 2), ("xor", 1)
  ]  # fmt: skip
  for n in range(1, 301):
    rounds = collectives.butterfly_rounds(n)
    assert len(rounds) == math.ceil(math.log2(n)), n  # within ceil(log2 N) + 2
    assert sum(r.chunks for r in rounds) == n - 1, n  # (N-1)/N of the buffer
    # The largest message goes to the nearest partner: distances grow, messages shrink.
    assert [r.chunks for r in rounds] == sorted((r.chunks for r in rounds), reverse=True), n
    assert [abs(r.distance) for r in rounds] == sorted(abs(r.distance) for r in rounds), n
    assert _chunks(n, "all_gather") == _chunks(n)[::-1], n


def _lowered(fn, n, elements):
  x = jnp.zeros((n * elements,), jnp.float32)
  mapped = jax.shard_map(fn, mesh=_mesh(n), in_specs=P("x"), out_specs=P("x"), check_vma=False)
  return jax.jit(mapped).lower(x)


def check_butterfly_traffic(n):
  """Rounds (permutes of the lowered program) and bytes per device per round (compiled)."""
  c = 16  # elements per chunk, float32
  for kind, fn, elements in (
    ("reduce_scatter", lambda b: collectives.reduce_scatter(b, "x"), n * c),
    ("all_gather", lambda b: collectives.all_gather(b, "x"), c),
  ):
    lowered = _lowered(fn, n, elements)
    rounds = lowered.as_text().count("stablehlo.collective_permute")
    assert rounds <= math.ceil(math.log2(n)) + 2, (kind, n, rounds)
    assert rounds == len(collectives.butterfly_rounds(n, kind)), (kind, n, rounds)
    ops = bytes_sent.collective_ops(lowered.compile().as_text(), n)
    assert {op.kind for op in ops} == {"collective-permute"}, (kind, n)
    sent = sorted(op.sent for op in ops)
    table = sorted(4.0 * c * r.chunks for r in collectives.butterfly_rounds(n, kind))
    assert sent == table, (kind, n, sent, table)
    assert sum(sent) == (n - 1) / n * (4 * n * c), (kind, n)


@pytest.mark.parametrize("n", [n for n in BUTTERFLY_COUNTS if n > 1])
def test_butterfly_rounds_and_bytes_in_the_compiled_program(n):
  check_butterfly_traffic(n)


def check_large_counts():
  """Every butterfly check on LARGE_COUNTS (run by a process with 12 devices)."""
  for n in LARGE_COUNTS:
    check_reduce_scatter("butterfly", n)
    check_all_gather("butterfly", n)
    check_gradients("butterfly", n)
    check_butterfly_traffic(n)
    print(f"butterfly ok on {n} devices", flush=True)
  for algorithm in ("butterfly", "ring"):
    check_levels((3, 4), algorithm)  # 12 as 3 nodes x 4
  print("levels ok on 3 x 4", flush=True)


# Two levels, outer first ((nodes, local)): every algorithm, one per level or the same.
LEVEL_SHAPES = ((2, 4), (4, 2), (3, 2), (2, 3))
LEVEL_ALGORITHMS = ("butterfly", "ring", "xla", ("ring", "butterfly"), ("butterfly", "direct"))


def _level_mesh(shape):
  devices = np.asarray(jax.devices()[: math.prod(shape)]).reshape(shape)
  return Mesh(devices, ("node", "local"), axis_types=(AxisType.Auto,) * 2)


def _run_levels(fn, shape, *xs):
  """fn on each device's block of each x ([N * rows, ...], split over node x local)."""
  spec = P(("node", "local"))
  mapped = jax.shard_map(
    fn, mesh=_level_mesh(shape), in_specs=(spec,) * len(xs), out_specs=spec, check_vma=False
  )
  return np.asarray(jax.jit(mapped)(*xs))


LEVELS = ("node", "local")


def check_levels(shape, algorithm):
  """Values and gradients of the two-level collectives == lax's over both axes (node-major)."""
  n = math.prod(shape)
  x = _rank_coded(n, rows=2 * n)
  got = _run_levels(lambda b: collectives.reduce_scatter(b, LEVELS, algorithm=algorithm), shape, x)
  want = _run_levels(
    lambda b: lax.psum_scatter(b, LEVELS, scatter_dimension=0, tiled=True), shape, x
  )
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)
  y = _rank_coded(n, rows=2)
  got = _run_levels(lambda b: collectives.all_gather(b, LEVELS, algorithm=algorithm), shape, y)
  want = _run_levels(lambda b: lax.all_gather(b, LEVELS, axis=0, tiled=True), shape, y)
  np.testing.assert_array_equal(got, want)
  w = _rank_coded(n + 1, rows=2 * n)[: 2 * n * n]

  def grad_of(gather, scatter):
    def local(xb, wb):
      return jax.grad(lambda v: jnp.sum(wb * gather(scatter(v))))(xb)

    return _run_levels(local, shape, x, w)

  ours = grad_of(
    lambda v: collectives.all_gather_with_scatter_grad(v, LEVELS, algorithm),
    lambda v: collectives.reduce_scatter_with_gather_grad(v, LEVELS, algorithm),
  )
  builtin = grad_of(
    lambda v: lax.all_gather(v, LEVELS, axis=0, tiled=True),
    lambda v: lax.psum_scatter(v, LEVELS, scatter_dimension=0, tiled=True),
  )
  np.testing.assert_allclose(ours, builtin, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("algorithm", LEVEL_ALGORITHMS)
@pytest.mark.parametrize("shape", LEVEL_SHAPES)
def test_two_level_collectives_match_lax_over_both_axes(shape, algorithm):
  check_levels(shape, algorithm)


def test_two_level_reduce_scatter_sends_the_whole_buffer_inside_and_1_over_l_across():
  """The levels' traffic: (L-1)/L of the buffer over 'local', (Nn-1)/Nn of 1/L over 'node'."""
  shape, elements = (2, 4), 96
  n = math.prod(shape)
  x = jnp.zeros((n * elements,), jnp.float32)
  spec = P(LEVELS)
  mapped = jax.shard_map(
    lambda b: collectives.reduce_scatter(b, LEVELS, algorithm="ring"),
    mesh=_level_mesh(shape),
    in_specs=spec,
    out_specs=spec,
    check_vma=False,
  )
  hlo = jax.jit(mapped).lower(x).compile().as_text()
  ops = [op for op in bytes_sent.collective_ops(hlo) if op.kind == "collective-permute"]
  per_pair = {}
  for op in ops:
    # Every permute of a level pairs devices of one node (local) or one local rank (node).
    pairs = op.pairs
    across = all(a // shape[1] != b // shape[1] for a, b in pairs)
    inside = all(a // shape[1] == b // shape[1] for a, b in pairs)
    assert across != inside, pairs
    per_pair.setdefault("across" if across else "inside", []).append(op.operand_bytes)
  buffer = elements * 4  # bytes per device's buffer
  assert sum(per_pair["inside"]) == buffer * (shape[1] - 1) // shape[1]
  assert sum(per_pair["across"]) == buffer // shape[1] * (shape[0] - 1) // shape[0]


def test_one_algorithm_per_level_is_checked():
  with pytest.raises(ValueError, match="one per level"):
    _run_levels(
      lambda b: collectives.all_gather(b, LEVELS, algorithm=("ring",)), (2, 4), _rank_coded(8, 2)
    )
  with pytest.raises(ValueError, match="parallel.collective='tree'"):
    _run_levels(
      lambda b: collectives.all_gather(b, LEVELS, algorithm=("ring", "tree")),
      (2, 4),
      _rank_coded(8, 2),
    )


def test_butterfly_on_more_devices_than_conftest_gives():
  """LARGE_COUNTS in one subprocess: the device count is fixed when JAX starts."""
  count = max(LARGE_COUNTS)
  script = "import test_collectives as t; t.check_large_counts()"
  env = dict(
    os.environ,
    XLA_FLAGS=f"{PATIENT_COLLECTIVES} --xla_force_host_platform_device_count={count}",
    PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
  )
  done = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split("\n")[:-1] == [
    *(f"butterfly ok on {n} devices" for n in LARGE_COUNTS),
    "levels ok on 3 x 4",
  ]


_PERMUTE = re.compile(r"= f32\[([\d,]*)\]\S* collective-permute\(")


def _bytes_sent_per_device(fn, n, elements):
  """Sum of collective-permute payloads in the compiled per-device program, in bytes."""
  x = jnp.zeros((n * elements,), jnp.float32)
  mapped = jax.shard_map(fn, mesh=_mesh(n), in_specs=P("x"), out_specs=P("x"), check_vma=False)
  hlo = jax.jit(mapped).lower(x).compile().as_text()
  sizes = [int(np.prod([int(d) for d in m.split(",") if d])) for m in _PERMUTE.findall(hlo)]
  assert sizes, "no collective-permute in the compiled program"
  return 4 * sum(sizes)


@pytest.mark.parametrize("algorithm", HAND_WRITTEN)
@pytest.mark.parametrize("n", [4, 6, 8])
def test_all_reduce_sends_the_bandwidth_optimum(algorithm, n):
  """Each device sends 2 (N-1) / N of the buffer per all-reduce (read off the HLO)."""
  elements = 64 * n
  sent = _bytes_sent_per_device(
    lambda b: collectives.all_reduce(b, "x", algorithm=algorithm), n, elements
  )
  assert sent == 2 * (n - 1) * (4 * elements) // n
