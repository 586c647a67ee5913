"""Markdown pieces the experiment scripts print and write: tables and the machine header."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
  """A GitHub markdown table; cells are str()-ed."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def machine_markdown(command: str) -> str:
  """Machine, software and date lines for a report header (starts JAX's backend)."""
  import jax

  dev = jax.devices()[0]
  return "\n".join(
    [
      f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      f"- command: `{command}`",
      f"- machine: {os.cpu_count()} CPUs, processor `{platform.processor() or 'unknown'}`, "
      f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
      f"- jax {jax.__version__}, backend `{jax.default_backend()}`, "
      f"{jax.device_count()} devices of kind `{dev.device_kind}`",
    ]
  )


def mib(nbytes: float, digits: int = 1) -> str:
  """Bytes as MiB with thousands separators: mib(3 * 2**20) -> '3.0'."""
  return f"{nbytes / 2**20:,.{digits}f}"


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), or platform.processor()."""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown CPU"
