"""Transform objects (optax-style init/update pairs) for every algorithm."""

from compressjax.lowrank.asvd import asvd
from compressjax.lowrank.svd import low_rank
from compressjax.lowrank.svd_llm import svd_llm
from compressjax.quantization.gptq import gptq
from compressjax.quantization.rtn import quantize
from compressjax.sparsity.magnitude import sparsify
from compressjax.sparsity.sparsegpt import sparsegpt
from compressjax.sparsity.wanda import wanda
from compressjax.core.transform import LeafState, Transform, chain

__all__ = ["LeafState", "Transform", "asvd", "chain", "gptq", "low_rank",
           "quantize", "sparsegpt", "sparsify", "svd_llm", "wanda"]
