"""KV cache: per-layer key/value stores and the attention that reads them.

    cache = kv.init_cache(layers, batch, capacity, kv_heads, head_dim)
    out, cache_l = kv.attention(q, k, v, positions, cache=cache[l], scale=s)

`DenseKV` is the float store; the store protocol and its extension points
(quantized entries, eviction policies with a token budget) are in
`kv.cache`'s docstring. Both decoders (models.llama, models.gpt2) use
`kv.attention` with and without a cache.
"""

from compressjax.kv.attention import attend, attention, token_positions
from compressjax.kv.cache import NO_POSITION, DenseKV, init_cache

__all__ = ["DenseKV", "NO_POSITION", "attend", "attention", "init_cache",
           "token_positions"]
