"""KV quantization: the group quantizer against a float64 numpy reference
(asymmetric min-max with an integer zero point, symmetric absmax, fp8), its
s/2 error bound, true sizes vs theory; a KIVI store (per-channel key
groups, per-token values, full-precision window) read against an
independent simulation of KIVI's rule; Hadamard-rotated keys."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressjax import kv
from compressjax.core.errors import CompressionError
from compressjax.kv.quant import KVQuant, quantize_groups


def _f16_up(s):
  """float16 storage of a scale, rounded up where the cast rounded down."""
  h = s.astype(np.float16)
  low = h.astype(np.float64) < s
  return np.where(low, np.nextafter(h, np.float16(np.inf)), h).astype(
      np.float64)


def _ref_dequant(x, bits, group, axis, symmetric, fmt="int"):
  """float64 reference of quantize + dequantize by groups along `axis`."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  shp = x.shape
  xg = x.reshape(shp[:-1] + (shp[-1] // group, group))
  if fmt == "fp8":
    mx = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    s = _f16_up(np.where(np.abs(xg).max(-1) > 0, np.abs(xg).max(-1) / mx, 1))
    y = np.clip(xg.astype(np.float32) / s[..., None].astype(np.float32),
                -mx, mx)
    q = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    out = q * s[..., None]
  elif symmetric:
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(xg).max(-1) / qmax
    s = _f16_up(np.where(s > 0, s, 1.0))
    q = np.clip(np.round(xg.astype(np.float32) / s[..., None].astype(
        np.float32)), -qmax - 1, qmax)
    out = q * s[..., None]
  else:
    lo, hi = xg.min(-1), xg.max(-1)
    s = (hi - lo) / (2 ** bits - 1)
    s = np.maximum(s, np.maximum(np.abs(lo), np.abs(hi)) / 16000)
    s = _f16_up(np.where(s > 0, s, 1.0))
    z = np.round(-lo.astype(np.float32) / s.astype(np.float32))
    y = xg.astype(np.float32) / s[..., None].astype(np.float32)
    q = np.clip(np.round(y + z[..., None].astype(np.float32)), 0,
                2 ** bits - 1)
    out = (q - z[..., None]) * s[..., None]
  return np.moveaxis(out.reshape(shp), -1, axis), s


@pytest.mark.parametrize("bits,sym,axis,group,fmt", [
    (2, False, 3, 8, "int"), (4, False, 2, 4, "int"), (4, True, 3, 8, "int"),
    (8, True, 3, 8, "fp8")])
def test_quantize_groups_matches_reference(bits, sym, axis, group, fmt):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((2, 2, 8, 16)).astype(np.float32) * 3
  x[0, 0, :, 3] += 7.0  # an all-positive outlier channel (KIVI's keys)
  spec = KVQuant("fp8_e4m3" if fmt == "fp8" else f"int{bits}",
                 "token" if axis == 3 else "channel", group, symmetric=sym)
  qa = spec.quantize(jnp.asarray(x))
  qa.validate()
  got = np.asarray(qa.materialize())
  want, s = _ref_dequant(x, bits, group, axis, sym, fmt)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  if fmt == "int":  # |x - x_hat| <= s / 2 in every group
    err = np.moveaxis(np.abs(got - x), axis, -1)
    err = err.reshape(err.shape[:-1] + (-1, group)).max(-1)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-7)
  # true size: codes + scales (+ zero points) = theory
  assert qa.nbytes * 8 == pytest.approx(
      spec.bits_per_element(16) * x.size)


@jax.jit
def _asym4(x):
  qa = quantize_groups(x, KVQuant("int4").fmt, 3, 8)
  return qa.materialize(), qa.scale


@settings(max_examples=10, deadline=None)
@given(st.floats(-50, 50), st.floats(1e-3, 10), st.integers(0, 2**16))
def test_asymmetric_error_bound(offset, spread, seed):
  """Any offset (all-positive, all-negative groups): |x - x_hat| <= s/2 with
  s the group's (max - min) / (2^b - 1) (up to float16 scale rounding)."""
  bits = 4
  x = offset + spread * np.random.default_rng(seed).standard_normal(
      (1, 1, 1, 8)).astype(np.float32)
  deq, scale = _asym4(jnp.asarray(x))
  err = np.abs(np.asarray(deq) - x).max()
  s = max(float(x.max() - x.min()) / (2 ** bits - 1), abs(x).max() / 16000)
  stored = float(np.asarray(scale, np.float64).max())
  assert stored <= s * 1.01 + 1e-7  # float16 storage, rounded up
  assert err <= stored / 2 * (1 + 1e-5) + 1e-6


def test_theory_bits_int4_g128():
  """int4 with group 128, fp16 scale + int16 zero: 4 + 32/128 = 4.25."""
  assert KVQuant("int4", "token", 128).bits_per_element(128) == 4.25


def test_rotation_roundtrip_and_spread():
  spec = KVQuant("int4", "token", 16, rotate=True)
  plain = KVQuant("int4", "token", 16)
  x = jax.random.normal(jax.random.key(0), (1, 2, 5, 16))
  xo = x.at[..., 3].mul(30.0)  # an outlier channel

  @jax.jit
  def run(x, xo):
    return (spec.rotate_out(spec.rotate_in(x)),
            plain.quantize(xo).materialize(),
            spec.dequantize(spec.quantize(spec.rotate_in(xo)), jnp.float32))

  back, q_plain, q_rot = run(x, xo)
  np.testing.assert_allclose(back, x, atol=1e-5)
  # R is orthogonal: x R R^T = x (checked against the explicit matrix)
  from compressjax.core.hadamard import hadamard_matrix
  r = np.diag(spec.signs(16)).astype(np.float64) @ hadamard_matrix(16)
  np.testing.assert_allclose(spec.rotate_in(x), np.asarray(x) @ r, atol=1e-5)
  # rotated 4-bit keys are closer than plain ones
  assert float(jnp.linalg.norm(q_rot - xo)) < float(
      jnp.linalg.norm(q_plain - xo))


def _kivi_reference(x, n, residual, kq, vq):
  """What a KIVI store holding tokens 0..n-1 (x (n, H, D) per lane) must
  read: keys in complete groups entirely older than the window quantized
  per channel by their group, values older than the window quantized per
  token, the rest exact."""
  keys, values = x
  g = kq.group_size
  out_k = keys.astype(np.float64).copy()
  for grp in range(n // g):
    if (grp + 1) * g <= n - residual:
      blk = keys[grp * g:(grp + 1) * g]  # (g, H, D): groups over tokens
      deq, _ = _ref_dequant(blk[None].transpose(0, 2, 1, 3), kq.bits, g, 2,
                            False)
      out_k[grp * g:(grp + 1) * g] = deq[0].transpose(1, 0, 2)
  out_v = values.astype(np.float64).copy()
  old = max(n - residual, 0)
  if old:
    deq, _ = _ref_dequant(values[None, :old].transpose(0, 2, 1, 3), vq.bits,
                          vq.group_size, 3, False)
    out_v[:old] = deq[0].transpose(1, 0, 2)
  return out_k, out_v


@pytest.mark.parametrize("residual", [0, 4])
def test_kivi_store_reads_as_kivi(residual):
  """Prefill of 7 tokens (one row left-padded by 2), then 6 tokens one at a
  time: after every append the store reads exactly KIVI's mix of
  dequantized and full-precision entries."""
  kq, vq = kv.kivi(2, 4)
  spec = kv.KVSpec(keys=kq, values=vq, residual=residual)
  b, h, d, total, pre, pad = 2, 2, 8, 13, 7, 2
  rng = np.random.default_rng(residual)
  k = rng.standard_normal((b, total, h, d)).astype(np.float32)
  v = rng.standard_normal((b, total, h, d)).astype(np.float32)
  k[..., 1] += 5.0  # an outlier key channel
  pos = np.tile(np.arange(total), (b, 1))
  pos[1] = np.arange(total) - pad
  pos[1, :pad] = kv.NO_POSITION
  store = spec.empty(b, 16, h, d)
  append = jax.jit(lambda s, k, v, p: s.append(k, v, p))
  chunks = [(0, pre)] + [(i, i + 1) for i in range(pre, total)]
  for a, e in chunks:
    store = append(store, k[:, a:e], v[:, a:e], pos[:, a:e])
    keys, values, kpos = store.read()
    for row in range(b):
      real = pos[row, :e] >= 0
      n = int(real.sum())
      want_k, want_v = _kivi_reference((k[row, :e][real], v[row, :e][real]),
                                       n, residual, kq, vq)
      slots = np.asarray(kpos[row, 0])
      assert sorted(slots[slots >= 0]) == list(range(n))
      got_k = np.asarray(keys[row])[:n]  # slot = position
      got_v = np.asarray(values[row])[:n]
      np.testing.assert_allclose(got_k, want_k, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-5)
  # true size: quantized slots + the float window + positions
  slots = 16
  k_bits = kq.bits_per_element(d) * b * h * slots * d
  v_bits = vq.bits_per_element(d) * b * h * slots * d
  window = (residual + 4 + residual) * b * h * d * 32
  assert store.entry_nbytes() * 8 == k_bits + v_bits + window


def test_quant_errors_name_the_layer():
  with pytest.raises(CompressionError, match="layer 1.*group_size 5"):
    kv.KVSpec(keys=KVQuant("int4", "token", 5)).empty(1, 8, 2, 8, layer=1,
                                                       num_layers=2)
  with pytest.raises(CompressionError, match="block-scale"):
    KVQuant("mxfp4")
  with pytest.raises(CompressionError, match="asymmetric"):
    KVQuant("fp8_e4m3")
  with pytest.raises(CompressionError, match="per-channel"):
    kv.KVSpec(policy="h2o", budget=4, keys=kv.kivi(2, 4)[0])
