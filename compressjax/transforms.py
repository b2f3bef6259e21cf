"""Transform objects (optax-style init/update pairs) for every algorithm."""

from compressjax.lowrank.svd import low_rank
from compressjax.quantize.gptq import gptq
from compressjax.quantize.rtn import quantize
from compressjax.sparsify.magnitude import sparsify
from compressjax.transform import LeafState, Transform, chain

__all__ = ["LeafState", "Transform", "chain", "gptq", "low_rank", "quantize",
           "sparsify"]
