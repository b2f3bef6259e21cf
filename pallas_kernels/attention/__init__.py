"""Block-sparse flash attention (FlashAttention-2, Dao 2023, Alg. 1/2) with
masks compiled ahead of time to block metadata.

  mask.py      mask algebra (Full, Causal, Local, Chunked, SinkWindow, Numpy,
               And/Or, MultiHeadMask) and `compile_mask` -> `MaskInfo`
  kernel.py    `block_sparse_attention` (Pallas forward + custom_vjp backward)
  reference.py `attention_reference` (plain jnp, float32)
"""

from pallas_kernels.attention.kernel import block_sparse_attention
from pallas_kernels.attention.mask import (And, CausalMask, ChunkedMask,
                                           FullMask, LocalMask, Mask, MaskInfo,
                                           MultiHeadMask, NumpyMask, Or,
                                           SinkWindowMask, compile_mask,
                                           dense_mask, density)
from pallas_kernels.attention.reference import attention_reference

__all__ = [
    "block_sparse_attention", "attention_reference", "compile_mask",
    "density", "dense_mask", "Mask", "MaskInfo", "FullMask", "CausalMask",
    "LocalMask", "ChunkedMask", "SinkWindowMask", "NumpyMask", "And", "Or",
    "MultiHeadMask",
]
