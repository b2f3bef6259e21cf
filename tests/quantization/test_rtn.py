"""Round-to-nearest: error bounds, exact storage, definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import compressjax as cj
from compressjax.core.contraction import apply_groups
from compressjax.quantization import quantize_array


def _scale_full(q):
  """The scale repeated to the array's shape."""
  lay = q.layout
  return lay.from_matrix(apply_groups(jnp.zeros((lay.k, lay.n)),
                                      q.scale.astype(jnp.float32),
                                      lambda a, b: a + b))


@settings(max_examples=12)  # eager ops: each example compiles
@given(bits=st.integers(2, 8), symmetric=st.booleans(),
       gran=st.sampled_from(["tensor", "channel", 4, 8]),
       k=st.sampled_from([8, 16, 24]), n=st.integers(1, 6),
       scale_dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_rtn_error_at_most_half_scale(bits, symmetric, gran, k, n, scale_dtype,
                                      seed):
  w = jax.random.normal(jax.random.key(seed), (k, n)) * 3.0
  g = gran if isinstance(gran, int) else None
  q = quantize_array(w, bits, group_size=g, symmetric=symmetric,
                     per_tensor=gran == "tensor", scale_dtype=scale_dtype)
  q.validate()
  err = jnp.abs(w - q.materialize())
  bound = _scale_full(q) / 2
  # float32 rounding of (q - z) * s adds at most a few ulps of |w|
  assert bool(jnp.all(err <= bound * (1 + 1e-6) + 1e-6 * jnp.abs(w)))
  assert q.scale.dtype == scale_dtype


@given(bits=st.integers(2, 8), symmetric=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_codes_in_range_and_definition(bits, symmetric, seed):
  w = jax.random.normal(jax.random.key(seed), (16, 3))
  q = quantize_array(w, bits, group_size=8, symmetric=symmetric)
  fmt = q.fmt
  vals = fmt.decode(q.stored_codes())
  assert bool(jnp.all((vals >= fmt.qmin) & (vals <= fmt.qmax)))
  assert bool(jnp.all(vals == jnp.round(vals)))
  # w_hat == (q - z) * s exactly as documented
  z = 0.0 if q.zero is None else jnp.repeat(q.zero.astype(jnp.float32), 8, 0)
  s = jnp.repeat(q.scale, 8, 0)
  np.testing.assert_array_equal(np.asarray(q.materialize()),
                                np.asarray((vals - z) * s))


def test_rtn_is_nearest_grid_point():
  # with the scale fixed, no other code is closer to w
  w = jax.random.normal(jax.random.key(0), (32, 4))
  q = quantize_array(w, 4)
  s = q.scale
  grid = jnp.arange(q.fmt.qmin, q.fmt.qmax + 1, dtype=jnp.float32)
  best = jnp.min(jnp.abs(w[..., None] - grid * s[..., None]), axis=-1)
  np.testing.assert_allclose(jnp.abs(w - q.materialize()), best, atol=1e-6)


@pytest.mark.parametrize("bits,group,expected_bpw", [
    (8, None, 8 + 32 / 256), (4, 128, 4 + 32 / 128), (4, 64, 4.5),
    (3, 128, 3 + 32 / 128), (2, 32, 3.0)])
def test_storage_is_really_packed(bits, group, expected_bpw):
  w = jax.random.normal(jax.random.key(1), (256, 64))
  q = quantize_array(w, bits, group_size=group)
  assert q.codes.dtype in (jnp.uint8, jnp.int8)
  assert q.codes.shape == (256 * bits // 8, 64)
  assert q.bits_per_weight == pytest.approx(expected_bpw)


def test_asymmetric_zero_points_and_nbytes():
  w = jax.random.uniform(jax.random.key(2), (128, 8), minval=0.5, maxval=2.0)
  q = quantize_array(w, 4, group_size=32, symmetric=False)
  assert q.zero is not None and q.zero.dtype == jnp.uint8
  assert q.nbytes == 128 * 8 // 2 + 4 * 8 * 4 + 4 * 8
  # asymmetric uses the whole range: better than symmetric on positive data
  qs = quantize_array(w, 4, group_size=32)
  assert jnp.linalg.norm(w - q.materialize()) < jnp.linalg.norm(
      w - qs.materialize())


def test_all_zero_group_is_exact():
  w = jnp.zeros((16, 4)).at[8:].set(1.0)
  for fmt in ("int4_narrow", "int4_full", "int4_asym"):
    q = quantize_array(w, format=fmt, group_size=8)
    d = np.asarray(q.materialize())
    np.testing.assert_array_equal(d[:8], 0.0)
    # a constant group: exact on grids where its absmax is a level; the full
    # symmetric grid maps it to qmax + 1/2, rounded down: error s / 2
    want = 7 / 7.5 if fmt == "int4_full" else 1.0
    np.testing.assert_allclose(d[8:], want, rtol=1e-6)


def test_dtype_preserved_and_tree_transform():
  p = {"params": {"dense": {"kernel": jnp.ones((8, 4), jnp.bfloat16),
                            "bias": jnp.ones((4,), jnp.bfloat16)}}}
  c = cj.quantize(p, 8)
  k = c["params"]["dense"]["kernel"]
  assert isinstance(k, cj.QArray) and k.materialize().dtype == jnp.bfloat16
  assert c["params"]["dense"]["bias"] is p["params"]["dense"]["bias"]
