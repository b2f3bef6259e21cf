"""Unmodified linen and NNX models on compressed trees (jit, grad, dispatch)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import compressjax as cj
from compressjax.runtime import dispatch

T = cj.transforms

# Conv kernels are (width, in, out): their input axis is 1, not Flax's usual 0.
CONV = [(r".*Conv_0/kernel", dict(axis=1))]
TRANSFORMS = {
    "int8": T.quantize(8),
    "int4_g16_asym": T.quantize(4, group_size=16, symmetric=False, rules=CONV),
    "int3": T.quantize(3),
    "unstructured": T.sparsify(0.5),
    "nm24": T.sparsify(pattern="nm", n=2, m=4, rules=CONV),
    "block": T.sparsify(0.5, pattern="block", block=(8, 8),
                        rules=[(r".*Conv_0/kernel", dict(block=(1, 8, 8))),
                               (r".*Einsum_0/kernel", dict(block=(8, 1, 8)))]),
    "lowrank": T.low_rank(rank=4),
    "nm24_int4": cj.chain(T.sparsify(pattern="nm", n=2, m=4, rules=CONV),
                          T.quantize(4)),
    "lr_qres": cj.chain(T.low_rank(rank=4, residual=True), T.quantize(4)),
}


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(64)(x)
    x = nn.gelu(x)
    x = nn.Einsum((64, 4, 8), "bd,dhk->bhk")(x).reshape(x.shape[0], -1)
    x = nn.LayerNorm()(x)
    y = nn.Conv(16, (3,))(x[:, :, None].repeat(16, -1)[:, :, :16])
    return nn.Dense(16)(x) + y.mean(1)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(32, 64, rngs=rngs)
    self.ein = nnx.Einsum("bd,dhk->bhk", (64, 4, 8), rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.l2 = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    h = self.ein(nnx.gelu(self.l1(x))).reshape(x.shape[0], -1)
    return self.l2(self.norm(h))


X = jax.random.normal(jax.random.key(0), (5, 32))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_linen_compressed_equals_materialized_under_jit(name):
  model = LinenNet()
  v = model.init(jax.random.key(1), X)
  c = TRANSFORMS[name].apply(v)
  assert any(cj.is_compressed(x) for x in jax.tree.leaves(
      c, is_leaf=cj.is_compressed))
  y = jax.jit(lambda c, x: cj.run(model, c, x))(c, X)
  ref = jax.jit(model.apply)(cj.materialize_tree(c), X)
  np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
  if name == "int8":  # and close to the float model
    np.testing.assert_allclose(y, model.apply(v, X), atol=0.05)


@pytest.mark.parametrize("name", ["int8", "int4_g16_asym", "nm24_int4",
                                  "lowrank"])
def test_nnx_compressed_equals_materialized_under_jit(name):
  model = NNXNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  c = TRANSFORMS[name].apply(params)
  y = jax.jit(lambda c, x: cj.run(model, c, x))(c, X)
  ref_model = NNXNet(nnx.Rngs(0))
  nnx.update(ref_model, cj.materialize_tree(c))
  np.testing.assert_allclose(y, ref_model(X), rtol=2e-5, atol=2e-5)


def test_dense_matmuls_go_through_dispatch(monkeypatch):
  calls = []
  orig = dispatch.dot_general

  def spy(*a, **k):
    calls.append(type(a[1] if not k["lhs_leaf"] else a[0]).__name__)
    return orig(*a, **k)

  monkeypatch.setattr(dispatch, "dot_general", spy)
  model = LinenNet()
  v = model.init(jax.random.key(1), X)
  c = cj.quantize(v, 8)
  cj.run(model, c, X)
  # both Dense layers and the Einsum consume the QArray without materializing
  assert calls.count("QArray") == 3


@pytest.mark.parametrize("fmt,group,sym", [
    ("int4", 8, True), ("int8", None, True), ("int3", 16, True),
    ("fp8_e4m3", None, True), ("nf4", 8, True), ("ternary", None, True),
    ("int4", 8, False), ("mxfp4", None, True)])
def test_qarray_matmul_rule_does_not_materialize(monkeypatch, fmt, group,
                                                 sym):
  c = cj.quantize({"k": jax.random.normal(jax.random.key(0), (32, 16))},
                  format=fmt, group_size=group, symmetric=sym,
                  default=lambda p, x: True)
  want = X @ c["k"].materialize()

  real = cj.QArray.materialize

  def boom(self):  # small scale arrays (mxfp4's E8M0) may be materialized
    if tuple(self.shape) in ((32, 16), (32, 4, 4)):
      raise AssertionError("materialized")
    return real(self)
  monkeypatch.setattr(cj.QArray, "materialize", boom)
  y = jax.jit(lambda c, x: cj.apply(lambda t, x: x @ t["k"], c, x))(c, X)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  # an Einsum kernel (K, h, d) multiplies as the (K, h*d) matrix
  w3 = {"k": jax.random.normal(jax.random.key(0), (32, 4, 4))}
  c3 = cj.quantize(w3, format=fmt, group_size=group, symmetric=sym,
                   default=lambda p, x: True)
  monkeypatch.setattr(cj.QArray, "materialize", real)
  want3 = jnp.einsum("bd,dhk->bhk", X, c3["k"].materialize())
  monkeypatch.setattr(cj.QArray, "materialize", boom)
  y3 = jax.jit(lambda c, x: cj.apply(
      lambda t, x: jnp.einsum("bd,dhk->bhk", x, t["k"]), c, x))(c3, X)
  np.testing.assert_allclose(y3, want3, rtol=2e-5, atol=2e-5)


def test_grad_wrt_float_parts():
  model = LinenNet()
  v = model.init(jax.random.key(1), X)
  c = cj.quantize(v, 4, group_size=16, rules=CONV)
  flo, rest = cj.partition_float(c)

  def loss(flo):
    return jnp.sum(cj.run(model, cj.combine(flo, rest), X) ** 2)

  g = jax.jit(jax.grad(loss))(flo)
  gk = g["params"]["Dense_0"]["kernel"]
  assert gk.codes is None and gk.scale.shape == (2, 64)
  # d loss / d scale agrees with finite differences on the materialized model
  eps = 1e-3
  k = c["params"]["Dense_0"]["kernel"]

  def with_scale(s):
    t = jax.tree.map(lambda x: x, c)
    t["params"]["Dense_0"]["kernel"] = dataclasses.replace(k, scale=s)
    return jnp.sum(model.apply(cj.materialize_tree(t), X) ** 2)
  e = jnp.zeros_like(k.scale).at[0, 3].set(eps)
  fd = (with_scale(k.scale + e) - with_scale(k.scale - e)) / (2 * eps)
  np.testing.assert_allclose(gk.scale[0, 3], fd, rtol=2e-2)
  assert g["params"]["Dense_0"]["bias"].shape == (64,)


def test_bf16_model_runs_compressed():
  model = nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  v = model.init(jax.random.key(0), X)
  c = cj.quantize(v, 8)
  y = jax.jit(lambda c, x: cj.run(model, c, x))(c, X)
  ref = model.apply(cj.materialize_tree(c), X)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(ref, np.float32), atol=0.05, rtol=0.02)


def test_plain_function_and_non_array_args():
  c = cj.quantize({"w": jax.random.normal(jax.random.key(0), (32, 8))}, 8,
                  default=lambda p, x: True)
  f = lambda t, x, scale=1.0, relu=False: (jax.nn.relu if relu else (
      lambda z: z))(x @ t["w"]) * scale
  y = cj.run(f, c, X, scale=2.0, relu=True)
  ref = jax.nn.relu(X @ c["w"].materialize()) * 2.0
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["pallas", "xla", "reference"])
def test_every_kernel_choice_runs_the_compressed_model(kernels):
  """The same compressed model through each matmul implementation (Pallas in
  interpret mode on CPU) equals the materialized model."""
  model = LinenNet()
  v = model.init(jax.random.key(1), X)
  c = cj.quantize(v, 4, group_size=16, rules=CONV)
  want = model.apply(cj.materialize_tree(c), X)
  with dispatch.use_kernels(kernels):
    y = jax.jit(lambda c, x: cj.run(model, c, x))(c, X)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="kernels must be one of"):
    with dispatch.use_kernels("triton"):
      pass


# -- bad trees fail clearly, on entry ----------------------------------------
def test_invalid_compressed_leaf_fails_before_running():
  c = cj.quantize({"w": jax.random.normal(jax.random.key(0), (32, 8))}, 4,
                  default=lambda p, x: True)
  bad = {"w": dataclasses.replace(c["w"], codes=c["w"].codes[:8])}  # 4-bit
  called = []

  def f(t, x):
    called.append(True)
    return x @ t["w"]
  with pytest.raises(cj.CompressionError,
                     match=r"codes has shape \(8, 8\), expected \(16, 8\)"
                     r".*compress the param again.*\[param 'w'\]"):
    cj.run(f, bad, X)
  assert not called
  with pytest.raises(cj.CompressionError, match=r"\[param 'w'\]"):
    jax.jit(lambda t, x: cj.run(f, t, x))(bad, X)  # shape checks under jit
  assert not called


def test_params_the_model_never_reads(caplog):
  model = nn.Dense(8)
  v = model.init(jax.random.key(0), X)
  c = cj.quantize(v, 8)
  c["params"]["head"] = {"kernel": jnp.ones((8, 2))}
  with pytest.raises(cj.TreeMismatchError,
                     match=r"never reads 1 param.*'params/head/kernel'.*"
                     r"allow_unused=True"):
    cj.run(model, c, X, allow_unused=False)  # strict
  with caplog.at_level("WARNING", logger="absl"):
    cj.run(model, c, X)  # default: named in a warning
  assert "never reads 1 param(s) of the tree: ['params/head/kernel']" in \
      caplog.text
  caplog.clear()
  y = cj.run(model, c, X, allow_unused=True)  # the documented opt-out
  assert "never reads" not in caplog.text
  np.testing.assert_allclose(
      y, model.apply({"params": {k: cj.materialize_tree(x) for k, x in
                                 c["params"].items() if k != "head"}}, X),
      rtol=1e-5, atol=1e-5)


def test_linen_tree_without_its_params_level():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
  v = model.init(jax.random.key(1), X)
  with pytest.raises(cj.TreeMismatchError,
                     match=r"\{'params': \.\.\.\}.*\['layers_0', 'layers_2'\].*"
                     r"pass \{'params': tree\}"):
    cj.run(model, cj.quantize(v, 8)["params"], X)


def test_nnx_input_of_the_wrong_width_names_the_layer():
  model = NNXNet(nnx.Rngs(0))
  c = cj.quantize(nnx.state(model, nnx.Param), 8)
  with pytest.raises(cj.CompressionError,
                     match=r"dense shape \(32, 64\).*\[\(5, 16\)\].*"
                     r"input width.*\[param 'l1/kernel'\]"):
    cj.run(model, c, X[:, :16])
