"""Dynamic sparse training: GMP schedule, SET/RigL drop and regrowth, ERK,
N:M SR-STE, export equals the masked forward, errors name the param."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import compressjax as cj
from compressjax.train import sparse as S


class MLP(nn.Module):
  hidden: int = 16
  out: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(x)


def _params(seed=0, d_in=8, hidden=16, out=4):
  # MLP's param tree, drawn with numpy (no flax init or jax compile needed)
  rng = np.random.default_rng(seed)
  dense = lambda i, o: {
      "kernel": jnp.asarray(rng.standard_normal((i, o), np.float32) / 3),
      "bias": jnp.asarray(rng.standard_normal(o, np.float32) / 10)}
  return {"Dense_0": dense(d_in, hidden), "Dense_1": dense(hidden, out)}


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)


def _kernels(tree):
  return {p: x for p, x in cj.core.tree.leaves_with_paths(tree)
          if p.endswith("kernel")}


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# ------------------------------------------------------------------ GMP


def _cubic(t, si, sf, t0, t1):
  frac = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
  return sf + (si - sf) * (1 - frac) ** 3


def test_gmp_schedule_hand_values():
  g = S.GMP(sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=110,
            update_every=10)
  assert float(g.sparsity_at(10)) == pytest.approx(0.1)
  # midpoint: 0.8 + (0.1 - 0.8) * 0.5**3
  assert float(g.sparsity_at(60)) == pytest.approx(0.8 - 0.7 / 8)
  assert float(g.sparsity_at(110)) == pytest.approx(0.8)
  assert float(g.sparsity_at(0)) == pytest.approx(0.1)  # before t0
  assert float(g.sparsity_at(500)) == pytest.approx(0.8)  # after t_end


@given(si=st.floats(0.0, 0.5), sf=st.floats(0.5, 0.99),
       t=st.integers(0, 300), t0=st.integers(0, 50),
       span=st.integers(1, 200))
def test_gmp_schedule_matches_formula(si, sf, t, t0, span):
  g = S.GMP(sparsity=sf, initial_sparsity=si, begin_step=t0,
            end_step=t0 + span, update_every=1)
  assert float(g.sparsity_at(t)) == pytest.approx(
      _cubic(t, si, sf, t0, t0 + span), abs=1e-5)


def test_gmp_realized_sparsity_follows_schedule():
  params = _params()
  t0, t1, every = 2, 20, 3
  g = S.GMP(sparsity=0.75, initial_sparsity=0.2, begin_step=t0, end_step=t1,
            update_every=every)
  tx = g.wrap_optax(optax.sgd(0.05))
  state = tx.init(params)
  upd = jax.jit(tx.update)
  expect = {p: 0 for p in _kernels(params)}
  for t in range(t1 + 4):
    updates, state = upd(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    if t >= t0 and t <= t1 and ((t - t0) % every == 0 or t == t1):
      s_t = _cubic(t, 0.2, 0.75, t0, t1)
      expect = {p: s_t * w.size for p, w in _kernels(params).items()}
    masks = _kernels(state.masks)
    for p, w in _kernels(params).items():
      w, m = np.asarray(w), np.asarray(masks[p])
      assert abs((~m).sum() - expect[p]) <= 1, (t, p)
      assert np.all(w[~m] == 0)  # exactly zero after apply_updates
      assert (w == 0).sum() == (~m).sum()
  # biases are not selected and stay dense
  assert state.masks["Dense_0"]["bias"] is None
  for p, w in _kernels(params).items():
    assert (np.asarray(w) == 0).sum() == round(0.75 * w.size)


# ------------------------------------------------------------- SET / RigL


@pytest.mark.parametrize("cls", [S.SET, S.RigL])
def test_dst_constant_sparsity_and_drop_counts(cls):
  params = _params(1)
  u = cls(sparsity=0.6, end_step=12, update_every=2, drop_fraction=0.4,
          seed=3)
  tx = u.wrap_optax(optax.adam(1e-2))
  state = tx.init(params)
  upd = jax.jit(tx.update)
  n_keep = {p: w.size - round(0.6 * w.size)
            for p, w in _kernels(params).items()}
  moved = 0
  for t in range(14):
    old = _np(_kernels(state.masks))
    w_old = _np(_kernels(params))
    updates, state = upd(_grads(params, 100 + t), state, params)
    params = optax.apply_updates(params, updates)
    new = _np(_kernels(state.masks))
    for p in old:
      assert new[p].sum() == n_keep[p]
      dropped, grown = old[p] & ~new[p], new[p] & ~old[p]
      assert dropped.sum() == grown.sum()
      if t > 0 and t % 2 == 0 and t < 12:
        f = 0.4 / 2 * (1 + math.cos(math.pi * t / 12))
        assert abs(dropped.sum() - f * n_keep[p]) <= 0.5 + 1e-6
        # the dropped are the smallest-|w| active weights
        kept = old[p] & new[p]
        assert np.abs(w_old[p][dropped]).max() <= np.abs(w_old[p][kept]).min()
        moved += dropped.sum()
      else:
        assert dropped.sum() == 0
      w = np.asarray(_kernels(params)[p])
      assert np.all(w[~new[p]] == 0)
      assert np.all(w[grown] == 0)  # regrown start at exactly zero
  assert moved > 0


@pytest.mark.parametrize("make", [S.rigl, S.set_])
def test_magnitude_init_keeps_largest_weights(make):
  """mask_init="magnitude" (dense-to-sparse fine-tuning) starts from each layer's
  largest |w|; the default "random" does not."""
  params = _params(3)
  st = make(optax.sgd(0.1), 0.75, end_step=10, mask_init="magnitude").init(params)
  for p, m in _kernels(S.find_state(st).masks).items():
    w = np.abs(np.asarray(_kernels(params)[p]))
    k = int(m.sum())
    assert k == w.size - round(0.75 * w.size)
    assert np.min(w[np.asarray(m)]) >= np.max(w[~np.asarray(m)])
  rnd = S.find_state(make(optax.sgd(0.1), 0.75, end_step=10).init(params))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(rnd.masks), jax.tree.leaves(S.find_state(st).masks)))
  with pytest.raises(cj.CompressionError, match="mask_init must be"):
    make(optax.sgd(0.1), 0.75, end_step=10, mask_init="lottery")


@pytest.mark.parametrize("inner", [optax.adam(1e-2),
                                   optax.sgd(0.1, momentum=0.9)])
def test_rigl_regrows_top_gradient_and_resets_moments(inner):
  params = _params(2)
  u = S.RigL(sparsity=0.7, end_step=1000, update_every=10)
  tx = u.wrap_optax(inner)
  state = tx.init(params)
  params = S.masked_params(params, state)  # hard zeros before the update step
  # nonzero moments everywhere, at an update step
  inner_state = jax.tree.map(
      lambda x: jnp.ones_like(x) if x.ndim else x, state.inner_state)
  state = state.replace(count=jnp.int32(10), inner_state=inner_state)
  grads = _grads(params, 7)
  old = _np(state.masks)
  updates, state = tx.update(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  f = 0.3 / 2 * (1 + math.cos(math.pi * 10 / 1000))
  for p, m_old in _kernels(old).items():
    g = np.abs(np.asarray(_kernels(grads)[p])).ravel()
    w = np.abs(np.asarray(_kernels(params)[p])).ravel()
    mo = m_old.ravel()
    k = round(f * mo.sum())
    act, inact = np.flatnonzero(mo), np.flatnonzero(~mo)
    want_drop = set(act[np.argsort(w[act], kind="stable")[:k]])
    want_grow = set(inact[np.argsort(-g[inact], kind="stable")[:k]])
    mn = np.asarray(_kernels(state.masks)[p]).ravel()
    assert set(np.flatnonzero(mo & ~mn)) == want_drop
    assert set(np.flatnonzero(mn & ~mo)) == want_grow
    grown = np.zeros_like(mo)
    grown[list(want_grow)] = True
    assert np.all(np.asarray(_kernels(new_params)[p]).ravel()[grown] == 0)
  # every params-shaped moment of the inner state is zero at regrown spots
  for moments in _moment_trees(state.inner_state):
    for p, m in _kernels(moments).items():
      grown = np.asarray(_kernels(state.masks)[p]) & ~_kernels(old)[p]
      assert grown.sum() > 0
      assert np.all(np.asarray(m)[grown] == 0)
      assert np.all(np.asarray(m)[~grown & _kernels(old)[p]] != 0)


def _moment_trees(inner_state):
  s = inner_state[0]
  if hasattr(s, "mu"):
    return [s.mu, s.nu]
  return [s.trace]


def test_rigl_mlp_80_percent_reduces_loss():
  model = MLP(32, 1)
  x = jax.random.normal(jax.random.key(0), (128, 8))
  y = jnp.sin(x @ jax.random.normal(jax.random.key(1), (8, 1)))
  params = _params(2, 8, 32, 1)
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   S.rigl(optax.adam(1e-2), 0.8, end_step=150,
                          update_every=25, distribution="erk"))
  opt_state = tx.init(params)

  def loss(p, st):
    pred = model.apply({"params": S.masked_params(p, st)}, x)
    return jnp.mean((pred - y) ** 2)

  @jax.jit
  def step(p, st):
    l, g = jax.value_and_grad(loss)(p, st)
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st, l

  losses = []
  for _ in range(150):
    params, opt_state, l = step(params, opt_state)
    losses.append(float(l))
  assert losses[-1] < 0.5 * losses[0]
  masks = _kernels(S.find_state(opt_state).masks)
  total = sum(m.size for m in masks.values())
  active = sum(int(np.asarray(m).sum()) for m in masks.values())
  assert active == pytest.approx(0.2 * total, abs=len(masks))
  for p, w in _kernels(params).items():
    assert np.all(np.asarray(w)[~np.asarray(masks[p])] == 0)
  _check_export(model, params, opt_state, x)


# ------------------------------------------------------------------- ERK


def _erk_raw(shape):
  return sum(shape) / math.prod(shape)


@given(shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)),
                       min_size=1, max_size=4),
       sparsity=st.floats(0.05, 0.98))
def test_erk_hits_target_caps_dense_and_is_proportional(shapes, sparsity):
  params = {f"l{i}": {"kernel": np.zeros(s, np.float32)}
            for i, s in enumerate(shapes)}
  d = S.layer_densities(params, sparsity, "erk")
  sizes = {f"l{i}/kernel": math.prod(s) for i, s in enumerate(shapes)}
  raw = {f"l{i}/kernel": _erk_raw(s) for i, s in enumerate(shapes)}
  total = sum(sizes.values())
  assert sum(d[p] * sizes[p] for p in d) == pytest.approx(
      (1 - sparsity) * total, rel=1e-9)
  assert all(0 < v <= 1 + 1e-12 for v in d.values())
  free = [p for p in d if d[p] < 1 - 1e-12]
  capped = [p for p in d if p not in free]
  assert free  # some layer always carries the sparsity
  eps = [d[p] / raw[p] for p in free]
  assert max(eps) == pytest.approx(min(eps), rel=1e-9)
  if capped:  # only the layers with the largest ERK scores are capped
    assert min(raw[p] for p in capped) >= max(raw[p] for p in free)


def test_erk_caps_small_layer_and_uniform_and_rule_override():
  params = {"a": {"kernel": jnp.zeros((2, 2))},
            "b": {"kernel": jnp.zeros((64, 64))},
            "c": {"kernel": jnp.zeros((64, 8))}}
  d = S.layer_densities(params, 0.9, "erk")
  assert d["a/kernel"] == 1.0
  assert d["c/kernel"] > d["b/kernel"]
  u = S.layer_densities(params, 0.9)
  assert all(v == pytest.approx(0.1) for v in u.values())
  # a rule fixes one layer; the target is spread over the others
  r = S.layer_densities(params, 0.9, "erk", rules=[("a/kernel",
                                                    dict(sparsity=0.5))])
  assert r["a/kernel"] == 0.5
  assert (r["b/kernel"] * 4096 + r["c/kernel"] * 512) == pytest.approx(
      0.1 * (4096 + 512))
  skip = S.layer_densities(params, 0.5, rules=[("a/.*", None)])
  assert set(skip) == {"b/kernel", "c/kernel"}


def test_erk_layer_masks_realize_densities():
  params = _params(3, d_in=8, hidden=32, out=2)
  u = S.RigL(sparsity=0.8, distribution="erk", end_step=100)
  state = u.wrap_optax(optax.sgd(0.1)).init(params)
  d = S.layer_densities(params, 0.8, "erk")
  for p, m in _kernels(state.masks).items():
    assert int(np.asarray(m).sum()) == round(d[p] * m.size)


# ------------------------------------------------------------- N:M SR-STE


@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8)]),
       axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
def test_nm_masks_exact_n_per_group(nm, axis, seed):
  n, m = nm
  shape = (16, 8) if axis == 0 else (8, 16)
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  params = {"k": {"kernel": jnp.asarray(w)}}
  state = S.nm_srste(optax.sgd(0.1), n, m, axis=axis).init(params)
  got = np.moveaxis(np.asarray(S.masked_params(params, state)["k"]["kernel"]),
                    axis, -1)
  runs = got.reshape(8, 16 // m, m)  # groups along the input axis
  dense = np.moveaxis(w, axis, -1).reshape(runs.shape)
  assert np.all((runs != 0).sum(-1) == n)
  np.testing.assert_array_equal(runs[runs != 0], dense[runs != 0])
  kept_min = np.where(runs != 0, np.abs(dense), np.inf).min(-1)
  drop_max = np.where(runs == 0, np.abs(dense), -np.inf).max(-1)
  assert np.all(kept_min >= drop_max)


def test_nm_masks_follow_params_each_step():
  params = _params(6)
  tx = S.nm_srste(optax.sgd(0.5), 2, 4)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  for t in range(3):
    updates, state = upd(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    for p, w in _kernels(params).items():  # masks of the new params
      want = S.nm_mask(jnp.abs(w), 2, 4, 0)
      np.testing.assert_array_equal(_kernels(state.masks)[p], want)
      assert int(np.asarray(want).sum()) == w.size // 2


def test_srste_decay_term_and_straight_through_gradient():
  params = _params(4)
  lam = 1e-2
  u = S.SRSTE(n=2, m=4, decay=lam)
  tx = u.wrap_optax(optax.identity())
  state = tx.init(params)
  grads = _grads(params, 5)
  updates, _ = tx.update(grads, state, params)
  zero, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), state, params)
  for p, w in _kernels(params).items():
    mask = np.asarray(_kernels(state.masks)[p])
    want = lam * (1 - mask) * np.asarray(w)
    np.testing.assert_allclose(_kernels(zero)[p], want, rtol=1e-6)
    assert np.all(np.asarray(_kernels(zero)[p])[mask] == 0)
    np.testing.assert_allclose(_kernels(updates)[p],
                               _kernels(grads)[p] + want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(updates["Dense_0"]["bias"],
                                grads["Dense_0"]["bias"])
  # the gradient of the masked forward reaches every dense weight
  g = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(
      S.masked_params(p, state))))(params)
  assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(g))
  # the state-free form used inside a loss_fn equals the state's masks
  for a, b in zip(jax.tree.leaves(u.masked(params)),
                  jax.tree.leaves(S.masked_params(params, state))):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ export


def _check_export(model, params, opt_state, x):
  out = S.export(params, opt_state)
  for p, leaf in cj.core.tree.leaves_with_paths(out):
    if p.endswith("kernel"):
      assert isinstance(leaf, (cj.SparseArray, cj.NMSparseArray))
    else:
      assert isinstance(leaf, jax.Array)
  masked = S.masked_params(params, opt_state)
  want = model.apply({"params": masked}, x)
  got = jax.jit(lambda t, x: cj.run(model, {"params": t}, x))(out, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for p, leaf in _kernels(out).items():
    np.testing.assert_array_equal(leaf.materialize(), _kernels(masked)[p])
  return out


@pytest.mark.parametrize("make", [
    lambda inner: S.gmp(inner, 0.7, end_step=6, update_every=2),
    lambda inner: S.set_(inner, 0.5, end_step=8, update_every=3,
                         distribution="erk"),
    lambda inner: S.nm_srste(inner, 2, 4),
], ids=["gmp", "set_erk", "nm"])
def test_export_equals_masked_forward(make):
  model = MLP(16, 4)
  x = jnp.asarray(np.random.default_rng(9).standard_normal((5, 8),
                                                          np.float32))
  params = _params(1)
  tx = make(optax.adam(1e-2))
  state = tx.init(params)

  def loss(p, st):
    return jnp.mean(model.apply({"params": S.masked_params(p, st)}, x) ** 2)

  step = jax.jit(lambda p, st: tx.update(jax.grad(loss)(p, st), st, p))
  for _ in range(8):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  out = _check_export(model, params, state, x)
  if isinstance(out["Dense_0"]["kernel"], cj.NMSparseArray):
    assert out["Dense_0"]["kernel"].n == 2 and out["Dense_0"]["kernel"].m == 4


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_bad_sparsity_names_param(s):
  for fn in (lambda: S.rigl(optax.sgd(0.1), s, end_step=10).init(_params()),
             lambda: S.layer_densities(_params(), s, "erk")):
    with pytest.raises(cj.CompressionError) as e:
      fn()
    assert "sparsity must be in [0, 1)" in str(e.value)
    assert "Dense_0/kernel" in str(e.value)


def test_m_not_dividing_k_names_param():
  with pytest.raises(cj.CompressionError) as e:
    S.nm_srste(optax.sgd(0.1), 2, 4).init(_params(d_in=6))
  assert "Dense_0/kernel" in str(e.value) and "M=4" in str(e.value)
  # a rule skipping that param makes it valid
  S.nm_srste(optax.sgd(0.1), 2, 4,
             rules=[("Dense_0/.*", None)]).init(_params(d_in=6))


def test_other_bad_configs():
  p = _params()
  with pytest.raises(cj.CompressionError, match="distribution"):
    S.layer_densities(p, 0.5, "gaussian")
  with pytest.raises(cj.CompressionError, match="unknown rule keys"):
    S.gmp(optax.sgd(0.1), 0.5, end_step=10,
          rules=[("Dense_0/kernel", dict(n=2))]).init(p)
  with pytest.raises(cj.CompressionError, match="no parameter selected"):
    S.rigl(optax.sgd(0.1), 0.5, end_step=10, default=None).init(p)
  with pytest.raises(cj.CompressionError, match="begin_step < end_step"):
    S.GMP(sparsity=0.5, begin_step=10, end_step=5)
  with pytest.raises(cj.CompressionError, match="needs the params"):
    tx = S.rigl(optax.sgd(0.1), 0.5, end_step=10)
    tx.update(p, tx.init(p))
