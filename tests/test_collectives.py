"""Hand-written collectives against the lax builtins, values, gradients and traffic."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from deep_image.parallel import collectives

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


CASES = [(a, n) for a in HAND_WRITTEN for n in (1, 2, 4, 8)] + [
  (a, n) for a in HAND_WRITTEN for n in (3, 6)
]


@pytest.mark.parametrize("algorithm,n", CASES)
def test_reduce_scatter_matches_psum_scatter(algorithm, n):
  x = _rank_coded(n, rows=2 * n)
  got = _run(lambda b: collectives.reduce_scatter(b, "x", algorithm=algorithm), n, x)
  want = _run(lambda b: lax.psum_scatter(b, "x", scatter_dimension=0, tiled=True), n, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("algorithm,n", CASES)
def test_all_gather_matches_lax(algorithm, n):
  x = _rank_coded(n, rows=2)
  got = _run(lambda b: collectives.all_gather(b, "x", algorithm=algorithm), n, x)
  want = _run(lambda b: lax.all_gather(b, "x", axis=0, tiled=True), n, x)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("algorithm,n", [(a, n) for a in HAND_WRITTEN for n in (2, 6, 8)])
def test_all_reduce_of_odd_shape_is_psum(algorithm, n):
  x = _rank_coded(n, rows=5, cols=7)  # 35 elements per device: padding needed
  got = _run(lambda b: collectives.all_reduce(b, "x", algorithm=algorithm), n, x)
  want = _run(lambda b: lax.psum(b, "x"), n, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("algorithm,n", [(a, n) for a in HAND_WRITTEN for n in (4, 6)])
def test_gradients_match_lax(algorithm, n):
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


def test_indivisible_leading_dimension_is_a_clear_error():
  x = jnp.zeros((4 * 5, 3))  # 5 rows per device, 4 devices
  with pytest.raises(ValueError, match=r"leading dimension 5 .* does not divide over the 4"):
    _run(lambda b: collectives.reduce_scatter(b, "x"), 4, x)


def test_unknown_algorithm_is_a_clear_error():
  with pytest.raises(ValueError, match="parallel.collective='tree'"):
    _run(lambda b: collectives.all_gather(b, "x", algorithm="tree"), 2, jnp.zeros((4, 3)))


def test_butterfly_falls_back_to_ring_off_powers_of_two():
  assert collectives.resolve_algorithm("butterfly", 6) == "ring"
  assert collectives.resolve_algorithm("butterfly", 8) == "butterfly"


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
@pytest.mark.parametrize("n", [4, 8])
def test_all_reduce_sends_the_bandwidth_optimum(algorithm, n):
  """Each device sends 2 (N-1) / N of the buffer per all-reduce (read off the HLO)."""
  elements = 64 * n
  sent = _bytes_sent_per_device(
    lambda b: collectives.all_reduce(b, "x", algorithm=algorithm), n, elements
  )
  assert sent == 2 * (n - 1) * (4 * elements) // n
