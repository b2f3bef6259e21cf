"""FWHT against the explicit Sylvester matrix; randomized rotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from compressjax.core import hadamard


@given(st.integers(0, 9), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_fwht_equals_matrix(log_n, rows, seed):
  n = 2 ** log_n
  x = np.random.default_rng(seed).normal(size=(rows, n))
  y = np.asarray(hadamard.fwht(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(y, x @ hadamard.hadamard_matrix(n), rtol=1e-5,
                             atol=1e-5)


def test_orthonormal_involution_and_axis():
  h = hadamard.hadamard_matrix(64)
  np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-12)
  x = jax.random.normal(jax.random.key(0), (64, 3, 5))
  np.testing.assert_allclose(
      hadamard.fwht(hadamard.fwht(x, axis=0), axis=0), x, atol=1e-5)
  np.testing.assert_allclose(
      hadamard.fwht(x, axis=0),
      np.einsum("ij,ibc->jbc", h, np.asarray(x, np.float64)), atol=1e-5)


def test_block_diagonal_for_non_power_of_two():
  n = 96  # 3 blocks of 32
  b = hadamard.largest_power_of_two_divisor(n)
  assert b == 32
  x = np.random.default_rng(0).normal(size=(4, n))
  ref = x @ np.kron(np.eye(3), hadamard.hadamard_matrix(32))
  np.testing.assert_allclose(hadamard.fwht(jnp.asarray(x, jnp.float32),
                                           block=b), ref, atol=1e-5)
  with pytest.raises(ValueError, match="power of two dividing 96"):
    hadamard.fwht(x, block=64)


def test_rotation_preserves_products():
  k = jax.random.key(1)
  x = jax.random.normal(k, (7, 128))
  w = jax.random.normal(jax.random.key(2), (128, 9))
  s = hadamard.random_signs(jax.random.key(3), 128)
  assert set(np.unique(np.asarray(s))) == {-1, 1}
  xr = hadamard.rotate(x, s, 128)               # x R
  wr = hadamard.fwht(w * s[:, None].astype(w.dtype), axis=0)  # R^T W
  np.testing.assert_allclose(xr @ wr, x @ w, rtol=1e-4, atol=1e-4)
  # spreads an outlier: one huge coordinate becomes flat magnitudes
  e = jnp.zeros((128,)).at[5].set(100.0)
  np.testing.assert_allclose(np.abs(hadamard.rotate(e, s, 128)),
                             100 / np.sqrt(128), rtol=1e-5)
