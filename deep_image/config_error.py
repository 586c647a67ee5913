"""`ConfigError`: the one exception type for a config that cannot run.

Its own module, free of jax imports, so that any layer can raise it and the
experiment scripts can catch it before JAX starts.
"""


class ConfigError(ValueError):
  """A config field (or flag) whose value cannot run; the message names field and value.

  Scripts print the message in one line, without a traceback
  (`experiments/cli.py`); a ValueError subclass, so callers that catch
  ValueError keep working.
  """
