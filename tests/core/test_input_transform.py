"""InputTransform: effective weight, dispatch (scale, rotation, W8A8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core import hadamard
from compressjax.core.input_transform import InputTransform
from compressjax.formats import activations

K, N = 64, 24
X = jax.random.normal(jax.random.key(0), (5, 3, K))
W = jax.random.normal(jax.random.key(1), (K, N)) / 8
S = jnp.exp(jax.random.normal(jax.random.key(2), (K,)))
SIGNS = hadamard.random_signs(jax.random.key(3), K)


def leaf(weight, scale=None, signs=None, block=0, act=None):
  t = InputTransform(weight=weight, scale=scale, signs=signs, block=block,
                     act=act, shape=(K, N), dtype="float32")
  t.validate()
  return t


def run(t, x=X):
  return jax.jit(lambda t, x: cj.apply(lambda p, x: x @ p["w"], {"w": t},
                                       x))(t, x)


def test_scale_is_exact_reparametrization():
  # AWQ/SmoothQuant: (x / s) @ (diag(s) W) == x @ W
  t = leaf(W * S[:, None], scale=1 / S)
  np.testing.assert_allclose(t.materialize(), W, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run(t), X @ W, rtol=1e-4, atol=1e-5)


def test_online_rotation_is_exact():
  # block-diagonal R (2 blocks of 32): weight holds R^T W
  wr = hadamard.fwht(W * SIGNS[:, None].astype(W.dtype), axis=0, block=32)
  t = leaf(wr, signs=SIGNS, block=32)
  np.testing.assert_allclose(t.materialize(), W, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(t), X @ W, rtol=1e-4, atol=1e-4)


def test_w8a8_int_path_equals_fake_quant_reference(monkeypatch):
  q = cj.quantize({"w": W * S[:, None]}, 8, default=lambda p, x: True)["w"]
  t = leaf(q, scale=1 / S, act="int8")
  xs = X * (1 / S)
  ref = activations.fake_quant(xs) @ q.materialize()
  def boom(self):
    raise AssertionError("materialized")
  monkeypatch.setattr(cj.QArray, "materialize", boom)
  y = run(t)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_act_quant_on_other_weights_and_nesting():
  q = cj.quantize({"w": W}, 4, group_size=16, default=lambda p, x: True)["w"]
  t = leaf(q, act="fp8_e4m3")
  ref = activations.fake_quant(X, "fp8_e4m3") @ q.materialize()
  np.testing.assert_allclose(run(t), ref, rtol=1e-5, atol=1e-5)
  # quantize transform reaches the inner weight; checkpoint round trip
  t2 = cj.quantize({"w": leaf(W * S[:, None], scale=1 / S)}, 8,
                   default=lambda p, x: True)["w"]
  assert isinstance(t2.weight, cj.QArray)
  assert t2.nbytes < W.size * 4 / 3
  assert "x*s" in cj.core.report.describe(t2)


def test_checkpoint_round_trip(tmp_path):
  t = leaf(cj.quantize({"w": W}, 4, default=lambda p, x: True)["w"],
           scale=1 / S, signs=SIGNS, block=64, act="int8")
  cj.save(str(tmp_path / "c"), {"w": t})
  r = cj.restore(str(tmp_path / "c"))["w"]
  assert isinstance(r, InputTransform) and r.act == "int8" and r.block == 64
  np.testing.assert_array_equal(r.materialize(), t.materialize())


def test_validate_errors():
  with pytest.raises(cj.CompressionError, match="power of two dividing"):
    leaf(W, signs=SIGNS, block=48)
  with pytest.raises(cj.CompressionError, match="act"):
    leaf(W, act="int4")
  with pytest.raises(cj.CompressionError, match="scale has shape"):
    leaf(W, scale=jnp.ones((K + 1,)))


def test_capture_sees_transformed_input():
  # calibration of a smoothed/rotated model: stats of the input the stored
  # weight multiplies, i.e. of x * scale rotated
  from compressjax.calibrate import capture
  t = leaf(W, scale=1 / S, signs=SIGNS, block=64)
  fn = lambda p, x: x @ p["w"]
  stats = capture(fn, {"w": t}, [X], default=lambda p, x: True)
  xt = np.asarray(t.transform_input(X)).reshape(-1, K)
  np.testing.assert_allclose(stats["w"].gram, xt.T @ xt, rtol=1e-4,
                             atol=1e-4)
