"""jax's persistent compilation cache, for repeated calibration runs.

Calibrated algorithms compile once per layer shape and configuration (one
jitted function serves every same-shaped layer of a model), but each new
process compiles again: seconds per shape on CPU, often longer than the
call. `enable_compilation_cache(path)` stores compiled executables in `path`,
so the next run with the same shapes, configs, jax version and backend loads
them instead. Nothing is enabled by default (it writes to disk); the
benchmarks take `--compile_cache DIR`.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache


def enable_compilation_cache(path: str, min_compile_seconds: float = 0.5
                             ) -> None:
  """Turns on jax's persistent compilation cache in directory `path` for
  every function whose compilation takes at least `min_compile_seconds`
  (also after something compiled: jax decides whether to use a cache once
  per process, so that decision is reset)."""
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
