"""Wanda: numpy top-k per output, N:M, equivalences and output error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.calibrate.capture import LayerStats
from compressjax.core.errors import CompressionError
from compressjax.sparsity import wanda, wanda_prune


def wanda_reference(w, norm, sparsity):
  """Per output j, zero the round(p*K) inputs i with lowest |W_ij| ||X_i||."""
  w = np.asarray(w, np.float64)
  s = np.abs(w) * np.asarray(norm, np.float64)[:, None]
  out = w.copy()
  n_prune = round(sparsity * w.shape[0])
  for j in range(w.shape[1]):
    out[np.argsort(s[:, j], kind="stable")[:n_prune], j] = 0
  return out


def nm_reference(w, norm, n, m):
  w = np.asarray(w, np.float64)
  s = np.abs(w) * np.asarray(norm, np.float64)[:, None]
  out = np.zeros_like(w)
  for r0 in range(0, w.shape[0], m):
    for j in range(w.shape[1]):
      top = r0 + np.argsort(-s[r0:r0 + m, j], kind="stable")[:n]
      out[top, j] = w[top, j]
  return out


def _wn(seed, k, n):
  kw, kn = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (k, n))
  norm = jnp.exp(2 * jax.random.normal(kn, (k,)))  # strongly varying norms
  return w, norm


# Shapes from a small fixed set, so each compiles once.
SHAPES = [(16, 8), (40, 12)]


@given(shape=st.sampled_from(SHAPES),
       sparsity=st.sampled_from([0.3, 0.5, 0.9]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_numpy_top_k_per_output(shape, sparsity, seed):
  w, norm = _wn(seed, *shape)
  s = wanda_prune(w, norm, sparsity=sparsity)
  s.validate()
  got = np.asarray(s.materialize(), np.float64)
  np.testing.assert_array_equal(got, wanda_reference(w, norm, sparsity))
  # exactly round(p * K) pruned in every output
  assert np.all((got == 0).sum(0) == round(sparsity * shape[0]))


@given(nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
       seed=st.integers(0, 2**31 - 1))
def test_nm_keeps_top_n_scores_of_every_m(nm, seed):
  n, m = nm
  shape = (40, 12)
  w, norm = _wn(seed, *shape)
  s = wanda_prune(w, norm, pattern="nm", n=n, m=m)
  s.validate()
  got = np.asarray(s.materialize(), np.float64)
  np.testing.assert_array_equal(got, nm_reference(w, norm, n, m))
  runs = got.reshape(-1, m, shape[1])
  assert np.all((runs != 0).sum(1) == n)


@given(shape=st.sampled_from(SHAPES), c=st.floats(0.1, 10.0),
       seed=st.integers(0, 2**31 - 1))
def test_equal_norms_is_per_output_magnitude(shape, c, seed):
  w, _ = _wn(seed, *shape)
  s = wanda_prune(w, jnp.full((shape[0],), c), sparsity=0.5)
  got = np.asarray(s.materialize())
  wn = np.abs(np.asarray(w))
  kept = got != 0
  for j in range(shape[1]):  # per output: every kept |w| >= every pruned |w|
    assert wn[kept[:, j], j].min() >= wn[~kept[:, j], j].max()
  np.testing.assert_array_equal(got[kept], np.asarray(w)[kept])
  # and 2:4 with equal norms is plain magnitude 2:4
  if shape[0] % 4 == 0:
    a = wanda_prune(w, jnp.full((shape[0],), c), pattern="nm")
    b = cj.sparsify({"k": w}, pattern="nm", n=2, m=4,
                    default=lambda p, x: True)["k"]
    np.testing.assert_array_equal(np.asarray(a.materialize()),
                                  np.asarray(b.materialize()))


def test_scores_scale_invariant_per_input_only():
  """Wanda depends on norms only through their ratios across inputs."""
  w, norm = _wn(3, 40, 12)
  a = wanda_prune(w, norm, sparsity=0.5).materialize()
  b = wanda_prune(w, 7.0 * norm, sparsity=0.5).materialize()
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("pattern", ["unstructured", "nm"])
def test_lower_output_error_than_magnitude_with_varying_norms(pattern):
  t, k, n = 256, 64, 32
  ks = jax.random.split(jax.random.key(0), 3)
  scale = jnp.exp(1.5 * jax.random.normal(ks[0], (k,)))  # feature scales
  x = jax.random.normal(ks[1], (t, k)) * scale
  w = jax.random.normal(ks[2], (k, n))
  norm = jnp.sqrt(jnp.sum(x * x, 0))
  kw = dict(pattern=pattern, n=2, m=4) if pattern == "nm" else dict()
  wd = wanda_prune(w, norm, sparsity=0.5, **kw).materialize()
  ones = np.ones(k)  # magnitude = Wanda's rules with equal norms (numpy)
  if pattern == "nm":
    mag = nm_reference(w, ones, 2, 4)
  else:  # one threshold for the layer
    a = np.abs(np.asarray(w)).ravel()
    mag = np.where(np.abs(np.asarray(w)) > np.sort(a)[a.size // 2 - 1],
                   np.asarray(w), 0)
  err = lambda a: float(jnp.linalg.norm(x @ (w - jnp.asarray(a,
                                                            jnp.float32))))
  assert err(wd) < 0.5 * err(mag)


def test_transform_from_captured_stats():
  from flax import linen as nn
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(16)])
  scale = jnp.exp(1.5 * jax.random.normal(jax.random.key(5), (32,)))
  xs = [jax.random.normal(jax.random.key(i), (64, 32)) * scale
        for i in range(3)]
  v = model.init(jax.random.key(9), xs[0])
  stats = capture(model, v, xs)
  np.testing.assert_allclose(
      np.asarray(stats["params/layers_0/kernel"].norm),
      np.linalg.norm(np.concatenate([np.asarray(a) for a in xs]), axis=0),
      rtol=1e-5)
  c = wanda(stats, 0.5).apply(v)
  k0 = c["params"]["layers_0"]["kernel"]
  assert isinstance(k0, cj.SparseArray) and k0.sparsity == 0.5
  np.testing.assert_array_equal(
      np.asarray(k0.materialize()),
      wanda_reference(v["params"]["layers_0"]["kernel"],
                      stats["params/layers_0/kernel"].norm, 0.5))
  x = jnp.concatenate(xs)
  y = model.apply(v, x)
  err = lambda t: float(jnp.linalg.norm(
      model.apply(cj.materialize_tree(t), x) - y))
  assert err(c) < err(cj.sparsify(v, 0.5))
  c24 = wanda(stats, pattern="nm").apply(v)
  assert isinstance(c24["params"]["layers_2"]["kernel"], cj.NMSparseArray)


def test_hand_made_stats_and_errors_name_the_path():
  w, norm = _wn(1, 16, 8)
  st_ = LayerStats(gram=jnp.diag(norm**2), abs_sum=norm, sq_sum=norm**2,
                   abs_max=norm, count=jnp.asarray(1.0))
  params = {"a": {"kernel": w}, "b": {"kernel": w[:12]}}
  c = wanda({"a/kernel": st_, "b/kernel": st_}, 0.5,
            rules=[("b/kernel", None)]).apply(params)
  np.testing.assert_allclose(np.asarray(c["a"]["kernel"].materialize()),
                             wanda_reference(w, norm, 0.5), rtol=1e-6)
  with pytest.raises(CompressionError, match="statistics.*b/kernel"):
    wanda({"a/kernel": st_}, 0.5).init(params)
  with pytest.raises(CompressionError, match=r"M=8 .*b/kernel"):
    wanda({"a/kernel": st_, "b/kernel": st_}, pattern="nm", n=2,
          m=8).init(params)
  with pytest.raises(CompressionError, match="do not match"):
    wanda_prune(w, norm[:10], path="k")
  with pytest.raises(CompressionError, match="block"):
    wanda({"a/kernel": st_}, pattern="block", rules=[("b/kernel", None)]
          ).init(params)


def _outproj_conv():
  """An attention out-projection (heads, head_dim, d) and a 'SAME' 1-D conv
  (width, in, out): contractions (0, 1) each."""
  def f(t, x):
    h = jnp.einsum("blhd,hde->ble", x, t["out"]["kernel"])
    return jax.lax.conv_general_dilated(
        h, t["conv"]["kernel"], (1,), "SAME",
        dimension_numbers=("NWC", "WIO", "NWC"))
  r = np.random.default_rng(3)
  p = {"out": {"kernel": r.standard_normal((4, 3, 8), np.float32)},
       "conv": {"kernel": r.standard_normal((3, 8, 6), np.float32)}}
  xs = [r.standard_normal((2, 5, 4, 3), np.float32) * np.exp(r.normal(
      size=(4, 3))).astype(np.float32) for _ in range(2)]
  return f, p, capture(f, p, xs)


def test_any_contraction_is_the_paper_on_the_2d_view():
  f, p, stats = _outproj_conv()
  c = wanda(stats, 0.5).apply(p)
  c24 = wanda(stats, pattern="nm", rules=[("out/kernel", None)]).apply(p)
  for name in ("out", "conv"):
    st_ = stats[f"{name}/kernel"]
    v = st_.view(p[name]["kernel"].shape)
    got = np.asarray(c[name]["kernel"].materialize())
    np.testing.assert_array_equal(v.to_matrix(got), wanda_reference(
        v.to_matrix(p[name]["kernel"]), st_.norm, 0.5))
  k = c24["conv"]["kernel"]  # 2:4 along the conv's input channels
  assert isinstance(k, cj.NMSparseArray) and k.axis == 1
  v = stats["conv/kernel"].view((3, 8, 6))
  np.testing.assert_array_equal(
      v.to_matrix(np.asarray(k.materialize())),
      nm_reference(v.to_matrix(p["conv"]["kernel"]),
                   stats["conv/kernel"].norm, 2, 4))
