"""Binary, ternary and NF4 level formats."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from compressjax.formats import BINARY, NF4, TERNARY
from compressjax.quantization import quantize_array


def test_nf4_levels_are_normal_quantiles():
  # bitsandbytes create_normal_map(offset=0.9677083): 8 positive, 7 negative
  ppf = statistics.NormalDist().inv_cdf
  off = 0.9677083
  pos = [ppf(off + (0.5 - off) * i / 8) for i in range(8)]
  neg = [-ppf(off + (0.5 - off) * i / 7) for i in range(7)]
  v = np.sort(np.array(pos + neg + [0.0]))
  v = v / np.max(np.abs(v))
  np.testing.assert_allclose(NF4.levels, v, atol=1e-6)
  assert NF4.bits == 4 and len(NF4.levels) == 16


@given(seed=st.integers(0, 2**31 - 1))
def test_nearest_level(seed):
  x = jax.random.normal(jax.random.key(seed), (257,)) * 1.5
  for fmt in (BINARY, TERNARY, NF4):
    lv = np.asarray(fmt.levels, np.float32)
    got = np.asarray(fmt.round(x))
    best = np.min(np.abs(np.asarray(x)[:, None] - lv[None]), axis=1)
    np.testing.assert_allclose(np.abs(np.asarray(x) - got), best, atol=1e-7)


def test_binary_is_sign_times_mean_abs():
  w = jax.random.normal(jax.random.key(0), (64, 8))
  q = quantize_array(w, format="binary")
  assert q.fmt.bits == 1 and q.codes.shape == (8, 8)
  ref = jnp.sign(w) * jnp.mean(jnp.abs(w), axis=0, keepdims=True)
  np.testing.assert_allclose(q.materialize(), ref, rtol=1e-6)
  # mean|w| is the L2-optimal scale for sign(w) (XNOR-Net Eq. 3)
  w0 = w[:, 0]
  err = lambda a: jnp.sum((w0 - jnp.sign(w0) * a) ** 2)
  a = q.scale[0, 0]
  assert err(a) <= err(a * 1.05) and err(a) <= err(a * 0.95)


def test_ternary_twn_threshold_and_storage():
  w = jax.random.normal(jax.random.key(1), (128, 4))
  q = quantize_array(w, format="ternary")
  assert q.fmt.bits == 2 and q.bits_per_weight == 2 + 32 / 128
  d = np.asarray(q.materialize())
  delta = 0.7 * np.mean(np.abs(np.asarray(w)), axis=0)
  np.testing.assert_array_equal(d == 0, np.abs(np.asarray(w)) <= delta)
  assert set(np.unique(np.sign(d))) <= {-1.0, 0.0, 1.0}


def test_nf4_double_quant():
  w = jax.random.normal(jax.random.key(2), (512, 32))
  q = quantize_array(w, format="nf4", group_size=64)
  dq = quantize_array(w, format="nf4", group_size=64, double_quant=True)
  assert q.bits_per_weight == 4 + 32 / 64
  # 8-bit scales, plus a float32 scale and a uint8 zero point per column
  assert dq.bits_per_weight == 4 + 8 / 64 + (32 + 8) / 512
  rel = lambda a: float(jnp.linalg.norm(w - a.materialize()) / jnp.linalg.norm(w))
  assert rel(dq) < rel(q) * 1.02


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_lloyd_is_optimal_for_its_assignment(bits):
  from compressjax.formats.codebook import quantize_codebook
  w = jax.random.t(jax.random.key(3), 3.0, (128, 16))
  c = quantize_codebook(w, bits, group_size=64)
  c.validate()
  assert c.indices.shape == (128 * bits // 8, 16) and c.codebook.shape == (
      2, 2**bits)
  # each centroid is the mean of its members (a Lloyd fixed point) ...
  idx = np.asarray(c.codes()).reshape(2, -1)
  x = np.asarray(w).reshape(2, -1)
  for g in range(2):
    for k in range(2**bits):
      members = x[g][idx[g] == k]
      if members.size:
        np.testing.assert_allclose(c.codebook[g, k], members.mean(), rtol=1e-3,
                                   atol=1e-4)
  # ... and it beats uniform RTN of the same bits on heavy-tailed weights
  rtn = quantize_array(w, max(bits, 2), group_size=64)
  err = lambda a: float(jnp.linalg.norm(w - a.materialize()))
  assert err(c) < err(rtn)
