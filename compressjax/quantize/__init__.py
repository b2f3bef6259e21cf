from compressjax.quantize.rtn import quantize, quantize_array
from compressjax.quantize.rotation import (Reader, RotationPlan, ValueOut,
                                          quarot, rotate, rotation_gptq)
from compressjax.quantize.awq import awq
from compressjax.quantize.scaling import ScaleGroup, apply_scales
from compressjax.quantize.smoothquant import smoothquant

__all__ = ["quantize", "quantize_array", "awq", "ScaleGroup", "apply_scales",
           "smoothquant", "quarot", "rotate", "rotation_gptq", "Reader",
           "RotationPlan", "ValueOut"]
