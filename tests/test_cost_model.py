"""The cost model (parallel/cost_model.py, scaling_model.py) and parallel.strategy='auto'."""

import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from deep_image.config_error import ConfigError
from deep_image.models.summary import total_parameters
from deep_image.models.vgg import make_model, make_spec
from deep_image.parallel import clusters, layout_policy, strategies, validation
from deep_image.parallel import collective_cost as cc
from deep_image.parallel import cost_model as cm
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import scaling_model as sm
from deep_image.parallel.collective_cost import collective_cost
from deep_image.train.optimizer import make_optimizer
from experiments.configs import base

MODEL = "scaling_8conv_3fc"


def _cluster(per_node, intra_bw, inter_bw, intra_lat=0.0, inter_lat=0.0, per_nic=None):
  """A cluster with round numbers; one NIC of `inter_bw` per node unless per_nic says."""
  return clusters.Cluster(
    name="test",
    description="hand-computed",
    devices_per_node=per_node,
    num_nodes=64,
    peak_flops=1e12,
    utilisation=1.0,
    intra_bandwidth=intra_bw,
    intra_latency=intra_lat,
    nic_bandwidth=inter_bw,
    devices_per_nic=per_node if per_nic is None else per_nic,
    inter_latency=inter_lat,
  )


# --- alpha-beta --------------------------------------------------------------


def test_ring_inside_one_node_is_n_minus_1_rounds_of_alpha_plus_chunk_over_bandwidth():
  cl = _cluster(4, intra_bw=1e9, inter_bw=1e9, intra_lat=1e-6)
  cost = collective_cost("reduce_scatter", "ring", 4e6, 4, cl)
  assert cost.seconds == pytest.approx(3 * (1e-6 + 1e6 / 1e9))
  assert (cost.bytes_sent, cost.rounds, cost.algorithm) == (3e6, 3, "ring")


def test_butterfly_rounds_across_nodes_share_the_node_link():
  # 8 devices, 2 per node, chunk c = 1 MB. The reduce-scatter's first round,
  # d = 1, stays inside a node with the largest message (4c); d = 2, 4 cross
  # nodes with both devices of a node on its link (messages 2c, c).
  cl = _cluster(2, intra_bw=10e9, inter_bw=1e9)
  cost = collective_cost("reduce_scatter", "butterfly", 8e6, 8, cl)
  assert cost.seconds == pytest.approx(4e6 / 10e9 + 2 * 2e6 / 1e9 + 2 * 1e6 / 1e9)
  assert (cost.bytes_sent, cost.rounds) == (7e6, 3)
  # The all-gather runs the same rounds in reverse order: same time and bytes.
  gather = collective_cost("all_gather", "butterfly", 8e6, 8, cl)
  assert gather.seconds == pytest.approx(cost.seconds)
  # Ring: each round one device per node crosses (alone on the link), 7 rounds of c.
  ring = collective_cost("reduce_scatter", "ring", 8e6, 8, cl)
  assert ring.seconds == pytest.approx(7 * 1e6 / 1e9)
  # xla is modelled as the faster of the two: here the butterfly.
  assert collective_cost("reduce_scatter", "xla", 8e6, 8, cl).seconds == cost.seconds
  # Direct: shifts 1 and 7 send one device of a node across (the other stays
  # inside), shifts 2..6 both.
  direct = collective_cost("reduce_scatter", "direct", 8e6, 8, cl)
  assert direct.seconds == pytest.approx((2 * 1 + 5 * 2) * 1e6 / 1e9)


