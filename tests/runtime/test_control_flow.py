"""Compressed leaves stay compressed through scan (closed-over and stacked per
layer), remat, cond, while and custom_jvp/custom_vjp functions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import compressjax as cj
from compressjax.quantization.rtn import quantize_array
from compressjax.runtime import dispatch
from compressjax.runtime.interpret import NotStackable, slice_leading

T = cj.transforms
POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


@pytest.fixture
def dispatched(monkeypatch):
  """(leaf type, dense shape) of every matmul that reached dispatch."""
  calls = []
  orig = dispatch.dot_general

  def spy(*a, **k):
    leaf = a[0] if k["lhs_leaf"] else a[1]
    calls.append((type(leaf).__name__, tuple(leaf.shape)))
    return orig(*a, **k)
  monkeypatch.setattr(dispatch, "dot_general", spy)
  return calls


def forbid_materialize(monkeypatch):
  def boom(self):
    raise AssertionError(f"materialized {self!r}")
  monkeypatch.setattr(cj.QArray, "materialize", boom)


def primitives(jaxpr, found=None):
  """{primitive name: [eqn params]} over a jaxpr and all its sub-jaxprs."""
  found = {} if found is None else found
  for e in jaxpr.eqns:
    found.setdefault(e.primitive.name, []).append(e.params)
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(sub, "eqns") or hasattr(sub, "consts"):
          primitives(getattr(sub, "jaxpr", sub), found)
  return found


def float_grads_match(loss_c, loss_ref, c):
  flo, rest = cj.partition_float(c)
  g = jax.jit(jax.grad(lambda f: loss_c(cj.combine(f, rest))))(flo)
  want = jax.jit(jax.grad(lambda f: loss_ref(cj.materialize_tree(
      cj.combine(f, rest)))))(flo)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  return g


# -- linen: nn.scan over nn.remat blocks holding an nn.cond ------------------
class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    h = nn.relu(nn.Dense(16)(h))
    h = nn.cond(h.sum() > 0, lambda m, h: m(h), lambda m, h: -m(h),
                nn.Dense(16, name="gate"), h)
    return jnp.tanh(h), None


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16)(x)
    layers = nn.scan(nn.remat(Block, policy=POLICY),
                     variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)
    h, _ = layers(name="layers")(h, None)
    return nn.Dense(4)(h)


X = jax.random.normal(jax.random.key(0), (2, 8))
ALL = lambda p, x: True
STACKED = [(r"params/layers/.*kernel", dict(axis=1))]


def test_linen_scan_remat_cond_stay_compressed(dispatched, monkeypatch):
  model = ScanNet()
  v = jax.jit(model.init)(jax.random.key(1), X)
  c = jax.jit(lambda v: cj.quantize(v, 4, group_size=8, symmetric=False,
                                    rules=STACKED))(v)
  k = c["params"]["layers"]["Dense_0"]["kernel"]
  assert isinstance(k, cj.QArray) and k.shape == (3, 16, 16)
  ref = jax.jit(lambda c, x: model.apply(cj.materialize_tree(c), x))(c, X)
  run = lambda c, x: cj.run(model, c, x)
  # the program keeps its loop, its rematerialization policy and its branch
  prims = primitives(jax.make_jaxpr(run)(c, X).jaxpr)
  assert {"scan", "cond"} <= set(prims)
  remat = prims.get("remat2", prims.get("checkpoint"))
  assert [p["policy"] for p in remat] == [POLICY]
  dispatched.clear()
  forbid_materialize(monkeypatch)
  y = jax.jit(lambda c, x: cj.run(model, c, x))(c, X)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # traced once each: the first Dense, the scanned block's Dense (a per-layer
  # QArray), both branches of the gate, the head
  assert sorted(dispatched) == sorted(
      [("QArray", (8, 16)), ("QArray", (16, 16)), ("QArray", (16, 16)),
       ("QArray", (16, 16)), ("QArray", (16, 4))])
  monkeypatch.undo()
  g = float_grads_match(lambda t: jnp.sum(cj.run(model, t, X) ** 2),
                        lambda t: jnp.sum(model.apply(t, X) ** 2), c)
  gk = g["params"]["layers"]["Dense_0"]["kernel"]
  assert gk.codes is None and gk.scale.shape == k.scale.shape
  assert float(jnp.abs(gk.scale).max()) > 0


# -- lax: while_loop, fori_loop, cond around closed-over weights -------------
def fori_cond_model(t, x):
  h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ t["u"]) + i, x)
  return jax.lax.cond(h.sum() > 0, lambda h: h @ t["v"],
                      lambda h: h[:, :8], h)


def loop_model(t, x):
  _, h = jax.lax.while_loop(lambda c: c[0] < 3,
                            lambda c: (c[0] + 1, jnp.tanh(c[1] @ t["w"])),
                            (0, x))
  return fori_cond_model(t, h)


def test_while_fori_cond_closed_over_weights(dispatched, monkeypatch):
  keys = jax.random.split(jax.random.key(2), 3)
  p = {"w": jax.random.normal(keys[0], (16, 16)) / 4,
       "u": jax.random.normal(keys[1], (16, 16)) / 4,
       "v": jax.random.normal(keys[2], (16, 8))}
  c = jax.jit(lambda p: cj.quantize(p, 8, default=ALL))(p)
  x = jax.random.normal(jax.random.key(3), (4, 16))
  ref = jax.jit(lambda c, x: loop_model(cj.materialize_tree(c), x))(c, x)
  forbid_materialize(monkeypatch)
  y = jax.jit(lambda c, x: cj.run(loop_model, c, x))(c, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert sorted(dispatched) == [("QArray", (16, 8)), ("QArray", (16, 16)),
                                ("QArray", (16, 16))]
  monkeypatch.undo()
  # derivatives w.r.t. the scales: forward mode (reverse mode of a
  # while_loop is unsupported by jax itself)
  flo, rest = cj.partition_float(c)
  tan = jax.tree.map(jnp.ones_like, flo)
  _, dy = jax.jit(lambda f, t: jax.jvp(
      lambda f: cj.run(loop_model, cj.combine(f, rest), x), (f,), (t,)))(
          flo, tan)
  _, want = jax.jit(lambda f, t: jax.jvp(lambda f: loop_model(
      cj.materialize_tree(cj.combine(f, rest)), x), (f,), (t,)))(flo, tan)
  np.testing.assert_allclose(dy, want, rtol=1e-4, atol=1e-4)
  # reverse mode through the fori_loop (a scan) and the cond
  x4 = x / 4
  float_grads_match(
      lambda t: jnp.sum(cj.run(fori_cond_model, t, x4) ** 2),
      lambda t: jnp.sum(fori_cond_model(t, x4) ** 2),
      {"u": c["u"], "v": c["v"]})


# -- custom derivatives: the forward dispatches, the user's rule is kept -----
@jax.custom_vjp
def ste_tanh_layer(w, x):
  return jnp.tanh(x @ w)


def _ste_fwd(w, x):
  return ste_tanh_layer(w, x), (w, x)


def _ste_bwd(res, ct):  # straight-through: ignores tanh' on purpose
  w, x = res
  return x.T @ ct, ct @ w.T


ste_tanh_layer.defvjp(_ste_fwd, _ste_bwd)


@jax.custom_jvp
def half_jvp_layer(w, x):
  return jnp.sin(x @ w)


@half_jvp_layer.defjvp
def _half_jvp(primals, tangents):  # half the true derivative, on purpose
  w, x = primals
  tw, tx = tangents
  z = x @ w
  return jnp.sin(z), 0.5 * jnp.cos(z) * (tx @ w + x @ tw)


def custom_model(t, x):
  return half_jvp_layer(t["b"], ste_tanh_layer(t["a"], x))


def test_custom_jvp_and_vjp_bodies_dispatch_and_keep_their_rules(
    dispatched, monkeypatch):
  keys = jax.random.split(jax.random.key(4), 2)
  p = {"a": jax.random.normal(keys[0], (16, 16)) / 4,
       "b": jax.random.normal(keys[1], (16, 8)) / 4}
  c = jax.jit(lambda p: cj.quantize(p, 4, group_size=8, default=ALL))(p)
  x = jax.random.normal(jax.random.key(5), (4, 16))
  ref = jax.jit(lambda c, x: custom_model(cj.materialize_tree(c), x))(c, x)
  forbid_materialize(monkeypatch)
  y = jax.jit(lambda c, x: cj.run(custom_model, c, x))(c, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert sorted(dispatched) == [("QArray", (16, 8)), ("QArray", (16, 16))]
  monkeypatch.undo()
  loss = lambda t: jnp.sum(cj.run(custom_model, t, x) ** 2)
  g = float_grads_match(loss, lambda t: jnp.sum(custom_model(t, x) ** 2), c)
  # the rules matter: plain autodiff of the same forward differs
  plain = lambda t: jnp.sum(jnp.sin(jnp.tanh(x @ t["a"]) @ t["b"]) ** 2)
  flo, rest = cj.partition_float(c)
  g_plain = jax.jit(jax.grad(lambda f: plain(cj.materialize_tree(
      cj.combine(f, rest)))))(flo)
  for k in ("a", "b"):
    assert not np.allclose(g[k].scale, g_plain[k].scale, rtol=0.05)


# -- slicing a compressed leaf along a stacked (layer) axis ------------------
W = jax.random.normal(jax.random.key(6), (3, 32, 8))


def _per_layer_qarray(w):
  """Per-layer QArrays stacked: the layer axis is the major part of the
  stored columns, so each child is the layers' children side by side."""
  qs = [quantize_array(w[i], 4, group_size=8, symmetric=False)
        for i in range(3)]
  stack = lambda f: jnp.concatenate([getattr(q, f) for q in qs], axis=1)
  return dataclasses.replace(qs[0], codes=stack("codes"), scale=stack("scale"),
                             zero=stack("zero"), shape=w.shape,
                             contract=(1,)), qs


