"""Low-precision float element formats: fp8 e4m3fn / e5m2, fp6 e2m3fn / e3m2fn,
fp4 e2m1fn.

The formats are defined by `ml_dtypes` (OCP 8-bit floats; the MX spec's FP6 and
FP4 elements): `cast` reproduces an `ml_dtypes` cast exactly, rounding to
nearest-even, with the format's own overflow rule (e4m3fn: NaN; e5m2: inf;
the fp6/fp4 types have neither and saturate to ±max, and NaN becomes -0).
Quantizers use `round`, which first saturates to ±max (as the OCP MX spec
requires), so a quantized tensor never holds NaN or inf.

Storage: the format's bit pattern (sign, exponent, mantissa), `bits` wide,
packed below 8 bits. XLA casts are used where XLA has the type (fp8, fp4);
fp6 rounds through the table of its 32 magnitudes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.core.format import Capabilities, KernelDecode, register_format
from compressjax.formats.rounding import stochastic_index
from compressjax.formats.scaled import ScaledFormat, nonzero_scale

ELEMENTS = {  # name -> (bits, ml_dtypes type, XLA has it)
    "e4m3fn": (8, ml_dtypes.float8_e4m3fn, True),
    "e5m2": (8, ml_dtypes.float8_e5m2, True),
    "e2m3fn": (6, ml_dtypes.float6_e2m3fn, False),
    "e3m2fn": (6, ml_dtypes.float6_e3m2fn, False),
    "e2m1fn": (4, ml_dtypes.float4_e2m1fn, True),
}


@functools.lru_cache(maxsize=None)
def value_table(element: str) -> np.ndarray:
  """float32 value of every code 0 .. 2^bits - 1 (from ml_dtypes)."""
  bits, dt, _ = ELEMENTS[element]
  return np.arange(2**bits, dtype=np.uint8).view(dt).astype(np.float32)


@register_format
@dataclasses.dataclass(frozen=True)
class FloatFormat(ScaledFormat):
  """Float elements times a per-group float scale s = max|w| / max_value."""

  kind = "float"
  element: str = "e4m3fn"
  capabilities = Capabilities(groups=True, calibrated=True, qat=True,
                              float_scale=True)

  def __post_init__(self):
    if self.element not in ELEMENTS:
      raise CompressionError(f"unknown float element {self.element!r}; use "
                             f"one of {sorted(ELEMENTS)}")

  @property
  def bits(self) -> int:
    return ELEMENTS[self.element][0]

  @property
  def name(self) -> str:
    return {"e4m3fn": "fp8_e4m3", "e5m2": "fp8_e5m2", "e2m3fn": "fp6_e2m3",
            "e3m2fn": "fp6_e3m2", "e2m1fn": "fp4_e2m1"}[self.element]

  @property
  def max_value(self) -> float:
    return float(ml_dtypes.finfo(ELEMENTS[self.element][1]).max)

  @property
  def storage_dtype(self):
    return jnp.uint8

  @property
  def code_range(self) -> tuple[float, float]:
    return -self.max_value, self.max_value

  def scale_zero(self, x, reduce, store=lambda s: s):
    return store(nonzero_scale(reduce(jnp.abs(x), jnp.max) /
                               self.max_value)), None

  def kernel_decode(self) -> KernelDecode:
    bits, dt, xla = ELEMENTS[self.element]
    if bits == 8 and xla:  # the stored byte is the XLA float8 bit pattern
      return KernelDecode(float8=jnp.dtype(dt).name)
    return KernelDecode(table=tuple(float(v) for v in value_table(
        self.element)))

  @property
  def _magnitudes(self) -> np.ndarray:
    return value_table(self.element)[:2**(self.bits - 1)]

  def cast(self, x):
    """Exactly `x.astype(ml_dtypes.<element>).astype(float32)`."""
    x = jnp.asarray(x, jnp.float32)
    bits, dt, xla = ELEMENTS[self.element]
    if xla:
      return x.astype(jnp.dtype(dt)).astype(jnp.float32)
    mags = jnp.asarray(self._magnitudes)
    a = jnp.abs(x)
    i = jnp.clip(jnp.searchsorted(mags, a, side="left"), 1, mags.size - 1)
    lo, hi = mags[i - 1], mags[i]
    up = (a - lo > hi - a) | ((a - lo == hi - a) & (i % 2 == 0))
    m = jnp.where(a >= mags[-1], mags[-1], jnp.where(up, hi, lo))
    m = jnp.where(jnp.isnan(x), 0.0, m)
    neg = jnp.signbit(x) | jnp.isnan(x)
    return jnp.where(neg, -m, m)

  @property
  def finite_values(self) -> np.ndarray:
    """Sorted distinct finite values (for stochastic rounding)."""
    t = value_table(self.element)
    return np.unique(t[np.isfinite(t)])

  def round(self, x, key=None):
    """Saturate to ±max, then round to nearest-even (or stochastically)."""
    if key is not None:
      v = jnp.asarray(self.finite_values)
      return v[stochastic_index(x, v, key)]
    mx = self.max_value
    return self.cast(jnp.clip(x, -mx, mx))

  def encode(self, v):
    """Representable float32 values -> bit patterns (uint8)."""
    bits, dt, xla = ELEMENTS[self.element]
    if bits == 8:
      return jax.lax.bitcast_convert_type(
          jnp.asarray(v, jnp.float32).astype(jnp.dtype(dt)), jnp.uint8)
    mag = jnp.searchsorted(jnp.asarray(self._magnitudes), jnp.abs(v))
    sign = jnp.signbit(v).astype(jnp.uint8) << (bits - 1)
    return (mag.astype(jnp.uint8) | sign).astype(jnp.uint8)

  def decode(self, stored):
    return jnp.asarray(value_table(self.element))[stored.astype(jnp.int32)]
