"""Transform objects (optax-style init/update pairs) for every algorithm.

Each builder's keyword options are one `Options` dataclass (`XOptions`
below, `builder.options`): rules override them per param, as dicts or as
instances of that class, and both are checked when the transform is built.
"""

from compressjax.core.rules import Options, Rule
from compressjax.core.transform import Chain, LeafState, Transform, chain
from compressjax.lowrank.asvd import AsvdOptions, asvd
from compressjax.lowrank.svd import LowRankOptions, low_rank
from compressjax.lowrank.svd_llm import SvdLlmOptions, svd_llm
from compressjax.quantization.awq import AwqOptions, awq
from compressjax.quantization.gptq import GptqOptions, gptq
from compressjax.quantization.rotation import RotateOptions, rotate
from compressjax.quantization.rtn import QuantizeOptions, quantize
from compressjax.quantization.smoothquant import SmoothQuantOptions, smoothquant
from compressjax.sparsity.magnitude import SparsifyOptions, sparsify
from compressjax.sparsity.sparsegpt import SparseGptOptions, sparsegpt
from compressjax.sparsity.wanda import WandaOptions, wanda

__all__ = ["AsvdOptions", "AwqOptions", "Chain", "GptqOptions", "LeafState",
           "LowRankOptions", "Options", "QuantizeOptions", "RotateOptions",
           "Rule", "SmoothQuantOptions", "SparseGptOptions", "SparsifyOptions",
           "SvdLlmOptions", "Transform", "WandaOptions", "asvd", "awq",
           "chain", "gptq", "low_rank", "quantize", "rotate", "smoothquant",
           "sparsegpt", "sparsify", "svd_llm", "wanda"]
