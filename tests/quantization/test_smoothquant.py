"""SmoothQuant: eq. 4 migration algebra, W8A8 against numpy, transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.core.input_transform import InputTransform
from compressjax.models import transformer as tr
from compressjax.quantization import quantize_array
from compressjax.quantization.scaling import ScaleGroup, apply_scales, plan_groups
from compressjax.quantization.smoothquant import (smooth_scale, smoothquant,
                                              weight_max)

K = 64
_RNG = np.random.default_rng(0)
_OUT = np.arange(K) % 9 == 0
# Outlier input channels (30x), whose weight rows are small, so that (as in
# LLMs) they dominate the per-token activation range but not the output.
X = (_RNG.standard_normal((256, K)) * np.where(_OUT, 30.0, 1.0)).astype(
    np.float32)
W1 = (_RNG.standard_normal((K, 32)) * np.where(_OUT, 0.01, 0.1)[:, None]
      ).astype(np.float32)
W2 = (_RNG.standard_normal((K, 16)) * np.where(_OUT, 0.01, 0.1)[:, None]
      ).astype(np.float32)


@settings(max_examples=15)
@given(alpha=st.floats(0.0, 1.0))
def test_migration_follows_eq4(alpha):
  ax = np.abs(X).max(0)
  s = np.asarray(smooth_scale(ax, weight_max([W1, W2]), alpha), np.float64)
  aw = np.maximum(np.abs(W1).max(1), np.abs(W2).max(1)).astype(np.float64)
  np.testing.assert_allclose(s, ax**alpha / aw**(1 - alpha), rtol=1e-5)
  # X^ = X / s and W^ = s W (over both consumers) share the product:
  #   max|X^_j| = (max|X_j| max|W_j|)^(1 - alpha),  max|W^_j| = (...)^alpha
  xh = np.abs(X / s).max(0)
  wh = np.maximum(np.abs(s[:, None] * W1).max(1),
                  np.abs(s[:, None] * W2).max(1))
  np.testing.assert_allclose(xh, (ax * aw)**(1 - alpha), rtol=1e-4)
  np.testing.assert_allclose(wh, (ax * aw)**alpha, rtol=1e-4)
  np.testing.assert_allclose(xh * wh, ax * aw, rtol=1e-4)
  if alpha == 0.5:
    np.testing.assert_allclose(xh, wh, rtol=1e-4)


def test_dead_channels_keep_scale_one():
  s = smooth_scale(jnp.array([0.0, 2.0, 3.0]), jnp.array([1.0, 0.0, 0.5]))
  np.testing.assert_allclose(s, [1.0, 1.0, np.sqrt(3 / 0.5)], rtol=1e-6)


def _ln(p, x):
  mu = x.mean(-1, keepdims=True)
  xh = (x - mu) / jnp.sqrt(((x - mu)**2).mean(-1, keepdims=True) + 1e-6)
  return xh * p["ln"]["scale"] + p["ln"]["bias"]


def _ln_model(p, x):
  h = _ln(p, x)
  return jnp.concatenate([h @ p["w1"], h @ p["w2"]], -1)


_SEL = lambda path, leaf: path in ("w1", "w2")
_GROUP = ScaleGroup(("w1", "w2"), "norm", ("ln/scale", "ln/bias"))


def _ln_params():
  return {"ln": {"scale": jnp.asarray(1 + 3 * (np.arange(K) % 9 == 0),
                                      jnp.float32) * 2,
                 "bias": jnp.asarray(_RNG.standard_normal(K), jnp.float32)},
          "w1": jnp.asarray(W1), "w2": jnp.asarray(W2)}


def test_folded_smoothing_moves_the_ranges():
  """Calibrating the folded float model again sees max|X_j| / s_j."""
  p = _ln_params()
  stats = capture(_ln_model, p, [jnp.asarray(X)], default=_SEL)
  ax = np.asarray(stats["w1"].abs_max, np.float64)
  s = smooth_scale(ax, weight_max([W1, W2]), 0.5)
  groups = plan_groups(p, [_GROUP], {"w1", "w2"})
  folded = apply_scales(p, groups, [s])
  np.testing.assert_allclose(_ln_model(folded, X), _ln_model(p, X),
                             rtol=1e-4, atol=1e-5)
  after = capture(_ln_model, folded, [jnp.asarray(X)], default=_SEL)
  aw = np.maximum(np.abs(W1).max(1), np.abs(W2).max(1))
  prod = np.sqrt(ax * aw)
  np.testing.assert_allclose(after["w1"].abs_max, prod, rtol=1e-4)
  np.testing.assert_allclose(np.maximum(np.abs(folded["w1"]).max(1),
                                        np.abs(folded["w2"]).max(1)), prod,
                             rtol=1e-4)
  # the transform: consumers are int8 W8A8 InputTransforms with no scale
  c = smoothquant(stats, groups=[_GROUP], default=_SEL).apply(p)
  for n in ("w1", "w2"):
    assert isinstance(c[n], InputTransform) and c[n].scale is None
    assert c[n].act == "int8" and c[n].weight.codes.dtype == jnp.int8
  np.testing.assert_allclose(c["ln"]["scale"], folded["ln"]["scale"],
                             rtol=1e-6)


def np_int8_rows(a, axis):
  """Symmetric int8 with one absmax scale per slice along `axis` (float32)."""
  a = np.asarray(a, np.float32)
  sc = np.abs(a).max(axis, keepdims=True) / np.float32(127)
  sc[sc == 0] = 1
  return np.clip(np.round(a / sc), -128, 127).astype(np.int32), sc


def np_w8a8(x, inv, qw, sw):
  """(x * inv) quantized per token, times int8 weight codes with per-channel
  scales, summed in int32."""
  qx, sx = np_int8_rows(np.asarray(x, np.float32) * inv, 1)
  acc = qx @ np.asarray(qw, np.int32)
  assert acc.dtype == np.int32
  return acc.astype(np.float64) * sx * np.asarray(sw, np.float64).reshape(1, -1)


_fn = lambda p, x: x @ p["w"]
_run = jax.jit(lambda t, x: cj.run(_fn, {"w": t}, x))


def test_w8a8_equals_numpy_reference(monkeypatch):
  stats = capture(_fn, {"w": jnp.asarray(W1)}, [jnp.asarray(X)],
                  default=lambda p, l: True)
  c = smoothquant(stats, default=lambda p, l: True).apply(
      {"w": jnp.asarray(W1)})["w"]
  assert isinstance(c, InputTransform) and c.act == "int8"
  s = np.asarray(smooth_scale(np.abs(X).max(0), np.abs(W1).max(1)),
                 np.float32)
  np.testing.assert_allclose(1 / c.scale, s, rtol=1e-6)
  # the weight: int8 per output channel of diag(s) W (a code may differ
  # where float rounding of s puts a product at a .5 tie)
  qw, sw = np_int8_rows(s[:, None] * W1, 0)
  assert np.mean(np.asarray(c.weight.codes) == qw) > 0.999
  np.testing.assert_allclose(c.weight.scale, sw, rtol=1e-6)
  ref = np_w8a8(X, np.asarray(c.scale), c.weight.codes, c.weight.scale)

  def boom(self):
    raise AssertionError("W8A8 should not materialize its weight")
  monkeypatch.setattr(cj.QArray, "materialize", boom)
  y = np.asarray(_run(c, X), np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-4,
                             atol=1e-4 * np.abs(ref).max())


def _err(y, ref):
  return float(np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref))


def test_smoothing_beats_plain_w8a8_with_outliers():
  ref = X.astype(np.float64) @ W1
  stats = capture(_fn, {"w": jnp.asarray(W1)}, [jnp.asarray(X)],
                  default=lambda p, l: True)
  sq = smoothquant(stats, default=lambda p, l: True).apply(
      {"w": jnp.asarray(W1)})["w"]
  plain = InputTransform(weight=quantize_array(W1, 8), scale=None, signs=None,
                         block=0, act="int8", shape=W1.shape,
                         dtype="float32")
  e_sq, e_plain = _err(_run(sq, X), ref), _err(_run(plain, X), ref)
  assert e_sq < 0.2 * e_plain
  # alpha = 0 puts all the range in the activations: worse than 0.5
  a0 = smoothquant(stats, 0.0, default=lambda p, l: True).apply(
      {"w": jnp.asarray(W1)})["w"]
  assert e_sq < _err(_run(a0, X), ref)


TCFG = tr.TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=32,
                            seq_len=16)


@pytest.fixture(scope="module")
def lm():
  model = tr.TransformerLM(TCFG)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, (4, 16), dtype=np.int32)
  from tests import multiaxis as ma  # numpy draws: no compilation for init
  v = ma.draw_params(rng, jax.eval_shape(model.init, jax.random.key(0), toks))
  batches = [rng.integers(0, 256, (4, 16), dtype=np.int32) for _ in range(3)]
  return model, v, toks, capture(model, v, batches)


def test_smoothquant_on_transformer(lm, tmp_path, monkeypatch):
  model, v, toks, stats = lm
  y = np.asarray(jax.jit(model.apply)(v, toks), np.float64)
  c = smoothquant(stats, groups=tr.scale_groups(TCFG)).apply(v)
  p = c["params"]
  for i in range(TCFG.n_layers):
    b = p[f"block_{i}"]
    for k in ("query", "key", "value", "out"):
      t = b["attn"][k]["kernel"]
      assert isinstance(t, InputTransform) and t.scale is None
      assert t.act == "int8" and t.weight.codes.dtype == jnp.int8
    assert b["mlp"]["fc1"]["kernel"].scale is None
    assert b["mlp"]["fc2"]["kernel"].scale is not None  # after gelu
  assert p["head"]["kernel"].scale is None
  run = jax.jit(lambda t: cj.run(model, t, toks))
  cj.save(str(tmp_path / "sq"), c)
  r = cj.restore(str(tmp_path / "sq"))

  def boom(self):
    raise AssertionError("W8A8 should not materialize its weight")
  monkeypatch.setattr(cj.QArray, "materialize", boom)
  out = np.asarray(run(c), np.float64)
  assert _err(out, y) < 0.05
  np.testing.assert_array_equal(run(r), out)
  # a skipped consumer of a folded group stays float, scaled to match
  c2 = smoothquant(stats, groups=tr.scale_groups(TCFG),
                   rules=[(r".*block_0/attn/query/kernel", None)]).apply(v)
  b0, f0 = c2["params"]["block_0"], v["params"]["block_0"]
  s = np.asarray(f0["ln_1"]["scale"]) / np.asarray(b0["ln_1"]["scale"])
  np.testing.assert_allclose(b0["attn"]["query"]["kernel"],
                             np.asarray(f0["attn"]["query"]["kernel"])
                             * s[:, None], rtol=1e-5)
  assert isinstance(b0["attn"]["key"]["kernel"], InputTransform)


def test_errors_name_the_path(lm):
  model, v, _, stats = lm
  with pytest.raises(cj.CompressionError,
                     match=r"block_1/mlp/fc1/kernel': option alpha=1.5 must "
                     r"be in \[0, 1\]"):
    smoothquant(stats, rules=[(r".*block_1/mlp/fc1/kernel",
                               dict(alpha=1.5))]).init(v)
  with pytest.raises(cj.CompressionError, match="alpha=-0.1 must be in"):
    smoothquant(stats, alpha=-0.1).init(v)
  path = "params/block_0/attn/out/kernel"
  partial = {p: s for p, s in stats.items() if p != path}
  with pytest.raises(cj.CompressionError, match="no calibration.*" + path):
    smoothquant(partial).init(v)
  with pytest.raises(cj.CompressionError, match="unknown option 'bits'"):
    smoothquant(stats, rules=[(r".*fc1/kernel", dict(bits=4))]).init(v)
  with pytest.raises(cj.CompressionError, match="same alpha.*query"):
    smoothquant(stats, groups=tr.scale_groups(TCFG),
                rules=[(r".*key/kernel", dict(alpha=0.8))]).apply(v)
  with pytest.raises(cj.CompressionError, match="act"):
    smoothquant(stats, act="int4").init(v)


def test_multi_axis_smoothquant_is_smoothquant_on_the_2d_view():
  # DenseGeneral kernels: s on the contracted axes, W8A8 through cj.run
  # (per-token int8 over the flattened contraction) as the 2-D model's.
  from tests import multiaxis as ma
  x, m, f, sm, sf = ma.setup(0)
  om = smoothquant(sm, groups=ma.GROUPS).apply(m)
  of = smoothquant(sf, groups=ma.GROUPS).apply(f)
  p = om["params"]
  assert all(p[n]["kernel"].act == "int8" for n in ma.KERNELS)
  assert p["o"]["kernel"].contract == (0, 1)
  assert p["o"]["kernel"].weight.contract == (0, 1)
  assert p["p"]["kernel"].scale is not None  # explicit: no producer
  w, y, top = ma.compare(om, of, x)
  assert w <= 1e-6 * top and y <= 1e-5 * top