def test_butterfly_off_a_power_of_two_keeps_its_big_rounds_inside_a_node():
  # 12 devices, 4 per node (3 nodes), c = 1 MB: halving at d = 1, 2 inside a node
  # (6c, 3c), then the odd factor 3 by shifts of 4 and 8: every device crosses,
  # 4 per node on its link (c each). The all-gather: the same rounds backwards.
  cl = _cluster(4, intra_bw=10e9, inter_bw=1e9)
  for kind in ("reduce_scatter", "all_gather"):
    cost = collective_cost(kind, "butterfly", 12e6, 12, cl)
    assert cost.seconds == pytest.approx(6e6 / 10e9 + 3e6 / 10e9 + 2 * 4 * 1e6 / 1e9), kind
    assert (cost.bytes_sent, cost.rounds, cost.algorithm) == (11e6, 4, "butterfly"), kind
  six = collective_cost("all_gather", "butterfly", 6e6, 6, clusters.PRESETS["minwa"])
  assert (six.bytes_sent, six.rounds, six.algorithm) == (5e6, 3, "butterfly")
  assert collective_cost("all_gather", "butterfly", 6e6, 1, cl).seconds == 0.0
  with pytest.raises(ConfigError, match="parallel.collective='tree'"):
    collective_cost("all_gather", "tree", 6e6, 4, cl)


def test_a_gpu_crosses_nodes_through_its_own_nic():
  # h100: a NIC per GPU. 16 GPUs on 2 nodes, buffer 16 MB (c = 1 MB). A flat ring
  # round puts one GPU of each node on the next node: alone on its 50 GB/s NIC
  # (not the node's 8 x 50), the other 7 on NVLink at once.
  h100 = clusters.PRESETS["h100"]
  lat = h100.inter_latency
  ring = collective_cost("reduce_scatter", "ring", 16e6, 16, h100)
  assert ring.seconds == pytest.approx(15 * (lat + 1e6 / 50e9))
  # The same buffer level by level (2 x 8): a ring over local on the whole buffer
  # (7 rounds of 2 MB on NVLink), then over node on its 1/8 (1 round of 1 MB, all 8
  # GPUs of a node crossing at once, each through its own NIC).
  two = cc.mesh_cost("reduce_scatter", "ring", 16e6, (2, 8), h100)
  assert two.seconds == pytest.approx(7 * (h100.intra_latency + 2e6 / 450e9) + lat + 1e6 / 50e9)
  assert (two.bytes_sent, two.rounds, two.algorithm) == (15e6, 8, "ring/ring")
  # Bytes across: the flat ring's last GPU of a node sends every chunk across (15 MB), the
  # others nothing; the two-level ring: every GPU its 1 MB.
  assert ring.max_across == pytest.approx(15e6) and ring.bytes_across == pytest.approx(15e6 / 8)
  assert two.max_across == two.bytes_across == pytest.approx(1e6)
  # Minwa: one adapter for a node's 4 GPUs, so the node level's 4 senders share it.
  minwa = clusters.PRESETS["minwa"]
  node = cc.level_cost("all_gather", "ring", 4e6, (2, 4), 0, minwa)
  assert node.seconds == pytest.approx(minwa.inter_latency + 4 * 2e6 / 6e9)
  assert node.bytes_across == node.max_across == pytest.approx(2e6)
  # A one-axis mesh is the flat collective; size-1 axes cost nothing.
  flat = cc.mesh_cost("all_gather", "butterfly", 16e6, (16,), h100)
  assert flat == collective_cost("all_gather", "butterfly", 16e6, 16, h100)
  assert cc.level_cost("all_gather", "ring", 4e6, (1, 4), 0, minwa).seconds == 0.0
  with pytest.raises(ValueError, match="one per axis"):
    cc.mesh_cost("all_gather", ("ring",), 4e6, (2, 4), minwa)


def test_the_presets_reach_the_clusters_of_the_issue():
  minwa, h100 = clusters.PRESETS["minwa"], clusters.PRESETS["h100"]
  assert (minwa.max_devices, minwa.nics_per_node, minwa.inter_bandwidth) == (144, 1, 6e9)
  assert (h100.max_devices, h100.nics_per_node, h100.inter_bandwidth) == (512, 8, 400e9)


# --- the schedule ------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["butterfly", "ring", "direct"])
def test_data_parallel_bytes_per_device_are_flat_in_n(algorithm):
  params = total_parameters(make_spec(MODEL, num_classes=1000, image_size=224))
  for n in (2, 4, 8, 16, 32, 64):
    p = cm.predict(MODEL, "data", algorithm, n, 64, "minwa")
    # Reduce-scatter + all-gather of every parameter: 2 x params x (N-1)/N (+ padding).
    assert p.bytes_sent_per_device == pytest.approx(2 * 4 * params * (n - 1) / n, rel=1e-4), n
    assert p.activation_bytes_sent_per_device == 0


