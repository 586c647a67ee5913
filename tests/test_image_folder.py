"""The image-folder path of configs/image_folder.py, as its docstring runs it: generated
scenes exported as class folders of PNGs, prepared, trained on, evaluated."""

import json
import os

from conftest import run_cli

from deep_image.data.image_folder_export import folder_name

HIGHRES_TINY = "--config=experiments/configs/highres.py:tiny"


def test_folder_name_is_one_safe_path_component():
  assert folder_name("L/J up") == "L-J_up"
  assert folder_name("n01440764 tench, Tinca tinca") == "n01440764_tench_Tinca_tinca"
  assert folder_name("///") == "---" and folder_name("  ") == "class"


def test_export_prepare_train_and_evaluate_an_image_folder(tmp_path):
  folder, prepared, workdir = tmp_path / "folder", tmp_path / "prepared", tmp_path / "run"
  for split, limit in (("train", 128), ("validation", 64)):
    done = run_cli(
      "experiments.export_images",
      HIGHRES_TINY,
      f"--split={split}",
      f"--dst={folder / split}",
      f"--limit={limit}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(os.listdir(folder / "train"))[:2] == [
    "horizontal_stripes_2.5px",
    "horizontal_stripes_3.5px",
  ]
  assert sum(len(files) for _, _, files in os.walk(folder / "train")) == 128
  classes = prepared / "train" / "classes.json"
  for split, extra in (("train", ()), ("validation", (f"--classes={classes}",))):
    done = run_cli(
      "experiments.prepare", f"--src={folder / split}", f"--dst={prepared / split}", *extra
    )
    assert done.returncode == 0, done.stderr[-2000:]
  done = run_cli(
    "experiments.train",
    "--config=experiments/configs/image_folder.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={prepared}",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  with open(workdir / "result.json") as f:
    result = json.load(f)
  assert result["step"] == 12 and result["count"] == 64
  # A wrong class count stops before training, naming both numbers.
  done = run_cli(
    "experiments.train",
    "--config=experiments/configs/image_folder.py:tiny",
    f"--workdir={tmp_path / 'bad'}",
    f"--config.data.data_dir={prepared}",
    "--config.model.num_classes=5",
  )
  assert done.returncode == 1 and "num_classes=5" in done.stderr.splitlines()[-1]
