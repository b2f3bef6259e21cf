"""Truncated SVD: Eckart–Young error, rank choices, residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import compressjax as cj
from compressjax.lowrank import factorize


@given(m=st.integers(2, 24), n=st.integers(2, 24), frac=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_truncation_error_equals_tail_singular_values(m, n, frac, seed):
  w = np.asarray(jax.random.normal(jax.random.key(seed), (m, n)), np.float64)
  r = max(1, int(frac * min(m, n)))
  lr = factorize(jnp.asarray(w, jnp.float32), rank=r)
  s = np.linalg.svd(w, compute_uv=False)
  err = np.linalg.norm(w - np.asarray(lr.materialize(), np.float64))
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-3,
                             atol=1e-4)
  assert lr.a.shape == (m, r) and lr.b.shape == (r, n)


def test_energy_and_ratio_select_rank():
  u = np.linalg.qr(np.random.default_rng(0).normal(size=(32, 32)))[0]
  s = np.array([8., 4., 2., 1.] + [0.01] * 28)
  w = jnp.asarray((u * s) @ u.T, jnp.float32)
  # 8^2 + 4^2 = 80 of 85.0028 total: 0.94 -> rank 2, 0.95 -> rank 3
  assert factorize(w, energy=0.94).rank == 2
  assert factorize(w, energy=0.95).rank == 3
  assert factorize(w, rank_ratio=0.5).rank == int(0.5 * 32 * 32 / 64)


def test_residual_is_exact_and_quantizable():
  w = jax.random.normal(jax.random.key(0), (32, 16))
  lr = factorize(w, rank=4, residual=True)
  np.testing.assert_allclose(lr.materialize(), w, atol=1e-5)
  q = cj.chain(cj.transforms.low_rank(4, residual=True),
               cj.transforms.quantize(4)).apply({"k": w})["k"]
  assert isinstance(q.residual, cj.QArray)
  plain = factorize(w, rank=4)
  # the quantized residual recovers most of the low-rank error
  e_lr = jnp.linalg.norm(w - plain.materialize())
  e_q = jnp.linalg.norm(w - q.materialize())
  assert e_q < 0.3 * e_lr


def test_nd_kernel_is_viewed_as_matrix():
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
  lr = factorize(w, rank=16)
  assert lr.a.shape == (72, 16)
  np.testing.assert_allclose(lr.materialize(), w, atol=1e-4)
  assert lr.materialize().shape == w.shape
