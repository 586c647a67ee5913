r"""Print a model's per-layer table (shape, parameters, FLOPs per image).

  python -m experiments.summary --config=experiments/configs/table2.py

The last line is `parameters: N`, N the exact count, checked against the
Flax model's own parameter tree (jax.eval_shape, nothing allocated).
"""

import jax
import jax.numpy as jnp
from absl import app
from ml_collections import config_flags

from deep_image.models import summary
from deep_image.models.vgg import count_parameters, make_model

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/default.py", "Experiment config file.", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  model = make_model(config.model)
  spec = model.spec
  sample = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
  flax_count = count_parameters(shapes)
  table_count = summary.total_parameters(spec)
  if flax_count != table_count:
    raise AssertionError(f"table counts {table_count} parameters, the Flax model {flax_count}")
  print(summary.format_table(spec, config.model.name))


if __name__ == "__main__":
  app.run(main)
