"""Per-layer key/value stores for incremental decoding.

A store holds, for one attention layer, a fixed number of slots (its
`capacity`): keys and values (B, S, H_kv, D) and the position of the token in
each slot (B, S) int32, `NO_POSITION` (-1) for an empty slot or a padding
token. Attention masks by these stored positions (`kv.attention`), never by
slot index, so a store may put tokens in any slot: in order (this dense
store), in a ring, or in the slot of a token it evicted.

The protocol a store implements (the decoders call nothing else, so new
stores plug in without touching llama.py / gpt2.py):

  empty(batch, capacity, kv_heads, head_dim, dtype, layer=, num_layers=)
                                  -> store   (a classmethod, or a spec's
                                  method: kv.store.KVSpec)
  attention(q, k, v, positions, scale=, window=, rotary=) -> (out, store)
                                        one layer's step (kv.attention calls
                                        it): append, attend, observe
  append(k, v, positions) -> store      k, v (B, T, H_kv, D); positions (B, T)
  read() -> (keys, values, positions)   dense (B, S, H_kv, D) x2 and (B, S)
                                        or (B, H_kv, S) for per-head slots
  observe(probs, q_positions) -> store  the attention weights just computed
                                        over read()'s slots, (B, H_kv, G, T, S)
                                        with G = query heads per kv head
  next_position() -> (B,) int32         position of the next token per row

`kv.store.KVCache` implements it with quantized entries (KVCodes per
token / channel, KIVI) and eviction policies (`kv.policies`: H2O, TOVA,
SnapKV, StreamingLLM, ...) under a token budget: new tokens go into the
slots of the tokens it evicts (their positions travel with them, so masking
stays right).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.base import array_nbytes, is_concrete
from compressjax.core.errors import CompressionError

NO_POSITION = -1  # stored position of an empty slot or a padding token


@dataclasses.dataclass(frozen=True)
class DenseKV:
  """Float keys and values in arrival order: slot `length + i` takes the
  i-th appended token. Static shapes under `jax.jit`; `length` counts slots
  used (padding tokens included).

  Appending past `capacity` raises when `length` is concrete; under
  `jax.jit` the overflowing tokens are dropped (not written) and
  `overflowed()` turns true, so size the capacity to prompt + new tokens.
  """

  keys: Any       # (B, S, H_kv, D)
  values: Any     # (B, S, H_kv, D)
  positions: Any  # (B, S) int32, NO_POSITION where empty
  length: Any     # () int32, slots used

  @classmethod
  def empty(cls, batch: int, capacity: int, kv_heads: int, head_dim: int,
            dtype: Any = jnp.float32, layer: int = 0, num_layers: int = 1
            ) -> "DenseKV":
    del num_layers
    if capacity < 1:
      raise CompressionError(f"layer {layer}: KV cache capacity must be >= "
                             f"1, got {capacity}")
    shape = (batch, capacity, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.full((batch, capacity), NO_POSITION, jnp.int32),
               jnp.zeros((), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.keys.shape[1]

  def append(self, k, v, positions) -> "DenseKV":
    b, t = positions.shape
    if k.shape[:2] != (b, t) or v.shape[:2] != (b, t) or \
        k.shape[2:] != self.keys.shape[2:]:
      raise CompressionError(
          f"append: keys {tuple(k.shape)} / values {tuple(v.shape)} do not "
          f"match positions {(b, t)} and the store's (heads, head_dim) "
          f"{tuple(self.keys.shape[2:])}")
    if t > self.capacity:
      raise CompressionError(
          f"append: {t} tokens exceed the KV cache capacity {self.capacity}; "
          "make the cache with a larger capacity")
    if is_concrete(self.length) and int(self.length) + t > self.capacity:
      raise CompressionError(
          f"append: {int(self.length)} stored + {t} new tokens exceed the KV "
          f"cache capacity {self.capacity}; make the cache with capacity >= "
          "prompt + generated tokens")
    slots = self.length + jnp.arange(t)
    put = lambda a, x: a.at[:, slots].set(x.astype(a.dtype), mode="drop")  # noqa: E731
    return DenseKV(put(self.keys, k), put(self.values, v),
                   put(self.positions, positions.astype(jnp.int32)),
                   self.length + t)

  @property
  def nbytes(self) -> int:
    return sum(array_nbytes(x) for x in (self.keys, self.values,
                                         self.positions, self.length))

  def read(self):
    return self.keys, self.values, self.positions

  def attention(self, q, k, v, positions, *, scale: float,
                window: int | None = None, rotary: Any = None):
    """Append, attend over everything stored, observe (kv.attention)."""
    del rotary  # keys are stored at their own positions
    from compressjax.kv.attention import attend  # attention imports this
    store = self.append(k, v, positions)
    keys, values, kpos = store.read()
    out, probs = attend(q, keys, values, positions, kpos, scale=scale,
                        window=window)
    return out, store.observe(probs, positions)

  def observe(self, probs, q_positions) -> "DenseKV":
    del probs, q_positions  # the dense store keeps every token
    return self

  def next_position(self):
    return jnp.max(self.positions, axis=-1) + 1

  def overflowed(self):
    return self.length > self.capacity


jax.tree_util.register_dataclass(
    DenseKV, data_fields=["keys", "values", "positions", "length"],
    meta_fields=[])


def init_cache(num_layers: int, batch: int, capacity: int, kv_heads: int,
               head_dim: int, dtype: Any = jnp.float32, store: Any = DenseKV
               ) -> tuple:
  """One empty store per layer (a tuple: the decoders' `cache` argument).
  `store`: the store class or spec (anything with the protocol's `empty`);
  `capacity`: tokens of context (a spec with a budget keeps fewer)."""
  return tuple(store.empty(batch, capacity, kv_heads, head_dim, dtype,
                           layer=i, num_layers=num_layers)
               for i in range(num_layers))


def check_cache(cache: Any, num_layers: int) -> None:
  """A decoder's `cache` argument: None, or one store per layer (what
  `init_cache` / the model's `init_cache` returns)."""
  if cache is None:
    return
  if not isinstance(cache, (tuple, list)) or len(cache) != num_layers:
    got = type(cache).__name__ + (f" of {len(cache)}" if isinstance(
        cache, (tuple, list)) else "")
    raise CompressionError(
        f"cache must be a tuple of {num_layers} per-layer stores, got {got}; "
        "make it with model.init_cache(batch, capacity)")
  for i, store in enumerate(cache):
    if not callable(getattr(store, "attention", None)):
      raise CompressionError(
          f"layer {i}: cache entry is a {type(store).__name__}, not a KV "
          "store (the protocol in compressjax.kv.cache); make the cache with "
          "model.init_cache(batch, capacity)")
