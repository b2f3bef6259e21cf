"""SparseGPT against a slow, separately written float64 implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.core.errors import CompressionError
from compressjax.sparsity import nm_sparsify, sparsegpt, sparsegpt_prune
from compressjax.sparsity.sparsegpt import _resolve, _sparsegpt


def sparsegpt_reference(w, h, *, sparsity=0.5, nm=None, bs=16, damp=0.01,
                        bits=None, gs=None, symmetric=True, levels=None):
  """Frantar & Alistarh Alg. 1 without lazy batching, float64, W = kernel^T.

  Unstructured: mask per block of `bs` columns, pruning the lowest
  w^2 / U_jj^2 (ties in kernel order, input-major). N:M: per row, the N
  largest of every M columns from the updated weights. Quantization: integer
  grid (or the nearest of sorted `levels`, ties down, e.g. NF4); absmax scales
  per row (N:M) or per tensor (unstructured) from the original W, or per group
  of gs kept values (gs*M/N columns) from the updated W at its start; for N:M
  only over the weights the N:M rule would keep at that point.
  """
  W = np.asarray(w, np.float64).T.copy()
  H = np.asarray(h, np.float64).copy()
  rows, k = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H += damp * np.mean(np.diag(H)) * np.eye(k)
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  d = np.diag(U)
  quant = bits is not None or levels is not None
  if levels is not None:
    lv = np.asarray(levels, np.float64)
    qmax = np.abs(lv).max()
    rnd = lambda y: lv[np.argmin(np.abs(y[:, None] - lv[None, :]), axis=1)]
  elif bits:
    qmin, qmax = (-2**(bits - 1), 2**(bits - 1) - 1) if symmetric else (
        0, 2**bits - 1)
    rnd = lambda y: np.clip(np.round(y), qmin, qmax)

  def scale_zero(x, axis):
    if symmetric:  # levels: max|level|; integers: the full grid, (qmax-qmin)/2
      s = np.abs(x).max(axis) / (qmax if levels is not None else
                                 (qmax - qmin) / 2)
      z = np.zeros_like(s)
    else:
      hi, lo = np.maximum(x.max(axis), 0), np.minimum(x.min(axis), 0)
      s = (hi - lo) / (qmax - qmin)
      s = np.where(s > 0, s, 1.0)
      z = np.clip(np.round(-lo / s), qmin, qmax)
    return np.where(s > 0, s, 1.0), z

  def predicted_kept(x, c0):  # x = W[:, c0:c0 + len]
    out = np.zeros_like(x)
    n, m = nm
    for c in range(0, x.shape[1], m):
      sc = x[:, c:c + m] ** 2 / d[c0 + c:c0 + c + m] ** 2
      for r in range(rows):
        idx = c + np.argsort(-sc[r], kind="stable")[:n]
        out[r, idx] = x[r, idx]
    return out

  span = gs * nm[1] // nm[0] if gs else None
  if quant and not gs:
    s, z = (scale_zero(predicted_kept(W, 0), 1) if nm
            else scale_zero(W.reshape(-1), 0))
  keep = np.zeros((rows, k), bool)
  out = np.zeros((rows, k))
  for j in range(k):
    if nm is None and j % bs == 0:
      blk = slice(j, min(j + bs, k))
      sc = (W[:, blk] ** 2 / d[blk] ** 2).T.ravel()  # kernel order
      kb = np.ones(sc.size, bool)
      kb[np.argsort(sc, kind="stable")[:round(sparsity * sc.size)]] = False
      keep[:, blk] = kb.reshape(-1, rows).T
    if nm and j % nm[1] == 0:
      n, m = nm
      sc = W[:, j:j + m] ** 2 / d[j:j + m] ** 2
      for r in range(rows):
        keep[r, j + np.argsort(-sc[r], kind="stable")[:n]] = True
    if gs and j % span == 0:
      s, z = scale_zero(predicted_kept(W[:, j:j + span], j), 1)
    q = W[:, j].copy()
    if quant:
      q = (rnd(q / s + z) - z) * s
    q = np.where(keep[:, j], q, 0.0)
    err = (W[:, j] - q) / U[j, j]
    W[:, j:] -= np.outer(err, U[j, j:])
    out[:, j] = q
  return out.T, keep.T


def magnitude_reference(w, sparsity):
  """Layer-wise magnitude pruning (the papers' baseline), numpy."""
  w = np.asarray(w, np.float64)
  flat = np.abs(w).ravel()
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = False
  return np.where(keep.reshape(w.shape), w, 0.0)


def _data(k=48, n=32, t=256, seed=0, dead=5):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (t, 12)) @ jax.random.normal(ks[1], (12, k))
  x = x + 0.1 * jax.random.normal(ks[2], (t, k))
  if dead is not None:
    x = x.at[:, dead].set(0.0)  # a dead input column
  w = jax.random.normal(ks[3], (k, n))
  return x, w, 2 * x.T @ x / t


