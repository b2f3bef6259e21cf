"""Hutchinson traces, Fisher diagonals, exact loss deltas, Spearman's rho."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings, strategies as st

from compressjax import allocate as A
from compressjax.allocate.candidates import LayerOptions, Table
from compressjax.core.errors import CompressionError
from compressjax.core.tree import leaves_with_paths
from tests.allocate.fixtures import mlp, mse_loss

K2 = "params/layers_4/kernel"


def test_hutchinson_is_exact_for_a_diagonal_hessian():
  # loss = sum_l sum(c_l * b * w_l^2): H_l = diag(2 c_l b); Rademacher v has
  # v_i^2 = 1, so every sample is exact, averaged over batches b
  params = {"a": {"kernel": jnp.ones((4, 3))},
            "b": {"kernel": jnp.ones((2, 5))}, "c": {"bias": jnp.ones(3)}}
  coef = {"a": jnp.arange(12.).reshape(4, 3), "b": jnp.full((2, 5), 0.5)}

  def loss(p, b):
    return sum(jnp.sum(coef[k] * b * p[k]["kernel"] ** 2) for k in coef)

  tr, se = A.hessian_trace(loss, params, [1.0, 3.0], key=jax.random.key(0),
                           samples=3, return_stderr=True)
  assert tr == pytest.approx({"a/kernel": 2 * 2.0 * 66.0,
                              "b/kernel": 2 * 2.0 * 5.0}, rel=1e-6)
  assert all(s < 1e-4 for s in se.values())


def test_hutchinson_matches_the_exact_hessian_trace():
  model, v, _, batches = mlp()
  loss = mse_loss(model)
  mean = lambda p: sum(loss(p, b) for b in batches) / len(batches)
  w = v["params"]["layers_4"]["kernel"]

  def of_layer(x):
    p = jax.tree.map(lambda a: a, v)
    p["params"]["layers_4"]["kernel"] = x.reshape(w.shape)
    return mean(p)

  exact = float(jnp.trace(jax.hessian(of_layer)(w.reshape(-1))))
  tr, se = A.hessian_trace(loss, v, batches, key=jax.random.key(1),
                           samples=32, return_stderr=True)
  assert abs(tr[K2] - exact) < 4 * se[K2] + 1e-6 * abs(exact)
  assert se[K2] < 0.2 * abs(exact)  # the test has power
  assert set(tr) == {p for p, x in leaves_with_paths(v) if x.ndim == 2}


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient():
  model, v, _, batches = mlp()
  loss = mse_loss(model)
  f = A.fisher_diagonal(loss, v, batches[:2])
  g2, n = 0.0, 0
  grad = jax.jit(jax.grad(loss))
  for x, y in batches[:2]:
    for i in range(x.shape[0]):
      g = grad(v, (x[i:i + 1], y[i:i + 1]))
      g2 = g2 + np.asarray(g["params"]["layers_4"]["kernel"], np.float64) ** 2
      n += 1
  np.testing.assert_allclose(np.asarray(f[K2]), g2 / n, rtol=2e-4,
                             atol=1e-12)


def test_loss_delta_is_the_exact_change_of_the_mean_loss():
  model, v, _, batches = mlp()
  loss = mse_loss(model)
  ld = A.LossDelta(loss, v, batches)
  w = v["params"]["layers_4"]["kernel"]
  new = jnp.round(w * 8) / 8
  p = jax.tree.map(lambda a: a, v)
  p["params"]["layers_4"]["kernel"] = new
  ref = (np.mean([float(loss(p, b)) for b in batches]) -
         np.mean([float(loss(v, b)) for b in batches]))
  assert ld(K2, new) == pytest.approx(ref, rel=1e-5, abs=1e-9)
  assert ld(K2, w) == 0.0


def test_estimators_refuse_bad_input():
  params = {"w": {"kernel": jnp.ones((2, 2))}, "i": jnp.ones(2, jnp.int32)}
  f = lambda p, b: jnp.sum(p["w"]["kernel"])
  with pytest.raises(CompressionError, match="not float arrays.*'i'"):
    A.hessian_trace(f, params, [0], key=jax.random.key(0))
  with pytest.raises(CompressionError, match="at least one batch"):
    A.fisher_diagonal(f, {"w": {"kernel": jnp.ones((2, 2))}}, [])
  with pytest.raises(CompressionError, match="samples"):
    A.hessian_trace(f, {"w": {"kernel": jnp.ones((2, 2))}}, [0],
                    key=jax.random.key(0), samples=0)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-3, 3)),
                min_size=3, max_size=30))
def test_spearman_matches_scipy_with_ties(pairs):
  a = [float(x) for x, _ in pairs]
  b = [float(y) for _, y in pairs]
  want = scipy.stats.spearmanr(a, b).statistic
  got = A.spearman(a, b)
  if math.isnan(want):
    assert math.isnan(got)
  else:
    assert got == pytest.approx(want, abs=1e-12)


def test_correlations_pool_pairs_and_rank_layers():
  rng = np.random.default_rng(0)
  layers = []
  for i in range(5):
    truth = np.sort(rng.uniform(0, 1, 3))[::-1] * (i + 1)
    layers.append(LayerOptions(
        path=f"l{i}", shape=(4,), dense_bytes=16,
        candidates=tuple(A.Candidate(c) for c in ("a", "b", "c")),
        nbytes=np.array([1, 2, 3]),
        scores={"loss": truth, "weight": truth + 1.0, "good": truth ** 3,
                "bad": -truth}))
  out = A.correlations(Table(tuple(layers)))
  assert out["good"]["pooled"] == pytest.approx(1.0)
  assert out["good"]["across_layers"] == pytest.approx(1.0)
  assert out["bad"]["pooled"] == pytest.approx(-1.0)
  assert set(out["good"]["per_candidate"]) == {"a", "b", "c"}
