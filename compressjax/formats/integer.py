"""Uniform integer formats of 2..8 bits, symmetric or asymmetric.

Code domain q: symmetric q in [-2^(b-1), 2^(b-1) - 1]; asymmetric q in
[0, 2^b - 1] (a zero point z is subtracted at dequantization). Rounding is
round-half-to-even (`jnp.round`), then clipping to the code range.

Storage: 8-bit codes are stored as they are (int8 symmetric, uint8
asymmetric); fewer bits are stored unsigned, u = q - qmin, and packed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from compressjax.core.format import Format, register_format
from compressjax.formats.rounding import stochastic_round_int

MIN_BITS, MAX_BITS = 2, 8  # 1 bit: see levels.BINARY (sign and scale)


@register_format
@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
  kind = "int"
  bits: int = 8
  symmetric: bool = True

  def __post_init__(self):
    if not MIN_BITS <= self.bits <= MAX_BITS:
      raise ValueError(
          f"integer bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")

  @property
  def name(self) -> str:
    return f"int{self.bits}" + ("" if self.symmetric else "_asym")

  @property
  def qmin(self) -> int:
    return -(1 << (self.bits - 1)) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

  @property
  def storage_dtype(self):
    if self.bits == 8 and self.symmetric:
      return jnp.int8
    return jnp.uint8

  @property
  def offset(self) -> int:
    """Code value = stored integer + offset."""
    return 0 if self.bits == 8 else self.qmin

  def encode(self, q):
    return (q - self.offset).astype(self.storage_dtype)

  def decode(self, stored):
    return stored.astype(jnp.float32) + self.offset

  @property
  def max_value(self) -> int:
    return self.qmax

  def round(self, x, key=None):
    """Round-half-to-even, or stochastic rounding when a key is given."""
    if key is not None:
      return stochastic_round_int(x, key, self.qmin, self.qmax)
    return jnp.clip(jnp.round(x), self.qmin, self.qmax)