def _out_err(x, w, w_hat):
  x = np.asarray(x, np.float64)
  return float(np.linalg.norm(x @ (np.asarray(w, np.float64)
                                   - np.asarray(w_hat, np.float64))))


# One layer shape (48 inputs, 32 outputs) throughout, so the compiled kernels
# are shared between tests. Unstructured masks use blocks of 32 (32, 16: a
# partial last block), N:M lazy batches of 24.
BS, NM_BS = 32, 24
CASES = [
    dict(sparsity=0.5, block_size=BS),
    dict(sparsity=0.7, block_size=BS),
    dict(pattern="nm", n=2, m=4, block_size=NM_BS),
    dict(pattern="nm", n=4, m=8, block_size=NM_BS),
]


@pytest.mark.parametrize("kw", CASES)
def test_matches_float64_reference(kw):
  x, w, h = _data()
  s = sparsegpt_prune(w, h, **kw)
  s.validate()
  nm = (kw["n"], kw["m"]) if kw.get("pattern") == "nm" else None
  ref, keep = sparsegpt_reference(w, h, sparsity=kw.get("sparsity", 0.5),
                                  nm=nm, bs=kw["block_size"])
  got = np.asarray(s.materialize(), np.float64)
  mask = np.asarray(s.dense_mask() if nm is None else s.materialize() != 0)
  np.testing.assert_array_equal(mask, keep)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)
  assert np.all(got[5] == 0)  # the dead input is pruned


JOINT = [
    dict(bits=4, block_size=BS),  # one scale per tensor
    dict(pattern="nm", bits=3, symmetric=False),  # per output channel
    dict(pattern="nm", format="nf4", group_size=8),  # groups of kept values
]


