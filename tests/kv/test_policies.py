"""Eviction policies under a budget smaller than the context, against an
independent float64 simulation of each paper's rule: a prefill of 6 tokens
(one row left-padded), a 3-token chunk, then single tokens; after every call
the outputs and the kept tokens per head must match. StreamingLLM's
repositioned sinks are checked with a RoPE in the test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import kv

B, HKV, G, D, TOTAL, BUDGET, PAD = 2, 2, 2, 8, 14, 5, 2
CHUNKS = [(0, 6), (6, 9)] + [(i, i + 1) for i in range(9, TOTAL)]
SCALE = D ** -0.5


def _inv_freq():
  return 1.0 / (100.0 ** (np.arange(0, D, 2) / D))


def _rope_np(x, p):
  a = np.asarray(p, np.float64)[..., None] * _inv_freq()
  c, s = np.cos(a), np.sin(a)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _rope_jnp(x, idx):  # x (B, T, H, D), idx (B, T)
  a = idx[..., None, None].astype(jnp.float32) * jnp.asarray(
      _inv_freq(), jnp.float32)
  c, s = jnp.cos(a), jnp.sin(a)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _data():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((B, TOTAL, HKV * G, D))
  k = rng.standard_normal((B, TOTAL, HKV, D))
  v = rng.standard_normal((B, TOTAL, HKV, D))
  pos = np.tile(np.arange(TOTAL), (B, 1))
  pos[1] = np.arange(TOTAL) - PAD
  pos[1, :PAD] = -1
  # queries and keys rotated at their positions, as the decoders do
  pr = np.maximum(pos, 0)
  return (_rope_np(q, pr[..., None]), _rope_np(k, pr[..., None]), v, pos)


def _simulate(pol, q, k, v, pos, kept_in=None):
  """One row: outputs (T, H, D) and the kept positions per kv head after
  every chunk. kept_in: use these kept sets before each chunk instead of
  the simulation's own (for the random control)."""
  tok = {int(p): t for t, p in enumerate(pos) if p >= 0}
  kept = [[] for _ in range(HKV)]
  acc = [dict() for _ in range(HKV)]
  pw, sinks = pol.stream_mask(BUDGET)
  out = np.zeros(q.shape)
  history = []
  nxt = 0
  for c, (a, e) in enumerate(CHUNKS):
    if kept_in is not None:
      kept = [list(s) for s in kept_in[c]]
    new = [int(p) for p in pos[a:e] if p >= 0]
    nxt = max([nxt] + [p + 1 for p in new])
    rows = [t for t in range(a, e) if pos[t] >= 0]
    cands, incs = [], []
    for h in range(HKV):
      cand = kept[h] + new
      probs = {}
      for t in rows:
        i = int(pos[t])
        for g in range(G):
          qh = h * G + g
          lg = np.full(len(cand), -np.inf)
          for n, j in enumerate(cand):
            if j > i or (pw is not None and not (i - j < pw or j < sinks)):
              continue
            qq = q[t, qh]
            if pol.reposition and j < sinks:  # the query at min(i, S - 1)
              qq = _rope_np(qq, -max(0, i - (BUDGET - 1)))
            lg[n] = qq @ k[tok[j], h] * SCALE
          p = np.exp(lg - lg.max())
          p /= p.sum()
          out[t, qh] = p @ v[[tok[j] for j in cand], h]
          probs[(t, g)] = p
      inc = np.zeros(len(cand))
      if pol.name == "h2o":
        inc = sum(probs.values())
      elif pol.name == "snapkv":
        last = rows[-pol.window:]
        inc = sum(probs[(t, g)] for t in last for g in range(G))
        nn = e - a  # pool the votes of the call's tokens (padding: 0)
        votes = np.zeros(nn)
        votes[nn - len(new):] = inc[len(kept[h]):]
        r = pol.kernel // 2
        pooled = [votes[max(0, i - r):i + r + 1].max() for i in range(nn)]
        inc = np.concatenate([inc[:len(kept[h])], pooled[nn - len(new):]])
      elif pol.name == "tova":
        inc = np.mean([probs[(rows[-1], g)] for g in range(G)], axis=0)
      cands.append(cand)
      incs.append(inc)
    if pol.name == "tova":  # one choice per layer: mean over kv heads too
      mean = np.mean(incs, axis=0)
      incs = [mean] * HKV
    for h in range(HKV):
      cand = cands[h]
      score = []
      for n, j in enumerate(cand):
        a_j = acc[h].get(j, 0.0) + incs[h][n]
        acc[h][j] = a_j
        if pol.name in ("window", "sink"):
          s = np.inf if j < sinks else j
        elif pol.name == "h2o":
          s = np.inf if j >= nxt - pol.recent_tokens(BUDGET) else a_j
        elif pol.name == "snapkv":
          s = np.inf if j >= nxt - pol.window else a_j
        elif pol.name == "tova":
          s = incs[h][n]
        else:
          s = 0.0
        score.append(s)
      order = np.argsort(-np.asarray(score), kind="stable")[:BUDGET]
      kept[h] = [cand[n] for n in sorted(order)]
      acc[h] = {j: acc[h][j] for j in kept[h]}
    history.append([sorted(s) for s in kept])
  return out, history


