from compressjax.quantization.rtn import quantize, quantize_array
from compressjax.quantization.rotation import (Reader, RotationPlan, ValueOut,
                                          quarot, rotate, rotation_gptq)
from compressjax.quantization.awq import awq
from compressjax.quantization.gptq import gptq, gptq_quantize
from compressjax.quantization.scaling import ScaleGroup, apply_scales
from compressjax.quantization.smoothquant import smoothquant

__all__ = ["quantize", "quantize_array", "awq", "gptq", "gptq_quantize", "ScaleGroup", "apply_scales",
           "smoothquant", "quarot", "rotate", "rotation_gptq", "Reader",
           "RotationPlan", "ValueOut"]
