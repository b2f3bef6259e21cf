"""Plain-jnp masked attention: the reference the block-sparse FlashAttention-2
kernel (Dao 2023, Alg. 1/2) is tested against. It materialises the dense
logits and the dense boolean mask (`mask.dense_mask`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import mask as mask_lib


def _check_shapes(q, k, v, mask):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError("q, k, v must be (batch, heads, length, head_dim)")
  b, hq, lq, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} "
                     f"v={v.shape}")
  hkv, lkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
  if mask is not None:
    if tuple(mask.shape) != (lq, lkv):
      raise ValueError(f"mask shape {mask.shape} != (q_len, kv_len) "
                       f"{(lq, lkv)}")
    if isinstance(mask, mask_lib.MultiHeadMask) and mask.num_heads not in (
        1, hq):
      raise ValueError(f"MultiHeadMask has {mask.num_heads} heads, q has {hq}")


def attention_reference(q, k, v, mask=None, *, scale=None, soft_cap=None):
  """softmax(mask(cap(scale * q k^T))) v, in float32, returned in q.dtype.

  q: (B, Hq, Lq, D); k, v: (B, Hkv, Lkv, D) with Hq a multiple of Hkv (GQA /
  MQA: query head h uses kv head h // (Hq // Hkv)). mask: a `Mask` shared by
  all heads, a `MultiHeadMask` with Hq (or 1) heads, or None (full). scale
  defaults to 1/sqrt(D). soft_cap, if given, maps logits to
  soft_cap * tanh(logits / soft_cap) (after scaling, before masking).
  Fully masked query rows output 0 (and get zero gradients).
  """
  _check_shapes(q, k, v, mask)
  b, hq, lq, d = q.shape
  hkv, lkv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, lq, d)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  s = jnp.einsum("bkgqd,bksd->bkgqs", qf, kf,
                 precision=jax.lax.Precision.HIGHEST) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  s = s.reshape(b, hq, lq, lkv)
  if mask is not None:
    dense = jnp.asarray(mask_lib.dense_mask(mask))[None]  # (1, Hm, Lq, Lkv)
    s = jnp.where(dense, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  o = jnp.einsum("bkgqs,bksd->bkgqd", p.reshape(b, hkv, hq // hkv, lq, lkv),
                 vf, precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, hq, lq, d).astype(q.dtype)
