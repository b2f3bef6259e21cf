"""Number formats: every scheme is one `Format` object (`core/format.py`).

`get(name)` resolves a format name used in configs to its object:
  int2 .. int8             uniform integers (IntFormat): symmetric on the
                           default grid (full range: -8..7 at 4 bits, scale
                           2 max|w| / 15, see integer.py); `int4_narrow`
                           (-7..7, max|w| / 7) / `int4_full` pick the grid,
                           `int4_asym` (or symmetric=False) a zero point
  binary, ternary, nf4     fixed level sets (LevelsFormat)
  fp8_e4m3, fp8_e5m2, fp6_e2m3, fp6_e3m2, fp4_e2m1   float elements with a
                           per-channel/group float scale (FloatFormat)
  mxfp8_e4m3, mxfp8_e5m2, mxfp6_e2m3, mxfp6_e3m2, mxfp4, mxint8, nvfp4
                           microscaling schemes (block scales; MXFormat,
                           NVFP4Format in microscaling.py)
  codebook1 .. codebook8   Lloyd-fitted codebooks, per tensor or per group
                           (CodebookFormat: a CodebookArray, not a QArray)
Anywhere a format name is accepted, a Format object is too. A new format is a
class (registered for checkpoints with `register_format`) and an entry here.
"""

from __future__ import annotations

import numbers
from typing import Any

from compressjax.core.errors import CompressionError
from compressjax.core.format import Format
from compressjax.formats.codebook import CodebookFormat, quantize_codebook
from compressjax.formats.float import FloatFormat
from compressjax.formats.integer import FULL_RANGE_DEFAULT, IntFormat
from compressjax.formats.levels import BINARY, NF4, TERNARY, LevelsFormat
from compressjax.formats.microscaling import (MX_ELEMENTS, E8M0Format,
                                              MXFormat, NVFP4Format,
                                              quantize_mx, quantize_nvfp4)

REGISTRY: dict[str, Format] = {
    "binary": BINARY, "ternary": TERNARY, "nf4": NF4,
    "fp8_e4m3": FloatFormat("e4m3fn"), "fp8_e5m2": FloatFormat("e5m2"),
    "fp6_e2m3": FloatFormat("e2m3fn"), "fp6_e3m2": FloatFormat("e3m2fn"),
    "fp4_e2m1": FloatFormat("e2m1fn"),
    **{name: MXFormat(el) for el, (name, _) in MX_ELEMENTS.items()},
    "nvfp4": NVFP4Format(),
    **{f"codebook{b}": CodebookFormat(b) for b in range(1, 9)},
}
for _b in range(2, 9):
  for _f in (IntFormat(_b), IntFormat(_b, narrow_range=True),
             IntFormat(_b, narrow_range=False), IntFormat(_b, False)):
    REGISTRY[_f.name] = _f
  REGISTRY[f"int{_b}_{'full' if FULL_RANGE_DEFAULT else 'narrow'}"] = (
      IntFormat(_b))
NAMES = tuple(REGISTRY)


def register(fmt: Format, name: str | None = None) -> Format:
  """Makes `fmt` available to configs as `name` (default fmt.name)."""
  REGISTRY[name or fmt.name] = fmt
  return fmt


def get(name: Any, symmetric: bool = True) -> Format:
  """The Format object for a name (or a Format, returned as is);
  symmetric=False asks for its zero-point variant."""
  fmt = name if isinstance(name, Format) else REGISTRY.get(name)
  if fmt is None:
    raise CompressionError(f"unknown format {name!r}; use a Format object or "
                           f"one of {', '.join(NAMES)}")
  return fmt if symmetric else fmt.asymmetric()


def resolve(format: Any = None, bits: Any = None, symmetric: Any = True, *,
            default_bits: int = 8, path: str = "<array>") -> Format:
  """The Format a config asks for, checked: `format` (name or object), or
  int<bits> when only `bits` is given; both must agree; `symmetric` must be a
  bool. Raises CompressionError naming `path` and the fix."""
  if symmetric is None:
    symmetric = True
  if not isinstance(symmetric, bool):
    raise CompressionError(
        f"symmetric must be True or False, got {symmetric!r}", path)
  if bits is not None and (isinstance(bits, bool) or
                           not isinstance(bits, numbers.Integral)):
    raise CompressionError(f"bits must be an int, got {bits!r}", path)
  if format is None:
    b = default_bits if bits is None else int(bits)
    if not 2 <= b <= 8:
      raise CompressionError(
          f"integer bits must be in [2, 8], got {b}; choose bits between 2 "
          "and 8 (or format='binary' for 1 bit)", path)
    format = f"int{b}"
  if not isinstance(format, (str, Format)):
    raise CompressionError(f"format must be a name or a Format object, got "
                           f"{format!r}", path)
  try:
    fmt = get(format, symmetric)
  except CompressionError as e:
    raise CompressionError(str(e), path) from None
  if bits is not None and int(bits) != fmt.bits:
    raise CompressionError(
        f"bits={bits} conflicts with format={fmt.name!r} ({fmt.bits} bits); "
        "give only one of them", path)
  return fmt


__all__ = ["BINARY", "CodebookFormat", "E8M0Format", "FloatFormat",
           "IntFormat", "LevelsFormat", "MXFormat", "NAMES", "NF4",
           "NVFP4Format", "REGISTRY", "TERNARY", "get", "quantize_codebook",
           "quantize_mx", "quantize_nvfp4", "register", "resolve"]
