"""Stochastic rounding (for QAT): round x to one of its two neighbouring
representable values lo <= x <= hi, choosing hi with probability
(x - lo) / (hi - lo), so E[round(x)] = x inside the representable range
(Gupta et al. 2015, Deep Learning with Limited Numerical Precision, Eq. 2).
Values outside the range saturate. Keyed by a PRNG key: deterministic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stochastic_index(x, values, key):
  """Index into sorted `values` of a stochastic neighbour of x."""
  x = jnp.clip(jnp.asarray(x, jnp.float32), values[0], values[-1])
  hi = jnp.clip(jnp.searchsorted(values, x, side="left"), 1, values.size - 1)
  lo_v, hi_v = values[hi - 1], values[hi]
  p = (x - lo_v) / (hi_v - lo_v)
  u = jax.random.uniform(key, x.shape)
  return jnp.where(u < p, hi, hi - 1)


def stochastic_round_int(x, key, qmin: int, qmax: int):
  """Integer grid: floor(x + u), u ~ U[0, 1), then clip."""
  u = jax.random.uniform(key, jnp.shape(x))
  return jnp.clip(jnp.floor(jnp.asarray(x, jnp.float32) + u), qmin, qmax)
