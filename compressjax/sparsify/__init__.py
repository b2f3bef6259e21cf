from compressjax.sparsify.magnitude import nm_sparsify, sparse_from_mask, sparsify

__all__ = ["nm_sparsify", "sparse_from_mask", "sparsify"]