def test_hybrid_fc_bytes_follow_the_batch_not_the_fc_weights():
  n = 16
  for model in ("deep_image_16", "deep_image_16_fc8192"):
    spec = make_spec(model, num_classes=1000, image_size=224)
    f, h2 = spec.feature_dim, spec.fc[1]
    by_batch = {b: cm.predict(model, "hybrid", "butterfly", n, b, "minwa") for b in (16, 64)}
    for b, p in by_batch.items():
      # Features gathered and scattered back (F), FC2's sums scattered and gathered (H2).
      expected = 2 * 4 * n * b * (f + h2) * (n - 1) / n
      assert p.activation_bytes_sent_per_device == pytest.approx(expected), (model, b)
    act = {b: p.activation_bytes_sent_per_device for b, p in by_batch.items()}
    assert act[64] == pytest.approx(4 * act[16])
  # Wider FC layers: 1.5x the FC1 weights, but only the H2 part of the activations grows.
  small = cm.predict("deep_image_16", "hybrid", "ring", n, 64, "minwa")
  wide = cm.predict("deep_image_16_fc8192", "hybrid", "ring", n, 64, "minwa")
  ratio = wide.activation_bytes_sent_per_device / small.activation_bytes_sent_per_device
  assert ratio == pytest.approx((25088 + 8192) / (25088 + 6144))


@pytest.mark.parametrize("preset", ["minwa", "h100"])
@pytest.mark.parametrize("strategy", ["data", "lazy", "hybrid"])
def test_deferred_is_never_slower_than_none(preset, strategy):
  for n in (2, 8, 64):
    for b in (4, 64):
      none = cm.predict(MODEL, strategy, "butterfly", n, b, preset, overlap="none")
      deferred = cm.predict(MODEL, strategy, "butterfly", n, b, preset, overlap="deferred")
      assert deferred.step_s <= none.step_s * (1 + 1e-12), (n, b)
      assert none.compute_s == pytest.approx(deferred.compute_s)
      assert deferred.step_s >= deferred.compute_s
  # Data's all-gather after backward is exposed without deferral: strictly slower on Minwa.
  none = cm.predict(MODEL, "data", "butterfly", 64, 64, "minwa", overlap="none")
  deferred = cm.predict(MODEL, "data", "butterfly", 64, 64, "minwa")
  assert deferred.step_s < none.step_s


def test_two_level_hybrid_keeps_activations_in_a_node_and_syncs_its_fc_shards_across():
  spec = make_spec(MODEL, num_classes=1000, image_size=224)
  f, h2, b = spec.feature_dim, spec.fc[1], 64
  flat = cm.predict(MODEL, "hybrid", "ring", 64, b, "h100")
  two = cm.predict(MODEL, "hybrid", "ring", 64, b, "h100", mesh=(8, 8))
  assert (two.mesh, two.node_algorithm, flat.mesh) == ((8, 8), "ring", (64,))
  # Activations over local only: the node's 8 b rows, (L-1)/L of them sent.
  assert two.activation_bytes_sent_per_device == pytest.approx(2 * 4 * 8 * b * (f + h2) * 7 / 8)
  # Across nodes only buckets: what data sends across (its 1/L of every gradient).
  data = cm.predict(MODEL, "data", "ring", 64, b, "h100", mesh=(8, 8))
  assert two.bytes_across_per_device == pytest.approx(data.bytes_across_per_device, rel=1e-3)
  assert two.bytes_across_max_per_device == pytest.approx(two.bytes_across_per_device)
  # The flat ring's last GPU of a node carries its node's crossing: 8x the mean.
  assert flat.bytes_across_max_per_device == pytest.approx(8 * flat.bytes_across_per_device)
  assert two.step_s < flat.step_s
  # Each device updates 1/L (not 1/N) of FC1 / FC2's split leaves.
  layers = cm.model_layers(MODEL)
  split = layers[-3].kernel + layers[-3].bias + layers[-2].kernel
  assert cm.updated_parameters(layers, "hybrid", "data", (8, 8)) - cm.updated_parameters(
    layers, "hybrid", "data", 64
  ) == pytest.approx(split / 8 - split / 64)
  with pytest.raises(ValueError, match="mesh=.* does not have num_devices=64"):
    cm.predict(MODEL, "data", "ring", 64, b, "h100", mesh=(4, 8))


