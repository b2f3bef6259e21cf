"""The persistent compilation cache stores compiled programs, also when
enabled after something compiled (process-wide config: restored after)."""

import os

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

from compressjax.calibrate import enable_compilation_cache

KEYS = ("jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")


def test_compiled_programs_are_stored(tmp_path):
  old = {k: getattr(jax.config, k) for k in KEYS}
  try:
    jax.jit(lambda x: x - 2)(jnp.ones(3)).block_until_ready()  # compiled first
    enable_compilation_cache(str(tmp_path / "cc"), min_compile_seconds=0.0)
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.ones(5)).block_until_ready()
    assert any(f.startswith("jit__lambda")
               for f in os.listdir(tmp_path / "cc"))
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
