"""Shared timing for the bench scripts (run as `python bench/<name>.py`, so
this module is importable as `timing`)."""

from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, *args, repeats: int, warmup: int = 1) -> float:
  """Median seconds of `fn(*args)` (blocked until ready) over `repeats`
  calls, after `warmup` calls that compile and warm caches."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def interleaved_medians(thunks: dict, *, repeats: int, warmup: int = 2
                        ) -> dict:
  """Median seconds of each thunk (a no-argument callable): `warmup`
  rounds, then `repeats` rounds that call every thunk once each, so they
  share the machine's drift."""
  for _ in range(warmup):
    for f in thunks.values():
      jax.block_until_ready(f())  # the first round compiles
  ts = {k: [] for k in thunks}
  for _ in range(repeats):
    for k, f in thunks.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in ts.items()}
