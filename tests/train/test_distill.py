"""Distillation losses against numpy references, intermediates capture, the
loss_fn's gradient flow, a short distillation run and teacher sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import compressjax as cj
from compressjax.models.transformer import (TransformerConfig, TransformerLM,
                                            next_token_loss)
from compressjax.train import distill as D

TEACHER = TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64,
                            seq_len=16)
STUDENT = TransformerConfig(d_model=16, n_layers=1, n_heads=1, d_mlp=32,
                            seq_len=16)
B, L = 4, 12


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_softmax(z):
  return np.exp(_np_log_softmax(z))


def _logits(seed, shape=(3, 5, 11)):
  r = np.random.default_rng(seed)
  return (r.normal(size=shape) * 2).astype(np.float32), (
      r.normal(size=shape) * 2).astype(np.float32), r.integers(
          0, shape[-1], shape[:-1])


_kd = jax.jit(lambda s, t, y, T, a: D.kd_loss(s, t, y, temperature=T,
                                              alpha=a))


@given(seed=st.integers(0, 2**16), T=st.floats(0.5, 5.0),
       a=st.floats(0.0, 1.0))
def test_kd_loss_matches_numpy(seed, T, a):
  zs, zt, y = _logits(seed)
  pt = _np_softmax(zt / T)
  kl = (pt * (_np_log_softmax(zt / T) - _np_log_softmax(zs / T))).sum(-1)
  ce = -np.take_along_axis(_np_log_softmax(zs), y[..., None], -1)[..., 0]
  want = a * T * T * kl.mean() + (1 - a) * ce.mean()
  np.testing.assert_allclose(_kd(zs, zt, y, T, a), want, rtol=2e-5,
                             atol=1e-6)


def test_kd_loss_special_cases():
  zs, zt, y = _logits(0)
  # Student == teacher: no KL, only the hard term is left.
  kl, ce = D.kd_terms(zt, zt, y, temperature=3.0)
  assert abs(float(kl)) < 1e-6
  # T^2 scaling of the soft term (no labels: the loss is T^2 KL).
  kl3, _ = D.kd_terms(zs, zt, temperature=3.0)
  np.testing.assert_allclose(D.kd_loss(zs, zt, temperature=3.0), 9 * kl3,
                             rtol=1e-6)
  # alpha = 0: plain next-token cross entropy.
  np.testing.assert_allclose(
      D.kd_loss(zs, zt, y, alpha=0.0),
      next_token_loss(jnp.asarray(zs), jnp.asarray(y)).mean(), rtol=1e-6)
  # A mask averages over the kept tokens only.
  m = np.zeros(y.shape, np.float32)
  m[:, :2] = 1
  np.testing.assert_allclose(
      D.kd_loss(zs, zt, y, mask=m), D.kd_loss(zs[:, :2], zt[:, :2], y[:, :2]),
      rtol=1e-6)


_kd_grad = jax.jit(jax.grad(
    lambda s, t, y, T, a: D.kd_loss(s, t, y, temperature=T, alpha=a)))


@given(seed=st.integers(0, 2**16), T=st.floats(0.5, 5.0),
       a=st.floats(0.0, 1.0))
def test_kd_gradient_closed_form(seed, T, a):
  zs, zt, y = _logits(seed)
  n = y.size
  onehot = np.eye(zs.shape[-1])[y]
  # Hinton et al. 2015, Eq. 2 with the T^2 factor: the soft term's gradient
  # is a*T*(p_s^T - p_t^T)/N; the hard term adds (1-a)*(p_s - y)/N.
  want = (a * T * (_np_softmax(zs / T) - _np_softmax(zt / T))
          + (1 - a) * (_np_softmax(zs) - onehot)) / n
  np.testing.assert_allclose(_kd_grad(zs, zt, y, T, a), want, atol=1e-6)


def test_uniform_layer_map():
  assert D.uniform_layer_map(2, 4) == [1, 3]
  assert D.uniform_layer_map(3, 12) == [3, 7, 11]
  assert D.uniform_layer_map(1, 2) == [1]
  assert D.uniform_layer_map(2, 2) == [0, 1]
  with pytest.raises(ValueError):
    D.hidden_loss([jnp.zeros((1, 2, 3))], [jnp.zeros((1, 2, 3))], None, [1])


def _hiddens(seed, n, d, shape=(2, 5)):
  r = np.random.default_rng(seed)
  return [r.normal(size=shape + (d,)).astype(np.float32) for _ in range(n)]


def test_hidden_loss_zero_and_layer_map():
  h = _hiddens(0, 3, 8)
  eye = D.init_projections(jax.random.key(0), 8, 8, [0, 1, 2], identity=True)
  for kind in ("mse", "cosine"):
    assert float(D.hidden_loss(h, h, eye, None, kind)) < 1e-6
    assert float(D.hidden_loss(h, h, None, None, kind)) < 1e-6
  # Student layer 0 <-> teacher layer 2 only: equal there, zero loss.
  s = [h[2]]
  assert float(D.hidden_loss(s, h, None, [2])) < 1e-6
  assert float(D.hidden_loss(s, h, None, [0])) > 0.5
  assert float(D.hidden_loss(s, h, None, {0: 2})) < 1e-6


@given(seed=st.integers(0, 2**16))
def test_hidden_loss_matches_numpy(seed):
  hs, ht = _hiddens(seed, 2, 6), _hiddens(seed + 1, 4, 10)
  lm = [1, 3]
  proj = D.init_projections(jax.random.key(seed), 6, 10, lm)
  proj["layer_0"]["bias"] = jnp.linspace(-1, 1, 10)
  ref_mse, ref_cos = [], []
  for i, j in enumerate(lm):
    p = proj[f"layer_{i}"]
    y = hs[i] @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    ref_mse.append(((y - ht[j]) ** 2).mean())
    cos = (y * ht[j]).sum(-1) / (np.linalg.norm(y, axis=-1)
                                 * np.linalg.norm(ht[j], axis=-1))
    ref_cos.append((1 - cos).mean())
  np.testing.assert_allclose(D.hidden_loss(hs, ht, proj, lm),
                             np.mean(ref_mse), rtol=1e-4)
  np.testing.assert_allclose(D.hidden_loss(hs, ht, proj, lm, "cosine"),
                             np.mean(ref_cos), rtol=1e-4, atol=1e-6)


def _attn(seed, n, h, b=2, t=5):
  r = np.random.default_rng(seed)
  causal = np.tril(np.ones((t, t), bool))
  z = np.where(causal, r.normal(size=(n, b, h, t, t)), -np.inf)
  return list(_np_softmax(z).astype(np.float32))


def _np_attn_ref(a_s, a_t, kind):
  if a_s.shape[1] != a_t.shape[1]:
    a_s, a_t = a_s.mean(1, keepdims=True), a_t.mean(1, keepdims=True)
  if kind == "mse":
    return ((a_s - a_t) ** 2).mean()
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(a_t > 0, a_t * (np.log(a_t) - np.log(a_s)), 0)
  return kl.sum(-1).mean()


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("heads", [(2, 2), (1, 4)])
def test_attention_loss_matches_numpy(kind, heads):
  a_s, a_t = _attn(0, 2, heads[0]), _attn(1, 4, heads[1])
  lm = [1, 3]
  want = np.mean([_np_attn_ref(a_s[i], a_t[j], kind)
                  for i, j in enumerate(lm)])
  np.testing.assert_allclose(D.attention_loss(a_s, a_t, lm, kind), want,
                             rtol=1e-4)
  assert float(D.attention_loss(a_t, a_t, None, kind)) < 1e-6


def _init(model, seed):
  """model.init's tree filled from numpy: compiling threefry for every
  param costs seconds on CPU; the values only need to be model-like."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((B, L), jnp.int32))
  r = np.random.default_rng(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(r.normal(size=x.shape) * (0.0 if "bias" in name
                                                 else 0.1), x.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def models():
  t, s = TransformerLM(TEACHER), TransformerLM(STUDENT)
  return t, _init(t, 0), s, _init(s, 1)


@pytest.fixture(scope="module")
def qteacher(models):
  return cj.quantize(models[1], bits=8, group_size=16)  # shared: eager RTN


_inter = jax.jit(D.intermediates, static_argnums=0)
_apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)


def _batch(seed, b=B, n=L + 1):
  """Synthetic bytes: x_{t+1} = (5 x_t + 3) mod 64 with a random start, so a
  teacher has something to learn."""
  start = np.random.default_rng(seed).integers(0, 64, (b, 1))
  seq = [start]
  for _ in range(n - 1):
    seq.append((seq[-1] * 5 + 3) % 64)
  return jnp.asarray(np.concatenate(seq, 1), jnp.int32)


def test_intermediates(models, qteacher):
  t, tv, _, _ = models
  x = _batch(0)[:, :-1]
  assert set(tv) == {"params"}  # init does not collect the sows
  logits, hs, attns = _inter(t, tv, x)
  np.testing.assert_array_equal(logits, _apply(t, tv, x))  # sows change nothing
  assert len(hs) == len(attns) == TEACHER.n_layers
  assert all(h.shape == (B, L, TEACHER.d_model) for h in hs)
  for a in attns:
    assert a.shape == (B, TEACHER.n_heads, L, L)
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(a, 1)).max()) == 0.0  # causal
  # The last hidden is the final block's output: ln_f and head give logits.
  p = tv["params"]
  y = jax.nn.standardize(hs[-1], axis=-1, epsilon=1e-6)
  y = y * p["ln_f"]["scale"] + p["ln_f"]["bias"]
  np.testing.assert_allclose(y @ p["head"]["kernel"] + p["head"]["bias"],
                             logits, atol=1e-4)
  # A compressed tree goes through compressjax.run without materializing.
  ql, qh, qa = _inter(t, qteacher, x)
  dl, dh, _ = _inter(t, cj.materialize_tree(qteacher), x)
  np.testing.assert_allclose(ql, dl, atol=1e-4)
  np.testing.assert_allclose(qh[-1], dh[-1], atol=1e-4)
  assert len(qa) == TEACHER.n_layers


