"""Decode attention over a KV store's slots, masked by stored positions.

Flash-Decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
long-context inference"): the S slots of a (batch, kv head) are split into
`splits` chunks processed in parallel; each chunk runs FlashAttention's
online softmax (Dao 2023, FlashAttention-2 Alg. 1, lines 8-10) over blocks of
`block_kv` slots and writes its normalised output o_c and logsumexp lse_c;
the chunks are combined exactly: lse = logsumexp_c lse_c,
o = sum_c exp(lse_c - lse) o_c.

The mask is computed from positions inside the kernel (a store may hold its
tokens in any slot order, per head, with empty slots): query row m at
position qp sees slot s holding position kp iff

    kp != -1 and kp <= qp [and qp - kp < window]
    [and (qp - kp < policy_window or kp < sinks)]

Layout: q (B, H_kv, M, D), the M = G * T query rows of a kv head (its G query
heads times T new tokens), q_positions (B, M); k, v (B, H_kv, S, D);
k_positions (B, H_kv, S) int32. Returns (out (B, H_kv, M, D) in q.dtype,
lse (B, H_kv, M) float32; rows that see nothing give 0 and -inf).

One driver for every backend: grid (batch, kv head, split), a
`lax.fori_loop` over the chunk's kv blocks with dynamic slices (as the GPU
driver of `kernel.py`), so it lowers with Triton and runs in interpret mode
on CPU. Not compiled on TPU/GPU in this repository's tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention.kernel import _softmax_step

_F32 = jnp.float32
NO_POSITION = -1


def _allowed(qp, kp, window, policy_window, sinks):
  ok = (kp != NO_POSITION) & (kp <= qp)
  if window is not None:
    ok &= qp - kp < window
  if policy_window is not None:
    ok &= (qp - kp < policy_window) | (kp < sinks)
  return ok


def _kernel(qpos_ref, q_ref, k_ref, v_ref, kpos_ref, o_ref, lse_ref, *,
            scale, window, policy_window, sinks, block_kv, blocks):
  q = q_ref[...]
  m_rows, d = q.shape
  qp = qpos_ref[...]  # (M, 1)

  def body(j, carry):
    sl = pl.ds(j * block_kv, block_kv)
    k, v = k_ref[sl, :], v_ref[sl, :]
    kp = kpos_ref[sl][None, :]  # (1, bk)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=_F32) * scale
    s = jnp.where(_allowed(qp, kp, window, policy_window, sinks), s,
                  -jnp.inf)
    return _softmax_step(s, v, *carry)

  init = (jnp.full((m_rows, 1), -jnp.inf, _F32),
          jnp.zeros((m_rows, 1), _F32), jnp.zeros((m_rows, d), _F32))
  m, l, acc = lax.fori_loop(0, blocks, body, init)
  ok = l > 0
  o_ref[...] = (acc / jnp.where(ok, l, 1.0)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def decode_attention(q, k, v, q_positions, k_positions, *, scale=None,
                     window: int | None = None,
                     policy_window: int | None = None, sinks: int = 0,
                     block_kv: int = 128, splits: int | None = None,
                     interpret: bool | None = None):
  """Masked attention of a few query rows over position-tagged slots (see
  the module docstring). `splits`: parallel chunks (default: enough for
  chunks of ~8 blocks). interpret: None means True on CPU."""
  b, hkv, m, d = q.shape
  s = k.shape[2]
  if k.shape != (b, hkv, s, d) or v.shape != k.shape:
    raise ValueError(f"decode_attention: q {q.shape} does not fit k {k.shape}"
                     f" / v {v.shape} ((B, H_kv, M, D) and (B, H_kv, S, D))")
  if q_positions.shape != (b, m) or k_positions.shape != (b, hkv, s):
    raise ValueError(f"decode_attention: positions {q_positions.shape} / "
                     f"{k_positions.shape} must be {(b, m)} / {(b, hkv, s)}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  scale = float(d ** -0.5 if scale is None else scale)
  bk = min(int(block_kv), -(-s // 8) * 8)
  nblocks = -(-s // bk)
  if splits is None:
    splits = max(1, nblocks // 8)
  splits = max(1, min(int(splits), nblocks))
  per = -(-nblocks // splits)  # blocks per split
  chunk = per * bk
  pad = splits * chunk - s
  if pad:  # padded slots are empty
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    k_positions = jnp.pad(k_positions, ((0, 0), (0, 0), (0, pad)),
                          constant_values=NO_POSITION)
  qpos = q_positions.astype(jnp.int32)[..., None]  # (B, M, 1)
  kernel = functools.partial(
      _kernel, scale=scale, window=window, policy_window=policy_window,
      sinks=int(sinks), block_kv=bk, blocks=per)
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, hkv, splits),
      in_specs=[
          pl.BlockSpec((None, m, 1), lambda i, h, c: (i, 0, 0)),
          pl.BlockSpec((None, None, m, d), lambda i, h, c: (i, h, 0, 0)),
          pl.BlockSpec((None, None, chunk, d), lambda i, h, c: (i, h, c, 0)),
          pl.BlockSpec((None, None, chunk, d), lambda i, h, c: (i, h, c, 0)),
          pl.BlockSpec((None, None, chunk), lambda i, h, c: (i, h, c)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, m, d),
                       lambda i, h, c: (i, h, c, 0, 0)),
          pl.BlockSpec((None, None, None, m, 1),
                       lambda i, h, c: (i, h, c, 0, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, m, d), _F32),
                 jax.ShapeDtypeStruct((b, hkv, splits, m, 1), _F32)],
      interpret=interpret,
      name="kv_decode_attention",
  )(qpos, q, k, v, k_positions.astype(jnp.int32))
  lse_all = jax.nn.logsumexp(lse, axis=2)  # (B, H, M, 1)
  safe = jnp.where(jnp.isfinite(lse_all), lse_all, 0.0)
  w = jnp.exp(lse - safe[:, :, None])  # 0 for empty chunks
  out = jnp.sum(w * o, axis=2)
  return out.astype(q.dtype), lse_all[..., 0]


def decode_reference(q, k, v, q_positions, k_positions, *, scale=None,
                     window=None, policy_window=None, sinks=0):
  """Plain jnp float32 reference of `decode_attention` (same contract)."""
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bhmd,bhsd->bhms", q.astype(_F32), k.astype(_F32),
                 precision=lax.Precision.HIGHEST) * scale
  ok = _allowed(q_positions[:, None, :, None], k_positions[:, :, None, :],
                window, policy_window, sinks)
  s = jnp.where(ok, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  p = jnp.where(ok, jnp.exp(s - safe[..., None]), 0.0)
  o = jnp.einsum("bhms,bhsd->bhmd", p, v.astype(_F32),
                 precision=lax.Precision.HIGHEST)
  return o.astype(q.dtype), lse
