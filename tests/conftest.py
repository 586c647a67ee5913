"""Every test process sees 8 simulated CPU devices (unless XLA_FLAGS already says otherwise).

Set before jax is imported anywhere, since the device count is fixed when the
CPU backend starts.
"""

import os

# XLA:CPU aborts the process when a collective's rendezvous waits longer than
# its termination timeout. Eight simulated devices per test worker, on two
# shared cores, can be that slow under load: give them minutes, not seconds.
PATIENT_COLLECTIVES = (
  "--xla_cpu_collective_timeout_seconds=900 --xla_cpu_collective_call_terminate_timeout_seconds=900"
)

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
  _flags += " " + PATIENT_COLLECTIVES
os.environ["XLA_FLAGS"] = _flags.strip()

# `experiments.train` flags for a seconds-long job: the default config's `tiny` variant
# (vgg_tiny on 16 px digit crops; experiments/configs/base.py); CLI tests add their own
# steps and devices.
TINY_JOB_FLAGS = ("--config=experiments/configs/default.py:tiny",)


def tiny_config(**overrides):
  """`experiments/configs/default.py:tiny` with dotted-field overrides.

  E.g. `tiny_config(**{"train.num_steps": 4, "data.augment.crop_size": 12})`.
  """
  from experiments.configs import default

  c = default.get_config("tiny")
  for key, value in overrides.items():
    *sections, field = key.split(".")
    target = c
    for name in sections:
      target = target[name]
    target[field] = value
  return c