def test_gradients_reach_student_and_projections_not_teacher(models):
  t, tv, s, sv = models
  lm = D.uniform_layer_map(STUDENT.n_layers, TEACHER.n_layers)
  proj = D.init_projections(jax.random.key(2), STUDENT.d_model,
                            TEACHER.d_model, lm)
  trainable = {"student": sv, "proj": proj}
  batch = _batch(1)
  kw = dict(temperature=2.0, alpha=0.5, hidden_weight=1.0, attn_weight=1.0)
  # Differentiate w.r.t. the teacher's params too (they are closed over in
  # practice): the loss must not move them.
  f = lambda tr, tp: D.distill_loss_fn(t, tp, s, **kw)(
      tr, batch, jax.random.key(0))
  (loss, m), (g, gt) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(
      trainable, tv)
  assert set(m) == {"loss", "kl", "ce", "hidden", "attn"}
  assert np.isfinite(float(loss)) and float(m["hidden"]) > 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(g):
    assert float(jnp.abs(leaf).max()) > 0, jax.tree_util.keystr(path)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(gt))


def test_compressed_student_recipe(models, qteacher):
  """The documented recipe: partition a compressed student, train its floats."""
  t, _, s, sv = models
  q = cj.quantize(sv, bits=4, group_size=8)
  flo, rest = cj.partition_float(q)
  run = lambda p, x: D.intermediates(s, cj.combine(p, rest), x)
  # A compressed teacher too: it runs through compressjax.run.
  loss_fn = D.distill_loss_fn(t, qteacher, student_run=run, attn_weight=1.0)
  batch = {"tokens": _batch(2), "mask": jnp.ones((B, L + 1))}  # dict form
  g = jax.jit(jax.grad(lambda p: loss_fn({"student": p}, batch, None)[0]))(flo)
  scales = [x for x in jax.tree.leaves(g) if x.ndim == 2]  # QArray scales
  assert scales and all(np.isfinite(x).all() for x in jax.tree.leaves(g))
  assert max(float(jnp.abs(x).max()) for x in scales) > 0


