"""GPTQ against a slow, separately written float64 implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.quantization import quantize_array
from compressjax.quantization.gptq import gptq, gptq_quantize


def gptq_reference(w, h, bits, gs, damp=0.01, full=False):
  """Frantar et al. Alg. 1 without lazy batching, float64, symmetric: the
  narrow grid (-qmax..qmax, s = max|w| / qmax), or `full`, the reference
  code's quantizer (zero 2^(b-1), s = 2 max|w| / (2^b - 1))."""
  W = np.asarray(w, np.float64).T.copy()  # (out, in)
  H = np.asarray(h, np.float64).copy()
  n, k = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H += damp * np.mean(np.diag(H)) * np.eye(k)
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  qmax = 2**(bits - 1) - 1
  out = np.zeros_like(W)
  s = None
  for j in range(k):
    if j % gs == 0:
      s = np.abs(W[:, j:j + gs]).max(1) / (qmax + 0.5 if full else qmax)
      s[s == 0] = 1
    q = np.clip(np.round(W[:, j] / s), -qmax - full, qmax) * s
    err = (W[:, j] - q) / U[j, j]
    W[:, j:] -= np.outer(err, U[j, j:])
    out[:, j] = q
  return out.T


def _data(k=64, n=16, t=256, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (t, 8)) @ jax.random.normal(ks[1], (8, k))
  x = x + 0.05 * jax.random.normal(ks[2], (t, k))
  x = x.at[:, 5].set(0.0)  # a dead input column
  w = jax.random.normal(ks[3], (k, n))
  return x, w, 2 * x.T @ x / t


@pytest.mark.parametrize("bits,gs,full", [(4, 16, False), (3, 64, False),
                                         (4, 64, False), (4, 16, True)])
def test_matches_float64_reference(bits, gs, full):
  x, w, h = _data()
  q = gptq_quantize(w, h, format=f"int{bits}_{'full' if full else 'narrow'}",
                    group_size=gs, block_size=32)
  ref = gptq_reference(w, h, bits, gs, full=full)
  got = np.asarray(q.materialize(), np.float64)
  same = np.isclose(got, ref, rtol=1e-4, atol=1e-5)
  # float32 vs float64 may flip a rare rounding; on the full grid each
  # group's absmax lands on a tie (-7.5: the same error either way) that the
  # two precisions may break differently
  assert same.mean() > (0.93 if full else 0.98)
  out = lambda v: np.linalg.norm(np.asarray(x, np.float64) @ v)
  assert abs(out(got - np.asarray(w)) - out(ref - np.asarray(w))) < 0.02 * out(
      ref - np.asarray(w))
  assert np.all(got[5] == 0)  # dead column


@pytest.mark.parametrize("kw", [dict(group_size=16), dict(),
                                dict(group_size=16, act_order=True),
                                dict(group_size=16, symmetric=False)])
def test_lower_output_error_than_rtn(kw):
  x, w, h = _data(k=128, n=32, seed=1)
  q = gptq_quantize(w, h, bits=3, block_size=64, **kw)
  q.validate()
  r = quantize_array(w, 3, group_size=kw.get("group_size"),
                     symmetric=kw.get("symmetric", True))
  err = lambda a: float(jnp.linalg.norm(x @ (w - a.materialize())))
  assert err(q) < 0.7 * err(r)


def test_gptq_transform_from_captured_stats():
  from flax import linen as nn
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(16)])
  xs = [jax.random.normal(jax.random.key(i), (32, 32)) for i in range(3)]
  v = model.init(jax.random.key(9), xs[0])
  stats = capture(model, v, xs)
  c = gptq(stats, 4, group_size=16).apply(v)
  r = cj.quantize(v, 4, group_size=16)
  x = jnp.concatenate(xs)
  y = model.apply(v, x)
  err = lambda t: float(jnp.linalg.norm(cj.run(model, t, x) - y))
  assert isinstance(c["params"]["layers_0"]["kernel"], cj.QArray)
  assert err(c) < err(r)


@pytest.mark.parametrize("fmt", ["nf4", "fp4_e2m1", "fp8_e4m3"])
def test_gptq_with_other_formats(fmt):
  x, w, h = _data(k=128, n=32, seed=2)
  q = gptq_quantize(w, h, format=fmt, group_size=32, block_size=64)
  q.validate()
  r = quantize_array(w, format=fmt, group_size=32)
  err = lambda a: float(jnp.linalg.norm(x @ (w - a.materialize())))
  assert err(q) < err(r)


