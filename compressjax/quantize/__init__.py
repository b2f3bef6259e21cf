from compressjax.quantize.rtn import quantize, quantize_array

__all__ = ["quantize", "quantize_array"]
