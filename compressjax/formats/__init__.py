"""Number formats: quantize/dequantize pairs with exact definitions."""

from compressjax.formats.integer import IntFormat

__all__ = ["IntFormat"]
