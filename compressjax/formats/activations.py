"""Dynamic per-token activation quantization (int8, fp8), for W8A8 and KV caches.

Each token (every index of all axes but the feature axis) gets its own scale,
computed on the fly: s = max_j |x_j| / max_value, codes = round(x / s) in the
format (int8: round-half-to-even, s = absmax / 127 so codes lie in
[-127, 127]; fp8: saturating, as the ml_dtypes cast). The
result is a QArray whose scale has size 1 along the feature axis, so it runs,
checkpoints and materializes like any weight; `fake_quant` is its dense value
(what a W8A8 kernel sees), jit-compatible since shapes do not depend on data.
SmoothQuant (Xiao et al. 2022, Sec. 3) uses exactly this per-token scheme.
"""

from __future__ import annotations

import jax.numpy as jnp

from compressjax.core.qarray import QArray
from compressjax.formats.float import FloatFormat
from compressjax.formats.integer import IntFormat

ACTIVATION_FORMATS = {"int8": IntFormat(8), "fp8_e4m3": FloatFormat("e4m3fn"),
                      "fp8_e5m2": FloatFormat("e5m2")}


def quantize_per_token(x, format: str = "int8", axis: int = -1) -> QArray:
  fmt = ACTIVATION_FORMATS[format]
  axis = axis % x.ndim
  xf = jnp.asarray(x, jnp.float32)
  s = jnp.max(jnp.abs(xf), axis=axis, keepdims=True) / fmt.max_value
  s = jnp.where(s > 0, s, 1.0)
  codes = fmt.encode(fmt.round(xf / s))
  return QArray(codes=codes, scale=s, zero=None, shape=tuple(x.shape),
                dtype=jnp.dtype(x.dtype).name, fmt=fmt, axis=axis)


def fake_quant(x, format: str = "int8", axis: int = -1):
  """Quantize-dequantize per token (the activation a W8A8 matmul consumes)."""
  return quantize_per_token(x, format, axis).materialize()
