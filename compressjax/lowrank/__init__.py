from compressjax.lowrank.svd import factorize, low_rank

__all__ = ["factorize", "low_rank"]
