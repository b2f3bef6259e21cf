"""Fast Walsh–Hadamard transform (FWHT) and randomized block rotations.

`fwht(x, axis)` multiplies x along `axis` by the orthonormal Sylvester
Hadamard matrix H_n / sqrt(n) (n a power of two) in n log2 n additions:
H_2n = [[H_n, H_n], [H_n, -H_n]], one butterfly per level. H is symmetric and
orthogonal, so the transform is its own inverse.

Sizes that are not a power of two use a block-diagonal rotation: blocks of
`block` = the largest power of two dividing n (e.g. 768 = 3 x 256), each
rotated independently; still orthogonal, so computational invariance holds,
but it mixes only within blocks (QuaRot instead multiplies known Hadamard
matrices of order 12, 20, 28, ... by powers of two; not done here).
A randomized Hadamard rotation is R = diag(signs) H with random +-1 signs
(QuaRot, Ashkboos et al. 2024, Sec. 3; QuIP#, Tseng et al. 2024).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def largest_power_of_two_divisor(n: int) -> int:
  return n & -n


# jit: eager callers (folds, materialize) would otherwise dispatch log2(n)
# butterflies op by op.
@functools.partial(jax.jit, static_argnames=("axis", "block"))
def fwht(x, axis: int = -1, block: int | None = None):
  """Orthonormal Hadamard transform of blocks of `block` along `axis`."""
  x = jnp.asarray(x)
  axis = axis % x.ndim
  n = x.shape[axis]
  b = n if block is None else block
  if not is_power_of_two(b) or n % b:
    raise ValueError(f"Hadamard block {b} must be a power of two dividing "
                     f"{n}; use block=largest_power_of_two_divisor({n}) = "
                     f"{largest_power_of_two_divisor(n)}")
  y = jnp.moveaxis(x, axis, -1)
  lead = y.shape[:-1]
  y = y.reshape(-1, n // b, b)
  h = 1
  while h < b:  # butterfly on pairs (i, i + h) inside runs of 2h
    y = y.reshape(-1, n // b, b // (2 * h), 2, h)
    lo, hi = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([lo + hi, lo - hi], axis=-2)
    h *= 2
  y = y.reshape(lead + (n,)) * jnp.asarray(1.0 / np.sqrt(b), y.dtype)
  return jnp.moveaxis(y, -1, axis)


def hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Sylvester Hadamard matrix (float64), for tests/references."""
  if not is_power_of_two(n):
    raise ValueError(f"n = {n} is not a power of two")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def random_signs(key, n: int) -> jax.Array:
  """+-1 as int8 (the randomization of a randomized Hadamard rotation)."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1, -1).astype(
      jnp.int8)


def rotate(x, signs, block: int, axis: int = -1):
  """x -> x diag(signs) H_block along `axis` (R = diag(signs) H)."""
  axis = axis % jnp.ndim(x)
  shape = [1] * jnp.ndim(x)
  shape[axis] = -1
  s = jnp.reshape(signs, shape).astype(x.dtype)
  return fwht(x * s, axis=axis, block=block)