def test_bfloat16_gradients_halve_the_gradient_bytes_only():
  kw = dict(mesh=(8, 8))
  f32 = cm.predict(MODEL, "data", "butterfly", 64, 64, "h100", **kw)
  bf16 = cm.predict(MODEL, "data", "butterfly", 64, 64, "h100", grad_dtype="bfloat16", **kw)
  assert bf16.param_bytes_sent_per_device == pytest.approx(f32.param_bytes_sent_per_device / 2)
  # lazy: the reduce-scatters halve, the parameter all-gathers keep float32.
  f32 = cm.predict(MODEL, "lazy", "butterfly", 64, 64, "h100", **kw)
  bf16 = cm.predict(MODEL, "lazy", "butterfly", 64, 64, "h100", grad_dtype="bfloat16", **kw)
  assert bf16.param_bytes_sent_per_device == pytest.approx(
    0.75 * f32.param_bytes_sent_per_device, rel=1e-3
  )
  with pytest.raises(ConfigError, match="parallel.grad_dtype='float16'"):
    cm.predict(MODEL, "data", "ring", 8, 64, "h100", grad_dtype="float16")
  with pytest.raises(ConfigError, match="parallel.collective='tree'"):
    cm.predict(MODEL, "data", "ring", 8, 64, "h100", node_collective="tree")


def test_prefetch_gives_fc1s_gather_more_compute_to_hide_behind():
  # data on 64 Minwa GPUs: FC1's 411 MB all-gather, one bucket ahead, is exposed.
  base_ = cm.predict(MODEL, "data", "butterfly", 64, 64, "minwa")
  times = [
    cm.predict(MODEL, "data", "butterfly", 64, 64, "minwa", prefetch_mb=mb).step_s
    for mb in (0, 25, 100, 1000)
  ]
  assert times[0] == base_.step_s
  assert all(a >= b for a, b in zip(times, times[1:], strict=False)), times
  assert times[-1] < 0.95 * times[0] and base_.exposed_comm_s > 0.05


@pytest.mark.parametrize("preset", ["h100", "cpu"])
def test_the_exposed_communication_is_charged_to_the_collectives_that_cause_it(preset):
  for strategy, mesh in (("lazy", (64,)), ("hybrid", (8, 8)), ("data", (8, 8))):
    p = cm.predict(MODEL, strategy, "butterfly", 64, 16, preset, mesh=mesh, image_size=32)
    assert sum(s for _, s in p.exposed) == pytest.approx(p.exposed_comm_s), (strategy, mesh)
    assert [s for _, s in p.exposed] == sorted((s for _, s in p.exposed), reverse=True)
  # One axis, 64 images per H100: FC1's 616 MB gather, one bucket ahead, hides behind
  # only conv7-8 (BENCHMARKS.md, "Planning a cluster").
  p = cm.predict(MODEL, "lazy", "butterfly", 64, 64, "h100")
  assert p.exposed[0][0].startswith("all-gather of fc1 (lazy, ") and p.exposed[0][1] > 2e-3


def test_one_device_is_pure_compute_and_speedup_is_one():
  p = cm.predict(MODEL, "hybrid", "butterfly", 1, 64, "minwa")
  assert (p.comm_s, p.bytes_sent_per_device, p.step_s) == (0.0, 0.0, p.compute_s)
  # Forward + backward = 3 x forward FLOPs but the first layer's missing input gradient.
  layers = cm.model_layers(MODEL)
  flops = 3 * sum(x.flops for x in layers) - layers[0].flops
  assert p.compute_s - p.update_s == pytest.approx(64 * flops / clusters.PRESETS["minwa"].flops)
  # The update: 20 bytes of memory traffic per parameter.
  params = sum(x.kernel + x.bias for x in layers)
  assert p.update_s == pytest.approx(20 * params / clusters.PRESETS["minwa"].memory_bandwidth)
  assert sm.speedup(MODEL, "minwa", 1, 256) == pytest.approx(1.0)


