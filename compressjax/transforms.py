"""Transform objects (optax-style init/update pairs) for every algorithm."""

from compressjax.lowrank.asvd import asvd
from compressjax.lowrank.svd import low_rank
from compressjax.lowrank.svd_llm import svd_llm
from compressjax.quantize.gptq import gptq
from compressjax.quantize.rtn import quantize
from compressjax.sparsify.magnitude import sparsify
from compressjax.sparsify.sparsegpt import sparsegpt
from compressjax.sparsify.wanda import wanda
from compressjax.transform import LeafState, Transform, chain

__all__ = ["LeafState", "Transform", "asvd", "chain", "gptq", "low_rank",
           "quantize", "sparsegpt", "sparsify", "svd_llm", "wanda"]
