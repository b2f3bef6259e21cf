from compressjax.lowrank.asvd import asvd, asvd_factorize
from compressjax.lowrank.svd import factorize, low_rank
from compressjax.lowrank.svd_llm import svd_llm, svd_llm_factorize

__all__ = ["asvd", "asvd_factorize", "factorize", "low_rank", "svd_llm",
           "svd_llm_factorize"]