@pytest.mark.parametrize("symmetric", [True, False])
def test_float16_scales_are_stored_and_used(symmetric):
  # Codes are chosen against the float16 scale itself, so the QArray holds
  # float16 scales (exact in a GPTQ checkpoint) and equals (q - z) * s16.
  x, w, h = _data(k=64, n=16, seed=3)
  q = gptq_quantize(w, h, bits=4, group_size=16, block_size=32,
                    symmetric=symmetric, scale_dtype=jnp.float16)
  q32 = gptq_quantize(w, h, bits=4, group_size=16, block_size=32,
                      symmetric=symmetric)
  q.validate()
  assert q.scale.dtype == jnp.float16 and q32.scale.dtype == jnp.float32
  s16 = np.asarray(q.scale, np.float64)
  codes = np.asarray(q.fmt.decode(q.stored_codes()), np.float64)
  z = 0 if q.zero is None else np.asarray(q.zero, np.float64)
  ref = (np.repeat(codes.reshape(4, 16, 16) - np.asarray(z).reshape(
      -1, 1, 16) if q.zero is not None else codes.reshape(4, 16, 16), 1, 0)
         * s16[:, None, :]).reshape(64, 16)
  np.testing.assert_allclose(np.asarray(q.materialize(), np.float64), ref,
                             rtol=1e-6, atol=1e-6)
  # The first group's scale comes from the original W in both runs: the
  # float16 one is the float32 one rounded up (RTN's convention).
  s32 = np.asarray(q32.scale, np.float64)[0]
  assert np.all(s16[0] >= s32) and np.all(s16[0] - s32 <= s32 * 2.0**-10)
  err = lambda a: float(jnp.linalg.norm(x @ (w - a.materialize())))
  assert abs(err(q) - err(q32)) < 0.05 * err(q32)
  assert err(q) < 0.8 * err(quantize_array(w, 4, group_size=16,
                                           symmetric=symmetric))


def test_gptq_transform_takes_scale_dtype():
  with pytest.raises(cj.CompressionError, match="scale_dtype"):
    gptq({}, 4, scale_dtype=jnp.int8)


def test_any_contraction_is_gptq_on_the_2d_view():
  def f(t, x):  # an attention out-projection (heads, head_dim, d)
    return jnp.einsum("blhd,hde->ble", x, t["out"]["kernel"])
  r = np.random.default_rng(5)
  p = {"out": {"kernel": r.standard_normal((4, 8, 6), np.float32)}}
  stats = capture(f, p, [r.standard_normal((2, 6, 4, 8), np.float32)])
  q = gptq(stats, 4, group_size=16).apply(p)["out"]["kernel"]
  st_ = stats["out/kernel"]
  v = st_.view((4, 8, 6))
  want = gptq_quantize(v.to_matrix(p["out"]["kernel"]), st_.hessian, bits=4,
                       group_size=16)
  assert q.contract == (0, 1) and q.shape == (4, 8, 6)
  np.testing.assert_array_equal(v.to_matrix(np.asarray(q.materialize())),
                                np.asarray(want.materialize()))


def _wrappers(w):
  """Leaves that carry a float kernel GPTQ quantizes in place."""
  from compressjax.core.input_transform import InputTransform
  from compressjax.core.pact_input import PactInput
  shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
  return {
      "pact": lambda inner: PactInput(weight=inner, alpha=jnp.float32(1.5),
                                      bits=4, signed=True, shape=shape,
                                      dtype=dtype),
      "act8": lambda inner: InputTransform(weight=inner, scale=None,
                                           signs=None, block=0, act="int8",
                                           shape=shape, dtype=dtype),
  }


@pytest.mark.parametrize("kind", ["pact", "act8"])
def test_gptq_inside_a_wrapper_is_gptq_of_its_kernel_wrapped(kind):
  # The leaf type names what GPTQ quantizes (`targets`): gptq(wrap(W)) ==
  # wrap(gptq(W)) with the same statistics, the wrapper's fields untouched.
  x, w, _ = _data(k=64, n=16, seed=4)
  stats = capture(lambda p, a: a @ p["w"], {"w": w}, [x],
                  default=lambda p, a: True)
  wrap = _wrappers(w)[kind]
  t = gptq(stats, 4, group_size=16, default=lambda p, a: True)
  got = t.apply({"w": wrap(w)})["w"]
  want = wrap(t.apply({"w": w})["w"])
  assert type(got) is type(want) and isinstance(got.weight, cj.QArray)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(got) == jax.tree.structure(want)


def test_gptq_refuses_a_kernel_whose_axes_are_gone():
  # sparse values are a flat list: no Hessian of theirs exists
  x, w, _ = _data(k=64, n=16, seed=4)
  stats = capture(lambda p, a: a @ p["w"], {"w": w}, [x],
                  default=lambda p, a: True)
  sp = cj.sparsify({"w": w}, 0.5, default=lambda p, a: True)
  with pytest.raises(cj.CompressionError, match=r"w.*GPTQ first"):
    gptq(stats, 4, default=lambda p, a: True).apply(sp)