def _in_pass(w, h, kw):
  """The dense weights the jitted pass itself produced (before storage)."""
  cfg = dict(dict(pattern="unstructured", n=2, m=4, sparsity=0.5), **kw)
  fmt, span = _resolve("<array>", w.shape, cfg)
  nm = cfg["pattern"] == "nm"
  bs = BS if not nm else NM_BS if not span else max(NM_BS // span, 1) * span
  n_prune = jnp.asarray([round(0 if nm else 0.5 * min(bs, w.shape[0] - i)
                               * w.shape[1]) for i in range(0, 48, bs)],
                        jnp.int32)
  q, keep, *_ = _sparsegpt(w, h, n_prune, damp=0.01, nm=nm, n=2, m=4,
                           block_size=bs, fmt=fmt, span=span)
  return np.asarray(q), np.asarray(keep)


@pytest.mark.parametrize("kw", JOINT)
def test_joint_quantization_matches_reference(kw):
  x, w, h = _data(seed=1)
  s = sparsegpt_prune(w, h, **dict(dict(block_size=NM_BS), **kw))
  s.validate()
  assert isinstance(s.values, cj.QArray)
  nm = (2, 4) if kw.get("pattern") == "nm" else None
  ref, keep = sparsegpt_reference(
      w, h, nm=nm, bs=kw.get("block_size", NM_BS), bits=kw.get("bits"),
      gs=kw.get("group_size"), symmetric=kw.get("symmetric", True),
      levels=s.values.fmt.levels if "format" in kw else None)
  got = np.asarray(s.materialize(), np.float64)
  # the stored QArray reproduces the in-pass quantized weights bit for bit
  q, kp = _in_pass(w, h, kw)
  np.testing.assert_array_equal(np.asarray(s.materialize()), q)
  np.testing.assert_array_equal(kp, keep)
  assert np.all(got[~keep] == 0)
  # float32 vs float64 may flip a rare rounding; everything else agrees
  same = np.isclose(got, ref, rtol=1e-4, atol=1e-5)
  assert same.mean() > 0.99
  assert abs(_out_err(x, w, got) - _out_err(x, w, ref)) < 0.01 * _out_err(
      x, w, ref)


@given(sparsity=st.sampled_from([0.1, 0.25, 0.5, 0.6, 0.75, 0.9]),
       seed=st.integers(0, 2**31 - 1))
def test_unstructured_exact_count_per_block(sparsity, seed):
  """Per block of block_size inputs, exactly round(p * B * outputs) go."""
  x, w, h = _data(seed=seed % 1000, dead=seed % 48)
  s = sparsegpt_prune(w, h, sparsity=sparsity, block_size=BS)
  mask = np.asarray(s.dense_mask())
  for i1 in range(0, 48, BS):
    blk = mask[i1:i1 + BS]
    assert (~blk).sum() == round(sparsity * blk.size)
  assert s.values.shape == (mask.sum(),)


@given(nm=st.sampled_from([(2, 4), (4, 8)]),
       seed=st.integers(0, 2**31 - 1))
def test_nm_exactly_n_of_every_m(nm, seed):
  n, m = nm
  x, w, h = _data(seed=seed % 1000, dead=seed % 48)
  s = sparsegpt_prune(w, h, pattern="nm", n=n, m=m, block_size=NM_BS)
  s.validate()
  dense = s.materialize()
  runs = np.asarray(dense).reshape(48 // m, m, 32)
  assert np.all((runs != 0).sum(1) == n)
  assert s.values.shape == (48 // m * n, 32)
  # the same compact layout as the magnitude helper given this mask
  ref = nm_sparsify(dense, n, m, 0, scores=dense != 0)
  np.testing.assert_array_equal(np.asarray(s.values), np.asarray(ref.values))
  np.testing.assert_array_equal(np.asarray(s.indices),
                                np.asarray(ref.indices))


@pytest.mark.parametrize("kw,mag", [
    (dict(sparsity=0.5, block_size=BS), lambda w: magnitude_reference(w, 0.5)),
    (dict(pattern="nm", n=2, m=4, block_size=NM_BS),
     lambda w: nm_sparsify(w, 2, 4).materialize()),
])
def test_lower_output_error_than_magnitude_on_correlated_inputs(kw, mag):
  x, w, h = _data(t=512, seed=5)  # X = Z A: 12 latents mixed into 48 inputs
  s = sparsegpt_prune(w, h, **kw)
  e_sg = _out_err(x, w, s.materialize())
  e_mag = _out_err(x, w, mag(w))
  assert e_sg < 0.6 * e_mag


@pytest.mark.parametrize("kw,chain_kw", [
    (JOINT[0], dict()),
    (JOINT[1], dict(symmetric=False)),
])
def test_joint_quantization_beats_prune_then_round(kw, chain_kw):
  x, w, h = _data(t=512, seed=4)
  joint = sparsegpt_prune(w, h, **dict(dict(block_size=NM_BS), **kw))
  pruned = sparsegpt_prune(w, h, **dict(dict(block_size=NM_BS), **{
      a: b for a, b in kw.items() if a not in ("bits", "symmetric")}))
  chained = cj.quantize({"k": pruned}, kw["bits"], default=lambda p, x: True,
                        **chain_kw)["k"]
  assert joint.values.scale.shape == chained.values.scale.shape
  assert _out_err(x, w, joint.materialize()) < _out_err(
      x, w, chained.materialize())


@functools.lru_cache(maxsize=None)
def _model_and_stats():
  from flax import linen as nn
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(16)])
  mix = jax.random.normal(jax.random.key(99), (8, 32))  # correlated inputs
  xs = [jax.random.normal(jax.random.key(i), (64, 8)) @ mix
        + 0.1 * jax.random.normal(jax.random.key(50 + i), (64, 32))
        for i in range(3)]
  v = model.init(jax.random.key(9), xs[0])
  return model, v, xs, capture(model, v, xs)


def test_transform_from_captured_stats():
  model, v, xs, stats = _model_and_stats()
  x = jnp.concatenate(xs)
  y = model.apply(v, x)
  # 2:4 + int4 in one pass for layer 0; a rule keeps layer 2 unstructured
  t = sparsegpt(stats, pattern="nm", bits=4, group_size=16, rules=[(
      r".*layers_2/kernel", dict(pattern="unstructured", sparsity=0.75,
                                 bits=None, group_size=None))])
  c = t.apply(v)
  k0, k2 = c["params"]["layers_0"]["kernel"], c["params"]["layers_2"]["kernel"]
  assert isinstance(k0, cj.NMSparseArray) and isinstance(k0.values, cj.QArray)
  assert isinstance(k2, cj.SparseArray) and k2.sparsity == 0.75
  # magnitude baseline (same patterns, not even quantized), numpy
  ref = jax.tree.map(lambda a: a, v)
  k = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)
  runs = np.abs(k).reshape(-1, 4, k.shape[1])
  drop = np.argsort(runs, axis=1, kind="stable")[:, :2]  # 2 smallest of 4
  mask = np.ones_like(runs, bool)
  np.put_along_axis(mask, drop, False, axis=1)
  ref["params"]["layers_0"]["kernel"] = jnp.asarray(
      np.where(mask.reshape(k.shape), k, 0), jnp.float32)
  ref["params"]["layers_2"]["kernel"] = jnp.asarray(magnitude_reference(
      v["params"]["layers_2"]["kernel"], 0.75), jnp.float32)
  err_c = float(jnp.linalg.norm(model.apply(cj.materialize_tree(c), x) - y))
  err_ref = float(jnp.linalg.norm(model.apply(ref, x) - y))
  assert err_c < 0.8 * err_ref


