"""The async-window analysis (deep_image.analysis.overlap) on a hand-written scheduled module
(no CUDA), and what experiments.compile_gpu compiles (experiments.gpu_overlap, gpu_target):
configurations, meshes, the bytes across hosts it reports (deep_image.analysis.cross_host,
tests/test_cross_host.py)."""

# ruff: noqa: E501  (HLO instruction lines are long, as XLA prints them)

import importlib.util

import pytest

from deep_image.analysis import hlo, overlap
from experiments import compile_gpu, gpu_overlap, gpu_target

# A scheduled module in the shape `compiled.as_text()` prints for a GPU: start/done pairs,
# an async-start wrapping a reduce-scatter, a copy-start (not a collective), a cuDNN conv.
HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[64]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%async_rs (p: f32[64]) -> f32[8] {
  %p = f32[64]{0} parameter(0)
  ROOT %rs = f32[8]{0} reduce-scatter(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

%fused_add (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  ROOT %b = f32[64]{0} add(%a, %a)
}

ENTRY %main (param.0: f32[8], param.1: bf16[4,4]) -> f32[64] {
  %param.0 = f32[8]{0} parameter(0)
  %param.1 = bf16[4,4]{1,0} parameter(1)
  %all-gather-start = (f32[8]{0}, f32[64]{0}) all-gather-start(%param.0), channel_id=1, dimensions={0}, metadata={op_name="jit(step)/shard_map/all_gather"}
  %bitcast.1 = bf16[16]{0} bitcast(%param.1)
  %loop_add_fusion = f32[64]{0} fusion(%param.0), kind=kLoop, calls=%fused_add
  %all-gather-done = f32[64]{0} all-gather-done(%all-gather-start)
  %reduce-scatter-start = ((f32[64]{0}), f32[8]{0}) async-start(%all-gather-done), calls=%async_rs, metadata={op_name="jit(step)/shard_map/psum_scatter"}
  %copy-start = (f32[64]{0}, f32[64]{0}, u32[]) copy-start(%loop_add_fusion)
  %bitcast.2 = f32[64]{0} bitcast(%all-gather-done)
  %copy-done = f32[64]{0} copy-done(%copy-start)
  %reduce-scatter-done = f32[8]{0} async-done(%reduce-scatter-start), calls=%async_rs
  %collective-permute-start = (bf16[4,4]{1,0}, bf16[4,4]{1,0}) collective-permute-start(%param.1), channel_id=2, source_target_pairs={{0,1},{1,0}}, backend_config={"collective_backend_config":{"is_sync":false}}
  %all-reduce-start = f32[] all-reduce-start(%param.0), channel_id=3, to_apply=%add, backend_config={"collective_backend_config":{"is_sync":true}}
  %all-reduce-done = f32[] all-reduce-done(%all-reduce-start)
  %cudnn-conv = (bf16[4,4]{1,0}, u8[0]{0}) custom-call(%param.1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/shard_map/VGG.features/convs_3/conv"}
  %collective-permute-done = bf16[4,4]{1,0} collective-permute-done(%collective-permute-start)
  ROOT %out = f32[64]{0} add(%copy-done, %bitcast.2)
}
"""


def test_async_collectives_pairs_and_windows():
  found = overlap.async_collectives(HLO)
  # Schedule order of the starts; copy-start is no collective.
  assert [c.kind for c in found] == [
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-reduce",
  ]
  ag, rs, cp, ar = found
  # Output bytes: the done's shape (f32[64]; f32[8]; bf16[4,4]; f32[]).
  assert [c.bytes for c in found] == [256, 32, 32, 4]
  assert (ag.start, ag.done) == ("all-gather-start", "all-gather-done")
  assert ag.compute == ("loop_add_fusion",) and ag.heavy == 0  # the bitcast does not count
  # Only a bitcast and another async copy inside: nothing to hide behind.
  assert rs.compute == () and not rs.overlapped
  assert rs.op_name == "jit(step)/shard_map/psum_scatter"
  # The all-reduce nested in the permute's window is not compute; the cuDNN conv is.
  assert cp.compute == ("cudnn-conv",) and cp.heavy == 1 and not cp.sync
  assert (ar.heavy_before, ar.heavy_total, ag.heavy_before) == (0, 1, 0)
  assert ar.compute == () and ar.sync
  assert ar.after == "jit(step)/shard_map/VGG.features/convs_3/conv"
  assert all(c.computation == "main" for c in found)


def test_overlap_summary_fractions_by_count_and_bytes():
  summary = overlap.overlap_summary(overlap.async_collectives(HLO))
  assert summary.per_kind == {
    "all-gather": (1, 1),
    "reduce-scatter": (1, 0),
    "collective-permute": (1, 1),
    "all-reduce": (1, 0),
  }
  assert (summary.count, summary.overlapped, summary.sync, summary.heavy) == (4, 2, 1, 1)
  assert summary.fraction == 0.5
  assert summary.bytes_fraction == pytest.approx((256 + 32) / (256 + 32 + 32 + 4))
  assert summary.line() == "overlapped: 50% of 4 async collectives, 89% of bytes"
  assert summary.kinds_text().startswith("all-gather 1 (1), reduce-scatter 1 (0)")


def test_shape_bytes():
  assert hlo.shape_bytes("bf16[2,3]{1,0}") == 12
  assert hlo.shape_bytes("(f32[8]{0}, (pred[], s8[4]))") == 32 + 1 + 4
  assert hlo.shape_bytes("f32[]") == 4
  with pytest.raises(ValueError, match="unknown HLO element type"):
    hlo.shape_bytes("q7[2]")


def test_unmatched_start_is_an_error():
  broken = HLO.replace(
    "  %all-gather-done = f32[64]{0} all-gather-done(%all-gather-start)\n",
    "  %all-gather-done = f32[64]{0} bitcast(%loop_add_fusion)\n",
  )
  with pytest.raises(ValueError, match="no matching done"):
    overlap.async_collectives(broken)


def test_configurations_cross_product():
  configs = gpu_overlap.configurations(
    ["gspmd", "data", "hybrid"], ["butterfly", "xla"], ["none", "deferred"], "lazy"
  )
  assert configs[0] == gpu_overlap.Configuration("gspmd", "gspmd", "xla", "none")
  assert len(configs) == 1 + 2 * 2 * 2
  assert configs[-1].label == "hybrid(conv=lazy) / xla / deferred"
  assert configs[-1].token == "hybrid(conv=lazy)/xla/deferred"


def test_configurations_on_a_two_axis_mesh():
  mesh = compile_gpu.parse_mesh("(('node',8),('local',8))")
  assert mesh == (("node", 8), ("local", 8))
  assert compile_gpu.parse_mesh("") == ()
  for bad in ("node=8", "(('node', 8.5),)", "((8, 'node'),)"):
    with pytest.raises(ValueError, match="--mesh"):
      compile_gpu.parse_mesh(bad)
  configs = gpu_overlap.configurations(["gspmd", "data"], ["ring"], ["deferred"], "data", mesh)
  assert [c.label for c in configs] == [
    "gspmd / node 8 x local 8",
    "data / ring / deferred / node 8 x local 8",
  ]
  assert configs[1].token == "data/ring/deferred/node8xlocal8"
  assert all(c.mesh == mesh for c in configs)
  two = gpu_overlap.configurations(["data"], ["ring"], ["deferred"], "data", mesh, "butterfly")
  assert two[0].label == "data / ring / deferred / node 8 x local 8 (node: butterfly)"
  assert two[0].node_collective == "butterfly"
  # A one-axis mesh is today's label.
  flat = gpu_overlap.configurations(["data"], ["ring"], ["deferred"], "data", (("data", 8),))
  assert flat[0].label == "data / ring / deferred"
  config = gpu_overlap.make_config(
    configs[1], model="vgg_tiny", image_size=8, batch=4, classes=10, dtype="float32",
    conv="data", bucket_mb=1,
  )  # fmt: skip
  assert tuple(config.parallel.mesh) == mesh


def test_missing_cuda_says_how_to_set_up(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name.startswith("jax_plugins") else real(name, *a),
  )
  missing = gpu_target.cuda_missing()
  assert "jax[cuda12]" in missing
  # What compile_gpu exits with.
  message = (
    f"compile_gpu: {missing}; set it up with: {gpu_target.setup_hint('experiments.compile_gpu')}"
  )
  assert "jax[cuda12]" in message and "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1" in message
  assert "\n" not in message


def test_compile_one_on_cpu_devices():
  """The compile path of compile_gpu on 2 CPU devices (CPU collectives are synchronous, so
  the async analysis finds none and counts every fraction as 1)."""
  import jax

  cfg = gpu_overlap.configurations(["lazy"], ["butterfly"], ["deferred"], "data")[0]
  config = gpu_overlap.make_config(
    cfg, model="vgg_tiny", image_size=8, batch=4, classes=10, dtype="float32", conv="data",
    bucket_mb=0.01,
  )  # fmt: skip
  assert (config.parallel.strategy, config.parallel.overlap) == ("lazy", "deferred")
  assert config.parallel.bucket_mb == 0.01 and config.model.num_classes == 10
  r = gpu_overlap.compile_one(cfg, config, jax.devices()[:2], hlo_dir=None)
  assert r["argument"] > 0 and r["seconds"] > 0 and r["buckets"] >= 1
  assert r["summary"].count == len(r["collectives"]) and r["summary"].fraction == 1.0
  text = gpu_overlap.report([r])
  assert "| lazy / butterfly / deferred |" in text and "(none)" in text
  assert "cross-host MiB / GPU, max / mean" in text
  # The cost model's figure beside it: one host, nothing crosses there either.
  assert r["model_cross_host"].max == 0 and "| 0.0 / 0.0 | 0.0 / 0.0 |" in text
  # Both CPU devices are process 0: one host, nothing crosses.
  assert r["cross_host"].per_device == (0.0, 0.0)
  assert gpu_overlap.device_hosts(jax.sharding.Mesh(jax.devices()[:2], ("data",))) == [0, 0]
  assert gpu_overlap.cross_host_lines([r]) == [
    "cross_host_mib_per_gpu lazy/butterfly/deferred 0.00"
  ]
