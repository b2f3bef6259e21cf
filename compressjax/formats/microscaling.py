"""Microscaling: OCP MX v1.0 (MXFP8, MXFP6, MXFP4, MXINT8) and NVFP4.

OCP Microscaling Formats (MX) v1.0, Sec. 5-6: a block of k = 32 consecutive
elements (here along the input axis) shares one scale X = 2^e stored as E8M0
(an unsigned biased exponent, bias 127, 0xFF = NaN). Sec. 6.3 computes
  e = floor(log2(max_i |V_i|)) - emax_elem   (clamped to the E8M0 range)
  P_i = element_round(V_i / X), saturating at the element format's max normal,
where emax_elem is the exponent of the element format's largest normal: 8
(e4m3), 15 (e5m2), 2 (e2m3), 4 (e3m2), 2 (e2m1), and 0 for MXINT8, whose
elements are int8 with an implicit 2^-6 (so its QArray scale is 2^(e-6), still a
power of two). MXFP4 = 4 + 8/32 = 4.25 bits per element.

NVFP4 (NVIDIA Blackwell; "Pretraining LLMs with NVFP4", 2025, Sec. 2): blocks
of 16 FP4 e2m1 elements, each block scale stored as FP8 e4m3, times one float32
per-tensor scale s_t = amax(W) / (6 * 448) so that block scales use e4m3's
range: s_b = e4m3(amax_block / (6 * s_t)), P_i = e2m1(V_i / (s_b * s_t)).
4 + 8/16 = 4.5 bits per element (plus 32 bits per tensor).

Both are QArrays whose `scale` is itself a QArray (E8M0 codes with no scale;
e4m3 codes with the tensor scale), so nothing downstream special-cases them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from compressjax.core.format import Format, register_format
from compressjax.core.qarray import QArray, apply_groups
from compressjax.formats.float import FloatFormat
from compressjax.formats.integer import IntFormat
from pallas_kernels import layout

MX_ELEMENTS = {  # scheme -> (element format, emax_elem)
    "mxfp8_e4m3": (FloatFormat("e4m3fn"), 8),
    "mxfp8_e5m2": (FloatFormat("e5m2"), 15),
    "mxfp6_e2m3": (FloatFormat("e2m3fn"), 2),
    "mxfp6_e3m2": (FloatFormat("e3m2fn"), 4),
    "mxfp4": (FloatFormat("e2m1fn"), 2),
    "mxint8": (IntFormat(8), 0),
}
MX_BLOCK = 32
NVFP4_BLOCK = 16


@register_format
@dataclasses.dataclass(frozen=True)
class E8M0Format(Format):
  """Power-of-two scale: stored u in [0, 254] means 2^(u - 127); 255 is NaN."""

  kind = "e8m0"
  bits: int = 8
  name: str = "e8m0"

  @property
  def storage_dtype(self):
    return jnp.uint8

  def encode(self, exponent):
    return (jnp.clip(exponent, -127, 127) + 127).astype(jnp.uint8)

  def decode(self, stored):
    # ldexp, not exp2: XLA's exp2 is not exact at integers
    v = jnp.ldexp(jnp.float32(1.0), stored.astype(jnp.int32) - 127)
    return jnp.where(stored == 255, jnp.nan, v)

  def round(self, x, key=None):
    return jnp.clip(jnp.floor(x), -127, 127)


def _block_amax(x, axis: int, block: int):
  n = x.shape[axis]
  xs = jnp.abs(x).reshape(x.shape[:axis] + (n // block, block) +
                          x.shape[axis + 1:])
  return jnp.max(xs, axis=axis + 1)


def _pack(fmt, v, axis):
  stored = fmt.encode(v)
  return layout.pack(stored, fmt.bits, axis) if fmt.bits < 8 else stored


def quantize_mx(w, scheme: str = "mxfp4", *, axis: int = 0, key=None) -> QArray:
  """OCP MX quantization with blocks of 32 along `axis` (module doc)."""
  fmt, emax = MX_ELEMENTS[scheme]
  w = jnp.asarray(w)
  x = w.astype(jnp.float32)
  amax = _block_amax(x, axis, MX_BLOCK)
  # floor(log2(amax)) exactly, from the float32 exponent bits (0 -> -127)
  e = jnp.where(amax > 0, jnp.frexp(amax)[1] - 1, -127) - emax
  e = jnp.clip(e, -127, 127)
  shift = 6 if scheme == "mxint8" else 0  # MXINT8's implicit 2^-6
  scale_q = QArray(codes=E8M0Format().encode(e - shift), scale=None, zero=None,
                   shape=tuple(amax.shape), dtype="float32", fmt=E8M0Format(),
                   axis=axis)
  s = scale_q.materialize()
  # XLA flushes float32 subnormals (2^-127) to zero: keep 0 / 0 out
  safe = jnp.where(s > 0, s, 1.0)
  v = fmt.round(apply_groups(x, safe, axis, lambda a, b: a / b), key)
  return QArray(codes=_pack(fmt, v, axis), scale=scale_q, zero=None,
                shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, fmt=fmt,
                axis=axis)


def quantize_nvfp4(w, *, axis: int = 0, key=None) -> QArray:
  """NVFP4: e2m1 blocks of 16, e4m3 block scales, float32 tensor scale."""
  fp4, fp8 = FloatFormat("e2m1fn"), FloatFormat("e4m3fn")
  w = jnp.asarray(w)
  x = w.astype(jnp.float32)
  amax_t = jnp.max(jnp.abs(x))
  s_t = jnp.where(amax_t > 0, amax_t / (fp4.max_value * fp8.max_value), 1.0)
  s_t = jnp.reshape(s_t, (1,) * x.ndim)
  amax_b = _block_amax(x, axis, NVFP4_BLOCK)
  s_b = fp8.round(amax_b / (fp4.max_value * s_t))
  scale_q = QArray(codes=fp8.encode(s_b), scale=s_t.astype(jnp.float32),
                   zero=None, shape=tuple(amax_b.shape), dtype="float32",
                   fmt=fp8, axis=axis)
  s = scale_q.materialize()
  safe = jnp.where(s > 0, s, 1.0)  # an all-zero block has scale 0: codes 0
  v = fp4.round(apply_groups(x, safe, axis, lambda a, b: a / b), key)
  return QArray(codes=_pack(fp4, v, axis), scale=scale_q, zero=None,
                shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, fmt=fp4,
                axis=axis)
