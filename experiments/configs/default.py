r"""Default job: a small VGG on scikit-learn's digits, 8 simulated devices, hybrid strategy.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/digits
  python -m experiments.train --config=experiments/configs/default.py:tiny --workdir=/tmp/tiny
  python -m experiments.sweep --config=experiments/configs/default.py --sweep=strategies \
      --workdir=/tmp/strategies
  python -m experiments.sweep --config=experiments/configs/default.py --sweep=collectives \
      --workdir=/tmp/collectives

Digits are upsampled to 32x32 RGB; the model is `vgg_small` (3 conv stages of
16/32/64 filters, FC 256-256-10) trained with the hybrid strategy (conv data
parallel, FC1/FC2 split over the 8 devices) and butterfly collectives, 600 steps,
evaluated and checkpointed every 200. Reaches >= 97% test top-1 in a few minutes on a
2-core CPU.

Variants (`default.py:tiny`): `tiny` (base.py) runs vgg_tiny on 16 px crops for 12 steps,
seconds on a CPU; the config of tests, benchmarks and smoke runs.

Sweeps (`experiments.sweep`): `strategies`, the four parallel strategies; `collectives`, the
four collective algorithms (under the config's strategy, hybrid by default). Both compute the
same function, so the sweeps compare speed at (nearly) equal accuracy.
"""

import ml_collections

from experiments.configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The digits job; `arg`: comma-separated variants of base.py ('tiny')."""
  c = base.get_config()
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return base.apply_variants(c, arg, base.VARIANTS)


def sweep_strategies(config: ml_collections.ConfigDict) -> list[dict[str, object]]:
  """One point per parallel strategy."""
  # Imported here, not at the top: the library's lists live in modules that import JAX,
  # and loading a config file imports no JAX (tests/test_pipeline.py). A sweep trains anyway.
  from deep_image.parallel.layout_policy import STRATEGIES

  del config
  return [{"parallel.strategy": s} for s in STRATEGIES]


def sweep_collectives(config: ml_collections.ConfigDict) -> list[dict[str, object]]:
  """One point per collective algorithm of the hand-written strategies."""
  from deep_image.parallel.collectives import ALGORITHMS  # as in sweep_strategies

  del config
  return [{"parallel.collective": a} for a in ALGORITHMS]
