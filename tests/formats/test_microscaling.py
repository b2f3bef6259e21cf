"""OCP MX and NVFP4 against a separate numpy reading of their definitions."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import compressjax as cj
from compressjax.formats import quantize_mx, quantize_nvfp4

SPEC = {  # scheme -> (ml_dtypes element or None for int8, emax_elem)
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4),
    "mxfp4": (ml_dtypes.float4_e2m1fn, 2),
    "mxint8": (None, 0),
}


def mx_reference(w: np.ndarray, scheme: str) -> np.ndarray:
  """OCP MX v1.0 Sec. 6.3, blocks of 32 along axis 0, in float64."""
  dt, emax = SPEC[scheme]
  k, n = w.shape
  out = np.empty_like(w, dtype=np.float64)
  for b in range(k // 32):
    v = w[b * 32:(b + 1) * 32].astype(np.float64)
    amax = np.abs(v).max(0)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))),
                 -127) - emax
    x = 2.0 ** np.clip(e, -127, 127)
    p = v / x
    if dt is None:  # int8 with implicit 2^-6, saturating
      p = np.clip(np.round(p * 64), -128, 127) / 64
    else:
      mx = float(ml_dtypes.finfo(dt).max)
      p = np.clip(p, -mx, mx).astype(np.float32).astype(dt).astype(np.float64)
    out[b * 32:(b + 1) * 32] = p * x
  return out


@pytest.mark.parametrize("scheme", sorted(SPEC))
def test_mx_matches_spec(scheme):
  w = np.array(jax.random.t(jax.random.key(0), 3.0, (128, 16)), np.float32)
  w[:32, 0] = 0.0  # an all-zero block
  q = quantize_mx(jnp.asarray(w), scheme)
  q.validate()
  np.testing.assert_array_equal(np.asarray(q.materialize()),
                                mx_reference(w, scheme).astype(np.float32))
  bits = 8 if scheme == "mxint8" else int(scheme[4])
  assert q.bits_per_weight == bits + 8 / 32  # e.g. MXFP4 = 4.25 exactly
  assert q.scale.codes.dtype == jnp.uint8  # E8M0


def test_nvfp4_matches_definition():
  w = np.asarray(jax.random.normal(jax.random.key(1), (64, 8)), np.float32)
  q = quantize_nvfp4(jnp.asarray(w))
  s_t = np.abs(w).max() / (6 * 448)
  amax_b = np.abs(w.reshape(4, 16, 8)).max(1)
  s_b = (amax_b / (6 * s_t)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  s = (s_b * np.float32(s_t))[:, None, :]
  p = np.clip(w.reshape(4, 16, 8) / s, -6, 6).astype(
      ml_dtypes.float4_e2m1fn).astype(np.float32)
  np.testing.assert_allclose(np.asarray(q.materialize()),
                             (p * s).reshape(64, 8), rtol=1e-6)
  assert q.bits_per_weight == pytest.approx(4.5 + 32 / (64 * 8))


@pytest.mark.parametrize("fmt", ["int3", "int2", "ternary", "binary", "nf4",
                                 "fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "mxfp4",
                                 "mxint8", "nvfp4", "codebook3"])
def test_every_format_through_transform_model_and_checkpoint(fmt, tmp_path):
  from flax import linen as nn
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
  x = jax.random.normal(jax.random.key(0), (4, 64))
  v = model.init(jax.random.key(1), x)
  c = cj.quantize(v, format=fmt)
  y = jax.jit(lambda c, x: cj.run(model, c, x))(c, x)
  np.testing.assert_allclose(y, model.apply(cj.materialize_tree(c), x),
                             rtol=1e-5, atol=1e-5)
  cj.save(tmp_path / fmt, c)
  r = cj.restore(tmp_path / fmt)
  for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(c)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "nf4", "codebook2"])
def test_formats_compose_with_sparsity_and_low_rank(fmt):
  w = jax.random.normal(jax.random.key(5), (128, 32))
  t = cj.transforms
  for first in (t.sparsify(pattern="nm", n=2, m=4),
                t.low_rank(rank=4, residual=True)):
    c = cj.chain(first, t.quantize(format=fmt)).apply({"k": w})["k"]
    c.validate()
    assert c.bits_per_weight < 16
    assert float(jnp.linalg.norm(w - c.materialize()) / jnp.linalg.norm(w)) < 0.8
