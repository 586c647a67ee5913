"""Kernel timelines of a `jax.profiler` trace, and how much of the collectives' time
compute kernels share: the measured overlap beside what the schedule promises
(`deep_image.analysis.overlap`)."""

from __future__ import annotations

import glob
import os

import jax

# Kernel names of GPU collectives in a profile.
COLLECTIVE_KERNELS = ("nccl",)


def overlap_fraction(events: list[tuple[str, float, float]]) -> float | None:
  """Of the time collective kernels run, the fraction some compute kernel also runs.

  Args:
    events: (kernel name, start, end) on one device; a name containing one of
      `COLLECTIVE_KERNELS` (case-insensitive) is a collective, anything else compute.
  Returns:
    |union(collective) & union(compute)| / |union(collective)|, or None without
    collective time.
  """

  def union(intervals):
    merged = []
    for start, end in sorted(intervals):
      if merged and start <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], end)
      else:
        merged.append([start, end])
    return merged

  is_collective = [any(k in name.lower() for k in COLLECTIVE_KERNELS) for name, _, _ in events]
  comm = union([(s, e) for (_, s, e), c in zip(events, is_collective, strict=True) if c])
  compute = union([(s, e) for (_, s, e), c in zip(events, is_collective, strict=True) if not c])
  total = sum(e - s for s, e in comm)
  if total <= 0:
    return None
  both, j = 0.0, 0
  for s, e in comm:
    while j < len(compute) and compute[j][1] <= s:
      j += 1
    k = j
    while k < len(compute) and compute[k][0] < e:
      both += min(e, compute[k][1]) - max(s, compute[k][0])
      k += 1
  return both / total


def device_kernel_events(profile_dir: str) -> dict[str, list[tuple[str, float, float]]]:
  """Kernel events per GPU plane ('/device:GPU:i') of the newest trace under `profile_dir`."""
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb trace under {profile_dir}")
  profile = jax.profiler.ProfileData.from_file(paths[-1])
  out = {}
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU:"):
      continue
    events = []
    for line in plane.lines:
      for ev in line.events:
        events.append((ev.name, ev.start_ns, ev.start_ns + ev.duration_ns))
    out[plane.name] = events
  return out
