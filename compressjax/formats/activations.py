"""Dynamic per-token activation quantization (int8, fp8), for W8A8 and KV caches.

Each token (every index of all axes but the feature axis) gets its own scale,
computed on the fly: s = max_j |x_j| / max_value, codes = round(x / s) in the
format (int8: round-half-to-even on the narrow grid, s = absmax / 127 so codes
lie in [-127, 127], as SmoothQuant; fp8: saturating, as the ml_dtypes cast).
`per_token` returns the codes in x's layout with scales (..., 1), what a W8A8
kernel consumes; `quantize_per_token` wraps them as a QArray contracted over
the feature axis (one scale per token = per output feature), so it runs,
checkpoints and materializes like any weight; `fake_quant` is its dense value,
jit-compatible since shapes do not depend on data. SmoothQuant (Xiao et al.
2022, Sec. 3) uses exactly this per-token scheme.
"""

from __future__ import annotations

import jax.numpy as jnp

from compressjax.core.contraction import MatrixLayout
from compressjax.core.errors import CompressionError
from compressjax.core.qarray import QArray
from compressjax.formats.float import FloatFormat
from compressjax.formats.integer import IntFormat

ACTIVATION_FORMATS = {"int8": IntFormat(8, narrow_range=True),
                      "fp8_e4m3": FloatFormat("e4m3fn"),
                      "fp8_e5m2": FloatFormat("e5m2")}


def _fmt(format: str):
  if format not in ACTIVATION_FORMATS:
    raise CompressionError(f"activation format {format!r}: use one of "
                           f"{sorted(ACTIVATION_FORMATS)}")
  return ACTIVATION_FORMATS[format]


def per_token(x, format: str = "int8", axis: int = -1):
  """(codes in x's layout, float32 scales with size 1 along `axis`)."""
  fmt = _fmt(format)
  xf = jnp.asarray(x, jnp.float32)
  s = jnp.max(jnp.abs(xf), axis=axis, keepdims=True) / fmt.max_value
  s = jnp.where(s > 0, s, 1.0)
  return fmt.encode(fmt.round(xf / s)), s


def quantize_per_token(x, format: str = "int8", axis: int = -1) -> QArray:
  axis = axis % x.ndim
  codes, s = per_token(x, format, axis)
  lay = MatrixLayout(tuple(x.shape), (axis,))
  return QArray(codes=lay.to_matrix(codes),
                scale=jnp.moveaxis(s, axis, 0).reshape(1, -1),
                zero=None, shape=tuple(x.shape),
                dtype=jnp.dtype(x.dtype).name, fmt=_fmt(format),
                contract=(axis,))


def fake_quant(x, format: str = "int8", axis: int = -1):
  """Quantize-dequantize per token (the activation a W8A8 matmul consumes)."""
  codes, s = per_token(x, format, axis)
  return (_fmt(format).decode(codes) * s).astype(x.dtype)