STACKABLE = {  # stacked (3, 32, 8) leaves, compressed along axis 1
    "int4_g8_asym": lambda w: cj.quantize({"k": w}, 4, group_size=8,
                                          symmetric=False, axis=1,
                                          default=ALL)["k"],
    "int8_channel": lambda w: cj.quantize({"k": w}, 8, axis=1,
                                          default=ALL)["k"],
    "mxfp4": lambda w: cj.quantize({"k": w}, format="mxfp4", axis=1,
                                   default=ALL)["k"],
    "nm24": lambda w: cj.sparsify({"k": w}, pattern="nm", n=2, m=4, axis=1,
                                  default=ALL)["k"],
    "nm24_int4": lambda w: cj.chain(
        T.sparsify(pattern="nm", n=2, m=4, axis=1, default=ALL),
        T.quantize(4, axis=1, default=ALL)).apply({"k": w})["k"],
    "codebook3": lambda w: cj.formats.quantize_codebook(w, 3, axis=1,
                                                        iters=2),
    "per_layer": lambda w: _per_layer_qarray(w)[0],
}


@pytest.mark.parametrize("name", sorted(STACKABLE))
def test_slice_leading_is_exact(name):
  leaf = jax.jit(STACKABLE[name])(W)  # jitted: fewer compiles than eager
  dense, sliced = jax.jit(lambda l: (l.materialize(), [
      slice_leading(l, i).materialize() for i in range(3)]))(leaf)
  for i in range(3):
    s = slice_leading(leaf, i)
    assert type(s) is type(leaf) and s.shape == (32, 8)
    s.validate()
    assert s.nbytes < leaf.nbytes
    np.testing.assert_array_equal(sliced[i], dense[i])
  if name == "per_layer":  # and it is exactly the leaf that was stacked
    for s, q in zip((slice_leading(leaf, i) for i in range(3)),
                    _per_layer_qarray(W)[1]):
      np.testing.assert_array_equal(s.codes, q.codes)
      np.testing.assert_array_equal(s.scale, q.scale)


