"""Block-sparse flash attention in Pallas, driven by compiled mask metadata.

Forward: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning", Alg. 1): per (batch, q head,
q block) an online softmax over the kv blocks, with float32 running max `m`,
normaliser `l` and accumulator `acc`. Only the non-empty kv blocks of that
(head, q block) are visited - the list `kv_indices` of `mask.MaskInfo`; full
blocks skip the element mask, partial blocks load their tile from the
deduplicated `partial_masks` table (`kv_mask_ids`). The logsumexp
`lse = m + log l` is saved for the backward pass.

Backward (Alg. 2, split into two kernels as in FA-2's "no atomics" variant):
with delta = rowsum(dO * O) precomputed in jnp and P = exp(S - lse),
dP = dO V^T, dS = P * (dP - delta) (times 1 - tanh^2 under a soft cap),
  * the dQ kernel walks the same kv lists as the forward: dQ = scale dS K;
  * the dK/dV kernel walks the transposed lists (per kv block, its non-empty
    q blocks, `q_indices`), summing over the query heads of a GQA group:
    dV = P^T dO, dK = scale dS^T Q.

Two drivers share the per-tile math:
  * backend "tpu" (default; also what runs on CPU in interpret mode): the grid
    is (batch, head, block, j) and j walks the metadata list. The metadata are
    scalar-prefetch operands (`pltpu.PrefetchScalarGridSpec`), read by the
    K/V (resp. Q/dO) BlockSpec index_maps, so empty blocks are never fetched;
    list padding repeats the last index, so steps j >= count refetch nothing
    and do nothing (`pl.when`).
  * backend "gpu" (Triton lowering has no scalar prefetch): grid (block,
    batch, head); the metadata are ordinary int32 inputs read inside the
    kernel, and a `lax.fori_loop` over the count loads K/V (resp. Q/dO) tiles
    with dynamic slices, like jax's pallas/ops/gpu/attention.py. This driver
    is tested in interpret mode only; it has NOT been compiled with Triton
    (block sizes and head_dim must then be powers of two).

Conventions: q (B, Hq, Lq, D), k/v (B, Hkv, Lkv, D), Hq a multiple of Hkv;
query head h uses kv head h // (Hq // Hkv). Sequence axes are zero-padded to
whole blocks (padded positions are masked). Fully masked query rows output 0
and have lse = +inf, so exp(S - lse) = 0 in the backward pass. On TPU,
block_kv should be a multiple of 128 and block_q of 32 (int8 mask tiles).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.attention.reference import _check_shapes

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))   # a @ b
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=_F32)


# --------------------------------------------------------------------------
# Per-tile math shared by both drivers.


def _logits(q, k, scale, soft_cap):
  """Scaled (and soft-capped) float32 logits of a (bq, D) x (bk, D) tile;
  also returns tanh(s / cap) (None without a cap) for the backward pass."""
  s = _dot(q, k, _NT) * scale
  if soft_cap is None:
    return s, None
  t = jnp.tanh(s / soft_cap)
  return soft_cap * t, t


def _softmax_step(s, v, m_prev, l_prev, acc_prev):
  """One online-softmax update (Alg. 1, lines 8-10) with masked = -inf."""
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m_prev - m_safe)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_new = alpha * acc_prev + _dot(p.astype(v.dtype), v, _NN)
  return m_new, l_new, acc_new


def _finalize(m, l, acc):
  """Output tile and logsumexp (+inf for fully masked rows)."""
  ok = l > 0
  o = acc / jnp.where(ok, l, 1.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), jnp.inf)
  return o, lse


def _bwd_tile(q, k, v, do, lse, delta, keep, scale, soft_cap):
  """P and dS (both float32, (bq, bk)) of one tile; `keep` is the element
  mask tile or None for a full block."""
  s, t = _logits(q, k, scale, soft_cap)
  p = jnp.exp(s - lse)
  if keep is not None:
    p = jnp.where(keep, p, 0.0)
  dp = _dot(do, v, _NT)
  ds = p * (dp - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


# --------------------------------------------------------------------------
# TPU-style driver: scalar prefetch, grid walks the metadata lists.


def _both_branches(fn, active, full):
  """fn(apply_mask) under pl.when for full and partial blocks."""
  pl.when(active & full)(lambda: fn(False))
  pl.when(active & jnp.logical_not(full))(lambda: fn(True))


def _fwd_kernel_tpu(hm_ref, idx_ref, cnt_ref, full_ref, mid_ref,
                    q_ref, k_ref, v_ref, pm_ref, o_ref, lse_ref,
                    m_sc, l_sc, acc_sc, *, scale, soft_cap, steps):
  del idx_ref, mid_ref  # used by the index maps
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  mh = hm_ref[h]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  def step(apply_mask):
    s, _ = _logits(q_ref[...], k_ref[...], scale, soft_cap)
    if apply_mask:
      s = jnp.where(pm_ref[...] != 0, s, -jnp.inf)
    m, l, acc = _softmax_step(s, v_ref[...], m_sc[...], l_sc[...],
                              acc_sc[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  _both_branches(step, j < cnt_ref[mh, i], full_ref[mh, i, j] != 0)

  @pl.when(j == steps - 1)
  def _write():
    o, lse = _finalize(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel_tpu(hm_ref, idx_ref, cnt_ref, full_ref, mid_ref,
                   q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pm_ref,
                   dq_ref, dq_sc, *, scale, soft_cap, steps):
  del idx_ref, mid_ref
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  mh = hm_ref[h]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  def step(apply_mask):
    k = k_ref[...]
    keep = pm_ref[...] != 0 if apply_mask else None
    _, ds = _bwd_tile(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                      delta_ref[...], keep, scale, soft_cap)
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN)

  _both_branches(step, j < cnt_ref[mh, i], full_ref[mh, i, j] != 0)

  @pl.when(j == steps - 1)
  def _write():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel_tpu(hm_ref, idx_ref, cnt_ref, full_ref, mid_ref,
                    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pm_ref,
                    dk_ref, dv_ref, dk_sc, dv_sc, *, scale, soft_cap, group,
                    steps):
  del idx_ref, mid_ref
  hk, kb = pl.program_id(1), pl.program_id(2)
  g, i = pl.program_id(3), pl.program_id(4)
  mh = hm_ref[hk * group + g]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

  def step(apply_mask):
    q, do = q_ref[...], do_ref[...]
    keep = pm_ref[...] != 0 if apply_mask else None
    p, ds = _bwd_tile(q, k_ref[...], v_ref[...], do, lse_ref[...],
                      delta_ref[...], keep, scale, soft_cap)
    dv_sc[...] += _dot(p.astype(do.dtype), do, _TN)
    dk_sc[...] += _dot(ds.astype(q.dtype), q, _TN)

  _both_branches(step, i < cnt_ref[mh, kb], full_ref[mh, kb, i] != 0)

  @pl.when((g == group - 1) & (i == steps - 1))
  def _write():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_params(semantics, interpret):
  if interpret:
    return None
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _kv_walk_maps(group: int):
  """BlockSpec index maps of the kernels that walk each (head, q block)'s
  kv list (forward, dQ): q tile i, kv tile idx[head, i, j], partial-mask
  tile mid[head, i, j]; scalar-prefetch operands follow the grid indices."""

  def q_map(b_, h, i, j, *_):
    return b_, h, i, 0

  def kv_map(b_, h, i, j, hm, idx, *_):
    return b_, h // group, idx[hm[h], i, j], 0

  def pm_map(b_, h, i, j, hm, idx, cnt, full, mid):
    return mid[hm[h], i, j], 0, 0

  return q_map, kv_map, pm_map


def _fwd_tpu(meta, qp, kp, vp, pm, cfg):
  hm, idx, cnt, full, mid = meta
  b, hq, lq, d = qp.shape
  group = hq // kp.shape[1]
  bq, bk = cfg.block_q, cfg.block_kv
  steps = idx.shape[-1]
  grid = (b, hq, lq // bq, steps)

  q_map, kv_map, pm_map = _kv_walk_maps(group)

  kernel = functools.partial(_fwd_kernel_tpu, scale=cfg.scale,
                             soft_cap=cfg.soft_cap, steps=steps)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=grid,
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, bq, bk), pm_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map),
          ],
          scratch_shapes=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32),
                          pltpu.VMEM((bq, d), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                 jax.ShapeDtypeStruct((b, hq, lq, 1), _F32)],
      compiler_params=_tpu_params(
          ("parallel", "parallel", "parallel", "arbitrary"), cfg.interpret),
      interpret=cfg.interpret,
      name="block_sparse_attention_fwd",
  )(*meta, qp, kp, vp, pm)


def _dq_tpu(meta, qp, kp, vp, dop, lse, delta, pm, cfg):
  hm, idx, cnt, full, mid = meta
  b, hq, lq, d = qp.shape
  group = hq // kp.shape[1]
  bq, bk = cfg.block_q, cfg.block_kv
  steps = idx.shape[-1]

  q_map, kv_map, pm_map = _kv_walk_maps(group)

  kernel = functools.partial(_dq_kernel_tpu, scale=cfg.scale,
                             soft_cap=cfg.soft_cap, steps=steps)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, hq, lq // bq, steps),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map),
              pl.BlockSpec((None, bq, bk), pm_map),
          ],
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), _F32)],
      ),
      out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
      compiler_params=_tpu_params(
          ("parallel", "parallel", "parallel", "arbitrary"), cfg.interpret),
      interpret=cfg.interpret,
      name="block_sparse_attention_dq",
  )(*meta, qp, kp, vp, dop, lse, delta, pm)


def _dkv_tpu(meta_t, qp, kp, vp, dop, lse, delta, pm, cfg):
  hm, idx, cnt, full, mid = meta_t
  b, hq, lq, d = qp.shape
  hkv, lk = kp.shape[1], kp.shape[2]
  group = hq // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  steps = idx.shape[-1]

  def q_map(b_, hk, kb, g, i, hm, idx, *_):
    h = hk * group + g
    return b_, h, idx[hm[h], kb, i], 0

  def kv_map(b_, hk, kb, g, i, *_):
    return b_, hk, kb, 0

  def pm_map(b_, hk, kb, g, i, hm, idx, cnt, full, mid):
    return mid[hm[hk * group + g], kb, i], 0, 0

  kernel = functools.partial(_dkv_kernel_tpu, scale=cfg.scale,
                             soft_cap=cfg.soft_cap, group=group, steps=steps)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, hkv, lk // bk, group, steps),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map),
              pl.BlockSpec((None, bq, bk), pm_map),
          ],
          out_specs=[pl.BlockSpec((None, None, bk, d), kv_map),
                     pl.BlockSpec((None, None, bk, d), kv_map)],
          scratch_shapes=[pltpu.VMEM((bk, d), _F32),
                          pltpu.VMEM((bk, d), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype),
                 jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
      compiler_params=_tpu_params(
          ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
          cfg.interpret),
      interpret=cfg.interpret,
      name="block_sparse_attention_dkv",
  )(*meta_t, qp, kp, vp, dop, lse, delta, pm)


# --------------------------------------------------------------------------
# GPU-style driver: metadata as ordinary inputs, fori_loop over the count.


def _whole(x):
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _masked_logits_gpu(s, full_ref, mid_ref, pm_ref, where, fill):
  """Applies the partial-block mask tile unless the block is full."""
  full = full_ref[where] != 0
  return lax.cond(full, lambda: s,
                  lambda: jnp.where(pm_ref[mid_ref[where]] != 0, s, fill))


def _fwd_kernel_gpu(hm_ref, idx_ref, cnt_ref, full_ref, mid_ref, q_ref, k_ref,
                    v_ref, pm_ref, o_ref, lse_ref, *, scale, soft_cap, bk):
  i, h = pl.program_id(0), pl.program_id(2)
  mh = hm_ref[h]
  q = q_ref[...]
  bq, d = q.shape

  def body(j, carry):
    kb = idx_ref[mh, i, j]
    k = k_ref[pl.ds(kb * bk, bk), :]
    v = v_ref[pl.ds(kb * bk, bk), :]
    s, _ = _logits(q, k, scale, soft_cap)
    s = _masked_logits_gpu(s, full_ref, mid_ref, pm_ref, (mh, i, j), -jnp.inf)
    return _softmax_step(s, v, *carry)

  init = (jnp.full((bq, 1), -jnp.inf, _F32), jnp.zeros((bq, 1), _F32),
          jnp.zeros((bq, d), _F32))
  m, l, acc = lax.fori_loop(0, cnt_ref[mh, i], body, init)
  o, lse = _finalize(m, l, acc)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel_gpu(hm_ref, idx_ref, cnt_ref, full_ref, mid_ref, q_ref, k_ref,
                   v_ref, do_ref, lse_ref, delta_ref, pm_ref, dq_ref, *,
                   scale, soft_cap, bk):
  i, h = pl.program_id(0), pl.program_id(2)
  mh = hm_ref[h]
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    kb = idx_ref[mh, i, j]
    k = k_ref[pl.ds(kb * bk, bk), :]
    v = v_ref[pl.ds(kb * bk, bk), :]
    keep = _masked_logits_gpu(jnp.ones((q.shape[0], bk), bool), full_ref,
                              mid_ref, pm_ref, (mh, i, j), False)
    _, ds = _bwd_tile(q, k, v, do, lse, delta, keep, scale, soft_cap)
    return dq + _dot(ds.astype(k.dtype), k, _NN)

  dq = lax.fori_loop(0, cnt_ref[mh, i], body, jnp.zeros(q.shape, _F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel_gpu(hm_ref, idx_ref, cnt_ref, full_ref, mid_ref, q_ref, k_ref,
                    v_ref, do_ref, lse_ref, delta_ref, pm_ref, dk_ref, dv_ref,
                    *, scale, soft_cap, bq, group):
  kb, hk = pl.program_id(0), pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  bk, d = k.shape
  dk = jnp.zeros((bk, d), _F32)
  dv = jnp.zeros((bk, d), _F32)
  for g in range(group):  # static: the query heads of this kv head
    mh = hm_ref[hk * group + g]

    def body(i, carry, g=g, mh=mh):
      dk, dv = carry
      qb = idx_ref[mh, kb, i]
      rows = pl.ds(qb * bq, bq)
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      keep = _masked_logits_gpu(jnp.ones((bq, bk), bool), full_ref, mid_ref,
                                pm_ref, (mh, kb, i), False)
      p, ds = _bwd_tile(q, k, v, do, lse_ref[g, rows, :],
                        delta_ref[g, rows, :], keep, scale, soft_cap)
      return (dk + _dot(ds.astype(q.dtype), q, _TN),
              dv + _dot(p.astype(do.dtype), do, _TN))

    dk, dv = lax.fori_loop(0, cnt_ref[mh, kb], body, (dk, dv))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_params(interpret):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _fwd_gpu(meta, qp, kp, vp, pm, cfg):
  b, hq, lq, d = qp.shape
  lk, group = kp.shape[2], hq // kp.shape[1]
  bq, bk = cfg.block_q, cfg.block_kv
  q_spec = pl.BlockSpec((None, None, bq, d), lambda i, b_, h: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, lk, d),
                         lambda i, b_, h: (b_, h // group, 0, 0))
  kernel = functools.partial(_fwd_kernel_gpu, scale=cfg.scale,
                             soft_cap=cfg.soft_cap, bk=bk)
  return pl.pallas_call(
      kernel,
      grid=(lq // bq, b, hq),
      in_specs=[_whole(x) for x in meta] + [q_spec, kv_spec, kv_spec,
                                            _whole(pm)],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1),
                                      lambda i, b_, h: (b_, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                 jax.ShapeDtypeStruct((b, hq, lq, 1), _F32)],
      compiler_params=_gpu_params(cfg.interpret),
      interpret=cfg.interpret,
      name="block_sparse_attention_fwd_gpu",
  )(*meta, qp, kp, vp, pm)


def _dq_gpu(meta, qp, kp, vp, dop, lse, delta, pm, cfg):
  b, hq, lq, d = qp.shape
  lk, group = kp.shape[2], hq // kp.shape[1]
  bq, bk = cfg.block_q, cfg.block_kv
  q_spec = pl.BlockSpec((None, None, bq, d), lambda i, b_, h: (b_, h, i, 0))
  r_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b_, h: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, lk, d),
                         lambda i, b_, h: (b_, h // group, 0, 0))
  kernel = functools.partial(_dq_kernel_gpu, scale=cfg.scale,
                             soft_cap=cfg.soft_cap, bk=bk)
  return pl.pallas_call(
      kernel,
      grid=(lq // bq, b, hq),
      in_specs=[_whole(x) for x in meta] + [q_spec, kv_spec, kv_spec, q_spec,
                                            r_spec, r_spec, _whole(pm)],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
      compiler_params=_gpu_params(cfg.interpret),
      interpret=cfg.interpret,
      name="block_sparse_attention_dq_gpu",
  )(*meta, qp, kp, vp, dop, lse, delta, pm)


def _dkv_gpu(meta_t, qp, kp, vp, dop, lse, delta, pm, cfg):
  b, hq, lq, d = qp.shape
  hkv, lk = kp.shape[1], kp.shape[2]
  group = hq // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda kb, b_, h: (b_, h, kb, 0))
  q_spec = pl.BlockSpec((None, group, lq, d), lambda kb, b_, h: (b_, h, 0, 0))
  r_spec = pl.BlockSpec((None, group, lq, 1), lambda kb, b_, h: (b_, h, 0, 0))
  kernel = functools.partial(_dkv_kernel_gpu, scale=cfg.scale,
                             soft_cap=cfg.soft_cap, bq=bq, group=group)
  return pl.pallas_call(
      kernel,
      grid=(lk // bk, b, hkv),
      in_specs=[_whole(x) for x in meta_t] + [q_spec, kv_spec, kv_spec,
                                              q_spec, r_spec, r_spec,
                                              _whole(pm)],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype),
                 jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
      compiler_params=_gpu_params(cfg.interpret),
      interpret=cfg.interpret,
      name="block_sparse_attention_dkv_gpu",
  )(*meta_t, qp, kp, vp, dop, lse, delta, pm)


# --------------------------------------------------------------------------
# custom_vjp wrapper.


@dataclasses.dataclass(frozen=True)
class _Config:
  mask: object
  num_q_heads: int
  block_q: int
  block_kv: int
  scale: float
  soft_cap: float | None
  backend: str
  interpret: bool

  @property
  def info(self) -> mask_lib.MaskInfo:
    return mask_lib.compile_mask(self.mask, self.block_q, self.block_kv)

  def metadata(self):
    """(forward, transposed) metadata as jnp int32 operand tuples."""
    info = self.info
    hm = info.head_map if info.num_heads > 1 else jnp.zeros(
        (self.num_q_heads,), jnp.int32)
    hm = jnp.asarray(hm, jnp.int32)
    fwd = (hm,) + tuple(jnp.asarray(a, jnp.int32) for a in (
        info.kv_indices, info.kv_counts, info.kv_full, info.kv_mask_ids))
    bwd = (hm,) + tuple(jnp.asarray(a, jnp.int32) for a in (
        info.q_indices, info.q_counts, info.q_full, info.q_mask_ids))
    pm = jnp.asarray(info.partial_masks, jnp.int8)
    return fwd, bwd, pm


def _pad_seq(x, multiple):
  pad = (-x.shape[2]) % multiple
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x


def _forward(q, k, v, cfg):
  meta, _, pm = cfg.metadata()
  qp, kp, vp = (_pad_seq(q, cfg.block_q), _pad_seq(k, cfg.block_kv),
                _pad_seq(v, cfg.block_kv))
  fwd = _fwd_tpu if cfg.backend == "tpu" else _fwd_gpu
  o, lse = fwd(meta, qp, kp, vp, pm, cfg)
  return o[:, :, :q.shape[2]], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, cfg):
  return _forward(q, k, v, cfg)[0]


def _attention_fwd(q, k, v, cfg):
  o, lse = _forward(q, k, v, cfg)
  return o, (q, k, v, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, o, lse = res
  meta, meta_t, pm = cfg.metadata()
  qp, kp, vp = (_pad_seq(q, cfg.block_q), _pad_seq(k, cfg.block_kv),
                _pad_seq(v, cfg.block_kv))
  dop = _pad_seq(do.astype(q.dtype), cfg.block_q)
  delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1, keepdims=True)
  delta = _pad_seq(delta, cfg.block_q)
  if cfg.backend == "tpu":
    dq = _dq_tpu(meta, qp, kp, vp, dop, lse, delta, pm, cfg)
    dk, dv = _dkv_tpu(meta_t, qp, kp, vp, dop, lse, delta, pm, cfg)
  else:
    dq = _dq_gpu(meta, qp, kp, vp, dop, lse, delta, pm, cfg)
    dk, dv = _dkv_gpu(meta_t, qp, kp, vp, dop, lse, delta, pm, cfg)
  lq, lk = q.shape[2], k.shape[2]
  return dq[:, :, :lq], dk[:, :, :lk], dv[:, :, :lk]


_attention.defvjp(_attention_fwd, _attention_bwd)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def block_sparse_attention(q, k, v, mask=None, *, scale=None, soft_cap=None,
                           block_q: int = 128, block_kv: int = 128,
                           backend: str | None = None,
                           interpret: bool | None = None):
  """Masked (GQA/MQA) attention over the non-empty blocks of `mask`.

  Same contract as `reference.attention_reference`: q (B, Hq, Lq, D), k/v
  (B, Hkv, Lkv, D); mask a `Mask`, a `MultiHeadMask` with Hq heads, or None
  (full); scale defaults to 1/sqrt(D); optional logit soft cap. Returns
  (B, Hq, Lq, D) in q.dtype; fully masked rows are 0. Differentiable in q, k,
  v (Pallas backward kernels). Blocks larger than the (8-rounded) sequence
  are shrunk to it. backend: "tpu" (scalar-prefetch grid; default except on
  GPU) or "gpu" (fori_loop driver). interpret: None means True on CPU.
  """
  _check_shapes(q, k, v, mask)
  lq, lk = q.shape[2], k.shape[2]
  if mask is None:
    mask = mask_lib.FullMask((lq, lk))
  platform = jax.default_backend()
  if backend is None:
    backend = "gpu" if platform == "gpu" else "tpu"
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
  if interpret is None:
    interpret = platform == "cpu"
  cfg = _Config(
      mask=mask, num_q_heads=q.shape[1],
      block_q=min(int(block_q), _round_up(lq, 8)),
      block_kv=min(int(block_kv), _round_up(lk, 8)),
      scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
      soft_cap=None if soft_cap is None else float(soft_cap),
      backend=backend, interpret=bool(interpret))
  return _attention(q, k, v, cfg)

