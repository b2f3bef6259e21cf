"""SVD-LLM: the data-aware loss equals the whitened tail, optimality against
SVD and ASVD, jitter on singular Grams, residual quantization, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.calibrate.capture import LayerStats
from compressjax.lowrank import (asvd_factorize, factorize, svd_llm,
                                 svd_llm_factorize)
from compressjax.lowrank.svd_llm import whitening


def _correlated(k, n, t, seed, spread=2.0):
  """X = Z A with per-channel scales over 10^+-spread, and W; float64."""
  rng = np.random.default_rng(seed)
  a = np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k)
  x = rng.normal(size=(t, k)) @ a * 10 ** rng.uniform(-spread, spread, k)
  return x, rng.normal(size=(k, n))


def _stats(x) -> LayerStats:
  x = np.asarray(x, np.float64)
  f = lambda v: jnp.asarray(v, jnp.float32)
  return LayerStats(gram=f(x.T @ x), abs_sum=f(np.abs(x).sum(0)),
                    sq_sum=f((x * x).sum(0)), abs_max=f(np.abs(x).max(0)),
                    count=jnp.float32(x.shape[0]))


def _data_err2(x, w, lr):
  wh = np.asarray(lr.materialize(), np.float64)
  return float(np.sum((x @ (w - wh)) ** 2))


# few shapes, so compiled kernels are reused across examples
@given(k=st.sampled_from([3, 8, 24]), n=st.sampled_from([2, 8, 20]),
       frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_loss_equals_whitened_tail_and_beats_svd_and_asvd(k, n, frac, seed):
  x, w = _correlated(k, n, 4 * k + 8, seed)
  r = max(1, int(frac * min(k, n)))
  g = x.T @ x
  lr = svd_llm_factorize(jnp.asarray(w, jnp.float32),
                         jnp.asarray(g, jnp.float32), rank=r)
  # float64 reference: L L^T = X^T X, loss = tail of sigma(L^T W)^2
  s = np.linalg.svd(np.linalg.cholesky(g).T @ w, compute_uv=False)
  tail = float(np.sum(s[r:] ** 2))
  total = float(np.sum(s ** 2))  # = ||X W||^2
  err = _data_err2(x, w, lr)
  np.testing.assert_allclose(err, tail, rtol=1e-3, atol=1e-6 * total)
  plain = _data_err2(x, w, factorize(jnp.asarray(w, jnp.float32), rank=r))
  act = _data_err2(x, w, asvd_factorize(jnp.asarray(w, jnp.float32),
                                        np.abs(x).mean(0), rank=r))
  assert err <= plain * (1 + 1e-4) + 1e-6 * total
  assert err <= act * (1 + 1e-4) + 1e-6 * total


def test_measured_errors_on_correlated_inputs():
  x, w = _correlated(64, 48, 512, seed=0)
  wf = jnp.asarray(w, jnp.float32)
  rel = lambda lr: np.sqrt(_data_err2(x, w, lr)) / np.linalg.norm(x @ w)
  for r in (4, 16):
    e_svd = rel(factorize(wf, rank=r))
    e_asvd = rel(asvd_factorize(wf, np.abs(x).mean(0), rank=r))
    e_llm = rel(svd_llm_factorize(wf, jnp.asarray(x.T @ x, jnp.float32),
                                  rank=r))
    assert e_llm < e_asvd < e_svd


def test_jitter_on_rank_deficient_gram():
  # 20 tokens for 64 channels, one channel never active: X^T X is singular
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20, 64)) * 10 ** rng.uniform(-1, 1, 64)
  x[:, 5] = 0
  w = rng.normal(size=(64, 32))
  g = jnp.asarray(x.T @ x, jnp.float32)
  with pytest.raises(Exception):  # plain float64 Cholesky fails here
    np.linalg.cholesky(x.T @ x)
  d, l, lam = whitening(g)
  assert lam > 0 and not np.any(np.isnan(l))
  for r in (4, 12):
    lr = svd_llm_factorize(jnp.asarray(w, jnp.float32), g, rank=r)
    wh = np.asarray(lr.materialize(), np.float64)
    assert np.all(np.isfinite(wh))
    # still the best rank-r fit of X W on the data (XW has rank <= 20) ...
    s = np.linalg.svd(x @ w, compute_uv=False)
    np.testing.assert_allclose(_data_err2(x, w, lr), np.sum(s[r:] ** 2),
                               rtol=1e-3)
    # ... and the ridge keeps W_hat bounded off the data's span
    assert np.linalg.norm(wh) < np.linalg.norm(w)


def test_energy_keeps_that_fraction_of_output_energy():
  x, w = _correlated(32, 24, 128, seed=2)
  g = jnp.asarray(x.T @ x, jnp.float32)
  wf = jnp.asarray(w, jnp.float32)
  total = float(np.sum((x @ w) ** 2))
  for e in (0.6, 0.95):
    lr = svd_llm_factorize(wf, g, energy=e)
    assert _data_err2(x, w, lr) <= (1 - e) * total * (1 + 1e-4)
    if lr.rank > 1:  # and it is the smallest such rank
      less = svd_llm_factorize(wf, g, rank=lr.rank - 1)
      assert _data_err2(x, w, less) > (1 - e) * total


def test_rank_ratio_parameter_count():
  x, w = _correlated(48, 40, 128, seed=3)
  lr = svd_llm_factorize(jnp.asarray(w, jnp.float32),
                         jnp.asarray(x.T @ x, jnp.float32), rank_ratio=0.3)
  m, n = w.shape
  params = lr.a.size + lr.b.size
  assert params <= 0.3 * m * n < params + m + n  # largest rank within budget


def test_residual_plus_quantized_residual():
  x, w = _correlated(64, 32, 256, seed=4)
  stats = {"k": _stats(x)}
  wf = jnp.asarray(w, jnp.float32)
  lr = svd_llm(stats, rank_ratio=0.2).apply({"k": wf})["k"]
  exact = svd_llm(stats, rank_ratio=0.2, residual=True).apply({"k": wf})["k"]
  np.testing.assert_allclose(exact.materialize(), wf, atol=1e-4)
  q = cj.chain(svd_llm(stats, rank_ratio=0.2, residual=True),
               cj.transforms.quantize(4, group_size=16)).apply({"k": wf})["k"]
  assert isinstance(q, cj.LowRank) and isinstance(q.residual, cj.QArray)
  # same factors, left in float; only the residual is quantized
  np.testing.assert_array_equal(q.a, lr.a)
  np.testing.assert_array_equal(q.b, lr.b)
  assert _data_err2(x, w, q) < 0.1 * _data_err2(x, w, lr)
  assert np.linalg.norm(w - q.materialize()) < 0.3 * np.linalg.norm(
      w - lr.materialize())


def test_transform_from_captured_stats():
  from flax import linen as nn
  model = nn.Sequential([nn.Dense(48), nn.relu, nn.Dense(16)])
  xs = [jax.random.normal(jax.random.key(i), (64, 32)) for i in range(3)]
  v = model.init(jax.random.key(9), xs[0])
  stats = capture(model, v, xs)
  x = jnp.concatenate(xs)
  y = model.apply(v, x)
  err = lambda t: float(jnp.linalg.norm(cj.run(model, t, x) - y))
  c = svd_llm(stats, rank=8).apply(v)
  assert isinstance(c["params"]["layers_0"]["kernel"], cj.LowRank)
  assert err(c) < err(cj.low_rank(v, 8))


def test_errors_name_the_path():
  w = {"params": {"dense": {"kernel": jnp.ones((16, 8))}}}
  path = "params/dense/kernel"
  stats = {path: _stats(np.random.default_rng(0).normal(size=(32, 16)))}
  with pytest.raises(cj.CompressionError, match=f"rank 9.*{path}"):
    svd_llm(stats, rank=9).init(w)
  with pytest.raises(cj.CompressionError, match=f"no calibration.*{path}"):
    svd_llm({}, rank=2).init(w)
  bad = {path: _stats(np.ones((32, 12)))}
  with pytest.raises(cj.CompressionError, match=f"input features.*{path}"):
    svd_llm(bad, rank=2).init(w)
  with pytest.raises(cj.CompressionError, match="exactly one"):
    svd_llm(stats, rank=2, energy=0.9).init(w)
  with pytest.raises(cj.CompressionError, match=f"cannot factorize.*{path}"):
    cj.chain(cj.transforms.quantize(8), svd_llm(stats, rank=2)).apply(w)
  with pytest.raises(cj.CompressionError, match="all zero"):
    svd_llm_factorize(jnp.ones((16, 8)), jnp.zeros((16, 16)), rank=2)


def test_multi_axis_svd_llm_is_svd_llm_on_the_2d_view():
  from tests import multiaxis as ma
  x, m, f, sm, sf = ma.setup(0)
  om = svd_llm(sm, rank=4).apply(m)
  of = svd_llm(sf, rank=4).apply(f)
  assert om["params"]["o"]["kernel"].contract == (0, 1)
  assert om["params"]["v"]["kernel"].contract == (0,)
  w, y, top = ma.compare(om, of, x)
  assert w <= 1e-6 * top and y <= 1e-5 * top
