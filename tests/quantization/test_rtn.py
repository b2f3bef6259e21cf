"""Round-to-nearest: error bounds, exact storage, definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tests.budget import COMPILING_EXAMPLES

import compressjax as cj
from compressjax import transforms as T
from compressjax.core.contraction import apply_groups
from compressjax.quantization import quantize_array


def _scale_full(q):
  """The scale repeated to the array's shape."""
  lay = q.layout
  return lay.from_matrix(apply_groups(jnp.zeros((lay.k, lay.n)),
                                      q.scale.astype(jnp.float32),
                                      lambda a, b: a + b))


@settings(max_examples=COMPILING_EXAMPLES)  # each example compiles
@given(bits=st.integers(2, 8), symmetric=st.booleans(),
       gran=st.sampled_from(["tensor", "channel", 4, 8]),
       k=st.sampled_from([8, 16, 24]), n=st.integers(1, 6),
       scale_dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_rtn_error_at_most_half_scale(bits, symmetric, gran, k, n, scale_dtype,
                                      seed):
  w = jax.random.normal(jax.random.key(seed), (k, n)) * 3.0
  g = gran if isinstance(gran, int) else None
  q = quantize_array(w, bits, group_size=g, symmetric=symmetric,
                     per_tensor=gran == "tensor", scale_dtype=scale_dtype)
  q.validate()
  err = jnp.abs(w - q.materialize())
  bound = _scale_full(q) / 2
  # float32 rounding of (q - z) * s adds at most a few ulps of |w|
  assert bool(jnp.all(err <= bound * (1 + 1e-6) + 1e-6 * jnp.abs(w)))
  assert q.scale.dtype == scale_dtype


@given(bits=st.integers(2, 8), symmetric=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_codes_in_range_and_definition(bits, symmetric, seed):
  w = jax.random.normal(jax.random.key(seed), (16, 3))
  q = quantize_array(w, bits, group_size=8, symmetric=symmetric)
  fmt = q.fmt
  vals = fmt.decode(q.stored_codes())
  assert bool(jnp.all((vals >= fmt.qmin) & (vals <= fmt.qmax)))
  assert bool(jnp.all(vals == jnp.round(vals)))
  # w_hat == (q - z) * s exactly as documented
  z = 0.0 if q.zero is None else jnp.repeat(q.zero.astype(jnp.float32), 8, 0)
  s = jnp.repeat(q.scale, 8, 0)
  np.testing.assert_array_equal(np.asarray(q.materialize()),
                                np.asarray((vals - z) * s))


def test_rtn_is_nearest_grid_point():
  # with the scale fixed, no other code is closer to w
  w = jax.random.normal(jax.random.key(0), (32, 4))
  q = quantize_array(w, 4)
  s = q.scale
  grid = jnp.arange(q.fmt.qmin, q.fmt.qmax + 1, dtype=jnp.float32)
  best = jnp.min(jnp.abs(w[..., None] - grid * s[..., None]), axis=-1)
  np.testing.assert_allclose(jnp.abs(w - q.materialize()), best, atol=1e-6)


@pytest.mark.parametrize("bits,group,expected_bpw", [
    (8, None, 8 + 32 / 256), (4, 128, 4 + 32 / 128), (4, 64, 4.5),
    (3, 128, 3 + 32 / 128), (2, 32, 3.0)])
def test_storage_is_really_packed(bits, group, expected_bpw):
  w = jax.random.normal(jax.random.key(1), (256, 64))
  q = quantize_array(w, bits, group_size=group)
  assert q.codes.dtype in (jnp.uint8, jnp.int8)
  assert q.codes.shape == (256 * bits // 8, 64)
  assert q.bits_per_weight == pytest.approx(expected_bpw)


def test_asymmetric_zero_points_and_nbytes():
  w = jax.random.uniform(jax.random.key(2), (128, 8), minval=0.5, maxval=2.0)
  q = quantize_array(w, 4, group_size=32, symmetric=False)
  assert q.zero is not None and q.zero.dtype == jnp.uint8
  assert q.nbytes == 128 * 8 // 2 + 4 * 8 * 4 + 4 * 8
  # asymmetric uses the whole range: better than symmetric on positive data
  qs = quantize_array(w, 4, group_size=32)
  assert jnp.linalg.norm(w - q.materialize()) < jnp.linalg.norm(
      w - qs.materialize())


def test_all_zero_group_is_exact():
  w = jnp.zeros((16, 4)).at[8:].set(1.0)
  for fmt in ("int4_narrow", "int4_full", "int4_asym"):
    q = quantize_array(w, format=fmt, group_size=8)
    d = np.asarray(q.materialize())
    np.testing.assert_array_equal(d[:8], 0.0)
    # a constant group: exact on grids where its absmax is a level; the full
    # symmetric grid maps it to qmax + 1/2, rounded down: error s / 2
    want = 7 / 7.5 if fmt == "int4_full" else 1.0
    np.testing.assert_allclose(d[8:], want, rtol=1e-6)


def test_dtype_preserved_and_tree_transform():
  p = {"params": {"dense": {"kernel": jnp.ones((8, 4), jnp.bfloat16),
                            "bias": jnp.ones((4,), jnp.bfloat16)}}}
  c = cj.quantize(p, 8)
  k = c["params"]["dense"]["kernel"]
  assert isinstance(k, cj.QArray) and k.materialize().dtype == jnp.bfloat16
  assert c["params"]["dense"]["bias"] is p["params"]["dense"]["bias"]


# -- contraction axes: groups along the flattened contraction, scales per
# output feature (every other axis) ------------------------------------------

def np_rtn(w, contract, group, bits, narrow):
  """Independent float32 reading: move the contraction axes first, flatten
  to (K, N), symmetric absmax RTN per group of rows and column, move back."""
  w = np.asarray(w, np.float32)
  rest = [d for d in range(w.ndim) if d not in contract]
  perm = list(contract) + rest
  m = w.transpose(perm).reshape(
      int(np.prod([w.shape[d] for d in contract])), -1)
  k, n = m.shape
  g = m.reshape(k // (group or k), group or k, n)
  qmax = 2**(bits - 1) - 1
  s = np.abs(g).max(1, keepdims=True) / np.float32(qmax if narrow else
                                                   qmax + 0.5)
  s = np.where(s > 0, s, np.float32(1))
  y = g / s
  q = np.clip(np.round(y), -qmax - (0 if narrow else 1), qmax) * s
  # on the full grid a negative group absmax sits on a rounding tie (-7.5 at
  # 4 bits): either neighbour has the same error, one step apart
  tie = np.abs(np.abs(y) - (qmax + 0.5)) < 1e-5
  back = lambda a: a.reshape(k, n).reshape([w.shape[d] for d in perm]
                                           ).transpose(np.argsort(perm))
  return back(q), back(np.broadcast_to(s, g.shape) * tie)


HEADS = np.array([1.0, 0.1, 0.01, 10.0], np.float32)


def _heads_kernel(seed, shape, head_axis):
  w = np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)
  sh = [1] * len(shape)
  sh[head_axis] = len(HEADS)
  return w * HEADS.reshape(sh)


def _per_head_err(w, w_hat, head_axis):
  d = np.moveaxis(np.asarray(w_hat) - w, head_axis, 0).reshape(len(HEADS), -1)
  ref = np.moveaxis(w, head_axis, 0).reshape(len(HEADS), -1)
  return np.linalg.norm(d, axis=1) / np.linalg.norm(ref, axis=1)


@pytest.mark.parametrize("shape,head_axis,contract,group,bits", [
    ((64, 4, 16), 1, (0,), None, 8),     # in-projection (d, heads, head_dim)
    ((64, 4, 16), 1, (0,), 16, 4),
    ((4, 16, 64), 0, (0, 1), 16, 4),     # out-projection: heads contracted
    ((3, 3, 8, 4), 3, (0, 1, 2), 24, 4),  # conv HWIO, groups span kh/kw
])
def test_nd_kernels_match_numpy_and_the_2d_case(shape, head_axis, contract,
                                                group, bits):
  w = _heads_kernel(len(shape) + bits, shape, head_axis)
  q = quantize_array(jnp.asarray(w), bits, group_size=group)  # default axes
  assert q.contract == contract
  for narrow in (True, False):
    qn = quantize_array(jnp.asarray(w), format=cj.IntFormat(
        bits, narrow_range=narrow), group_size=group)
    ref, tie_step = np_rtn(w, contract, group, bits, narrow)
    d = np.abs(np.asarray(qn.materialize()) - ref)
    assert np.all(d <= 1e-6 * np.abs(w) + 1.0001 * tie_step)
  # the same weights as the 2-D (K, N) matrix give the same numbers, so the
  # per-head relative errors are the 2-D case's whatever the head scales
  lay = q.layout
  q2 = quantize_array(lay.to_matrix(jnp.asarray(w)), bits, group_size=group)
  np.testing.assert_array_equal(np.asarray(lay.to_matrix(q.materialize())),
                                np.asarray(q2.materialize()))
  err = _per_head_err(w, q.materialize(), head_axis)
  err2 = _per_head_err(w, lay.from_matrix(q2.materialize()), head_axis)
  np.testing.assert_allclose(err, err2, rtol=1e-6)
  if head_axis not in contract or group == shape[1]:
    # one scale per head (output features, or groups inside one head): every
    # head keeps the error of its own grid (int8 ~0.006, int4 ~0.1)
    assert err.max() < (0.01 if bits == 8 else 0.15), err
    assert err.max() / err.min() < 1.5


def test_per_channel_means_per_output_feature():
  w = jnp.asarray(_heads_kernel(0, (64, 4, 16), 1))
  q = quantize_array(w, 8)
  assert q.scale.shape == (1, 64) and q.describe() == "int8 c"
  row = cj.layer_report({"k": w}, {"k": q})[0]
  assert row.format == "int8 c"


@pytest.mark.parametrize("kw,match", [
    (dict(format="int8", bits=4), r"bits=4 conflicts with format='int8'"),
    (dict(bits=4, axis=2), r"axis 2 out of range for shape \(16, 8\)"),
    (dict(bits=4, axis=-3), r"axis -3 out of range"),
    (dict(bits=4, key=0), r"key must be one jax PRNG key"),
    (dict(bits=4, key=jnp.zeros(3)), r"key must be one jax PRNG key"),
    (dict(bits=4, group_size=8, per_tensor=True), r"not both"),
    (dict(format="nvfp4", double_quant=True), r"double_quant"),
    (dict(format="nvfp4", group_size=16), r"own blocks of 16; drop"),
    (dict(format="mxfp4"), r"mxfp4 blocks of 32 do not divide in_features 16"),
])
def test_bad_quantize_configs_name_the_path_and_fix(kw, match):
  tree = {"blk": {"kernel": jnp.ones((16, 8))}}
  with pytest.raises(cj.CompressionError, match=match) as e:
    cj.quantize(tree, **kw)
  assert e.value.path == "blk/kernel"


@pytest.mark.parametrize("kw,match", [
    (dict(bits=4, symmetric="no"), r"option symmetric='no' must be bool"),
    (dict(bits=4, group_size=8.0), r"option group_size=8.0 must be int or "
     r"None"),
    (dict(bits=4, scale_dtype=jnp.int8), r"scale_dtype=.* must be a float"),
])
def test_bad_option_types_fail_when_the_transform_is_built(kw, match):
  with pytest.raises(cj.CompressionError, match=match):
    T.quantize(**kw)
  w = jnp.ones((16, 8))  # quantize_array checks the same, naming the path
  with pytest.raises(cj.CompressionError) as e:
    quantize_array(w, path="blk/kernel", **kw)
  assert e.value.path == "blk/kernel"


def test_scalar_param_forced_by_a_rule():
  with pytest.raises(cj.CompressionError, match="0-D") as e:
    cj.quantize({"s": jnp.float32(2.0)}, 8, rules=[("s", {})])
  assert e.value.path == "s"


def test_conv_kernels_work_with_the_default_axes():
  from flax import linen as nn
  model = nn.Conv(8, (3, 3))
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 8))
  v = model.init(jax.random.key(1), x)
  c = cj.quantize(v, 4, group_size=24)  # K = 3*3*8 = 72 = 3 groups
  k = c["params"]["kernel"]
  assert k.contract == (0, 1, 2) and k.scale.shape == (3, 8)
  y = cj.run(model, c, x)
  np.testing.assert_allclose(y, model.apply(cj.materialize_tree(c), x),
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.linalg.norm(y - model.apply(v, x)) /
               jnp.linalg.norm(model.apply(v, x))) < 0.2


def test_rule_declares_other_contraction_axes():
  w = jnp.asarray(_heads_kernel(3, (4, 16, 32), 0))  # e.g. MoE (experts, in, out)
  q = cj.quantize({"experts": w}, 8, rules=[("experts", dict(axis=1))])[
      "experts"]
  assert q.contract == (1,) and q.scale.shape == (1, 4 * 32)
  err = _per_head_err(np.asarray(w), q.materialize(), 0)
  assert err.max() < 0.01  # one scale per expert and output