def test_crossover_is_a_listed_count_and_moves_with_the_batch():
  # Hybrid's traffic grows with b like its compute; data's is fixed: a smaller
  # batch per device favours hybrid, so the crossover cannot move down.
  counts = [sm.crossover(MODEL, "minwa", b) for b in (16, 64, 256)]
  assert all(c in sm.device_counts(64) for c in counts)
  assert counts[0] >= counts[1] >= counts[2], counts
  # Free links: both strategies are pure compute, hybrid never slower.
  free = _cluster(4, intra_bw=1e18, inter_bw=1e18)
  assert sm.crossover(MODEL, free) == 64
  # Data-parallel speedup cannot exceed the device count.
  assert sm.speedup(MODEL, "minwa", 64, 1024) <= 64


def test_report_ends_with_crossover_and_speedup_lines():
  text = sm.report("minwa")
  last = text.splitlines()[-2:]
  assert re.fullmatch(r"crossover: \d+", last[0]), last
  assert re.fullmatch(r"speedup@64: \d+\.\dx", last[1]), last
  assert last[0] == f"crossover: {sm.crossover(MODEL, 'minwa')}"
  assert last[1] == f"speedup@64: {sm.speedup(MODEL, 'minwa', 64, 1024):.1f}x"
  assert "paper (section 3.3, Minwa): crossover 16, speedup@64 47x" in text
  rows = sm.predict_rows("h100")
  assert {r["figure"] for r in rows} == {"left", "right"}
  left = [r for r in rows if r["figure"] == "left" and r["strategy"] == "data"]
  assert [r["num_devices"] for r in left] == [1, 2, 4, 8, 16, 32, 64]
  assert left[0]["speedup"] == pytest.approx(1.0)


def test_bad_preset_names_the_presets():
  with pytest.raises(ValueError, match=r"preset='dgx' is not a known cluster.*'h100'"):
    sm.report("dgx")
  with pytest.raises(ValueError, match="preset='dgx'"):
    cm.predict(MODEL, "data", "ring", 8, 64, "dgx")
  with pytest.raises(ConfigError, match="parallel.strategy='pipeline'"):
    cm.predict(MODEL, "pipeline", "ring", 8, 64, "h100")


# --- against the compiled program and 'auto' -----------------------------------

_PERMUTE = re.compile(r"= \(?((?:[a-z0-9]+\[[0-9,]*\][^ ]*(?:, )?)+)\)? collective-permute\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def _config(strategy, batch, n_fc=24):
  c = base.get_config()
  c.model.name, c.model.image_size = "vgg_tiny", 8
  c.train.batch_size, c.train.warmup_steps = batch, 0
  c.parallel.strategy, c.parallel.collective = strategy, "butterfly"
  return c


def _mesh_spec(mesh):
  """parallel.mesh for axis sizes: one axis 'data', two 'node' x 'local'."""
  return (("data", mesh[0]),) if len(mesh) == 1 else (("node", mesh[0]), ("local", mesh[1]))


def _strategy(config, n):
  mesh = mesh_lib.make_mesh(config.parallel, jax.devices()[:n])
  return strategies.make_strategy(
    config, make_model(config.model), make_optimizer(config.train), mesh
  )


@pytest.mark.parametrize("n", [8, 6])  # 6: the butterfly off a power of two
def test_compare_bytes_matches_the_compiled_data_parallel_step(n):
  c = _config("data", n)
  s = _strategy(c, n)
  images = jax.ShapeDtypeStruct((n, 8, 8, 3), jnp.uint8, sharding=s.batch_sharding)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=s.batch_sharding)
  hlo = s.lower_train_step(s.abstract_state(), images, labels).compile().as_text()
  sent = 0
  for result in _PERMUTE.findall(hlo):
    for dtype, dims in _ARRAY.findall(result):
      assert dtype == "f32", dtype
      sent += 4 * math.prod(int(d) for d in dims.split(",") if d)
  assert sent > 0
  error = sm.compare_bytes(
    "vgg_tiny", "data", "butterfly", n, 1, sent, image_size=8, num_classes=c.model.num_classes
  )
  # The model pads each leaf to a multiple of N like buckets.plan, so only
  # per-bucket rounding differs.
  assert abs(error) < 0.02, (error, sent)


