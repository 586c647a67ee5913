"""Every test process sees 8 simulated CPU devices (unless XLA_FLAGS already says otherwise).

Set before jax is imported anywhere, since the device count is fixed when the
CPU backend starts.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
