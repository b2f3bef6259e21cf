"""QAT: STE / LSQ eq. 3 / PACT gradients against hand formulas, forward equal
to PTQ, export equal to the fake-quant forward, start from GPTQ, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given, settings, strategies as st

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.core.input_transform import InputTransform
from compressjax.quantization import quantize_array
from compressjax.train import qat as Q

K, N = 8, 6
# format name -> quantize_array kwargs, and the code range [lo, hi] of y = w/s
# (+ z): the clipping interval of the STE, written out independently.
FORMATS = {
    "int2": (dict(bits=2), (-2, 1)),  # the default grid: full range
    "int4": (dict(bits=4), (-8, 7)),
    "int4_narrow": (dict(format="int4_narrow"), (-7, 7)),
    "int8": (dict(bits=8), (-128, 127)),
    "int4_asym": (dict(bits=4, symmetric=False), (0, 15)),
    "fp8_e4m3": (dict(format="fp8_e4m3"), (-448, 448)),
    "fp4_e2m1": (dict(format="fp4_e2m1"), (-6, 6)),
    "nf4": (dict(format="nf4"), (-1, 1)),
    "ternary": (dict(format="ternary"), (-1, 1)),
}
GRANS = {"tensor": dict(per_tensor=True), "channel": {},
         "group4": dict(group_size=4)}


def _full(a, shape):
  """Per-step values repeated to the weight's shape (groups along axis 0)."""
  a = np.asarray(a, np.float32)
  return np.broadcast_to(np.repeat(a, shape[0] // a.shape[0], 0), shape)


def _per_step_sum(x, step_shape):
  g = step_shape[0]
  x = x.reshape(g, -1, x.shape[1]).sum(1)
  return x.sum(1, keepdims=True) if step_shape[1] == 1 else x


def _weight(seed, shape=(K, N), scale=2.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


def _leaf_grads(leaf, ct):
  def f(v, s):
    return jnp.sum(ct * dataclasses.replace(leaf, weight=v,
                                            step=s).materialize())
  return jax.grad(f, (0, 1))(leaf.weight, leaf.step)


@settings(max_examples=8)
@given(fmt=st.sampled_from(sorted(FORMATS)), gran=st.sampled_from(
    sorted(GRANS)), shrink=st.floats(0.3, 1.0), seed=st.integers(0, 2**16))
def test_ste_gradient_is_one_inside_range_zero_outside(fmt, gran, shrink,
                                                       seed):
  kw, (lo, hi) = FORMATS[fmt]
  w = _weight(seed)
  leaf = Q.fake_quant_leaf(w, weight="ste", **kw, **GRANS[gran])
  leaf = dataclasses.replace(leaf, step=leaf.step * shrink)  # some clip
  ct = _weight(seed + 1, scale=1.0)
  gw, gs = _leaf_grads(leaf, ct)
  y = np.asarray(w) / _full(leaf.step, w.shape)
  if leaf.zero is not None:
    y = y + _full(leaf.zero, w.shape)
  want = np.where((y >= lo) & (y <= hi), np.asarray(ct), 0.0)
  np.testing.assert_array_equal(np.asarray(gw), want)
  np.testing.assert_array_equal(np.asarray(gs), 0.0)  # "ste": fixed step


@settings(max_examples=8)
@given(bits=st.sampled_from([2, 3, 4, 8]), gran=st.sampled_from(sorted(GRANS)),
       full=st.booleans(), seed=st.integers(0, 2**16))
def test_lsq_step_gradient_is_eq3_times_g(bits, gran, full, seed):
  w = _weight(seed)
  # LSQ's signed grid is the full range (Q_N = 2^(b-1)); the default narrow
  # grid (int<b>_narrow) has Q_N = Q_P
  leaf = Q.fake_quant_leaf(w, format=f"int{bits}_{'full' if full else 'narrow'}",
                           weight="lsq", step_init="lsq", **GRANS[gran])
  # the paper's init: s = 2 mean|v| / sqrt(Q_P) per step
  qn, qp = 2.0**(bits - 1) - (not full), 2.0**(bits - 1) - 1
  n_w = w.size // leaf.step.size
  mean = _per_step_sum(np.abs(np.asarray(w)), leaf.step.shape) / n_w
  np.testing.assert_allclose(leaf.step, 2 * mean / np.sqrt(qp), rtol=1e-6)
  factor = jax.random.uniform(jax.random.key(seed + 2), leaf.step.shape,
                              minval=0.3, maxval=2.0)
  leaf = dataclasses.replace(leaf, step=leaf.step * factor)
  ct = _weight(seed + 1, scale=1.0)
  _, gs = _leaf_grads(leaf, ct)
  u = np.asarray(w) / _full(leaf.step, w.shape)
  eq3 = np.where(u <= -qn, -qn, np.where(u >= qp, qp, -u + np.round(u)))
  g = 1 / np.sqrt(n_w * qp)
  want = g * _per_step_sum(np.asarray(ct) * eq3, leaf.step.shape)
  np.testing.assert_allclose(gs, want, rtol=1e-5, atol=1e-6)
  # forward: eq. 1-2
  vhat = np.clip(np.round(u), -qn, qp) * _full(leaf.step, w.shape)
  np.testing.assert_array_equal(leaf.materialize(), vhat)


@settings(max_examples=10)
@given(bits=st.sampled_from([2, 4, 8]), signed=st.booleans(),
       alpha=st.floats(0.5, 3.0), seed=st.integers(0, 2**16))
def test_pact_forward_and_gradients(bits, signed, alpha, seed):
  x = _weight(seed, (32,), scale=2.0)
  ct = _weight(seed + 1, (32,), scale=1.0)
  a = jnp.float32(alpha)
  y = Q.pact(x, a, bits, signed)
  xn, ctn, an = np.asarray(x), np.asarray(ct), np.float32(alpha)
  lo = -an if signed else np.float32(0)
  sc = an / (2**(bits - 1) - 1 if signed else 2**bits - 1)
  np.testing.assert_array_equal(y, np.round(np.clip(xn, lo, an) / sc) * sc)
  gx, ga = jax.grad(lambda x, a: jnp.sum(ct * Q.pact(x, a, bits, signed)),
                    (0, 1))(x, a)
  np.testing.assert_array_equal(gx, np.where((xn > lo) & (xn < an), ctn, 0))
  want = ctn[xn >= an].sum() - (ctn[xn <= -an].sum() if signed else 0.0)
  np.testing.assert_allclose(ga, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=15)
@given(fmt=st.sampled_from(sorted(FORMATS)), gran=st.sampled_from(
    sorted(GRANS)), seed=st.integers(0, 2**16))
def test_forward_and_export_are_ptq_numbers(fmt, gran, seed):
  kw = {**FORMATS[fmt][0], **GRANS[gran]}
  w = _weight(seed)
  leaf = Q.fake_quant_leaf(w, weight="ste", **kw)
  ptq = quantize_array(w, **kw)
  np.testing.assert_array_equal(leaf.materialize(), ptq.materialize())
  ex = Q.export_leaf(leaf)
  for f in ("codes", "scale", "zero"):
    a, b = getattr(ex, f), getattr(ptq, f)
    assert (a is None) == (b is None)
    if a is not None:
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  assert (ex.fmt, ex.contract, ex.shape) == (ptq.fmt, ptq.contract, ptq.shape)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4, name="head")(x)


MODEL = MLP()
X = jax.random.normal(jax.random.key(7), (128, 16))
PARAMS = jax.jit(MODEL.init)(jax.random.key(0), X)
# Jitted: one compile per tree structure instead of one per eager op.
_run = jax.jit(lambda t, x: cj.run(MODEL, t, x))


def _qat(**kw):
  return jax.jit(Q.qat(**kw).apply)(PARAMS)


def _quantize(params, bits, **kw):
  return jax.jit(lambda p: cj.quantize(p, bits, **kw))(params)


@jax.jit
def _jitter(tree, seed=0):
  """Moves latent weights, steps and alphas off their init (trained-like)."""
  key = [jax.random.key(seed)]

  def one(leaf):
    if not isinstance(leaf, Q.FakeQuant):
      return leaf
    key[0], k1, k2 = jax.random.split(key[0], 3)
    w = leaf.weight + 0.05 * jax.random.normal(k1, leaf.weight.shape)
    s = leaf.step * jax.random.uniform(k2, leaf.step.shape, minval=0.8,
                                       maxval=1.2)
    a = None if leaf.alpha is None else leaf.alpha * 0.2
    return dataclasses.replace(leaf, weight=w, step=s, alpha=a)
  return jax.tree.map(one, tree, is_leaf=cj.is_compressed)


@pytest.mark.parametrize("cfg, kind", [
    (dict(bits=4, group_size=8), cj.QArray),                  # int4 g8 LSQ
    (dict(bits=8, weight="ste"), cj.QArray),                  # int8 channel
    (dict(format="fp8_e4m3"), cj.QArray),
    (dict(bits=8, weight="ste", act="int8"), InputTransform),  # W8A8
    (dict(bits=4, act="pact", act_bits=4), Q.PactInput),
], ids=["int4-g8-lsq", "int8-ste", "fp8", "w8a8", "pact"])
def test_export_equals_fake_quant_forward(cfg, kind):
  t = _jitter(_qat(**cfg))
  e = Q.export(t)
  assert all(isinstance(e["params"][n]["kernel"], kind)
             for n in ("Dense_0", "Dense_1", "head"))
  y, ye = _run(t, X), _run(e, X)
  np.testing.assert_allclose(ye, y, rtol=1e-6, atol=1e-6 * float(
      jnp.max(jnp.abs(y))))
  # the stored weight is bit-exact
  jax.tree.map(np.testing.assert_array_equal, cj.materialize_tree(e),
               cj.materialize_tree(t))


def test_activation_quantizer_is_applied_on_the_matmul():
  k = PARAMS["params"]["Dense_0"]["kernel"]
  for act, fq in (("int8", lambda x: Q.per_token_fake_quant(x)),
                  ("pact", lambda x: Q.pact(x, 1.0, 8, True))):
    t = _qat(bits=8, act=act, act_alpha=1.0)
    leaf = t["params"]["Dense_0"]["kernel"]
    y = cj.run(lambda p, x: x @ p["k"], {"k": leaf}, X)
    np.testing.assert_allclose(y, fq(X) @ leaf.materialize(), rtol=1e-6,
                               atol=1e-6)
    assert not np.allclose(fq(X), X)
  assert k.shape == leaf.shape


def _loss(tree, y):
  return jnp.mean((cj.run(MODEL, tree, X) - y)**2)


_grad = jax.jit(jax.grad(_loss))


def test_grad_through_run_reaches_latent_step_and_alpha():
  y = _run(PARAMS, X) + 0.1
  t = _qat(bits=4, group_size=8)
  g = _grad(t, y)
  # weight-only: the interpreter's gradient equals differentiating the
  # fake-quantized weights directly (materialize() is differentiable)
  g2 = jax.jit(jax.grad(lambda t: jnp.mean(
      (MODEL.apply(cj.materialize_tree(t), X) - y)**2)))(t)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7), g, g2)
  leaf = g["params"]["head"]["kernel"]
  assert float(jnp.abs(leaf.weight).sum()) > 0
  assert float(jnp.abs(leaf.step).sum()) > 0
  # PACT alpha (clipping: alpha below the inputs' range) and STE's fixed step
  t = _jitter(_qat(bits=8, weight="ste", act="pact"))
  g = jax.jit(jax.grad(lambda t: _loss(t, y) + Q.pact_penalty(t, 1e-4)))(t)
  for n in ("Dense_0", "Dense_1", "head"):
    leaf = g["params"][n]["kernel"]
    assert float(jnp.abs(leaf.alpha)) > 0
    np.testing.assert_array_equal(leaf.step, 0.0)
    assert bool(jnp.all(jnp.isfinite(leaf.weight)))
  np.testing.assert_allclose(
      jax.grad(Q.pact_penalty)(t, 0.5)["params"]["head"]["kernel"].alpha,
      t["params"]["head"]["kernel"].alpha)