def test_transform_errors_name_the_path():
  model, v, xs, stats = _model_and_stats()
  partial = {p: s for p, s in stats.items() if "layers_2" not in p}
  with pytest.raises(CompressionError, match="statistics.*layers_2/kernel"):
    sparsegpt(partial).init(v)
  with pytest.raises(CompressionError, match=r"M=3 .*layers_0/kernel"):
    sparsegpt(stats, pattern="nm", n=1, m=3).init(v)
  with pytest.raises(CompressionError, match="group_size.*layers_0"):
    sparsegpt(stats, bits=4, group_size=16).init(v)  # unstructured groups
  with pytest.raises(CompressionError, match="multiple of N=2"):
    sparsegpt(stats, pattern="nm", bits=4, group_size=3).init(v)
  with pytest.raises(CompressionError, match="absmax"):
    sparsegpt(stats, pattern="nm", format="mxfp4").init(v)
  with pytest.raises(CompressionError, match="block"):
    sparsegpt(stats, pattern="block").init(v)
  with pytest.raises(CompressionError, match="float kernel"):
    cj.chain(cj.transforms.quantize(4), sparsegpt(stats)).apply(v)
  with pytest.raises(CompressionError, match="does not match"):
    sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(6), path="k")


def test_any_contraction_is_the_paper_on_the_2d_view():
  def f(t, x):  # an out-projection (heads, head_dim, d), a 'SAME' 1-D conv
    h = jnp.einsum("blhd,hde->ble", x, t["out"]["kernel"])
    return jax.lax.conv_general_dilated(
        h, t["conv"]["kernel"], (1,), "SAME",
        dimension_numbers=("NWC", "WIO", "NWC"))
  r = np.random.default_rng(4)
  p = {"out": {"kernel": r.standard_normal((4, 3, 8), np.float32)},
       "conv": {"kernel": r.standard_normal((3, 8, 6), np.float32)}}
  xs = [r.standard_normal((2, 6, 4, 3), np.float32) for _ in range(2)]
  stats = capture(f, p, xs)
  t = sparsegpt(stats, 0.5, rules=[("conv/kernel", dict(pattern="nm"))])
  c = t.apply(p)
  for name, kw in (("out", {}), ("conv", dict(pattern="nm"))):
    st_ = stats[f"{name}/kernel"]
    v = st_.view(p[name]["kernel"].shape)
    want = sparsegpt_prune(v.to_matrix(p[name]["kernel"]), st_.hessian, **kw)
    np.testing.assert_array_equal(
        v.to_matrix(np.asarray(c[name]["kernel"].materialize())),
        np.asarray(want.materialize()))
  assert isinstance(c["conv"]["kernel"], cj.NMSparseArray)
  assert c["conv"]["kernel"].axis == 1
  with pytest.raises(CompressionError, match=r"M=4 does not divide.*"
                     r"out/kernel"):
    sparsegpt(stats, pattern="nm").apply(p)
  with pytest.raises(CompressionError, match=r"joint quantization.*axes "
                     r"\(0, 1\).*(out|conv)/kernel"):
    sparsegpt(stats, 0.5, bits=4).apply(p)
