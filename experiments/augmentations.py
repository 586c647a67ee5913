r"""Table 1 of the paper, computed from the augmentation parameter spaces in the code.

  python -m experiments.augmentations --table
  python -m experiments.augmentations --table --image_size=256 \
      --augment.color_cast.max_shift=10

Each count comes from `deep_image.data.augment.space_sizes`, i.e. from the grids that
sampling draws from, under the config given by `--augment.*` overrides of
`augment.default_config()` (so `--augment.color_cast.max_shift=10` shows the smaller space).
"""

import math

from absl import app, flags
from ml_collections import config_flags

from deep_image.data import augment

_TABLE = flags.DEFINE_bool("table", False, "Print Table 1 (number of possible changes).")
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size", augment.TABLE1_IMAGE_SIZE, "Side of the square images crops are taken from."
)
_AUGMENT = config_flags.DEFINE_config_dict("augment", augment.default_config())


def format_table(sizes: dict[str, int], crop_size: int, image_size: int) -> str:
  """Two-column text table with a total row (the product: every combination of changes)."""
  rows = [(name, f"{count:,}") for name, count in sizes.items()]
  rows[-1] = (
    rows[-1][0],
    f"{rows[-1][1]} (crop {crop_size}x{crop_size} of {image_size}x{image_size})",
  )
  rows.append(("Total (product of the rows)", f"{math.prod(sizes.values()):,}"))
  header = ("Augmentation", "Number of possible changes")
  width = max(len(r[0]) for r in rows + [header])
  lines = [f"{header[0]:<{width}}  {header[1]}", f"{'-' * width}  {'-' * len(header[1])}"]
  lines += [f"{name:<{width}}  {count}" for name, count in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _TABLE.value:
    raise app.UsageError("nothing to do: pass --table")
  cfg = _AUGMENT.value
  size = _IMAGE_SIZE.value
  try:
    sizes = augment.space_sizes(cfg, (size, size))
  except ValueError as e:  # Bad sizes or lens kinds in the flags: a usage error, not a crash.
    raise app.UsageError(str(e)) from e
  print(format_table(sizes, cfg.crop_size, size))


if __name__ == "__main__":
  app.run(main)
