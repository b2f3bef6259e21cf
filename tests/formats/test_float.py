"""fp8/fp6/fp4 elements: identical to ml_dtypes casts."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from compressjax.formats.float import ELEMENTS, FloatFormat, value_table


def _inputs(element):
  tab = value_table(element)
  fin = np.sort(tab[np.isfinite(tab)])
  rng = np.random.default_rng(0)
  rand = rng.standard_normal(4000) * rng.choice([1e-3, 0.1, 1, 30, 1e3], 4000)
  mids = (fin[:-1] + fin[1:]) / 2  # exact ties: round-half-to-even
  special = [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0,
             float(fin[-1]) * 1.01, float(fin[-1]) * 2, 1e-30]
  return np.concatenate([tab, rand, mids, np.nextafter(mids, np.inf),
                         np.nextafter(mids, -np.inf), special]).astype(
                             np.float32)


@pytest.mark.parametrize("element", sorted(ELEMENTS))
def test_cast_identical_to_ml_dtypes(element):
  x = _inputs(element)
  ref = x.astype(ELEMENTS[element][1]).astype(np.float32)
  got = np.asarray(FloatFormat(element).cast(jnp.asarray(x)))
  # bit-identical, including the sign of zeros and NaN placement
  np.testing.assert_array_equal(got.view(np.uint32) * ~np.isnan(got),
                                ref.view(np.uint32) * ~np.isnan(ref))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))


@pytest.mark.parametrize("element", sorted(ELEMENTS))
def test_codes_roundtrip_every_representable_value(element):
  f = FloatFormat(element)
  bits, dt, _ = ELEMENTS[element]
  codes = np.arange(2**bits, dtype=np.uint8)
  tab = value_table(element)
  ok = np.isfinite(tab)
  np.testing.assert_array_equal(np.asarray(f.encode(jnp.asarray(tab[ok]))),
                                codes[ok])
  np.testing.assert_array_equal(
      np.asarray(f.decode(jnp.asarray(codes))).view(np.uint32)[ok],
      tab.view(np.uint32)[ok])


@pytest.mark.parametrize("element", sorted(ELEMENTS))
def test_round_saturates(element):
  f = FloatFormat(element)
  x = jnp.array([1e9, -1e9, jnp.inf, -jnp.inf])
  np.testing.assert_array_equal(np.asarray(f.round(x)),
                                [f.max_value, -f.max_value] * 2)
  assert f.max_value == float(ml_dtypes.finfo(ELEMENTS[element][1]).max)
