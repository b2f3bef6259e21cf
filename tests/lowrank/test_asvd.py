"""ASVD: float64 reference, reduction to plain SVD, data-aware gain, zero
activations, rank choices, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import compressjax as cj
from compressjax.calibrate.capture import LayerStats
from compressjax.lowrank import asvd, asvd_factorize, factorize
from compressjax.lowrank.asvd import EPS


def _reference(w, mean_abs, alpha, r):
  """float64 ASVD: S^-1 trunc_r(S W), with the same EPS clamp."""
  m = np.maximum(mean_abs, EPS * mean_abs.max())
  s = m ** alpha
  u, sv, vt = np.linalg.svd(s[:, None] * w, full_matrices=False)
  return (u[:, :r] * sv[:r]) @ vt[:r] / s[:, None], sv


def _stats(x) -> LayerStats:
  x = np.asarray(x, np.float64)
  f = lambda v: jnp.asarray(v, jnp.float32)
  return LayerStats(gram=f(x.T @ x), abs_sum=f(np.abs(x).sum(0)),
                    sq_sum=f((x * x).sum(0)), abs_max=f(np.abs(x).max(0)),
                    count=jnp.float32(x.shape[0]))


# few shapes, so compiled kernels are reused across examples
@given(k=st.sampled_from([3, 8, 24]), n=st.sampled_from([2, 8, 20]),
       frac=st.floats(0, 1), alpha=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(k, n, frac, alpha, seed):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(k, n))
  mean_abs = 10 ** rng.uniform(-2, 2, k)
  r = max(1, int(frac * min(k, n)))
  lr = asvd_factorize(jnp.asarray(w, jnp.float32), mean_abs, alpha=alpha,
                      rank=r)
  wh = np.asarray(lr.materialize(), np.float64)
  ref, sv = _reference(w, mean_abs, alpha, r)
  # S W_hat is the best rank-r fit of S W: its error is the tail of sigma(SW)
  s = mean_abs ** alpha
  np.testing.assert_allclose(np.linalg.norm(s[:, None] * (w - wh)),
                             np.sqrt(np.sum(sv[r:] ** 2)), rtol=1e-3,
                             atol=1e-5 * sv[0])
  # and W_hat itself matches (tolerance scaled by the inverse scaling)
  np.testing.assert_allclose(wh, ref, atol=1e-4 * sv[0] / s.min())


@pytest.mark.parametrize("c", [1.0, 3.7, 0.0])
def test_equal_activations_is_plain_svd(c):
  w = jax.random.normal(jax.random.key(0), (24, 16))
  for r in (3, 10):
    a = asvd_factorize(w, jnp.full((24,), c), rank=r).materialize()
    b = factorize(w, rank=r).materialize()
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_invariant_to_activation_scale():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
  mean_abs = 10 ** rng.uniform(-1, 1, 24)
  a = asvd_factorize(w, mean_abs, rank=5).materialize()
  b = asvd_factorize(w, 1e3 * mean_abs, rank=5).materialize()
  np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_beats_plain_svd_when_input_scales_vary(seed):
  rng = np.random.default_rng(seed)
  k, n = 64, 48
  x = rng.normal(size=(256, k)) * 10 ** rng.uniform(-1.5, 1.5, k)
  w = rng.normal(size=(k, n))
  wf = jnp.asarray(w, jnp.float32)
  err = lambda lr: np.linalg.norm(
      x @ (w - np.asarray(lr.materialize(), np.float64)))
  # measured ratios: 0.67-0.75 at rank 4, 0.21-0.32 at rank 16
  for r, bound in ((4, 0.8), (16, 0.4)):
    e_asvd = err(asvd_factorize(wf, np.abs(x).mean(0), rank=r))
    e_svd = err(factorize(wf, rank=r))
    assert e_asvd < bound * e_svd


def test_zero_activations_do_not_divide_by_zero():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  mean_abs = rng.uniform(0.5, 2.0, 16)
  mean_abs[[0, 7]] = 0
  lr = asvd_factorize(w, mean_abs, rank=4, residual=True)
  assert np.all(np.isfinite(lr.a)) and np.all(np.isfinite(lr.b))
  np.testing.assert_allclose(lr.materialize(), w, atol=1e-4)
  # every row of W_hat is W's row projected on the kept right singular
  # subspace of S W, so a dead channel's row stays bounded too
  wh = np.asarray(asvd_factorize(w, mean_abs, rank=4).materialize())
  for j in (0, 7):
    assert np.linalg.norm(wh[j]) <= np.linalg.norm(w[j]) * (1 + 1e-3)
  # all channels dead: no information, plain SVD
  np.testing.assert_allclose(
      asvd_factorize(w, np.zeros(16), rank=4).materialize(),
      factorize(w, rank=4).materialize(), atol=2e-5)


def test_rank_ratio_and_energy():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(48, 40)), jnp.float32)
  mean_abs = rng.uniform(0.1, 3, 48)
  lr = asvd_factorize(w, mean_abs, rank_ratio=0.3)
  params = lr.a.size + lr.b.size
  assert params <= 0.3 * 48 * 40 < params + 48 + 40
  # energy counts sigma(S W)^2
  _, sv = _reference(np.asarray(w, np.float64), mean_abs, 0.5, 1)
  e = np.cumsum(sv ** 2) / np.sum(sv ** 2)
  assert asvd_factorize(w, mean_abs, energy=0.8).rank == int(
      np.searchsorted(e, 0.8) + 1)


def test_transform_and_residual_quantization():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(128, 32)) * 10 ** rng.uniform(-1, 1, 32)
  w = jnp.asarray(rng.normal(size=(32, 24)), jnp.float32)
  stats = {"k": _stats(x)}
  lr = asvd(stats, rank=6).apply({"k": w})["k"]
  np.testing.assert_allclose(
      lr.materialize(), asvd_factorize(w, np.abs(x).mean(0),
                                       rank=6).materialize(), atol=1e-4)
  q = cj.chain(asvd(stats, rank=6, residual=True),
               cj.transforms.quantize(4, group_size=8)).apply({"k": w})["k"]
  assert isinstance(q.residual, cj.QArray)
  np.testing.assert_array_equal(q.a, lr.a)
  err = lambda t: np.linalg.norm(x @ (np.asarray(w) - np.asarray(
      t.materialize())))
  assert err(q) < 0.3 * err(lr)


def test_errors_name_the_path():
  w = {"params": {"dense": {"kernel": jnp.ones((16, 8))}}}
  path = "params/dense/kernel"
  stats = {path: _stats(np.ones((4, 16)))}
  with pytest.raises(cj.CompressionError, match=f"rank 9.*{path}"):
    asvd(stats, rank=9).init(w)
  with pytest.raises(cj.CompressionError, match=f"no calibration.*{path}"):
    asvd({"other": stats[path]}, rank=2).init(w)
  with pytest.raises(cj.CompressionError, match=f"input features.*{path}"):
    asvd({path: _stats(np.ones((4, 10)))}, rank=2).init(w)
  # leaf-independent values fail when the transform is built
  with pytest.raises(cj.CompressionError, match="asvd: option alpha=-1.0"):
    asvd(stats, rank=2, alpha=-1.0)
  with pytest.raises(cj.CompressionError,
                     match=r"option rank_ratio=1.5 must be in \(0, 1\]"):
    asvd(stats, rank_ratio=1.5)


def test_multi_axis_asvd_is_asvd_on_the_2d_view():
  # (d, heads, head_dim) factors its (d, heads * head_dim) view, (heads,
  # head_dim, d) its (heads * head_dim, d) one; cj.run multiplies x @ A @ B.
  from compressjax.runtime import dispatch
  from tests import multiaxis as ma
  x, m, f, sm, sf = ma.setup(0)
  om = asvd(sm, rank=4).apply(m)
  of = asvd(sf, rank=4).apply(f)
  q, o = om["params"]["q"]["kernel"], om["params"]["o"]["kernel"]
  assert q.contract == (0,) and q.a.shape == (ma.D, 4)
  assert o.contract == (0, 1) and o.a.shape == (16, 4)
  w, y, top = ma.compare(om, of, x)
  assert w <= 1e-6 * top and y <= 1e-5 * top
  h = np.random.default_rng(1).standard_normal((3, 2, 8)).astype(np.float32)
  dims = (((1, 2), (0, 1)), ((), ()))
  got = dispatch._lowrank_dot(jnp.asarray(h), o, dims, jnp.float32)
  assert got is not None  # the factored path, not a materialization
  np.testing.assert_allclose(got, np.einsum("bhk,hkd->bd", h,
                                            np.asarray(o.materialize())),
                             rtol=1e-5, atol=1e-5)
  # residual: exact remainder on the multi-axis layout
  r = asvd(sm, rank=2, residual=True).apply(m)["params"]["v"]["kernel"]
  np.testing.assert_allclose(r.materialize(), m["params"]["v"]["kernel"],
                             atol=1e-6)