def _run(spec, q, k, v, pos, rotary=None, chunks=CHUNKS):
  step = jax.jit(lambda s, q, k, v, p: s.attention(
      q, k, v, p, scale=SCALE, rotary=rotary))
  store = spec.empty(B, TOTAL, HKV, D)
  outs, history = [], []
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  for a, e in chunks:
    o, store = step(store, f32(q[:, a:e]), f32(k[:, a:e]), f32(v[:, a:e]),
                    jnp.asarray(pos[:, a:e], jnp.int32))
    outs.append(np.asarray(o))
    kp = np.asarray(store.positions)
    history.append([[sorted(int(p) for p in kp[b, h] if p >= 0)
                     for h in range(HKV)] for b in range(B)])
  return np.concatenate(outs, axis=1), history, store


POLICIES = {
    "window": kv.Window(),
    "sink": kv.SinkWindow(sinks=2),
    "h2o": kv.H2O(),
    "snapkv": kv.SnapKV(window=2, kernel=3),
    "tova": kv.TOVA(),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_matches_reference(name):
  pol = POLICIES[name]
  q, k, v, pos = _data()
  spec = kv.KVSpec(policy=pol, budget=BUDGET)
  got, hist, store = _run(spec, q, k, v, pos,
                          _rope_jnp if pol.reposition else None)
  for b in range(B):
    want, want_hist = _simulate(pol, q[b], k[b], v[b], pos[b])
    real = pos[b] >= 0
    np.testing.assert_allclose(got[b][real], want[real], rtol=2e-4,
                               atol=2e-5, err_msg=name)
    assert [h[b] for h in hist] == want_hist, name
  assert store.capacity == BUDGET
  if name == "window":  # Window(S) is attention with a window of S keys
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    want, _ = kv.attend(f32(q), f32(k), f32(v), pos, pos, scale=SCALE,
                        window=BUDGET)
    np.testing.assert_allclose(got[pos >= 0], np.asarray(want)[pos >= 0],
                               rtol=1e-5, atol=1e-6)
  if not pol.per_head:  # one choice per layer
    kp = np.asarray(store.positions)
    assert all(np.array_equal(kp[:, 0], kp[:, h]) for h in range(HKV))


@pytest.mark.parametrize("spec", [
    kv.KVSpec(policy=p, budget=TOTAL) for p in
    list(POLICIES.values())[1:] + [kv.Random()]] + [
        kv.KVSpec(), kv.KVSpec(attention="pallas"),
        kv.KVSpec(policy=kv.SinkWindow(sinks=2), budget=TOTAL,
                  attention="pallas")],
    ids=lambda s: f"{s.policy.name if s.policy else 'none'}-{s.attention}")
def test_budget_covering_context_is_exact(spec):
  """Every policy keeps every token when the budget covers the context:
  causal attention exactly (the Pallas prefill and decode kernels too)."""
  q, k, v, pos = _data()
  if spec.attention == "pallas":  # one unpadded prompt for every row
    pos = np.tile(np.arange(TOTAL), (B, 1))
  chunks = [(0, 8)] + [(i, i + 1) for i in range(8, TOTAL)]
  got, hist, _ = _run(spec, q, k, v, pos, _rope_jnp, chunks)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  want, _ = kv.attend(f32(q), f32(k), f32(v), pos, pos, scale=SCALE)
  np.testing.assert_allclose(got[pos >= 0], np.asarray(want)[pos >= 0],
                             rtol=1e-5, atol=1e-5)
  assert hist[-1][1][0] == list(range(int((pos[1] >= 0).sum())))


def test_random_control_is_consistent():
  """Random keeps budget tokens it had or received, and every output is
  attention over exactly what it had kept plus the new tokens."""
  q, k, v, pos = _data()
  pol = kv.Random(seed=3)
  got, hist, _ = _run(kv.KVSpec(policy=pol, budget=BUDGET), q, k, v, pos)
  for b in range(B):
    before = [[[] for _ in range(HKV)]] + [h[b] for h in hist[:-1]]
    want, _ = _simulate(pol, q[b], k[b], v[b], pos[b], kept_in=before)
    real = pos[b] >= 0
    np.testing.assert_allclose(got[b][real], want[real], rtol=2e-4,
                               atol=2e-5)
    seen = 0
    for c, (a, e) in enumerate(CHUNKS):
      seen += int((pos[b, a:e] >= 0).sum())
      now = hist[c][b][0]
      assert len(now) == min(seen, BUDGET)
      assert set(now) <= set(before[c][0]) | set(
          int(p) for p in pos[b, a:e] if p >= 0)


def test_pyramid_budgets():
  b = kv.Pyramid(64, beta=8).per_layer(4, 1024)
  assert b == (120, 83, 45, 8)  # 2*64 - 8 down to 64/8, mean 64
  assert abs(np.mean(b) - 64) <= 1
  assert kv.Uniform(0.25).per_layer(3, 400) == (100, 100, 100)
  spec = kv.KVSpec(policy="h2o", budget=kv.Pyramid(0.5, beta=4))
  caps = [spec.empty(1, 64, 1, 8, layer=i, num_layers=3).capacity
          for i in range(3)]
  assert caps == [56, 32, 8]
