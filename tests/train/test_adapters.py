"""compressjax.train.adapters: LoRA on float and compressed bases through
cj.run (values and gradients equal the materialized tree's, the base never
materialized in the forward pass), LoftQ / PiSSA against float64 SVD
references, training only the adapters, merge, adapter checkpoints, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressjax as cj
from compressjax.core.qarray import QArray
from compressjax.quantization.rtn import quantize_array
from compressjax.train import adapters, loop
from compressjax.train.adapters import LoRA

MODEL = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
X = jax.random.normal(jax.random.key(1), (6, 48))


@functools.cache
def _params():
  # jitted, as every transform below: one compile beats eager op dispatch
  return jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, 48)))


def _apply(t, p):
  return jax.jit(t.apply)(p)


def _nudge(ad, seed=3):
  """Non-zero b (and perturbed a), so the adapter path is exercised."""
  r = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: x + 0.05 * r.normal(size=x.shape).astype(np.float32), ad)


T = cj.transforms
BASES = {
    "float": None,
    "int4_g16": T.quantize(4, group_size=16),
    "nf4_dq": T.quantize(format="nf4", group_size=16, double_quant=True),
    "sparse": T.sparsify(0.5),
    "lowrank": T.low_rank(rank_ratio=0.5),
}


@pytest.mark.parametrize("base", list(BASES))
def test_run_and_grads_equal_the_materialized_tree(base, monkeypatch):
  p = _params()
  if BASES[base] is not None:
    # sparsify sizes its storage from the values: not jittable
    p = (BASES[base].apply(p) if base == "sparse"
         else _apply(BASES[base], p))
  tree = _apply(adapters.lora(4, alpha=8.0), p)
  kern = tree["params"]["layers_0"]["kernel"]
  assert isinstance(kern, LoRA) and kern.rank == 4 and kern.scale == 2.0
  ad, rest = adapters.partition(tree)
  # only a and b are trainable
  assert len(jax.tree.leaves(ad)) == 4
  ad = _nudge(ad)

  # rest is an argument: jit would stage the validation of closed-over
  # (concrete) leaves, which a SparseArray's mask check cannot take
  def run_loss(ad, rest):
    return jnp.sum(cj.run(MODEL, cj.combine(ad, rest), X) ** 2)

  def dense_loss(ad, rest):
    dense = cj.materialize_tree(cj.combine(ad, rest))
    return jnp.sum(MODEL.apply(dense, X) ** 2)

  # the forward never dequantizes a QArray base of the kernels' shape (the
  # spy runs while the forward is traced)
  seen = []
  orig = QArray.materialize
  monkeypatch.setattr(QArray, "materialize",
                      lambda self: seen.append(self.shape) or orig(self))
  jax.eval_shape(run_loss, ad, rest)
  assert not {(48, 64), (64, 32)} & set(seen), seen
  monkeypatch.undo()
  y, g_run = jax.jit(jax.value_and_grad(run_loss))(ad, rest)
  y_dense, g_dense = jax.jit(jax.value_and_grad(dense_loss))(ad, rest)
  np.testing.assert_allclose(y, y_dense, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_run), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4 * np.abs(b).max())


def test_leaf_contract_against_numpy():
  p = _params()
  tree = _apply(adapters.lora(4, alpha=8.0, format="nf4", group_size=16,
                              double_quant=True), p)
  leaf = tree["params"]["layers_0"]["kernel"]
  leaf.validate()
  a, b = [np.asarray(x, np.float64) for x in (leaf.a, leaf.b)]
  np.testing.assert_array_equal(b, 0)  # standard init: the base model
  assert abs(a.std() * np.sqrt(48) - 1) < 0.2
  leaf = LoRA(base=leaf.base, a=leaf.a, b=leaf.b + 0.1, shape=leaf.shape,
              dtype=leaf.dtype, alpha=leaf.alpha)
  ref = (np.asarray(leaf.base.materialize(), np.float64)
         + 2.0 * a @ np.asarray(leaf.b, np.float64))
  np.testing.assert_allclose(leaf.materialize(), ref, rtol=1e-5, atol=1e-6)
  # nbytes: the NF4 base (with its 8-bit scales) plus the float32 factors
  assert leaf.nbytes == leaf.base.nbytes + 4 * (48 * 4 + 4 * 64)
  assert isinstance(leaf.base.scale, QArray)  # double quantization


def test_loftq_and_pissa_against_float64_svd():
  w = np.asarray(jax.random.normal(jax.random.key(5), (64, 48)) * 0.1)
  q = lambda x: quantize_array(x, 2, group_size=16)
  r, alpha = 4, 8.0
  # T = 1: Q = q(w), s a b = the rank-r truncated SVD of w - Q
  loftq = jax.jit(lambda w, t: adapters.loftq(w, r, q, alpha=alpha, iters=t),
                  static_argnums=1)
  base, a, b = loftq(w, 1)
  res = w - np.asarray(base.materialize(), np.float64)
  sv = np.linalg.svd(res, compute_uv=False)
  err = w - np.asarray(base.materialize(), np.float64) - (alpha / r) * (
      np.asarray(a, np.float64) @ np.asarray(b, np.float64))
  np.testing.assert_allclose(np.linalg.norm(err), np.sqrt(np.sum(sv[r:]**2)),
                             rtol=1e-4)
  # more alternations approximate w better than plain quantization
  base5, a5, b5 = loftq(w, 5)
  err5 = w - base5.materialize() - (alpha / r) * (a5 @ b5)
  rtn_err = np.linalg.norm(w - q(w).materialize())
  # (alternating is not monotone in general: both beat plain quantization)
  assert max(np.linalg.norm(err5), np.linalg.norm(err)) < 0.9 * rtn_err
  # PiSSA: base + s a b == w; s a b the best rank-r approximation
  res, a, b = jax.jit(lambda w: adapters.pissa(w, r, alpha=alpha))(w)
  u, s, vt = np.linalg.svd(w)
  top = (u[:, :r] * s[:r]) @ vt[:r]
  np.testing.assert_allclose((alpha / r) * np.asarray(a) @ np.asarray(b), top,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(res) + top, w, atol=1e-5)


def test_loftq_transform_starts_closer_than_standard():
  p = _params()
  kw = dict(bits=2, group_size=16, alpha=8.0)
  std = _apply(adapters.lora(8, **kw), p)
  lq = _apply(adapters.lora(8, init="loftq", iters=3, **kw), p)
  ref = MODEL.apply(p, X)
  fwd = jax.jit(lambda t: cj.run(MODEL, t, X))
  e = lambda t: float(jnp.mean((fwd(t) - ref) ** 2))
  assert e(lq) < 0.7 * e(std)
  assert isinstance(lq["params"]["layers_2"]["kernel"].base, QArray)
  pi = _apply(adapters.lora(8, init="pissa", alpha=8.0), p)
  np.testing.assert_allclose(fwd(pi), ref, atol=1e-5)


def test_train_adapters_only_merge_and_checkpoint(tmp_path):
  p = _params()
  tree = _apply(adapters.lora(4, bits=4, group_size=16), p)
  ad, rest = adapters.partition(tree)
  target = jnp.sin(X[:, :32])

  def loss_fn(ad, batch, rng):
    out = cj.run(MODEL, cj.combine(ad, rest), batch)
    return jnp.mean((out - target) ** 2)

  out = loop.train(loss_fn, ad, optax.adam(1e-2), lambda s: X, steps=30,
                   log_every=10, progress=False)
  losses = [h["loss"] for h in out.history]
  assert losses[-1] < 0.5 * losses[0], losses
  trained = cj.combine(out.params, rest)
  # the base is untouched
  for k in ("layers_0", "layers_2"):
    np.testing.assert_array_equal(trained["params"][k]["kernel"].base.codes,
                                  tree["params"][k]["kernel"].base.codes)
  # merge into float, or re-quantize the merged weight
  merged = jax.jit(adapters.merge)(trained)
  np.testing.assert_allclose(MODEL.apply(merged, X),
                             cj.run(MODEL, trained, X), rtol=1e-4, atol=1e-5)
  rq = jax.jit(lambda t: adapters.merge(t, bits=8))(trained)
  k = rq["params"]["layers_0"]["kernel"]
  assert isinstance(k, QArray)
  np.testing.assert_array_equal(
      k.codes, quantize_array(merged["params"]["layers_0"]["kernel"],
                              8).codes)
  # adapters alone on disk, loaded into a fresh tree on the same base
  adapters.save(str(tmp_path / "ad"), trained)
  back = adapters.restore(str(tmp_path / "ad"), tree)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(x, y)
  other = _apply(adapters.lora(2, bits=4, group_size=16), p)
  with pytest.raises(cj.CompressionError, match="another rank.*layers_0"):
    adapters.restore(str(tmp_path / "ad"), other)


def test_bad_inputs_name_the_param():
  p = _params()
  with pytest.raises(cj.CompressionError,
                     match=r"rank 40 exceeds min\(m, n\) = 32.*layers_2"):
    adapters.lora(40).apply(p)
  with pytest.raises(cj.CompressionError,
                     match=r"matmul kernel.*params/layers_0/bias"):
    adapters.lora(4, rules=[(r".*bias", {})]).apply(p)
  with pytest.raises(cj.CompressionError, match="quantizer.*layers_0"):
    adapters.lora(4, init="loftq").apply(p)
  q = cj.quantize(p, 4)
  with pytest.raises(cj.CompressionError, match="float weight.*QArray"):
    adapters.lora(4, init="pissa").apply(q)
  with pytest.raises(cj.CompressionError, match="already a QArray"):
    adapters.lora(4, bits=4).apply(q)
  with pytest.raises(cj.CompressionError, match="already has an adapter"):
    adapters.lora(4).apply(adapters.lora(4).apply(p))
  with pytest.raises(cj.CompressionError, match="rank"):
    adapters.lora(0)
