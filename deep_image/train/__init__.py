"""Train state, optimizer, losses, metrics and the training loop."""


def train_and_evaluate(config, workdir: str) -> dict:
  """See `deep_image.train.loop.train_and_evaluate` (imported lazily: it pulls in jax)."""
  from deep_image.train.loop import train_and_evaluate as run

  return run(config, workdir)