def test_reverse_scan_sees_each_layer_compressed(dispatched, monkeypatch):
  leaf = jax.jit(STACKABLE["per_layer"])(W)
  x = jax.random.normal(jax.random.key(7), (2, 32))

  def f(t, x):  # layer i multiplies x; outputs stacked in reverse order
    return jax.lax.scan(lambda h, k: (h, x @ k), x, t["k"], reverse=True)[1]
  want = jax.jit(f)({"k": leaf.materialize()}, x)
  forbid_materialize(monkeypatch)
  y = jax.jit(lambda t, x: cj.run(f, t, x))({"k": leaf}, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert dispatched == [("QArray", (32, 8))]


@pytest.mark.parametrize("leaf,why", [
    (lambda: cj.quantize({"k": W}, 8, axis=0, default=ALL)["k"], "axis 0"),
    (lambda: cj.sparsify({"k": W}, 0.5, default=ALL)["k"], "block"),
    (lambda: cj.low_rank({"k": W}, rank=4, default=ALL)["k"], "contraction axes"),
])
def test_unsliceable_leaves_say_why_and_run_materialized(leaf, why):
  leaf = leaf()
  with pytest.raises(NotStackable, match=why):
    slice_leading(leaf, 0)
  x = jax.random.normal(jax.random.key(7), (2, 32))

  def f(t, x):  # a scan over the stacked leaf, as nn.scan emits it
    return jax.lax.scan(lambda h, k: (h, h @ k), x, t["k"])[1]
  with pytest.warns(UserWarning, match="materialized before the loop"):
    y = jax.jit(lambda t, x: cj.run(f, t, x))({"k": leaf}, x)
  want = jax.jit(lambda t, x: f(cj.materialize_tree(t), x))({"k": leaf}, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# -- calibration observers and control flow ---------------------------------
class RematNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.remat(nn.Dense)(16)(x)


def test_calibration_sees_through_remat_and_refuses_loop_bodies():
  model = RematNet()
  v = jax.jit(model.init)(jax.random.key(8), X)
  stats = cj.calibrate.capture(model, v, [X])
  s = stats["params/CheckpointDense_0/kernel"]
  np.testing.assert_allclose(s.gram, X.T @ X, rtol=1e-5, atol=1e-5)
  scan_model = ScanNet()
  v = jax.jit(scan_model.init)(jax.random.key(1), X)
  with pytest.raises(cj.CompressionError, match="inside a lax.scan body"):
    cj.calibrate.capture(scan_model, v, [X])
