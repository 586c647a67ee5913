"""experiments.reproduce end to end on its tiny variants (runs, ablation, perturbations,
tables, figure, rerun); its protocols at a model's scale; RESULTS.md's tables equal their
rendering from the committed results JSON."""

import json
import os

import pytest
from conftest import run_cli

from deep_image.config_error import ConfigError
from deep_image.data.perturb import PERTURBATIONS
from experiments import reproduction, reproduction_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_protocol_scales_bracket_the_training_scale():
  assert reproduction.protocol_names(48) == {
    "centre crop": "center@48",
    "dense": "dense@48",
    "dense + flip": "dense+flip@48",
    "dense + flip + 3 scales": "dense+flip@40,48,56",
  }
  assert reproduction.protocol_names(96)["dense + flip + 3 scales"] == "dense+flip@80,96,112"


def test_ablations_flag():
  assert reproduction.check_ablations("all") == reproduction.AUGMENTATIONS
  assert reproduction.check_ablations("") == ()
  # The table's order, whatever the flag's.
  assert reproduction.check_ablations("color_cast, rotation") == ("rotation", "color_cast")
  with pytest.raises(ConfigError, match="--ablations.*'rotate'"):
    reproduction.check_ablations("rotate")
  configs = reproduction.run_configs(True, ("rotation",))
  assert list(configs) == ["low", "high", "low_noaug", "low_no_rotation"]
  augment = configs["low_no_rotation"].data.augment
  assert not augment.rotation.enabled
  assert augment.lens_distortion.enabled and augment.flip.enabled and augment.color_cast.enabled


def test_reproduce_tiny_writes_tables_and_figure_and_reruns_the_same(tmp_path):
  page = tmp_path / "PAGE.md"
  page.write_text("intro\n<!-- reproduce:ablation -->\nstale\n<!-- /reproduce:ablation -->\nend\n")
  args = (f"--out={tmp_path}", "--tiny", "--ablations=rotation")
  done = run_cli("experiments.reproduce", *args, f"--results_md={page}")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert set(results["runs"]) == {"low", "high", "low_noaug", "low_no_rotation"}
  assert results["runs"]["high"]["train_scale"] == 2 * results["runs"]["low"]["train_scale"]
  assert set(results["fused"]) == set(reproduction.FUSED)
  for name in ("low", "high"):
    assert set(results["protocols"][name]) == {label for label, _ in reproduction.PROTOCOLS}
  # Every low-scale run: its gap and each perturbation at its default strength.
  assert set(results["gap"]) == {"low", "low_noaug", "low_no_rotation"}
  gap = results["gap"]["low"]
  assert gap["gap"] == gap["train_top1"] - gap["validation_top1"]
  robustness = results["robustness"]
  assert [label.split(":")[0] for label in reproduction_report.perturbation_order(results)] == list(
    PERTURBATIONS
  )
  for label, got in robustness.items():
    assert set(got) == set(results["gap"]), label
    assert all(0.0 <= v <= 1.0 for v in got.values())
  assert robustness["clean"]["low"] == gap["validation_top1"]
  tta = results["time_to_accuracy"]
  assert set(tta["runs"]) == set(results["runs"])
  low = tta["runs"]["low"]
  assert low["steps"][-1] == results["runs"]["low"]["steps"]
  assert low["train_seconds"] == sorted(low["train_seconds"]) and low["train_seconds"][-1] > 0
  # results.md holds every table, rendered from the JSON as read back.
  table = (tmp_path / "results.md").read_text()
  assert table == reproduction_report.markdown(results)
  assert table in done.stdout and "fused (posteriors averaged)" in table
  assert "`low_no_rotation` | rotation" in table
  assert (tmp_path / "reproduce.png").stat().st_size > 20_000
  assert page.read_text() == (
    f"intro\n<!-- reproduce:ablation -->\n{reproduction_report.ablation_table(results)}\n"
    "<!-- /reproduce:ablation -->\nend\n"
  )
  # A rerun reuses the finished runs and prints the same tables.
  again = run_cli("experiments.reproduce", *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "is a finished run" in again.stderr
  with open(tmp_path / "results.json") as f:
    rerun = json.load(f)
  for key in ("protocols", "fused", "gap", "robustness"):
    assert rerun[key] == results[key], key


def test_a_page_with_an_unknown_table_is_refused_before_any_run_trains(tmp_path):
  page = tmp_path / "PAGE.md"
  text = "<!-- reproduce:nonsense -->\nkept\n<!-- /reproduce:nonsense -->\n"
  page.write_text(text)
  done = run_cli(
    "experiments.reproduce", f"--out={tmp_path / 'out'}", "--tiny", f"--results_md={page}"
  )
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert (
    done.stderr.strip()
    .splitlines()[-1]
    .startswith(
      f"config error: --results_md={str(page)!r}: <!-- reproduce:nonsense --> names no table"
    )
  )
  assert page.read_text() == text and not (tmp_path / "out" / "runs").exists()


def test_render_blocks_names_an_unknown_table():
  with pytest.raises(ValueError, match="reproduce:nonsense"):
    reproduction_report.render_blocks(
      "<!-- reproduce:nonsense -->\nx\n<!-- /reproduce:nonsense -->", {}
    )


def test_results_md_tables_are_rendered_from_the_committed_json():
  with open(os.path.join(REPO, "RESULTS.md")) as f:
    page = f.read()
  source = reproduction_report.results_source(page)
  assert source, "RESULTS.md names no <!-- reproduce:results PATH --> JSON"
  with open(os.path.join(REPO, source)) as f:
    results = json.load(f)
  # Every table of the page comes from the JSON, and the page shows each kind.
  assert set(reproduction_report.block_names(page)) == set(reproduction_report.TABLES)
  assert reproduction_report.render_blocks(page, results) == page, (
    "RESULTS.md's tables differ from their rendering of " + source + ": rerun "
    "`python -m experiments.reproduce --out=... --results_md=RESULTS.md`"
  )
