"""Dense linear algebra for Hessian-based algorithms (GPTQ, SparseGPT): the
factor of H^-1 and the OBS column sweep both run (`obs_sweep`).

Both need the upper Cholesky factor U of H^-1 (H^-1 = U^T U). Computing H^-1
and factoring it again costs ~2.3 K^3 flops; with J the reversal permutation
and J H J = L L^T, U = J L^-1 J needs one Cholesky and one triangular inverse
(K^3 / 3 each), the inverse by at most 4 x 4 blocks: mostly matmuls, and
few ops to compile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
# Unroll a slab's runs for N:M only: measured (k=1024, CPU seconds of the
# first call / each next), unrolling the columns costs GPTQ 5.7 / 0.35 vs
# 1.8-2.1 / 0.22-0.39 rolled and SparseGPT 50% 4.0 / 0.78 vs 2.6 / 0.35;
# 2:4's runs unrolled: 1.7 / 0.17 vs 1.5 / 0.50.
_UNROLL_RUNS = True


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


def tril_inv(l):
  """Inverse X of a lower-triangular matrix by P x P blocks (P <= 4: few ops,
  so the compiled program stays small): X_ii = L_ii^-1 (one batched trsm)
  and, for i > j, X_ij = -X_ii sum_{j <= m < i} L_im X_mj (~K^3 / 5
  multiply-adds)."""
  k = l.shape[0]
  p = min(4, -(-k // 512))
  if p == 1:
    return jax.scipy.linalg.solve_triangular(l, jnp.eye(k, dtype=l.dtype),
                                             lower=True)
  b = -(-k // p)
  pad = b * p - k
  if pad:  # identity rows/columns: the inverse is diag(L^-1, I)
    l = jnp.pad(l, ((0, pad), (0, pad))) + jnp.diag(
        (jnp.arange(k + pad) >= k).astype(l.dtype))
  diag = jnp.stack([l[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(p)])
  inv = jax.scipy.linalg.solve_triangular(
      diag, jnp.broadcast_to(jnp.eye(b, dtype=l.dtype), diag.shape),
      lower=True)
  x = [[None] * p for _ in range(p)]
  for i in range(p):
    x[i][i] = inv[i]
    for j in range(i):
      t = _mm(l[i * b:(i + 1) * b, j * b:i * b],
              jnp.concatenate([x[m][j] for m in range(j, i)], 0))
      x[i][j] = -_mm(x[i][i], t)
  zero = jnp.zeros((b, b), l.dtype)
  out = jnp.concatenate([jnp.concatenate(
      [x[i][j] if j <= i else zero for j in range(p)], 1)
                         for i in range(p)], 0)
  return out[:k, :k]


def hinv_upper(h):
  """Upper U with H^-1 = U^T U: with J the reversal and J H J = L L^T,
  U = J L^-1 J (one Cholesky and one triangular inverse, no explicit H^-1)."""
  l = jax.lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)
  return tril_inv(l)[::-1, ::-1]


# -- the OBS column sweep (GPTQ, SparseGPT) ------------------------------------


def obs_prepare(w, h, damp, perm=None):
  """The shared prologue of GPTQ (Alg. 1) and SparseGPT (Alg. 1): dead inputs
  (H_jj = 0) get H_jj = 1 and a zero row of the kernel; optionally permute
  the inputs; H += damp * mean(diag H) * I; U = upper factor of H^-1.
  w: kernel (K, N) (GPTQ's column j is row j here), h: (K, K).
  Returns (w, u)."""
  k = w.shape[0]
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  if perm is not None:
    w, h = w[perm], h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
  return w, hinv_upper(h)


class ObsRule:
  """What an OBS sweep does with each column; the sweep does the rest.

  Hooks (all traced; `state` is any pytree of fixed shapes, carried through):
    init(w, u) -> state                 once, on the prepared kernel
    block_start(state, w1, d1, i1) -> state   at a block start: w1 (B, N) its rows
                                        (all earlier blocks' updates applied),
                                        d1 = diag(U) there, i1 its first row
    slab(state, w1, d1, s0, i1) -> state   at each slab start s0 (in block)
    run_start(state, ws, ds, r0, s0, i1) -> state   every `run` columns
                                        (N:M's M): ws the slab's current rows,
                                        r0 the run's first row in the slab
    column(state, wj, j, c) -> (state, q_j, out_j): the value column c (j in
                                        its block) takes, and what to keep of
                                        it (stacked into the sweep's output)
  """

  run: int = 1

  def init(self, w, u):
    return ()

  def block_start(self, state, w1, d1, i1):
    return state

  def slab(self, state, w1, d1, s0, i1):
    return state

  def run_start(self, state, ws, ds, r0, s0, i1):
    return state

  def column(self, state, wj, j, c):
    raise NotImplementedError


def _rows(x, start, size):
  return jax.lax.dynamic_slice_in_dim(x, start, size, 0)


def _put_rows(x, y, start):
  return jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)


def obs_sweep(w, u, rule: ObsRule, *, block: int, slab: int):
  """The column sweep both GPTQ (Frantar et al. 2022, Alg. 1) and SparseGPT
  (Frantar & Alistarh 2023, Alg. 1) run: for each column j in order,
      q_j = rule(w_j);  e_j = (w_j - q_j) / U_jj;  W[:, j:] -= e_j U[j, j:]
  on the kernel w (K, N) (GPTQ's column j is row j) with H^-1 = U^T U.

  Lazily, as the papers' Sec. 4 / 3.4 (the same arithmetic regrouped): rank-1
  updates inside a slab of `slab` columns, one matmul per slab for the rest
  of the block, and each block's rows get all earlier blocks' updates when
  it starts (left-looking: sum over earlier blocks c of U[c, b]^T E_c, exact
  flops). Blocks run in a loop (one compiled block, not one per block), so
  K is padded to a multiple of `block` with inert rows (w = 0, U = I) that
  the rule must map to q = 0 (their error is then 0); outputs are cut back.
  Returns (state, outputs stacked over the K columns)."""
  k, n = w.shape
  pad = -k % block
  if pad:
    w = jnp.concatenate([w, jnp.zeros((pad, n), w.dtype)])
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
        (jnp.arange(k + pad) >= k).astype(u.dtype))
  kp = k + pad
  nblk, run = kp // block, rule.run
  if block % slab or slab % run:
    raise ValueError(f"block {block}, slab {slab}, run {run} do not nest")
  ut = u.T  # left-looking updates read contiguous rows
  state = rule.init(w, u)
  probe = jax.eval_shape(
      lambda s: rule.column(s, w[0], 0, 0)[2], state)
  outs = jax.tree.map(lambda a: jnp.zeros((kp,) + a.shape, a.dtype), probe)
  rows = jnp.arange(slab)
  bidx = jnp.arange(block)

  def block_step(b, carry):
    e, outs, state = carry
    i1 = b * block

    def lazy(c, acc):  # the updates of earlier block c on this block
      uc = jax.lax.dynamic_slice(ut, (i1, c * block), (block, block))
      return acc + jnp.matmul(uc, _rows(e, c * block, block), precision=_HI)

    w1 = _rows(w, i1, block) - jax.lax.fori_loop(
        0, b, lazy, jnp.zeros((block, n), w.dtype))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))
    d1 = jnp.diag(u1)
    state = rule.block_start(state, w1, d1, i1)

    def slab_step(t, c):
      w1, e1, o1, state = c
      s0 = t * slab
      state = rule.slab(state, w1, d1, s0, i1)
      us = jax.lax.dynamic_slice(u1, (s0, s0), (slab, slab))
      ds = jax.lax.dynamic_slice_in_dim(d1, s0, slab)

      def column(j, cc):
        ws, es, os, state = cc
        wj = ws[j]
        state, qj, oj = rule.column(state, wj, s0 + j, i1 + s0 + j)
        err = (wj - qj) / ds[j]
        ws = ws - (us[j] * (rows > j))[:, None] * err[None, :]
        os = jax.tree.map(lambda a, x: a.at[j].set(x), os, oj)
        return ws, es.at[j].set(err), os, state

      def one_run(r, cc):
        ws, es, os, state = cc
        r0 = r * run
        state = rule.run_start(state, ws, ds, r0, s0, i1)
        return jax.lax.fori_loop(r0, r0 + run, column, (ws, es, os, state))

      init = (_rows(w1, s0, slab), jnp.zeros((slab, n), w.dtype),
              jax.tree.map(lambda a: jnp.zeros((slab,) + a.shape[1:],
                                               a.dtype), outs), state)
      if run == 1:
        _, es, os, state = jax.lax.fori_loop(0, slab, column, init)
      else:
        _, es, os, state = jax.lax.fori_loop(0, slab // run, one_run, init,
                                              unroll=_UNROLL_RUNS)
      # the block's later columns get this slab's errors in one matmul
      ur = _rows(u1, s0, slab) * (bidx >= s0 + slab)[None, :]
      w1 = w1 - jnp.matmul(ur.T, es, precision=_HI)
      o1 = jax.tree.map(lambda a, x: _put_rows(a, x, s0), o1, os)
      return w1, _put_rows(e1, es, s0), o1, state

    init = (w1, jnp.zeros((block, n), w.dtype),
            jax.tree.map(lambda a: jnp.zeros((block,) + a.shape[1:],
                                             a.dtype), outs), state)
    _, e1, o1, state = jax.lax.fori_loop(0, block // slab, slab_step, init)
    outs = jax.tree.map(lambda a, x: _put_rows(a, x, i1), outs, o1)
    return _put_rows(e, e1, i1), outs, state

  _, outs, state = jax.lax.fori_loop(
      0, nblk, block_step, (jnp.zeros((kp, n), w.dtype), outs, state))
  return state, jax.tree.map(lambda a: a[:k], outs)
