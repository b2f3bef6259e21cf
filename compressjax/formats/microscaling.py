"""Microscaling: OCP MX v1.0 (MXFP8, MXFP6, MXFP4, MXINT8) and NVFP4.

OCP Microscaling Formats (MX) v1.0, Sec. 5-6: a block of k = 32 consecutive
elements (here along the contraction, rows of the (K, N) matrix a QArray
stores) shares one scale X = 2^e stored as E8M0 (an unsigned biased exponent,
bias 127, 0xFF = NaN). Sec. 6.3 computes
  e = floor(log2(max_i |V_i|)) - emax_elem   (clamped to the E8M0 range)
  P_i = element_round(V_i / X), saturating at the element format's max normal,
where emax_elem is the exponent of the element format's largest normal: 8
(e4m3), 15 (e5m2), 2 (e2m3), 4 (e3m2), 2 (e2m1), and 0 for MXINT8, whose
elements are int8 (full range -128..127) with an implicit 2^-6 (so its QArray
scale is 2^(e-6), still a power of two). MXFP4 = 4 + 8/32 = 4.25 bits per
element.

NVFP4 (NVIDIA Blackwell; "Pretraining LLMs with NVFP4", 2025, Sec. 2): blocks
of 16 FP4 e2m1 elements, each block scale stored as FP8 e4m3, times one float32
per-tensor scale s_t = amax(W) / (6 * 448) so that block scales use e4m3's
range: s_b = e4m3(amax_block / (6 * s_t)), P_i = e2m1(V_i / (s_b * s_t)).
4 + 8/16 = 4.5 bits per element (plus 32 bits per tensor).

Both are QArrays whose `fmt` is the scheme (`MXFormat`, `NVFP4Format`: block
size, scale format and element format in one object) and whose `scale` is
itself a QArray (E8M0 codes with no scale; e4m3 codes with the tensor scale),
so nothing downstream special-cases them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from compressjax.core.contraction import (MatrixLayout, apply_groups,
                                          normalize_contract)
from compressjax.core.errors import CompressionError
from compressjax.core.format import (Capabilities, Format, KernelDecode,
                                     register_format)
from compressjax.core.qarray import QArray, pack_codes
from compressjax.formats.float import FloatFormat
from compressjax.formats.integer import IntFormat

MX_BLOCK = 32
NVFP4_BLOCK = 16
# element -> (scheme name, emax_elem)
MX_ELEMENTS = {
    "e4m3fn": ("mxfp8_e4m3", 8), "e5m2": ("mxfp8_e5m2", 15),
    "e2m3fn": ("mxfp6_e2m3", 2), "e3m2fn": ("mxfp6_e3m2", 4),
    "e2m1fn": ("mxfp4", 2), "int8": ("mxint8", 0),
}
MXINT8_SHIFT = 6  # MXINT8's implicit 2^-6


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

  @property
  def code_range(self) -> tuple[float, float]:
    return 2.0**-127, 2.0**127

  def encode(self, exponent):
    return (jnp.clip(exponent, -127, 127) + 127).astype(jnp.uint8)

  def decode(self, stored):
    # ldexp, not exp2: XLA's exp2 is not exact at integers
    v = jnp.ldexp(jnp.float32(1.0), stored.astype(jnp.int32) - 127)
    return jnp.where(stored == 255, jnp.nan, v)

  def round(self, x, key=None):
    return jnp.clip(jnp.floor(x), -127, 127)


class _BlockFormat(Format):
  """Elements of `element_format` in fixed blocks; storage, rounding and
  kernel decoding are the element's."""

  capabilities = Capabilities(groups=False)

  @property
  def element_format(self) -> Format:
    raise NotImplementedError

  @property
  def bits(self) -> int:
    return self.element_format.bits

  @property
  def storage_dtype(self):
    return self.element_format.storage_dtype

  @property
  def code_range(self) -> tuple[float, float]:
    return self.element_format.code_range

  def encode(self, q):
    return self.element_format.encode(q)

  def decode(self, stored):
    return self.element_format.decode(stored)

  def round(self, x, key=None):
    return self.element_format.round(x, key)

  def kernel_decode(self) -> KernelDecode | None:
    return self.element_format.kernel_decode()

  def _leaf(self, w, x, lay, scale_q, key) -> QArray:
    s = scale_q.materialize()
    # XLA flushes float32 subnormals (2^-127) to zero, and an all-zero NVFP4
    # block has scale 0: keep 0 / 0 out (its codes are 0)
    safe = jnp.where(s > 0, s, 1.0)
    v = self.round(apply_groups(x, safe, lambda a, b: a / b), key)
    return QArray(codes=pack_codes(self.encode(v), self.bits), scale=scale_q,
                  zero=None, shape=tuple(w.shape),
                  dtype=jnp.dtype(w.dtype).name, fmt=self,
                  contract=lay.contract)


