"""Plain-jnp reference ops over the documented layout (`layout.py`).

These are the XLA formulations compressjax's dispatch uses where no Pallas
kernel applies, and the references the kernels are tested against.

quantized_matmul layout:
  x      (..., K) float activations
  codes  (K', N) stored integers; packed along K (K' = ceil(K*bits/8)) when
         bits < 8, else (K, N) int8/uint8
  scale  (G, N) or (G, 1) float, G groups of K/G consecutive rows
  zero   None or (G, N)/(G, 1) unsigned zero points
  offset integer added to stored codes to get code values (e.g. -8 for a
         symmetric int4 stored unsigned)
  lut    None or a table of 2**bits float values: code values are lut[codes]
         instead (fp8/fp6/fp4 bit patterns, NF4 and other level sets)
  y = sum_g (x_g @ (value(codes_g) - zero_g)) * scale_g, in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import layout


def quantized_matmul(x, codes, scale, zero=None, *, bits: int, k: int,
                     offset: int = 0, lut=None, out_dtype=None):
  out_dtype = out_dtype or x.dtype
  stored = layout.unpack(codes, bits, k, 0)
  if lut is not None:
    q = jnp.asarray(lut, jnp.float32)[stored.astype(jnp.int32)]
  else:
    q = stored.astype(jnp.float32) + offset
  g = scale.shape[0]
  lead = x.shape[:-1]
  xf = x.astype(jnp.float32).reshape(-1, g, k // g)
  qg = q.reshape(g, k // g, q.shape[-1])
  acc = jnp.einsum("bgk,gkn->bgn", xf, qg,
                   precision=jax.lax.Precision.HIGHEST)
  if zero is not None:
    acc = acc - xf.sum(-1)[..., None] * zero.astype(jnp.float32)[None]
  y = jnp.sum(acc * scale.astype(jnp.float32)[None], axis=1)
  return y.reshape(lead + (y.shape[-1],)).astype(out_dtype)


def int8_matmul(xq, x_scale, wq, w_scale, *, out_dtype=jnp.float32):
  """W8A8: int8 x int8 -> int32 accumulation, then both scales.

  xq (..., K) int8 with per-token x_scale (..., 1); wq (K, N) int8 with
  per-output-channel w_scale (1, N) or (N,): y = (xq @ wq) * x_scale * w_scale.
  """
  acc = jax.lax.dot_general(xq, wq, (((xq.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * jnp.reshape(
      w_scale, (-1,)).astype(jnp.float32)
  return y.astype(out_dtype)
