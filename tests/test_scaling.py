"""The scaling study's library: the HLO bytes parser (deep_image.analysis), one real measured
row (experiments.scaling_measure), flat data-parallel bytes, the claim checks
(experiments.scaling_checks) and the report writers (experiments.scaling_report)."""

import json

import jax
import pytest

from deep_image.analysis import bytes_sent, hlo
from deep_image.parallel.layout_policy import STRATEGIES
from experiments import scaling_checks, scaling_measure, scaling_report, step_programs

# CPU-style compiled HLO: synchronous collectives, operands printed by name only.
CPU_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[256]{0})->f32[256]{0}}, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main (p0: f32[256], p1: f32[64,32]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %p1 = f32[64,32]{1,0} parameter(1)
  %ag = f32[1024]{0} all-gather(%p0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(step)/shard_map/VGG.features/convs_0/all_gather"}
  %rs = f32[128]{0} reduce-scatter(%p0), channel_id=2, replica_groups={{0,1},{2,3}}, dimensions={0}, to_apply=%add
  %ar = f32[64,32]{1,0} all-reduce(%p1), channel_id=3, replica_groups=[2,2]<=[4], to_apply=%add
  %cp = f32[256]{0} collective-permute(%p0), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %a2a = f32[256]{0} all-to-all(%p0), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  %one = f32[256]{0} all-reduce(%p0), channel_id=6, replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %m = f32[256]{0} all-reduce(%p0), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, to_apply=%add
  ROOT %out = f32[256]{0} add(%p0, %cp)
}
"""  # noqa: E501
CPU_SENT = {
  "ag": 1024 * 3,  # all-gather: operand x (G-1), G=4
  "rs": 1024 / 2,  # reduce-scatter: operand x (G-1)/G, G=2
  "ar": 2 * 8192 / 2,  # all-reduce: 2 x operand x (G-1)/G, iota G=2
  "cp": 1024 * 2 / 4,  # permute: 2 of the 4 devices send
  "a2a": 1024 * 3 / 4,
  "m": 2 * 1024 / 2,  # mesh form: the 'axis_1' groups, G=2
}

# GPU-style: async start/done pairs, an async-start wrapping a reduce-scatter, iota groups.
GPU_HLO = """\
HloModule jit_step, is_scheduled=true, num_partitions=8

%wrapped_rs (x: bf16[64]) -> bf16[8] {
  %x = bf16[64]{0} parameter(0)
  ROOT %rs.1 = bf16[8]{0} reduce-scatter(%x), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
}

ENTRY %main (p: bf16[64]) -> bf16[64] {
  %p = bf16[64]{0} parameter(0)
  %ags = (bf16[64]{0}, bf16[256]{0}) all-gather-start(bf16[64]{0} %p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[256]{0} all-gather-done((bf16[64]{0}, bf16[256]{0}) %ags)
  %ars = bf16[64]{0} all-reduce-start(%p), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %ard = bf16[64]{0} all-reduce-done(%ars)
  %cps = (bf16[64]{0}, bf16[64]{0}, u32[], u32[]) collective-permute-start(%p), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %cpd = bf16[64]{0} collective-permute-done(%cps)
  %as = ((bf16[64]{0}), bf16[8]{0}) async-start(%p), calls=%wrapped_rs
  %ad = bf16[8]{0} async-done(%as)
  %e = bf16[64]{0} all-reduce(%p), channel_id=8, replica_groups={}, to_apply=%add
  ROOT %r = bf16[64]{0} add(%ard, %cpd)
}
"""  # noqa: E501
GPU_SENT = {
  "ags": 128 * 3,  # G=4 from [2,4]<=[8]
  "ars": 2 * 128 / 2,  # G=2 from the transposed iota
  "cps": 128,  # every device sends
  "rs.1": 128 * 7 / 8,  # counted once, in its wrapped computation
  "e": 2 * 128 * 7 / 8,  # empty groups: all 8 devices
}


# count: every collective op once, the one-device group of CPU_HLO's %one included.
@pytest.mark.parametrize("text, want, count", [(CPU_HLO, CPU_SENT, 7), (GPU_HLO, GPU_SENT, 5)])
def test_bytes_sent_per_op(text, want, count):
  ops = bytes_sent.collective_ops(text)
  assert {op.name: op.sent for op in ops} == pytest.approx(want)
  summary = bytes_sent.bytes_summary(ops)
  assert summary["ops"] == len(want)
  assert hlo.count_collectives(text) == count
  assert summary["bytes_sent"] == pytest.approx(sum(want.values()))


def test_replica_groups_forms():
  assert hlo.replica_group_size("x, replica_groups={{0,1,2},{3,4,5}}, y", 6) == 3
  assert hlo.replica_group_size("x, replica_groups=[4,2]<=[8], y", 8) == 2
  assert hlo.replica_group_size("replica_groups=mesh['a'=2,'b'=4] {'a','b'}", 8) == 8
  assert hlo.replica_group_size("replica_groups={}", 16) == 16
  assert hlo.module_devices(CPU_HLO) == 4
  ops = {op.name: op for op in bytes_sent.collective_ops(CPU_HLO)}
  assert ops["ag"].conv and not ops["ar"].conv  # op_name under VGG.features


def test_unknown_operand_is_an_error():
  bad = CPU_HLO.replace("all-to-all(%p0)", "all-to-all(%nowhere)")
  with pytest.raises(ValueError, match="nowhere"):
    bytes_sent.collective_ops(bad)


def test_one_measured_row_end_to_end():
  devices = jax.devices()[:2]
  programs = [
    step_programs.Program("vgg_tiny", "data", "butterfly", n, 16, 4 * n, classes=10) for n in (1, 2)
  ]
  one, two = scaling_measure.measure(programs, devices, repeats=2, budget_gb=1.0)
  for r in (one, two):
    assert r["memory_bytes"] > 0 and r["images_per_s"] > 0 and r["step_ms"] > 0
    assert r["per_device_batch"] == 4 and r["rounds"] == 2
  assert one["bytes_sent"] == 0 and one["ops"] == 0  # one device: nothing to send
  assert two["bytes_sent"] > 0 and two["ops"] > 0
  assert two["global_batch"] == 8


def test_data_parallel_bytes_flat_in_devices():
  """Data parallelism sends ~2 (N-1)/N x its gradient bytes per device (compiled only)."""
  grad, _ = step_programs.param_bytes("vgg_tiny", 16, 10)
  rows = []
  for n in (2, 4):
    p = step_programs.Program("vgg_tiny", "data", "butterfly", n, 16, 4 * n, classes=10)
    rows.append(scaling_measure.compile_program(p, jax.devices()[:n])[2][0])
  for r in rows:
    ring = 2 * grad * (r["devices"] - 1) / r["devices"]
    assert ring <= r["bytes_sent"] <= 1.25 * ring, (r["devices"], r["bytes_sent"], ring)
  (line,) = scaling_checks.flat_check(rows, {"vgg_tiny": grad}, "test")
  assert line.startswith("- PASS"), line
  checks = scaling_checks.claim_checks(rows, "cpu", "test")
  assert checks["cpu:flat"] == [line]
  fc = step_programs.param_bytes("vgg_tiny", 16, 10)[1]
  assert fc == 4 * (128 * 24 + 24 + 24 * 24 + 24 + 24 * 10 + 10)  # fc1 (4x4x8 in), fc2, fc3


def _fake_rows():
  rows = []
  for n in (1, 2, 4, 8):
    for s in STRATEGIES:
      fc = 1e4 * 4 * n * (n - 1) / n if s == "hybrid" else 0.0
      sent = 2e6 * (n - 1) / n if s == "data" else fc + 5e5 * (n > 1)
      rows.append(dict(
        part="cpu", model="m", strategy=s, algorithm="xla" if s == "gspmd" else "butterfly",
        devices=n, image_size=32, global_batch=4 * n, per_device_batch=4, dtype="float32",
        argument_bytes=1e6, temp_bytes=2e6, memory_bytes=3e6, compile_s=1.0, ops=3 * (n > 1),
        bytes_sent=sent, weight_bytes=sent - fc, activation_bytes=fc, by_kind={}, step_ms=10.0 * n,
        images_per_s=400.0, ms_per_image=2.5, rounds=3, group=0, loss=1.0,
      ))  # fmt: skip
  for b in (32, 64):
    for n in (1, 2, 4):
      rows.append(dict(rows[0], part="speedup", global_batch=b, devices=n, step_ms=100 / n**0.8))
  for p in (1, 2):
    rows.append(dict(rows[-1], part="process", processes=p, devices=8, step_ms=50.0 * p))
  gpu = [dict(r, part="gpu", hosts=max(1, r["devices"] // 8), async_collectives=4,
              overlapped=0.75, overlapped_bytes=0.9) for r in rows[:16]]  # fmt: skip
  return rows + gpu


def test_claim_checks_pass_and_fail():
  rows = [r for r in _fake_rows() if r["part"] == "cpu"]
  (flat,) = scaling_checks.flat_check(rows, {"m": 1e6}, "t")
  assert flat.startswith("- PASS")
  grown = [dict(r, bytes_sent=r["bytes_sent"] * r["devices"]) for r in rows]  # grows like N
  assert scaling_checks.flat_check(grown, {"m": 1e7}, "t")[0].startswith("- FAIL")
  (act,) = scaling_checks.activation_check(rows, {"m": 1e8}, "t")
  assert act.startswith("- PASS"), act
  weights = [dict(r, activation_bytes=1e5) for r in rows]  # flat in N: weights, not activations
  assert scaling_checks.activation_check(weights, {"m": 1e8}, "t")[0].startswith("- FAIL")
  square = [dict(r, activation_bytes=1e3 * r["devices"] ** 2) for r in rows]  # not ~ (N-1)
  assert scaling_checks.activation_check(square, {"m": 1e8}, "t")[0].startswith("- FAIL")
  (cross,) = scaling_checks.crossover_lines(rows, "t")
  assert "N=2: 0.54" in cross and "less than data at every N" in cross
  assert "+0.0 MiB of activations per added device) it would at N ~ 32" in cross, cross
  grown = [
    dict(r, bytes_sent=r["bytes_sent"] * r["devices"] ** 2 / 8) if r["strategy"] == "hybrid" else r
    for r in rows
  ]
  assert "more than data from N=8" in scaling_checks.crossover_lines(grown, "t")[0]


def test_report_writers(tmp_path):
  data = scaling_report.merge(
    {"meta": {}, "rows": [], "checks": {}, "skipped": []},
    ["cpu", "speedup", "process", "gpu"],
    _fake_rows(),
    {"cpu:flat": ["- PASS flat"]},
    ["gpu: not run at 128"],
  )
  data["cost_model"] = [
    dict(part="gpu", model="m", strategy="gspmd", algorithm="xla", devices=n, error=0.1 / n)
    for n in (8, 16)
  ]
  out = tmp_path / "scaling_x.md"
  scaling_report.save(data, str(out))
  text = out.read_text()
  assert "| m | hybrid | butterfly | 8 | 4 | 32 |" in text  # measured table row
  assert "| 2 x 4 | 64 | 100 |" in text and "2.00x" in text  # processes vs 1 x 8
  assert "- PASS flat" in text and "- gpu: not run at 128" in text
  assert "75%" in text  # the H100 table's overlap column
  assert "| gpu | m | gspmd | xla | N=8: +1.2%, N=16: +0.6% |" in text
  png = tmp_path / "scaling_x.png"
  assert png.stat().st_size > 10_000
  saved = json.loads((tmp_path / "scaling_x.json").read_text())
  assert len(saved["rows"]) == len(data["rows"])
  # A later part replaces only its own rows, checks and notes.
  again = scaling_report.merge(saved, ["gpu"], [], {}, [])
  assert {r["part"] for r in again["rows"]} == {"cpu", "speedup", "process"}
  assert again["checks"] == {"cpu:flat": ["- PASS flat"]} and again["skipped"] == []
  assert scaling_report.merge(again, ["cpu"], [], {}, [])["checks"] == {}


def test_model_figure_from_the_cost_model(tmp_path):
  from deep_image.parallel import scaling_model

  rows = scaling_model.predict_rows("minwa", max_devices=8)
  path = tmp_path / "model.png"
  scaling_report.write_model_figure(rows, "minwa", str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert {r["figure"] for r in rows} == {"left", "right"}
