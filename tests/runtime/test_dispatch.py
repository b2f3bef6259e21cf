"""Dispatch asks the leaf's format and layout: the stored (K, N) matrix is
used only when an op contracts exactly the declared axes; else the leaf is
materialized, so `cj.run` is exact whatever the declaration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax import formats
from compressjax.runtime import dispatch

def _no_materialize(monkeypatch, shape):
  real = cj.QArray.materialize

  def boom(self):  # small scale leaves (E8M0, e4m3) may be materialized
    if tuple(self.shape) == tuple(shape):
      raise AssertionError("materialized")
    return real(self)
  monkeypatch.setattr(cj.QArray, "materialize", boom)
  return real


def _q(shape, seed=1, **kw):
  w = jax.random.normal(jax.random.key(seed), shape)
  return cj.quantize({"k": w}, default=lambda p, x: True, **kw)["k"]


@pytest.mark.parametrize("spec,xshape", [
    ("bhk,hkd->bd", (3, 4, 8)),   # out-projection, contracted as declared
    ("bkh,hkd->bd", (3, 8, 4)),   # same axes, x's in another order
])
def test_out_projection_runs_from_codes(monkeypatch, spec, xshape):
  q = _q((4, 8, 32), format="int4", group_size=8)
  assert q.contract == (0, 1)
  x = jax.random.normal(jax.random.key(2), xshape)
  want = jnp.einsum(spec, x, q.materialize())
  _no_materialize(monkeypatch, q.shape)
  y = jax.jit(lambda t, x: cj.apply(lambda t, x: jnp.einsum(spec, x, t),
                                    t, x))(q, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis,spec,leaf_first", [
    ((4, 8, 32), None, "bd,hkd->bhk", False),  # contracts d, not (h, k)
    ((32, 4, 8), (0, 1), "bd,dhk->bhk", False),  # in-projection declared wrong
    ((4, 8, 32), None, "hkd,bd->bhk", True),   # the leaf on the left
])
def test_other_dimension_numbers_materialize_exactly(shape, axis, spec,
                                                     leaf_first):
  q = _q(shape, format="int4", axis=axis)
  x = jax.random.normal(jax.random.key(3), (3, 32))
  f = (lambda t, x: jnp.einsum(spec, t, x)) if leaf_first else (
      lambda t, x: jnp.einsum(spec, x, t))
  y = jax.jit(lambda t, x: cj.apply(f, t, x))(q, x)
  np.testing.assert_allclose(y, f(q.materialize(), x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,pallas,cpu", [
    ("int4", "pallas_int", "xla"), ("int8", "pallas_int", "xla"),
    ("int2_asym", "pallas_int", "xla"), ("mxint8", "pallas_int", "xla"),
    ("int3", "xla", "xla"), ("fp8_e4m3", "pallas_fp8", "xla"),
    ("mxfp8_e5m2", "pallas_fp8", "xla"), ("fp4_e2m1", "xla", "xla"),
    ("fp6_e3m2", "xla", "xla"), ("mxfp4", "xla", "xla"), ("nvfp4", "xla", "xla"),
    ("nf4", "xla", "xla"), ("ternary", "xla", "xla"), ("binary", "xla", "xla"),
    ("codebook3", None, None),
])
def test_fast_path_is_asked_of_the_format(name, pallas, cpu):
  fmt = formats.get(name)
  assert dispatch.kernel_for(fmt, "pallas") == pallas
  assert dispatch.kernel_for(fmt, "xla") == cpu


@pytest.mark.parametrize("name", ["fp8_e4m3", "mxfp8_e4m3", "int4", "nf4"])
def test_pallas_choice_runs_exactly_in_interpret_mode(monkeypatch, name):
  q = _q((64, 16), format=name)
  x = jax.random.normal(jax.random.key(4), (3, 64))
  want = x @ q.materialize()
  calls = []
  for fn in ("fp8_matmul", "quantized_matmul"):
    orig = getattr(dispatch.pallas_qmm, fn)
    monkeypatch.setattr(dispatch.pallas_qmm, fn,
                        lambda *a, _o=orig, _n=fn, **k: calls.append(_n)
                        or _o(*a, **k))
  _no_materialize(monkeypatch, q.shape)
  with dispatch.use_kernels("pallas"):
    y = cj.apply(lambda t, x: x @ t, q, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert calls == {"fp8_e4m3": ["fp8_matmul"], "mxfp8_e4m3": ["fp8_matmul"],
                   "int4": ["quantized_matmul"], "nf4": []}[name]


@pytest.mark.parametrize("name", ["nf4", "mxfp4", "nvfp4", "ternary",
                                  "fp6_e3m2", "fp8_e5m2"])
def test_table_formats_run_blocked_from_codes(monkeypatch, name):
  """Table-lookup formats reach the blocked XLA path from `cj.run` (never
  the whole float weight), with the materialized weight's result."""
  q = _q((64, 16), format=name)
  x = jax.random.normal(jax.random.key(5), (3, 64))
  want = x @ q.materialize()
  calls = []
  orig = dispatch.xla_matmul.quantized_matmul
  monkeypatch.setattr(dispatch.xla_matmul, "quantized_matmul",
                      lambda *a, **k: calls.append(1) or orig(*a, **k))
  _no_materialize(monkeypatch, q.shape)
  with dispatch.use_kernels("xla"):
    y = cj.run(lambda t, x: x @ t, q, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert calls == [1]
