"""experiments.reproduce end to end on its tiny variants (three runs, tables, figure, rerun);
experiments.reproduction's protocols at a model's scale."""

import json

from conftest import run_cli

from experiments import reproduction


def test_protocol_scales_bracket_the_training_scale():
  assert reproduction.protocol_names(48) == {
    "centre crop": "center@48",
    "dense": "dense@48",
    "dense + flip": "dense+flip@48",
    "dense + flip + 3 scales": "dense+flip@40,48,56",
  }
  assert reproduction.protocol_names(96)["dense + flip + 3 scales"] == "dense+flip@80,96,112"


def test_reproduce_tiny_writes_tables_and_figure_and_reruns_the_same(tmp_path):
  done = run_cli("experiments.reproduce", f"--out={tmp_path}", "--tiny")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert set(results["runs"]) == {"low", "high", "low_noaug"}
  assert results["runs"]["high"]["train_scale"] == 2 * results["runs"]["low"]["train_scale"]
  assert set(results["fused"]) == set(reproduction.FUSED)
  for name in ("low", "high"):
    assert set(results["protocols"][name]) == {label for label, _ in reproduction.PROTOCOLS}
  gap = results["gap"]["low"]
  assert gap["gap"] == gap["train_top1"] - gap["validation_top1"]
  table = (tmp_path / "results.md").read_text()
  assert table in done.stdout and "fused (posteriors averaged)" in table
  assert (tmp_path / "reproduce.png").stat().st_size > 10_000
  # A rerun reuses the finished runs and prints the same tables.
  again = run_cli("experiments.reproduce", f"--out={tmp_path}", "--tiny")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "is a finished run" in again.stderr
  assert (tmp_path / "results.md").read_text() == table
