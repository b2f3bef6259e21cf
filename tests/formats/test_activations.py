"""Dynamic per-token activation quantization."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from compressjax.formats.activations import fake_quant, quantize_per_token


def test_int8_per_token_bound_and_scales():
  x = jax.random.normal(jax.random.key(0), (3, 7, 64)) * jnp.arange(
      1, 8)[None, :, None]
  q = quantize_per_token(x)
  # contracted over features: one scale per token (21 output features)
  assert q.scale.shape == (1, 21) and q.codes.dtype == jnp.int8
  s = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
  np.testing.assert_allclose(q.scale.reshape(3, 7, 1), s, rtol=1e-7)
  assert bool(jnp.all(jnp.abs(x - q.materialize()) <= s / 2 + 1e-6))
  f = jax.jit(fake_quant)
  np.testing.assert_array_equal(f(x), q.materialize())


@pytest.mark.parametrize("fmt,dt", [("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                                    ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_fp8_per_token_is_the_ml_dtypes_cast(fmt, dt):
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, 32)), np.float32)
  q = quantize_per_token(jnp.asarray(x), fmt)
  s = np.asarray(q.scale).reshape(5, 1)
  ref = (x / s).astype(dt).astype(np.float32) * s
  np.testing.assert_allclose(np.asarray(q.materialize()), ref, rtol=1e-6)
