"""Dense linear algebra for Hessian-based algorithms (GPTQ, SparseGPT).

Both need the upper Cholesky factor U of H^-1 (H^-1 = U^T U). Computing H^-1
and factoring it again costs ~2.3 K^3 flops; with J the reversal permutation
and J H J = L L^T, U = J L^-1 J needs one Cholesky and one triangular inverse
(K^3 / 3 each), the inverse by 2x2 blocks so most of it is matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _split(k: int) -> int:
  return (k // 2 + 127) // 128 * 128


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


def _lower_right(x, a):
  """x @ a for lower-triangular a, skipping its zero block (half the flops)."""
  k = a.shape[0]
  if k <= 256:
    return _mm(x, a)
  h = _split(k)
  return jnp.concatenate([_lower_right(x[:, :h], a[:h, :h])
                          + _mm(x[:, h:], a[h:, :h]),
                          _lower_right(x[:, h:], a[h:, h:])], axis=1)


def _lower_left(d, y):
  """d @ y for lower-triangular d."""
  k = d.shape[0]
  if k <= 256:
    return _mm(d, y)
  h = _split(k)
  return jnp.concatenate([_lower_left(d[:h, :h], y[:h]),
                          _mm(d[h:, :h], y[:h])
                          + _lower_left(d[h:, h:], y[h:])], axis=0)


def tril_inv(l):
  """Inverse of a lower-triangular matrix by 2x2 blocks:
  [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]] (K^3/3 flops)."""
  k = l.shape[0]
  if k <= 256:
    return jax.scipy.linalg.solve_triangular(l, jnp.eye(k, dtype=l.dtype),
                                             lower=True)
  h = _split(k)
  a, d = tril_inv(l[:h, :h]), tril_inv(l[h:, h:])
  c = -_lower_left(d, _lower_right(l[h:, :h], a))
  top = jnp.concatenate([a, jnp.zeros((h, k - h), l.dtype)], axis=1)
  return jnp.concatenate([top, jnp.concatenate([c, d], axis=1)], axis=0)


def hinv_upper(h):
  """Upper U with H^-1 = U^T U: with J the reversal and J H J = L L^T,
  U = J L^-1 J (one Cholesky and one triangular inverse, no explicit H^-1)."""
  l = jax.lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)
  return tril_inv(l)[::-1, ::-1]
