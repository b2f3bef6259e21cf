"""KV cache: per-layer key/value stores and the attention that reads them.

    cache = model.init_cache(batch, capacity)               # dense, DenseKV
    spec = kv.KVSpec(policy="h2o", budget=0.25,             # compressed
                     keys=kv.KVQuant("int4", "token", 32),
                     values=kv.KVQuant("int4", "token", 32), residual=32)
    cache = model.init_cache(batch, capacity, store=spec)   # KVCache / layer
    logits, cache = model.apply(variables, ids, cache=cache)

    out, cache_l = kv.attention(q, k, v, positions, cache=cache[l], scale=s)

`DenseKV` (kv.cache) is the float store and defines the store protocol;
`KVCache` (kv.store) adds quantized entries (kv.quant: per token / per
channel, KIVI, fp8, Hadamard-rotated keys) and eviction policies under a
token budget (kv.policies: Window, SinkWindow (StreamingLLM), H2O, SnapKV,
TOVA, Random; budgets Uniform or Pyramid). The decoders (models.llama,
models.gpt2, models.transformer) use `kv.attention` with and without a
cache.
"""

from compressjax.kv.attention import (attend, attend_parts, attention,
                                      token_positions, visible)
from compressjax.kv.cache import NO_POSITION, DenseKV, check_cache, init_cache
from compressjax.kv.policies import (H2O, POLICIES, TOVA, Policy, Random,
                                     SinkWindow, SnapKV, Window)
from compressjax.kv.quant import KVCodes, KVQuant, kivi, quantize_groups
from compressjax.kv.store import KVCache, KVSpec, Pyramid, Uniform


def memory(cache) -> dict:
  """Bytes of a whole cache (a tuple of per-layer stores)."""
  return dict(bytes=int(sum(c.nbytes for c in cache)))


__all__ = ["DenseKV", "H2O", "KVCache", "KVCodes", "KVQuant", "KVSpec",
           "NO_POSITION", "POLICIES", "Policy", "Pyramid", "Random",
           "SinkWindow", "SnapKV", "TOVA", "Uniform", "Window", "attend",
           "attend_parts", "attention", "check_cache", "init_cache", "kivi",
           "memory", "quantize_groups", "token_positions", "visible"]