def test_asymmetric_grads_via_partition_float():
  t = _qat(bits=4, symmetric=False)
  assert t["params"]["head"]["kernel"].zero.dtype == jnp.uint8
  flo, rest = cj.partition_float(t)
  y = _run(PARAMS, X) + 0.1
  g = jax.jit(jax.grad(lambda f: _loss(cj.combine(f, rest), y)))(flo)
  assert float(jnp.abs(g["params"]["head"]["kernel"].step).sum()) > 0


def test_from_gptq_reproduces_ptq_and_round_trips():
  stats = capture(MODEL, PARAMS, [X])
  q = jax.jit(cj.transforms.gptq(stats, 4, group_size=8,
                                  symmetric=False).apply)(PARAMS)
  y = _run(q, X)
  for t in (jax.jit(Q.from_ptq)(q), jax.jit(Q.qat(init=q).apply)(PARAMS)):
    assert isinstance(t["params"]["head"]["kernel"], Q.FakeQuant)
    jax.tree.map(np.testing.assert_array_equal, cj.materialize_tree(t),
                 cj.materialize_tree(q))
    np.testing.assert_allclose(_run(t, X), y, rtol=1e-6,
                               atol=1e-6 * float(jnp.max(jnp.abs(y))))
    e = jax.jit(Q.export)(t)  # GPTQ's codes come back unchanged
    for n in ("Dense_0", "Dense_1", "head"):
      a, b = e["params"][n]["kernel"], q["params"][n]["kernel"]
      for f in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  # W8A8 PTQ: the InputTransform's per-token int8 is kept
  w8 = jax.tree.map(
      lambda l: InputTransform(weight=l, scale=None, signs=None, block=0,
                               act="int8", shape=l.shape, dtype=l.dtype)
      if isinstance(l, cj.QArray) else l, _quantize(PARAMS, 8),
      is_leaf=cj.is_compressed)
  t = jax.jit(Q.from_ptq)(w8)
  assert t["params"]["head"]["kernel"].act == "int8"
  y = _run(w8, X)
  np.testing.assert_allclose(_run(t, X), y, rtol=1e-6,
                             atol=1e-6 * float(jnp.max(jnp.abs(y))))