def test_distillation_reduces_kd_loss(models):
  t, tv, s, sv = models
  # Briefly train the teacher so it has structure to transfer.
  def lm_loss(p, batch, rng):
    return next_token_loss(t.apply(p, batch[:, :-1]), batch[:, 1:]).mean(), {}

  def make_step(loss_fn, opt):
    @jax.jit
    def step(p, o, batch):
      (l, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, None)
      u, o = opt.update(g, o, p)
      return optax.apply_updates(p, u), o, m
    return step

  opt = optax.adam(1e-2)
  step = make_step(lm_loss, opt)
  o = opt.init(tv)
  for i in range(20):
    tv, o, _ = step(tv, o, _batch(100 + i))

  loss_fn = D.distill_loss_fn(t, tv, s, temperature=2.0, alpha=0.9,
                              hidden_weight=0.1, attn_weight=0.1)
  proj = D.init_projections(jax.random.key(3), STUDENT.d_model,
                            TEACHER.d_model, D.uniform_layer_map(1, 2))
  p = {"student": sv, "proj": proj}
  step = make_step(loss_fn, opt)
  o = opt.init(p)
  held_out = _batch(999)
  kl = jax.jit(lambda p: loss_fn(p, held_out, None)[1]["kl"])
  kl0 = float(kl(p))
  for i in range(60):
    p, o, _ = step(p, o, _batch(200 + i))
  kl1 = float(kl(p))
  assert kl1 < 0.5 * kl0, (kl0, kl1)


def test_sample_sequences(models):
  t, tv, _, _ = models
  prompts = _batch(3, n=3)
  a = D.sample_sequences(t, tv, jax.random.key(0), prompts, 9)
  b = D.sample_sequences(t, tv, jax.random.key(0), prompts, 9)
  c = D.sample_sequences(t, tv, jax.random.key(1), prompts, 9)
  assert a.shape == (B, 12) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(a[:, :3], prompts)
  assert int(a.min()) >= 0 and int(a.max()) < TEACHER.vocab_size
  # Greedy: every generated token is the argmax of the model on its prefix
  # (causal attention: one full forward pass checks every step). 13 tokens
  # feed the model 12 <= seq_len.
  g = D.sample_sequences(t, tv, jax.random.key(0), prompts, 10,
                         temperature=0.0)
  pred = jnp.argmax(_apply(t, tv, g[:, :-1]), -1)
  np.testing.assert_array_equal(g[:, 3:], pred[:, 2:])


def test_sequence_kd_batches_with_compressed_teacher(models, qteacher):
  t, q = models[0], qteacher
  data = [_batch(10), {"tokens": _batch(11)}]
  out = list(D.sequence_kd_batches(t, q, jax.random.key(0), data,
                                   prompt_len=2))
  assert len(out) == 2
  for o, d in zip(out, [data[0], data[1]["tokens"]]):
    assert o.shape == d.shape
    np.testing.assert_array_equal(o[:, :2], d[:, :2])
    assert int(o.min()) >= 0 and int(o.max()) < TEACHER.vocab_size
