"""The decoders' attention, with or without a KV store.

Scaled dot-product attention (Vaswani et al. 2017, Eq. 1),
softmax(q k^T * scale + mask) v, with grouped-query heads (Ainslie et al.
2023: query head h reads kv head h // G, G = H / H_kv, as HF's repeat_kv),
the softmax in float32 (as HF upcasts it), and the mask made from token
positions only:

  key j is visible to query i  iff  pos_j != NO_POSITION and pos_j <= pos_i
                                    [and pos_i - pos_j < window]

The window rule is HF's sliding_window_overlay (kv_idx > q_idx - window: the
query and the window - 1 tokens before it). Padding tokens carry NO_POSITION,
so they are never attended to; a padding query sees no key and gets a
uniform (finite, meaningless) average.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.errors import CompressionError
from compressjax.kv.cache import NO_POSITION


def attend(q, k, v, q_positions, k_positions, *, scale: float,
           window: int | None = None):
  """Masked grouped-query attention over explicit keys.

  Args:
    q: (B, T, H, D) queries; k, v: (B, S, H_kv, D), H a multiple of H_kv.
    q_positions: (B, T) int; k_positions: (B, S) or, for per-head slots,
      (B, H_kv, S) int; NO_POSITION marks padding / empty slots.
    scale: multiplies q k^T.
    window: sliding window length (keys with pos_i - pos_j < window).
  Returns:
    (out (B, T, H, D), probs (B, H_kv, G, T, S) float32).
  """
  if k.shape != v.shape or k.ndim != 4:
    raise CompressionError(
        f"attention: keys {tuple(k.shape)} and values {tuple(v.shape)} must "
        "be (batch, slots, kv_heads, head_dim) alike")
  sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
  return attend_parts(q, [(sw(k), sw(v), k_positions)], q_positions,
                      scale=scale, window=window)


def visible(q_positions, k_positions, *, window: int | None = None,
            policy_window: int | None = None, sinks: int = 0):
  """Which keys each query sees, from positions only: (B, 1|H_kv, 1, T, S)
  bool. `policy_window` / `sinks`: an eviction policy's stream mask (a query
  at i sees j iff i - j < policy_window or j < sinks), so a call with many
  tokens sees what a token-by-token run would have kept."""
  kp = k_positions[:, None, None, None, :] if k_positions.ndim == 2 else \
      k_positions[:, :, None, None, :]
  qp = q_positions[:, None, None, :, None]
  allowed = (kp != NO_POSITION) & (kp <= qp)
  if window is not None:
    allowed &= qp - kp < window
  if policy_window is not None:
    allowed &= (qp - kp < policy_window) | (kp < sinks)
  return allowed


def attend_parts(q, parts, q_positions, *, scale: float,
                 window: int | None = None, policy_window: int | None = None,
                 sinks: int = 0, sink_q=None):
  """`attend` over keys given in head-major parts, one softmax over all.

  Args:
    q: (B, T, H, D); parts: sequence of (k, v, k_positions) with k, v
      (B, H_kv, S_i, D) and k_positions (B, S_i) or (B, H_kv, S_i).
    window, policy_window, sinks: see `visible`.
    sink_q: (B, T, H, D) or None: the queries that score keys at positions
      < sinks (StreamingLLM's positions within the cache, `kv.policies`).
  Returns:
    (out (B, T, H, D), probs (B, H_kv, G, T, sum S_i) float32).
  """
  b, t, h, d = q.shape
  hkv = parts[0][0].shape[1]
  for k, v, _ in parts:
    if h % hkv or k.shape != v.shape or k.shape[-1] != d or \
        k.shape[1] != hkv or k.shape[0] != b:
      raise CompressionError(
          f"attention: queries {tuple(q.shape)} do not fit keys "
          f"{tuple(k.shape)} / values {tuple(v.shape)} (heads must be a "
          "multiple of kv heads, head dims equal)")
  g = h // hkv
  qg = q.reshape(b, t, hkv, g, d)
  sq = None if sink_q is None else sink_q.reshape(b, t, hkv, g, d)
  s = jnp.asarray(scale, q.dtype)
  logits = []
  for k, _, kpos in parts:
    lg = (jnp.einsum("btkgd,bksd->bkgts", qg, k) * s).astype(jnp.float32)
    if sq is not None:
      kp = kpos[:, None, None, None, :] if kpos.ndim == 2 else \
          kpos[:, :, None, None, :]
      ls = (jnp.einsum("btkgd,bksd->bkgts", sq, k) * s).astype(jnp.float32)
      lg = jnp.where(kp < sinks, ls, lg)
    ok = visible(q_positions, kpos, window=window,
                 policy_window=policy_window, sinks=sinks)
    logits.append(jnp.where(ok, lg, jnp.finfo(jnp.float32).min))
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  out, start = 0, 0
  for k, v, _ in parts:
    n = k.shape[2]
    out = out + jnp.einsum("bkgts,bksd->btkgd",
                           probs[..., start:start + n].astype(v.dtype), v)
    start += n
  return out.reshape(b, t, h, d), probs


def attention(q, k, v, positions, *, cache: Any = None, scale: float,
              window: int | None = None, rotary: Any = None):
  """One attention layer of a decoder: the new tokens' q, k, v (B, T, ., D)
  and their positions (B, T) (NO_POSITION on padding).

  Without a cache the new tokens attend to each other; with one (a store,
  see kv.cache / kv.store) the store runs the step (`store.attention`):
  appends the tokens, attends over what it keeps, updates its policy.
  `rotary(x, positions)`: the model's RoPE, for stores that move keys to
  positions within the cache (StreamingLLM); None for learned positions.
  Returns (out, cache).
  """
  if cache is None:
    out, _ = attend(q, k, v, positions, positions, scale=scale, window=window)
    return out, None
  return cache.attention(q, k, v, positions, scale=scale, window=window,
                         rotary=rotary)


def token_positions(shape: tuple[int, int], positions=None,
                    attention_mask=None, cache: Any = None):
  """Positions of new tokens from the decoders' optional arguments.

  Args:
    shape: (B, T) of input_ids.
    positions: (B, T) int or None: by default each row counts its real
      tokens from 0 (from the store's `next_position()` with a cache), so
      left-padded rows start at 0 on their first real token.
    attention_mask: (B, T) 1 for a token, 0 for padding, over the new tokens
      only (earlier padding is remembered by the store), or None.
    cache: a layer's store (the first layer's), or None.
  Returns:
    (index, tokens): `index` (B, T) >= 0 for RoPE / learned position tables
    (padding gets 0), `tokens` (B, T) with NO_POSITION on padding (for
    attention and the store).
  """
  b, t = shape
  valid = (jnp.ones((b, t), bool) if attention_mask is None
           else jnp.asarray(attention_mask).astype(bool))
  if valid.shape != (b, t):
    raise CompressionError(f"attention_mask has shape {tuple(valid.shape)}; "
                           f"it must match input_ids {(b, t)}")
  if positions is None:
    start = 0 if cache is None else cache.next_position()[:, None]
    positions = start + jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1
  positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
  tokens = jnp.where(valid, positions, NO_POSITION)
  return jnp.where(valid, positions, 0), tokens