def test_int4_lsq_training_beats_rtn():
  # Teacher = the float model, so float loss is 0 and RTN's is its error.
  y = _run(PARAMS, X)
  rtn = float(jnp.mean((_run(_quantize(PARAMS, 4), X) - y)**2))
  t = _qat(bits=4)
  opt = optax.adam(3e-3)
  state = opt.init(t)

  @jax.jit
  def step(t, state):
    loss, g = jax.value_and_grad(_loss)(t, y)
    upd, state = opt.update(g, state, t)
    return optax.apply_updates(t, upd), state, loss

  first = None
  for _ in range(150):
    t, state, loss = step(t, state)
    first = float(loss) if first is None else first
  final = float(jnp.mean((_run(Q.export(t), X) - y)**2))  # deployed int4
  assert final < rtn and final < first, (final, rtn, first)


def test_default_step_init_is_ptq_and_relative_steps_is_log_space():
  t = _qat(bits=4, group_size=8)
  leaf = t["params"]["Dense_0"]["kernel"]
  ptq = _quantize(PARAMS, 4, group_size=8)["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(leaf.step, ptq.scale)
  flo, rest = cj.partition_float(t)
  opt = optax.chain(optax.adam(0.3), Q.relative_steps())
  st = opt.init(flo)
  g = jax.grad(lambda f: _loss(cj.combine(f, rest), _run(PARAMS, X)))(flo)
  plain, _ = optax.adam(0.3).update(g, optax.adam(0.3).init(flo), flo)
  upd, _ = opt.update(g, st, flo)
  k = lambda tree: tree["params"]["Dense_0"]["kernel"]
  # steps: s exp(u) - s (positive whatever u), the rest: adam's own update
  np.testing.assert_allclose(
      k(upd).step, np.asarray(k(flo).step) * np.expm1(np.asarray(
          k(plain).step, np.float64)), rtol=1e-5)
  assert np.all(np.asarray(k(flo).step) + np.asarray(k(upd).step) > 0)
  np.testing.assert_array_equal(k(upd).weight, k(plain).weight)
  np.testing.assert_array_equal(upd["params"]["Dense_0"]["bias"],
                                plain["params"]["Dense_0"]["bias"])
  with pytest.raises(ValueError, match="needs the params"):
    opt.update(g, st)


def test_rules_select_bits_per_path():
  t = Q.qat(4, group_size=8, rules=[(r"params/head/kernel", dict(
      bits=8, group_size=None)), (r"params/Dense_1/.*", None)]).apply(PARAMS)
  p = t["params"]
  assert p["Dense_0"]["kernel"].fmt.bits == 4
  assert p["Dense_0"]["kernel"].step.shape == (2, 32)
  assert p["head"]["kernel"].fmt.bits == 8
  assert p["head"]["kernel"].step.shape == (1, 4)
  assert not cj.is_compressed(p["Dense_1"]["kernel"])
  assert not cj.is_compressed(p["head"]["bias"])


@pytest.mark.parametrize("kw, match", [
    (dict(group_size=5), "group_size 5 does not divide"),
    (dict(format="mxfp4"), "block-scale scheme"),
    (dict(format="nf4", symmetric=False), "asymmetric"),
])
def test_bad_config_names_the_path(kw, match):
  with pytest.raises(cj.CompressionError, match=match) as e:
    Q.qat(4, **kw).apply(PARAMS)
  assert "params/Dense_0/kernel" in str(e.value)


@pytest.mark.parametrize("kw, match", [
    (dict(weight="sgd"), "option weight='sgd' must be one of 'lsq', 'ste'"),
    (dict(act="int4"), "option act='int4' must be one of None, 'int8'"),
    (dict(act="pact", act_bits=12), r"option act_bits=12 must be in \[2, 8\]"),
])
def test_bad_option_fails_when_the_transform_is_built(kw, match):
  with pytest.raises(cj.CompressionError, match=match):
    Q.qat(4, **kw)


def test_bad_inputs_name_the_path():
  q = _quantize(PARAMS, 4)
  with pytest.raises(cj.CompressionError, match="already a QArray"):
    Q.qat(4).apply(q)
  dq = _quantize(PARAMS, 4, double_quant=True)
  with pytest.raises(cj.CompressionError, match="params/Dense_0/kernel"):
    Q.from_ptq(dq)
  p3 = {"params": {"w": jnp.ones((4, 2, 3))}}
  with pytest.raises(cj.CompressionError, match="params/w.*"):
    Q.qat(8, act="int8").apply(p3)
  with pytest.raises(cj.CompressionError, match="init has shape"):
    Q.qat(4, init={"params": {"w": quantize_array(jnp.ones((2, 3)))}}).apply(
        {"params": {"w": jnp.ones((4, 3))}})


def test_nd_kernels_get_steps_per_output_feature():
  """An Einsum in-projection (d, heads, head_dim) with heads of magnitude
  1 / 0.1 / 0.01 / 10: one step per output feature (heads x head_dim), so
  every head keeps int8's error, as the same weights in 2-D."""
  heads = jnp.asarray([1.0, 0.1, 0.01, 10.0])[None, :, None]
  w = jax.random.normal(jax.random.key(0), (32, 4, 8)) * heads
  for mode in ("ste", "lsq"):
    leaf = Q.fake_quant_leaf(w, 8, weight=mode, step_init="ptq")
    assert leaf.contract == (0,) and leaf.step.shape == (1, 32)
    ptq = quantize_array(w, 8)
    np.testing.assert_array_equal(leaf.materialize(), ptq.materialize())
    d = np.asarray(leaf.materialize() - w).transpose(1, 0, 2).reshape(4, -1)
    rel = np.linalg.norm(d, axis=1) / np.linalg.norm(
        np.asarray(w).transpose(1, 0, 2).reshape(4, -1), axis=1)
    assert rel.max() < 0.01, rel
    ex = Q.export_leaf(leaf)
    assert ex.contract == (0,)
    np.testing.assert_array_equal(ex.codes, ptq.codes)
  lsq = Q.fake_quant_leaf(w, 4, step_init="lsq")  # per output feature
  m = np.abs(np.asarray(w)).reshape(32, 32).mean(0)
  np.testing.assert_allclose(np.asarray(lsq.step)[0], 2 * m / np.sqrt(7),
                             rtol=1e-5)
  gw, gs = _leaf_grads(lsq, jnp.ones_like(w))
  assert gw.shape == w.shape and gs.shape == (1, 32)
