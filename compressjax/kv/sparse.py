"""Kernel paths of `KVCache.attention` (`KVSpec(attention="pallas")`).

Prefill of an empty store (the first call, T > 1 tokens): the block-sparse
FlashAttention kernel (`pallas_kernels.attention.block_sparse_attention`)
with the mask of the policy's stream (Causal; & Local for a sliding window;
SinkWindowMask for StreamingLLM), so the blocks a window policy never lets a
query see are skipped. The kernel's masks are by index, so queries, keys and
values are first placed at row = position (left padding moves out of the
way, then outputs are gathered back): each row's real tokens must be at
positions 0 .. L-1 (the default positions of an empty store; checked when
positions are concrete).

Decoding: `pallas_kernels.attention.decode.decode_attention` (Flash-Decoding
over the store's slots, masked by stored positions) over the dequantized
keys and values.

The kernels give no attention weights: policies that score with them get
the rows they read (`Policy.observed_rows`: SnapKV's window, TOVA's last
query) from the XLA path, and where every row is needed (H2O; any
attention-scored policy decoding one token) the whole step runs on XLA, as
do StreamingLLM's repositioned sink keys. Each function returns None where
the XLA path runs instead.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from compressjax.core.base import is_concrete
from compressjax.core.errors import CompressionError
from compressjax.kv.attention import attend_parts


def _check_contiguous(positions, layer: int) -> None:
  if is_concrete(positions):
    p = np.asarray(positions)
    for row in p:
      real = row[row >= 0]
      if not np.array_equal(real, np.arange(real.size)):
        raise CompressionError(
            f"layer {layer}: the pallas prefill masks by index and needs each "
            "row's tokens at positions 0..L-1 in order; got "
            f"{real.tolist()[:8]}...; use KVSpec(attention='xla')")


def _by_position(x, positions, axis: int):
  """x with the entry of position p moved to index p along `axis` (the
  token axis); padding dropped."""
  t = positions.shape[1]
  slot = jnp.where((positions >= 0) & (positions < t), positions, t)
  bi = jnp.arange(x.shape[0])[:, None]
  x = jnp.moveaxis(x, axis, 1)
  out = jnp.zeros_like(x).at[bi, slot].set(x, mode="drop")
  return jnp.moveaxis(out, 1, axis)


def _prefill(q, k, v, positions, t_kv: int, *, scale, window, policy_window,
             sinks):
  """q (B, T, H, D) over k, v (B, H_kv, L, D) whose slot i holds position
  i; masks from the algebra of `pallas_kernels.attention.mask`."""
  from pallas_kernels.attention import block_sparse_attention
  from pallas_kernels.attention import mask as masks
  t = q.shape[1]
  shape = (t, t_kv)
  if sinks:
    m = masks.SinkWindowMask(shape, sinks, policy_window)
  else:
    m = masks.CausalMask(shape)
    if policy_window is not None:
      m = m & masks.LocalMask(shape, policy_window - 1, 0)
  if window is not None:
    m = m & masks.LocalMask(shape, window - 1, 0)
  o = block_sparse_attention(
      jnp.swapaxes(_by_position(q, positions, 1), 1, 2), k[:, :, :t_kv],
      v[:, :, :t_kv], m, scale=scale)
  idx = jnp.clip(positions, 0, t - 1)[:, :, None, None]
  return jnp.take_along_axis(jnp.swapaxes(o, 1, 2), idx, axis=1)


def _decode(q, parts, positions, *, scale, window, policy_window, sinks):
  from pallas_kernels.attention.decode import decode_attention
  b, t, h, d = q.shape
  k = jnp.concatenate([p[0] for p in parts], axis=2)
  v = jnp.concatenate([p[1] for p in parts], axis=2)
  hkv = k.shape[1]
  kp = jnp.concatenate([jnp.broadcast_to(p[2], (b, hkv, p[0].shape[2]))
                        for p in parts], axis=2)
  g = h // hkv
  rows = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(
      b, hkv, g * t, d)
  o, _ = decode_attention(rows, k, v, jnp.tile(positions, (1, g)), kp,
                          scale=scale, window=window,
                          policy_window=policy_window, sinks=sinks)
  return o.reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(
      b, t, h, d)


def store_attention(before, store, q, positions, *, scale, window):
  """Store without a policy (slot = position): the attention output."""
  t = q.shape[1]
  keys, values, kpos = store.read_heads()
  if before.fresh and t > 1:
    _check_contiguous(positions, store.layer)
    return _prefill(q, keys, values, positions, t, scale=scale,
                    window=window, policy_window=None, sinks=0)
  return _decode(q, [(keys, values, kpos)], positions, scale=scale,
                 window=window, policy_window=None, sinks=0)


def evicting_attention(store, q, stored, new, positions, *, scale, window,
                       policy_window, sinks, sink_q):
  """Store with a policy: (out, probs of the rows the policy reads) or
  (None, None)."""
  pol = store.spec.policy
  t = q.shape[1]
  rows = pol.observed_rows(t)
  if sink_q is not None or (rows == t and pol.needs_probs):
    return None, None
  if store.fresh and t > 1:
    _check_contiguous(positions, store.layer)
    out = _prefill(q, _by_position(new[0], positions, 2),
                   _by_position(new[1], positions, 2), positions, t,
                   scale=scale, window=window, policy_window=policy_window,
                   sinks=sinks)
  else:
    out = _decode(q, [stored, new], positions, scale=scale, window=window,
                  policy_window=policy_window, sinks=sinks)
  probs = None
  if rows:
    _, probs = attend_parts(q[:, -rows:], [stored, new], positions[:, -rows:],
                            scale=scale, window=window,
                            policy_window=policy_window, sinks=sinks)
  return out, probs