def _block_amax(x, block: int):
  k, n = x.shape
  return jnp.max(jnp.abs(x).reshape(k // block, block, n), axis=1)


def _check_blocks(fmt, k: int):
  if k % fmt.block_size:
    raise CompressionError(
        f"{fmt.name} blocks of {fmt.block_size} do not divide in_features {k}"
        " (the flattened contraction axes)")


@register_format
@dataclasses.dataclass(frozen=True)
class MXFormat(_BlockFormat):
  """OCP MX scheme with the given element ("e2m1fn" = MXFP4, "int8", ...)."""

  kind = "mx"
  element: str = "e2m1fn"
  block_size = MX_BLOCK

  def __post_init__(self):
    if self.element not in MX_ELEMENTS:
      raise CompressionError(f"unknown MX element {self.element!r}; use one "
                             f"of {sorted(MX_ELEMENTS)}")

  @property
  def name(self) -> str:
    return MX_ELEMENTS[self.element][0]

  @property
  def element_format(self) -> Format:
    if self.element == "int8":
      return IntFormat(8, symmetric=True, narrow_range=False)
    return FloatFormat(self.element)

  @property
  def scale_format(self) -> Format:
    return E8M0Format()

  def quantize(self, w, *, contract, group_size=None, per_tensor=False,
               scale_dtype=None, key=None) -> QArray:
    w = jnp.asarray(w)
    lay = MatrixLayout(tuple(w.shape), tuple(contract))
    x = lay.to_matrix(w.astype(jnp.float32))
    _check_blocks(self, lay.k)
    amax = _block_amax(x, MX_BLOCK)
    emax = MX_ELEMENTS[self.element][1]
    # floor(log2(amax)) exactly, from the float32 exponent bits (0 -> -127)
    e = jnp.where(amax > 0, jnp.frexp(amax)[1] - 1, -127) - emax
    e = jnp.clip(e, -127, 127)
    shift = MXINT8_SHIFT if self.element == "int8" else 0
    e8 = E8M0Format()
    scale_q = QArray(codes=e8.encode(e - shift), scale=None, zero=None,
                     shape=tuple(amax.shape), dtype="float32", fmt=e8,
                     contract=(0,))
    return self._leaf(w, x, lay, scale_q, key)


@register_format
@dataclasses.dataclass(frozen=True)
class NVFP4Format(_BlockFormat):
  """NVFP4: e2m1 blocks of 16, e4m3 block scales, float32 tensor scale."""

  kind = "nvfp4"
  block_size = NVFP4_BLOCK

  @property
  def name(self) -> str:
    return "nvfp4"

  @property
  def element_format(self) -> Format:
    return FloatFormat("e2m1fn")

  @property
  def scale_format(self) -> Format:
    return FloatFormat("e4m3fn")

  def quantize(self, w, *, contract, group_size=None, per_tensor=False,
               scale_dtype=None, key=None) -> QArray:
    fp4, fp8 = self.element_format, self.scale_format
    w = jnp.asarray(w)
    lay = MatrixLayout(tuple(w.shape), tuple(contract))
    x = lay.to_matrix(w.astype(jnp.float32))
    _check_blocks(self, lay.k)
    amax_t = jnp.max(jnp.abs(x))
    s_t = jnp.where(amax_t > 0, amax_t / (fp4.max_value * fp8.max_value), 1.0)
    s_t = jnp.reshape(s_t, (1, 1)).astype(jnp.float32)
    amax_b = _block_amax(x, NVFP4_BLOCK)
    s_b = fp8.round(amax_b / (fp4.max_value * s_t))
    scale_q = QArray(codes=fp8.encode(s_b), scale=s_t, zero=None,
                     shape=tuple(amax_b.shape), dtype="float32", fmt=fp8,
                     contract=(0,))
    return self._leaf(w, x, lay, scale_q, key)


def quantize_mx(w, scheme: str = "mxfp4", *, axis=None, key=None) -> QArray:
  """OCP MX quantization with blocks of 32 along the contraction `axis`
  (default: `core.contraction.default_contract`)."""
  from compressjax.formats import get  # the registry of scheme names
  fmt = get(scheme)
  if not isinstance(fmt, MXFormat):
    raise CompressionError(f"{scheme!r} is not an MX scheme")
  return _quantize(fmt, w, axis, key)


def quantize_nvfp4(w, *, axis=None, key=None) -> QArray:
  """NVFP4 quantization with blocks of 16 along the contraction `axis`."""
  return _quantize(NVFP4Format(), w, axis, key)


def _quantize(fmt, w, axis, key):
  w = jnp.asarray(w)
  return fmt.quantize(w, contract=normalize_contract(axis, w.shape), key=key)
