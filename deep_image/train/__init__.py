"""The training loop and what it writes: `train_and_evaluate`, its preflight checks,
optimizer, input, checkpoints, metrics and the workdir (`workdir` lists every file).

The train state and the losses live below, with the strategies that use them:
`deep_image.parallel.train_state`, `deep_image.models.losses`.
"""


def train_and_evaluate(config, workdir: str) -> dict:
  """See `deep_image.train.loop.train_and_evaluate` (imported lazily: it pulls in jax)."""
  from deep_image.train.loop import train_and_evaluate as run

  return run(config, workdir)
