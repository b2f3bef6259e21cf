from compressjax.sparsity.magnitude import nm_sparsify, sparse_from_mask, sparsify
from compressjax.sparsity.sparsegpt import sparsegpt, sparsegpt_prune
from compressjax.sparsity.wanda import wanda, wanda_prune, wanda_scores

__all__ = ["nm_sparsify", "sparse_from_mask", "sparsegpt", "sparsegpt_prune",
           "sparsify", "wanda", "wanda_prune", "wanda_scores"]