def _compiled_hlo(strategy):
  n = strategy.mesh.size
  size = strategy.config.model.image_size
  images = jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8, sharding=strategy.batch_sharding)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=strategy.batch_sharding)
  return strategy.lower_train_step(strategy.abstract_state(), images, labels).compile().as_text()


@pytest.mark.parametrize(
  "strategy,mesh,algorithm",
  [
    ("data", (8,), "ring"),
    ("data", (2, 4), "butterfly"),
    ("lazy", (2, 4), "ring"),
    ("hybrid", (8,), "butterfly"),
    ("hybrid", (2, 4), "ring"),
  ],
)
def test_cross_node_bytes_match_the_compiled_program_on_two_pretend_hosts(
  strategy, mesh, algorithm
):
  # What experiments.compile_gpu reports (analysis.cross_host on node-major hosts),
  # on 8 CPU devices taken as 2 hosts of 4: exact for the hand-written permutes.
  from deep_image.analysis import cross_host

  c = _config(strategy, 8)
  c.parallel.collective, c.parallel.mesh = algorithm, _mesh_spec(mesh)
  got = cross_host.cross_host_bytes(
    _compiled_hlo(_strategy(c, 8)), cross_host.node_major_hosts(8, 4)
  )
  assert got.mean > 0
  want = cm.cross_node_bytes(c, 8, 2)
  # Per-bucket padding to a multiple of N differs (as compare_bytes), and the model has
  # no all-reduce of the step's few metric scalars (24 bytes, XLA's: a ring in group order).
  assert want.mean == pytest.approx(got.mean, rel=0.02, abs=64), (want, got.mean)
  assert want.max == pytest.approx(got.max, rel=0.02, abs=64), (want, got.max)
  assert want.inside > 0


def test_auto_builds_the_predicted_fastest_strategy_and_logs_why(caplog):
  c = _config("auto", 16)
  validation.validate_parallel_config(c, 8)
  caplog.set_level(logging.INFO)
  s = _strategy(c, 8)
  assert s.name in layout_policy.STRATEGIES
  assert c.parallel.strategy == "auto"  # the caller's config is left as it was
  assert s.config.parallel.strategy == s.name
  line = [r.getMessage() for r in caplog.records if "parallel.strategy='auto'" in r.getMessage()]
  assert len(line) == 1 and f"-> {s.name!r}" in line[0] and "predicted step" in line[0], line
  times = dict(re.findall(r"(gspmd|data|lazy|hybrid) ([0-9.]+) ms", line[0]))
  assert sorted(times) == sorted(layout_policy.STRATEGIES), line
  assert float(times[s.name]) == min(map(float, times.values())), line
  # On 5 devices vgg_tiny's 24 FC1 columns do not split: only data and lazy can run.
  mesh = mesh_lib.make_mesh(c.parallel, jax.devices()[:5])
  c5 = _config("auto", 10)
  name, reason = strategies.choose_strategy(c5, mesh)
  assert name in ("data", "lazy") and "not runnable here: gspmd, hybrid" in reason, reason


def test_auto_ranks_the_strategies_on_a_two_level_mesh_as_the_planner_does():
  from deep_image.parallel import planner

  c = _config("auto", 16)
  c.parallel.mesh = _mesh_spec((2, 4))
  mesh = mesh_lib.make_mesh(c.parallel, jax.devices()[:8])
  name, reason = strategies.choose_strategy(c, mesh)
  assert "8 devices as 2x4" in reason, reason
  cl = clusters.cluster_for_mesh(mesh)
  rows = [
    planner.predict_row(c, cl, planner.Setup(s, (2, 4), "xla" if s == "gspmd" else "butterfly"))
    for s in layout_policy.STRATEGIES
  ]
  assert name == min(rows, key=planner.rank_key).setup.strategy


