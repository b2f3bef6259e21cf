"""Stochastic rounding: unbiased, between neighbours, deterministic per key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.formats import NF4, FloatFormat, IntFormat


@pytest.mark.parametrize("fmt", [IntFormat(4), FloatFormat("e2m1fn"), NF4],
                         ids=["int4", "fp4", "nf4"])
def test_stochastic_rounding_is_unbiased(fmt):
  x = jnp.full((20000,), 0.3 * fmt.max_value / 2) + jnp.linspace(0, 0.01, 20000)
  r = fmt.round(x, jax.random.key(0))
  near = fmt.round(x)
  assert abs(float(jnp.mean(r - x))) < 2e-3 * fmt.max_value
  assert float(jnp.mean(jnp.abs(near - x))) < float(jnp.mean(jnp.abs(r - x)))
  np.testing.assert_array_equal(np.asarray(r), np.asarray(fmt.round(
      x, jax.random.key(0))))
  # representable, and one of the two neighbours of x
  np.testing.assert_array_equal(np.asarray(fmt.round(r)), np.asarray(r))
  vals = np.unique(np.asarray(r))
  assert len(vals) <= 3  # x spans one grid interval (plus an endpoint)
