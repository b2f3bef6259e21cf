"""Number formats: quantize/dequantize pairs with exact definitions.

`get(name)` resolves a format name used in configs:
  int2 .. int8             uniform integers (IntFormat; `symmetric` applies)
  binary, ternary, nf4     fixed level sets (LevelsFormat)
  fp8_e4m3, fp8_e5m2, fp6_e2m3, fp6_e3m2, fp4_e2m1   float elements with a
                           per-channel/group float scale (FloatFormat)
  mxfp8_e4m3, mxfp8_e5m2, mxfp6_e2m3, mxfp6_e3m2, mxfp4, mxint8, nvfp4
                           microscaling schemes (block scales; microscaling.py)
  codebook2 .. codebook4   Lloyd-fitted codebooks, per tensor or per group
                           (codebook.py; a CodebookArray, not a QArray)
"""

from compressjax.formats.codebook import quantize_codebook
from compressjax.formats.float import FloatFormat
from compressjax.formats.integer import IntFormat
from compressjax.formats.levels import BINARY, NF4, TERNARY, LevelsFormat
from compressjax.formats.microscaling import (MX_ELEMENTS, E8M0Format,
                                              quantize_mx, quantize_nvfp4)

ELEMENT_FORMATS = {
    "binary": BINARY, "ternary": TERNARY, "nf4": NF4,
    "fp8_e4m3": FloatFormat("e4m3fn"), "fp8_e5m2": FloatFormat("e5m2"),
    "fp6_e2m3": FloatFormat("e2m3fn"), "fp6_e3m2": FloatFormat("e3m2fn"),
    "fp4_e2m1": FloatFormat("e2m1fn"),
}
CODEBOOKS = ("codebook2", "codebook3", "codebook4")
SCHEMES = tuple(MX_ELEMENTS) + ("nvfp4",) + CODEBOOKS
NAMES = tuple(f"int{b}" for b in range(2, 9)) + tuple(ELEMENT_FORMATS) + SCHEMES


def get(name: str, symmetric: bool = True):
  """Format object for `name`, or the name itself for block-scale schemes."""
  if name in SCHEMES:
    return name
  if name in ELEMENT_FORMATS:
    return ELEMENT_FORMATS[name]
  if name.startswith("int") and name[3:].isdigit():
    return IntFormat(int(name[3:]), symmetric)
  raise ValueError(f"unknown format {name!r}; use one of {', '.join(NAMES)}")


__all__ = ["BINARY", "E8M0Format", "FloatFormat", "IntFormat", "LevelsFormat",
           "NAMES", "NF4", "SCHEMES", "TERNARY", "get", "quantize_mx",
           "quantize_codebook", "quantize_nvfp4"]
