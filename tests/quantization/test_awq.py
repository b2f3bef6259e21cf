"""Scale groups / folding and AWQ against separately written numpy math."""

import flax.linen as nn
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
from compressjax.quantization.awq import (awq, awq_quantize, search_clip,
                                      search_scale)
from compressjax.quantization.scaling import ScaleGroup, apply_scales, plan_groups

D, H = 16, 32


class Tiny(nn.Module):
  """LayerNorm -> (q, k, v); attention-like token mixing (linear in v) -> o;
  residual -> fc1 -> gelu -> fc2."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    q, k, v = (nn.Dense(D, name=n)(h) for n in "qkv")
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0)
    z = x + nn.Dense(D, name="o")(jnp.einsum("bts,bsd->btd", att, v))
    return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(H, name="fc1")(z)))


TINY_GROUPS = (
    ScaleGroup(("params/q/kernel", "params/k/kernel", "params/v/kernel"),
               "norm",
               ("params/ln/scale", "params/ln/bias")),
    ScaleGroup(("params/o/kernel",), "linear",
               ("params/v/kernel", "params/v/bias")),
)  # fc1 (after a residual sum) and fc2 (after gelu): explicit by default


def random_params(model, x, seed):
  """Random params of the model's shapes, drawn with numpy (no compilation),
  with nontrivial norm scales and biases."""
  from tests import multiaxis as ma
  return ma.draw_params(np.random.default_rng(seed),
                        jax.eval_shape(model.init, jax.random.key(0), x))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_scales(groups, tree, seed, spread):
  # numpy, and jitted helpers below: eager jax ops each compile on first use
  leaves = dict(cj.core.leaves_with_paths(tree))
  rng = np.random.default_rng(seed)
  return [np.exp(spread * rng.standard_normal(
      leaves[g.consumers[0]].shape[0])).astype(np.float32) for g in groups]


def _kernels(v):
  return {p for p, _ in cj.core.leaves_with_paths(v) if p.endswith("kernel")}


# One compilation each (eager jax ops would each compile on first use).
_rtn = jax.jit(quantize_array, static_argnames=("bits", "group_size",
                                                "symmetric"))
_dense = jax.jit(cj.materialize_tree)


_TINY = Tiny()
_tiny_run = jax.jit(lambda t, x: cj.run(_TINY, t, x))


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 2.0))
def test_folding_is_exact_on_small_model(seed, spread):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 6, D)).astype(np.float32)
  x *= np.where(np.arange(D) % 5 == 0, 10.0, 1.0).astype(np.float32)
  v = random_params(_TINY, x, seed)
  y = _tiny_run(v, x)
  # all four groups: two foldable, fc1 and fc2 explicit
  groups = plan_groups(v, TINY_GROUPS, _kernels(v))
  assert [g.producer for g in groups] == ["norm", "linear", None, None]
  scales = _random_scales(groups, v, seed + 1, spread)
  folded = apply_scales(v, groups, scales)
  explicit = apply_scales(v, groups, scales, fold=False)
  p = folded["params"]
  assert isinstance(p["fc1"]["kernel"], InputTransform)
  assert isinstance(p["fc2"]["kernel"], InputTransform)
  assert not isinstance(p["q"]["kernel"], InputTransform)
  np.testing.assert_allclose(
      p["ln"]["scale"], np.asarray(v["params"]["ln"]["scale"]) / scales[0],
      rtol=1e-6)
  for t in (folded, explicit):
    assert _rel(_tiny_run(t, x), y) < 1e-5
  assert all(isinstance(explicit["params"][n]["kernel"], InputTransform)
             for n in ("q", "k", "v", "o", "fc1", "fc2"))


TCFG = tr.TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=32,
                            seq_len=16)


@pytest.fixture(scope="module")
def lm():
  model = tr.TransformerLM(TCFG)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, (4, 16), dtype=np.int32)
  v = random_params(model, toks, 1)
  batches = [rng.integers(0, 256, (4, 16), dtype=np.int32) for _ in range(3)]
  apply = jax.jit(lambda p: model.apply(p, toks))  # float trees
  return model, v, toks, capture(model, v, batches), apply


def test_folding_is_exact_on_transformer(lm):
  model, v, toks, _, apply = lm
  groups = plan_groups(v, tr.scale_groups(TCFG), _kernels(v))
  assert len(groups) == 4 * TCFG.n_layers + 1
  assert [g.producer for g in groups[:4]] == ["norm", "linear", "norm", None]
  scales = _random_scales(groups, v, 3, 1.0)
  t = apply_scales(v, groups, scales)  # (explicit: tested on the small model)
  assert _rel(jax.jit(lambda t: cj.run(model, t, toks))(t), apply(v)) < 1e-5


def test_folding_is_exact_on_rmsnorm_transformer():
  cfg = tr.TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_mlp=32,
                             seq_len=16, norm="rms")
  model = tr.TransformerLM(cfg)
  toks = np.random.default_rng(1).integers(0, 256, (2, 16), dtype=np.int32)
  v = random_params(model, toks, 4)
  groups = plan_groups(v, tr.scale_groups(cfg), _kernels(v))
  assert groups[0].producer_params == ("params/block_0/ln_1/scale",)
  t = apply_scales(v, groups, _random_scales(groups, v, 5, 1.0))
  assert _rel(jax.jit(lambda t: cj.run(model, t, toks))(t),
              jax.jit(model.apply)(v, toks)) < 1e-5


# -- numpy reference ---------------------------------------------------------

def np_rtn(w, bits, gs, symmetric, narrow=False):
  """Round-to-nearest per group of gs inputs and output column (float64)."""
  w = np.asarray(w, np.float64)
  k, n = w.shape
  gs = gs or k
  g = w.reshape(k // gs, gs, n)
  if symmetric:  # full-range grid: s = 2 max|w| / (2^b - 1); narrow: / qmax
    qmax = 2**(bits - 1) - 1
    s = np.abs(g).max(1, keepdims=True) / (qmax if narrow else qmax + 0.5)
    s[s == 0] = 1
    q = np.clip(np.round(g / s), -qmax - (0 if narrow else 1), qmax) * s
  else:
    hi = np.maximum(g.max(1, keepdims=True), 0)
    lo = np.minimum(g.min(1, keepdims=True), 0)
    s = (hi - lo) / (2**bits - 1)
    s[s == 0] = 1
    z = np.round(-lo / s)
    q = (np.clip(np.round(g / s) + z, 0, 2**bits - 1) - z) * s
  return q.reshape(k, n)


def np_awq_scale(x, alpha):
  m = np.abs(x).mean(0)
  m = np.maximum(m, 1e-6 * m.max())
  s = m**alpha
  return s / np.sqrt(s.max() * s.min())


def _layer(k=64, ns=(16, 24), t=512, seed=0, outliers=True):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, k)) @ (np.eye(k) + 0.2 * rng.standard_normal(
      (k, k)))
  if outliers:  # a few channels ~20x larger: what AWQ exploits
    x[:, ::13] *= 20
  ws = [rng.standard_normal((k, n)) for n in ns]
  return x.astype(np.float32), [w.astype(np.float32) for w in ws]


def _err(x, w, what):
  x = np.asarray(x, np.float64)
  return float(np.mean((x @ (np.asarray(w, np.float64) - np.asarray(
      what, np.float64)))**2))


def test_search_quantizer_is_rtn():
  """The searches' unpacked fake quantization equals quantize_array's."""
  from compressjax.quantization.awq import _fake_quant, _qcfg
  w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
  w[:16, 0] = 0  # an all-zero group
  w[16:32, 1] = np.abs(w[16:32, 1])  # a group with no negative values
  for bits, gs, sym in [(4, 16, False), (3, None, True), (8, 32, False)]:
    q = _qcfg(bits, None, gs, sym)
    np.testing.assert_array_equal(
        jax.jit(lambda w: _fake_quant(w, q))(w),
        _dense(_rtn(w, bits=bits, group_size=gs, symmetric=sym)))


@pytest.mark.parametrize("bits,gs,sym", [(4, 16, False), (3, 32, False),
                                         (4, None, True)])
def test_scale_search_is_the_grid_minimizer(bits, gs, sym):
  x, ws = _layer(seed=bits)
  # symmetric: the narrow grid, since the full one puts each group's absmax
  # on a rounding tie that float32 and this float64 reference break apart
  fmt = f"int{bits}_narrow" if sym else None
  res = search_scale(ws, x.T @ x, np.abs(x).mean(0), bits=bits, format=fmt,
                     group_size=gs, symmetric=sym, count=len(x))
  rtn_ = lambda w: np_rtn(w, bits, gs, sym, narrow=sym)
  brute = []
  for a in np.arange(20) / 20:
    s = np_awq_scale(x, a)[:, None]
    loss = [np.mean((x.astype(np.float64) @ (w - rtn_(s * w) / s))**2,
                    axis=0) for w in ws]
    brute.append(np.mean(np.concatenate(loss)))
  brute = np.array(brute)
  np.testing.assert_allclose(res.losses, brute, rtol=2e-3)
  assert res.alpha == np.argmin(brute) / 20
  np.testing.assert_allclose(res.scale, np_awq_scale(x, res.alpha),
                             rtol=1e-4)
  # alpha = 0 is s = 1, i.e. plain RTN: the search is never worse than it
  rtn = np.mean(np.concatenate([np.mean(
      (x.astype(np.float64) @ (w - rtn_(w)))**2, axis=0) for w in ws]))
  np.testing.assert_allclose(res.losses[0], rtn, rtol=2e-3)
  assert res.losses.min() <= res.losses[0]


def _awq_layer(x, w, bits, gs, **kw):
  res = search_scale(w, x.T @ x, np.abs(x).mean(0), bits=bits, group_size=gs,
                     count=len(x))
  s = np.asarray(res.scale)[:, None]
  q = awq_quantize(w * s, x.T @ x, res.scale, bits=bits, group_size=gs, **kw)
  return q, np.asarray(_dense(q)) / s


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_below_rtn_with_outlier_channels(bits):
  x, (w,) = _layer(k=64, ns=(32,), seed=5)
  rtn = _dense(_rtn(w, bits=bits, group_size=16, symmetric=False))
  _, wh = _awq_layer(x, w, bits, 16)
  e_awq, e_rtn = _err(x, w, wh), _err(x, w, rtn)
  assert e_awq < 0.4 * e_rtn  # measured ~0.2
  # without the clip search: RTN of diag(s) W exactly, between the two
  q0, wh0 = _awq_layer(x, w, bits, 16, n_clip=0)
  s = np.asarray(search_scale(w, x.T @ x, np.abs(x).mean(0), bits=bits,
                              group_size=16).scale)
  np.testing.assert_array_equal(q0.codes, _rtn(
      w * s[:, None], bits=bits, group_size=16, symmetric=False).codes)
  assert e_awq <= _err(x, w, wh0) < e_rtn
  # no outliers: still never worse than RTN
  x2, (w2,) = _layer(k=64, ns=(32,), seed=6, outliers=False)
  rtn2 = _dense(_rtn(w2, bits=bits, group_size=16, symmetric=False))
  assert _err(x2, w2, _awq_layer(x2, w2, bits, 16)[1]) <= _err(
      x2, w2, rtn2) * (1 + 1e-4)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([3, 4]),
       sym=st.booleans())
def test_clip_search_never_increases_group_error(seed, bits, sym):
  x, (w,) = _layer(k=64, ns=(8,), t=128, seed=seed % 1000)
  g = x.T @ x
  res = search_clip(w, g, bits=bits, group_size=16, symmetric=sym,
                    count=len(x))
  errs = np.asarray(res.errors)
  assert errs.shape == (10, 4, 8)  # int(0.5 * 20) ratios, 4 groups, 8 outputs
  q = _rtn(res.weight, bits=bits, group_size=16, symmetric=sym)
  # the stored QArray is exact to its definition; its per-group error is the
  # chosen candidate's, the minimum, so at most the unclipped (RTN) one
  d = (np.asarray(w, np.float64) - np.asarray(_dense(q), np.float64))
  d = d.reshape(4, 16, 8)
  gb = np.stack([np.asarray(g, np.float64)[i * 16:(i + 1) * 16,
                                           i * 16:(i + 1) * 16]
                 for i in range(4)])
  got = np.einsum("gin,gij,gjn->gn", d, gb, d) / len(x)
  np.testing.assert_allclose(got, errs.min(0), rtol=1e-3, atol=1e-6)
  assert np.all(errs.min(0) <= errs[0])
  r = np.asarray(res.ratio)
  assert np.all(np.isclose(r[..., None], 1 - np.arange(10) / 20).any(-1))
  wg = np.asarray(w).reshape(4, 16, 8)
  hi = np.abs(wg).max(1) if sym else np.maximum(wg.max(1), 0)
  cg = np.asarray(res.weight).reshape(4, 16, 8)
  np.testing.assert_allclose(np.abs(cg).max(1) if sym else cg.max(1),
                             r * hi, rtol=1e-6)


def test_transform_on_one_layer_matches_functions():
  x, (w,) = _layer(k=64, ns=(32,), seed=7)
  fn = lambda p, x: x @ p["w"]
  stats = capture(fn, {"w": jnp.asarray(w)}, [x[:256], x[256:]],
                  default=lambda p, l: True)
  c = awq(stats, 4, group_size=16, default=lambda p, l: True).apply(
      {"w": jnp.asarray(w)})["w"]
  assert isinstance(c, InputTransform) and isinstance(c.weight, cj.QArray)
  assert c.weight.zero is not None and c.weight.group_size == 16
  q, _ = _awq_layer(x, w, 4, 16)
  np.testing.assert_array_equal(c.weight.codes, q.codes)
  y = jax.jit(lambda c, x: cj.run(fn, {"w": c}, x))(c, x)
  np.testing.assert_allclose(y, x @ np.asarray(_dense(c)), rtol=1e-4,
                             atol=1e-3)


def test_awq_on_transformer_runs_and_checkpoints(lm, tmp_path):
  model, v, toks, stats, apply = lm
  y = apply(v)
  c = awq(stats, 4, group_size=16, groups=tr.scale_groups(TCFG)).apply(v)
  b = c["params"]["block_0"]
  for n in ("query", "key", "value", "out"):
    assert isinstance(b["attn"][n]["kernel"], cj.QArray)
  assert isinstance(b["mlp"]["fc1"]["kernel"], cj.QArray)
  assert isinstance(c["params"]["head"]["kernel"], cj.QArray)
  fc2 = b["mlp"]["fc2"]["kernel"]
  assert isinstance(fc2, InputTransform) and isinstance(fc2.weight, cj.QArray)
  assert not np.allclose(b["ln_1"]["scale"], v["params"]["block_0"]["ln_1"][
      "scale"])  # folded
  run = jax.jit(lambda t: cj.run(model, t, toks))
  out = run(c)
  # the effective weights (no activation quantization here): plain apply
  dense = lambda t: apply(_dense(t))
  np.testing.assert_allclose(out, dense(c), rtol=1e-4, atol=1e-4)
  e_awq = _rel(out, y)
  rtn = jax.jit(lambda v: cj.quantize(v, 4, group_size=16, symmetric=False))
  e_rtn = _rel(dense(rtn(v)), y)
  assert e_awq < e_rtn
  cj.save(str(tmp_path / "awq"), c)
  r = cj.restore(str(tmp_path / "awq"))
  np.testing.assert_array_equal(run(r), out)
  # no groups: every kernel gets an explicit input scale
  e = awq(stats, 4, group_size=16).apply(v)
  assert isinstance(e["params"]["block_1"]["attn"]["query"]["kernel"],
                    InputTransform)
  assert _rel(dense(e), y) < e_rtn


def test_errors_name_the_path(lm):
  model, v, _, stats, _ = lm
  path = "params/block_1/mlp/fc2/kernel"
  partial = {p: s for p, s in stats.items() if p != path}
  with pytest.raises(cj.CompressionError, match="no calibration.*" + path):
    awq(partial, 4, group_size=16).init(v)
  with pytest.raises(cj.CompressionError, match="does not divide.*fc2"):
    awq(stats, 4, group_size=16,
        rules=[(r".*fc2/kernel", dict(group_size=48))]).init(v)
  with pytest.raises(cj.CompressionError,
                     match=r"query/kernel': option n_grid=0 must be >= 1"):
    awq(stats, 4, group_size=16,
        rules=[(r".*query/kernel", dict(n_grid=0))]).init(v)
  with pytest.raises(cj.CompressionError, match="max_shrink"):
    awq(stats, 4, group_size=16, max_shrink=1.0).init(v)
  with pytest.raises(cj.CompressionError, match="not found.*blk"):
    awq(stats, 4, groups=[ScaleGroup(("params/blk/kernel",))]).init(v)
  with pytest.raises(cj.CompressionError, match="same n_grid"):
    awq(stats, 4, group_size=16, groups=tr.scale_groups(TCFG),
        rules=[(r".*query/kernel", dict(n_grid=5))]).apply(v)
  q = jax.tree.map(lambda x: x, v)
  q["params"]["block_0"]["attn"]["key"]["kernel"] = _rtn(
      v["params"]["block_0"]["attn"]["key"]["kernel"], bits=8)
  with pytest.raises(cj.CompressionError, match="float kernel.*key"):
    awq(stats, 4, group_size=16).apply(q)


def test_multi_axis_folding_is_exact_and_the_2d_folding():
  # DenseGeneral kernels (d, heads, head_dim) / (heads, head_dim, d): the
  # scale lives on the contracted axes; folded into the LayerNorm and into
  # v's (heads, head_dim) output axes, or explicit (p) with the contraction.
  from tests import multiaxis as ma
  x, m, f, sm, sf = ma.setup(0)
  cm = {p: s.contract for p, s in sm.items()}
  assert cm["params/o/kernel"] == (0, 1) and cm["params/q/kernel"] == (0,)
  sel = {f"params/{n}/kernel" for n in ma.KERNELS}
  gm = plan_groups(m, ma.GROUPS, sel, contracts=cm)
  gf = plan_groups(f, ma.GROUPS, sel)
  scales = _random_scales(gf, f, 3, 1.0)
  om = apply_scales(m, gm, scales, contracts=cm)
  of = apply_scales(f, gf, scales)
  t = om["params"]["p"]["kernel"]
  assert isinstance(t, InputTransform) and t.contract == (0, 1)
  np.testing.assert_allclose(  # v's bias divided by o's s on (heads, hd)
      om["params"]["v"]["bias"],
      np.asarray(m["params"]["v"]["bias"]) / scales[1].reshape(2, 8),
      rtol=1e-6)
  w, y, top = ma.compare(om, of, x)
  assert w == 0.0 and y <= 1e-6 * top
  assert _rel(cj.run(ma.MULTI, om, x), cj.run(ma.MULTI, m, x)) < 1e-5


def test_multi_axis_awq_is_awq_on_the_2d_view():
  from tests import multiaxis as ma
  x, m, f, sm, sf = ma.setup(0)
  t = lambda s: awq(s, 4, group_size=4, n_grid=3, n_clip=2,
                    groups=ma.GROUPS)
  om, of = t(sm).apply(m), t(sf).apply(f)
  p = om["params"]
  assert p["o"]["kernel"].contract == (0, 1) and p["o"]["kernel"].shape == (
      2, 8, ma.D)
  assert p["q"]["kernel"].contract == (0,)
  assert p["p"]["kernel"].contract == (0, 1)
  w, y, top = ma.compare(om, of, x)
  assert w <= 1e-6 * top and y <= 1e-5 * top


def test_multi_axis_bad_groups_name_the_param_and_fix():
  from tests import multiaxis as ma
  x, m, f, sm, sf = ma.setup(0)
  # o contracts (heads, head_dim) = (2, 8): a LayerNorm of d = 12 cannot
  # produce its input
  bad = ScaleGroup(("params/o/kernel",), "norm",
                   ("params/ln/scale", "params/ln/bias"))
  with pytest.raises(cj.CompressionError,
                     match=r"contracted shape \(2, 8\).*producer=None.*"
                     "params/ln/scale"):
    awq(sm, 4, group_size=4, groups=[bad]).init(m)
  mixed = ScaleGroup(("params/q/kernel", "params/o/kernel"))
  with pytest.raises(cj.CompressionError,
                     match=r"contracted shapes must agree.*different groups"
                     ".*params/o/kernel"):
    awq(sm, 4, group_size=4, groups=[mixed]).init(m)