def test_unknown_strategy_lists_auto():
  c = _config("fastest", 8)
  with pytest.raises(ConfigError, match=r"parallel.strategy='fastest'.*'auto'"):
    validation.validate_parallel_config(c, 8)


def test_update_follows_what_each_device_owns_and_a_shared_host_divides_its_rates():
  layers = cm.model_layers(MODEL)
  total = sum(x.kernel + x.bias for x in layers)
  # Hybrid splits FC1 and FC2's kernel; FC2's bias is added after the sum, whole.
  split = sum(x.kernel + x.bias for x in layers if x.name == "fc1") + layers[-2].kernel
  kernels = sum(x.kernel for x in layers)
  assert cm.updated_parameters(layers, "data", "data", 8) == total
  assert cm.updated_parameters(layers, "lazy", "data", 8) == pytest.approx(
    total - kernels + kernels / 8
  )
  assert layers[-2].name == "fc2"
  assert cm.updated_parameters(layers, "hybrid", "data", 8) == pytest.approx(
    total - split + split / 8
  )
  assert cm.updated_parameters(layers, "lazy", "data", 1) == total
  # Simulated devices share the host: 2 devices of 4 images take the compute time of
  # one device of 8 images, not of one device of 4.
  one = cm.predict(MODEL, "data", "butterfly", 1, 8, "cpu", image_size=32)
  two = cm.predict(MODEL, "data", "butterfly", 2, 4, "cpu", image_size=32)
  assert two.compute_s - two.update_s == pytest.approx(one.compute_s - one.update_s)
  assert two.update_s == pytest.approx(2 * one.update_s)  # every device updates everything


@pytest.mark.parametrize("mesh", [(8,), (2, 4)])
@pytest.mark.parametrize("strategy", layout_policy.STRATEGIES)
@pytest.mark.parametrize("conv", layout_policy.CONV_MODES)
def test_the_cost_model_plans_the_buckets_the_strategy_builds(strategy, conv, mesh):
  if strategy == "gspmd" and len(mesh) > 1:
    pytest.skip("gspmd is modelled on one axis")
  c = _config(strategy, 8)
  c.parallel.conv, c.parallel.bucket_mb = conv, 0.001  # 1 KiB: several buckets
  c.parallel.mesh = _mesh_spec(mesh)
  layers = cm.model_layers("vgg_tiny", 8, c.model.num_classes)
  modelled = cm.plan_buckets(layers, strategy, conv, mesh, c.parallel.bucket_mb, 4)
  if strategy == "gspmd":  # XLA synchronizes; the model plans the layouts' buckets
    shapes = jax.eval_shape(
      lambda: make_model(c.model).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    )
    shapes = nn.unbox(shapes)
    built_layouts = layout_policy.param_layouts(strategy, conv, shapes)
    paths = jax.tree_util.tree_leaves_with_path(shapes)
    built = layout_policy.plan_buckets(
      strategy,
      conv,
      [x.name for x in layers],
      [layout_policy.path_names(p) for p, _ in paths],
      [math.prod(x.shape) for _, x in paths],
      8,
      c.parallel.bucket_mb,
    )
    assert {lo.kind for lo in jax.tree.leaves(built_layouts)} == {"replicated", "split"}
  else:
    built = _strategy(c, 8).buckets
  assert len(modelled) > 2
  assert [(b.kind, b.layers, b.size, b.devices) for b in modelled] == [
    (b.kind, b.layers, b.size, b.devices) for b in built
  ]
  if strategy == "hybrid" and len(mesh) > 1:  # FC1 / FC2's shards, all-reduced over node
    assert {b.devices for b in built if b.kind == "split"} == {2}


def test_the_paper_setup_takes_the_parallel_defaults_of_the_base_config():
  # PAPER_SETUP names the paper's ImageNet model; its parallel fields are the defaults.
  c = base.get_config()
  assert cm.StepSetup.from_config(c).activation_bytes is None  # float32
  for field in ("overlap", "conv", "bucket_mb", "fc_micro_batches"):
    assert getattr(cm.PAPER_SETUP, field) == c.parallel[field], field
  assert (cm.PAPER_SETUP.image_size, cm.PAPER_SETUP.num_classes) == (224, 1000)
