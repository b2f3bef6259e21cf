"""A compressed KV store: quantized entries and eviction under a token budget.

    spec = kv.KVSpec(policy="h2o", budget=0.25,
                     keys=kv.KVQuant("int4", "token", 32), values=...)
    cache = model.init_cache(batch, context, store=spec)  # one KVCache/layer
    logits, cache = model.apply(variables, ids, cache=cache)   # under jit

`KVSpec` is the store factory the decoders' `init_cache(..., store=)` takes
(the `kv.cache` protocol's `empty`); each layer gets a `KVCache`, a pytree
with static shapes:

  keys, values  (B, H_kv, S, D) in the model's dtype, or KVCodes
                (`kv.quant`: per token or per channel groups)
  positions     (B, H_kv, S) int32, NO_POSITION where empty (per head:
                per-head policies keep different tokens per kv head)
  recent_keys / recent_values   (B, H_kv, F, D) float: the full-precision
                window (KIVI's residual R), slot = position mod F
  scores        (B, H_kv, S) float32 accumulator (stateful policies: H2O,
                SnapKV) or None
  next          (B,) int32: one past the newest position appended

S is the layer's budget (`Uniform` or `Pyramid` over layers); without a
policy S is the capacity and a token's slot is its position (no eviction,
overflow past the capacity is flagged by `overflowed()`).

One layer's step (`attention`, which `kv.attention` calls): the T new
tokens' keys and values are encoded (rotated, quantized per token), the
queries attend over the stored tokens plus the new ones (each query sees
the candidates the policy's stream mask allows: what a token-by-token run
would have kept), and the policy scores all S + T candidates; the S best
stay (`evict`). So H2O and TOVA see the current query's attention before
evicting, as in their algorithms. A token is read in full precision while
its position is >= `next - residual` (per-channel groups: while its group is
incomplete or overlaps that window, KIVI's rule), else dequantized.

`nbytes` is the store's true size: codes, scales, zero points, float window,
positions and scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.base import is_concrete
from compressjax.core.errors import CompressionError
from compressjax.kv import policies
from compressjax.kv.attention import attend_parts
from compressjax.kv.cache import NO_POSITION
from compressjax.kv.quant import ZERO_DTYPE, KVCodes, KVQuant, entry_nbytes

_DROP = np.iinfo(np.int32).max  # a scatter index that is dropped


# ------------------------------------------------------------------ budgets

def _tokens(budget: int | float, capacity: int) -> int:
  if isinstance(budget, float):
    if not 0 < budget <= 1:
      raise CompressionError(f"a fractional KV budget must be in (0, 1], got "
                             f"{budget}")
    return max(1, int(round(budget * capacity)))
  return int(budget)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """The same budget in every layer: tokens (int) or a fraction (float) of
  the capacity."""

  budget: int | float

  def per_layer(self, num_layers: int, capacity: int) -> tuple[int, ...]:
    return (_tokens(self.budget, capacity),) * num_layers


@dataclasses.dataclass(frozen=True)
class Pyramid:
  """PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression
  based on Pyramidal Information Funneling", Sec. 3.3): budgets fall
  arithmetically with depth, mean `budget`: the last layer keeps
  budget / beta, the first 2 budget - budget / beta."""

  budget: int | float
  beta: float = 20.0

  def per_layer(self, num_layers: int, capacity: int) -> tuple[int, ...]:
    mean = _tokens(self.budget, capacity)
    if num_layers == 1:
      return (mean,)
    last = mean / self.beta
    first = 2 * mean - last
    return tuple(int(round(first - (first - last) * i / (num_layers - 1)))
                 for i in range(num_layers))


# --------------------------------------------------------------------- spec

@dataclasses.dataclass(frozen=True)
class KVSpec:
  """How every layer's KV store is built (hashable, static).

  Attributes:
    policy: a `kv.policies.Policy` or its name; None keeps every token.
    budget: tokens per layer and kv head: int, a fraction of the capacity,
      or `Uniform` / `Pyramid`; required with a policy, None without.
    keys, values: `KVQuant` (None: float entries in the model's dtype).
    residual: the most recent tokens kept in full precision (KIVI's R).
    attention: "xla", or "pallas": the block-sparse kernel in a prefill of
      an empty store, the decode kernel in later steps
      (`pallas_kernels.attention`; interpret mode on CPU).
  """

  policy: Any = None
  budget: Any = None
  keys: KVQuant | None = None
  values: KVQuant | None = None
  residual: int = 0
  attention: str = "xla"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    if self.policy is not None:
      set_("policy", policies.get(self.policy))
      if self.budget is None:
        raise CompressionError(f"KV policy {self.policy.name} needs a budget "
                               "(tokens per layer, or a fraction)")
    elif self.budget is not None:
      raise CompressionError("a KV budget needs an eviction policy (e.g. "
                             "policy='h2o'); without one every token is kept")
    if isinstance(self.budget, (int, float)) and not isinstance(
        self.budget, bool):
      set_("budget", Uniform(self.budget))
    if self.residual < 0:
      raise CompressionError(f"residual must be >= 0, got {self.residual}")
    if self.residual and self.keys is None and self.values is None:
      raise CompressionError("a full-precision residual window needs "
                             "quantized keys or values")
    if self.attention not in ("xla", "pallas"):
      raise CompressionError(f"attention must be 'xla' or 'pallas', got "
                             f"{self.attention!r}")
    if self.policy is not None and any(
        q is not None and q.axis == "channel" for q in (self.keys,
                                                         self.values)):
      raise CompressionError(
          "per-channel KV quantization groups consecutive tokens, which "
          "eviction breaks up: use axis='token' with an eviction policy, or "
          "no policy with KIVI's per-channel keys")

  def budgets(self, num_layers: int, capacity: int) -> tuple[int, ...]:
    if self.policy is None:
      return (capacity,) * num_layers
    return self.budget.per_layer(num_layers, capacity)

  def empty(self, batch: int, capacity: int, kv_heads: int, head_dim: int,
            dtype: Any = jnp.float32, layer: int = 0, num_layers: int = 1
            ) -> "KVCache":
    """The empty store of `layer` (of `num_layers`) for `capacity` tokens
    of context."""
    where = f"layer {layer}"
    if capacity < 1:
      raise CompressionError(f"{where}: KV cache capacity must be >= 1, got "
                             f"{capacity}")
    budget = self.budgets(num_layers, capacity)[layer]
    if self.policy is not None:
      if budget < 1:
        raise CompressionError(
            f"{where}: a KV budget of {budget} tokens keeps nothing; give a "
            "budget >= 1 (pyramid: a larger mean or a smaller beta)")
      if budget > capacity:
        raise CompressionError(
            f"{where}: the KV budget of {budget} tokens is larger than the "
            f"context of {capacity} tokens the cache is made for; use a "
            f"budget <= {capacity} (or policy=None to keep every token)")
      self.policy.check(budget, layer)
    for q, what in ((self.keys, "keys"), (self.values, "values")):
      if q is not None:
        q.check(head_dim, what, layer)
    slots = budget
    for q in (self.keys, self.values):
      if q is not None and q.axis == "channel":
        slots = -(-slots // q.group_size) * q.group_size
    shape = (batch, kv_heads, slots, head_dim)

    def lane(q):
      if q is None:
        return jnp.zeros(shape, dtype), None
      g = q.group(head_dim)
      if q.axis == "token":
        cshape = (batch, kv_heads, slots, -(-head_dim * q.bits // 8))
        sshape = (batch, kv_heads, slots, head_dim // g)
        ax = 3
      else:
        cshape = (batch, kv_heads, slots * q.bits // 8, head_dim)
        sshape = (batch, kv_heads, slots // g, head_dim)
        ax = 2
      main = KVCodes(codes=jnp.zeros(cshape, q.fmt.storage_dtype),
                    scale=jnp.ones(sshape, q.scale_dtype),
                    zero=None if q.symmetric else jnp.zeros(sshape,
                                                            ZERO_DTYPE),
                    shape=shape, dtype=jnp.dtype(dtype).name, fmt=q.fmt,
                    axis=ax)
      f = _window(q, self.residual)
      recent = jnp.zeros((batch, kv_heads, f, head_dim), dtype) if f else None
      return main, recent

    keys, rk = lane(self.keys)
    values, rv = lane(self.values)
    stateful = self.policy is not None and self.policy.stateful
    return KVCache(
        keys=keys, values=values,
        positions=jnp.full((batch, kv_heads, slots), NO_POSITION, jnp.int32),
        recent_keys=rk, recent_values=rv,
        scores=jnp.zeros((batch, kv_heads, slots), jnp.float32)
        if stateful else None,
        next=jnp.zeros((batch,), jnp.int32), spec=self, layer=layer,
        fresh=self.attention == "pallas")

  def bits_per_element(self, head_dim: int, dtype: Any = jnp.float32
                       ) -> tuple[float, float]:
    """(keys, values) stored bits per element in theory (codes + scales +
    zeros; float entries: the dtype's bits), excluding the float window."""
    f = np.dtype(dtype).itemsize * 8
    return tuple(f if q is None else q.bits_per_element(head_dim)
                 for q in (self.keys, self.values))


def _window(q: KVQuant | None, residual: int) -> int:
  """Slots of the float window of one lane (0: none)."""
  if q is None:
    return 0
  if q.axis == "channel":  # the incomplete group + the residual
    return residual + q.group_size
  return residual


def _float_from(q: KVQuant | None, residual: int, nxt):
  """(B,) first position read in full precision."""
  if q is not None and q.axis == "channel":
    g = q.group_size
    return jnp.maximum(nxt - residual, 0) // g * g
  return nxt - residual


# ------------------------------------------------------------ slot helpers

def _scatter(x, idx, vals):
  """x (B, H, S, ...) with x[b, h, idx[b, h, i]] = vals[b, h, i] (idx
  (B, H|1, n); out-of-range indices are dropped)."""
  b, h = x.shape[:2]
  idx = jnp.broadcast_to(idx, (b, h, idx.shape[-1]))
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  return x.at[bi, hi, idx].set(vals.astype(x.dtype), mode="drop")


def _gather(x, idx):
  """x (B, H, N, ...)[b, h, idx[b, h, i]] -> (B, H, n, ...)."""
  idx = jnp.broadcast_to(idx, x.shape[:2] + idx.shape[-1:])
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, idx, axis=2)


def _map_entries(fn, n: int, *entries):
  """fn over the slot-indexed children of float / per-token KVCodes entries
  (all with the slot axis 2); n: slots of the result."""
  e0 = entries[0]
  if not isinstance(e0, KVCodes):
    return fn(*entries)
  kids = {f: fn(*[getattr(e, f) for e in entries])
          for f in ("codes", "scale") if getattr(e0, f) is not None}
  zero = None if e0.zero is None else fn(*[e.zero for e in entries])
  return KVCodes(codes=kids["codes"], scale=kids["scale"], zero=zero,
                shape=e0.shape[:2] + (n,) + e0.shape[3:], dtype=e0.dtype,
                fmt=e0.fmt, axis=e0.axis)


def _encode(q: KVQuant | None, x, dtype):
  """New tokens (B, H, T, D) float -> per-token entries (float or KVCodes);
  per-channel lanes quantize whole groups later (None here)."""
  if q is None:
    return x.astype(dtype)
  if q.axis == "channel":
    return None
  return q.quantize(q.rotate_in(x.astype(jnp.float32)))


def _decode(q: KVQuant | None, e, dtype):
  return e if q is None else q.dequantize(e, dtype)


def _real_rows(probs, positions):
  """probs (B, H_kv, G, R, N) of the last R queries with the rows of padding
  queries zeroed (a padding query sees nothing: its uniform row is no
  vote)."""
  real = positions[:, -probs.shape[3]:] >= 0
  return probs * real[:, None, None, :, None]


def _row_index(positions, targets):
  """(B, n) index t of the new token with position targets[b, i] among
  positions (B, T) (increasing over real tokens, NO_POSITION on padding)."""
  keyed = jax.lax.cummax(positions, axis=1)
  idx = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(keyed,
                                                                   targets)
  return jnp.minimum(idx, positions.shape[1] - 1)


# -------------------------------------------------------------------- store

@dataclasses.dataclass(frozen=True)
class KVCache:
  """One layer's compressed KV store; see the module docstring."""

  keys: Any
  values: Any
  positions: Any
  recent_keys: Any
  recent_values: Any
  scores: Any
  next: Any
  spec: KVSpec
  layer: int
  # static: nothing appended yet, so a prefill may run the block-sparse
  # kernel over the new tokens alone. Only "pallas" stores start fresh (the
  # first call changes the tree's structure; an "xla" store's never does,
  # so it can be a lax.scan / while_loop carry from the start).
  fresh: bool

  # -- sizes
  @property
  def capacity(self) -> int:
    return self.positions.shape[-1]

  @property
  def kv_heads(self) -> int:
    return self.positions.shape[1]

  @property
  def head_dim(self) -> int:
    return self.keys.shape[-1]

  @property
  def recent_dtype(self):
    k = self.keys
    return k.dtype if not isinstance(k, KVCodes) else k.dense_dtype

  @property
  def nbytes(self) -> int:
    """True bytes of every array the store holds."""
    return sum(entry_nbytes(getattr(self, f)) for f in (
        "keys", "values", "positions", "recent_keys", "recent_values",
        "scores", "next"))

  def entry_nbytes(self) -> int:
    """Bytes of keys and values alone (codes, scales, zeros, float window)."""
    return sum(entry_nbytes(getattr(self, f)) for f in (
        "keys", "values", "recent_keys", "recent_values"))

  # -- protocol
  def next_position(self):
    return self.next

  def overflowed(self):
    """True where a token's position did not fit (no-policy store)."""
    return jnp.any(self.next > self.capacity) if self.spec.policy is None \
        else jnp.zeros((), bool)

  def read(self):
    """Dense (B, S, H_kv, D) keys and values and (B, H_kv, S) positions."""
    k, v, p = self.read_heads()
    return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), p

  def read_heads(self):
    """Keys and values (B, H_kv, S, D) as attention sees them (dequantized,
    the float window where it applies) and positions (B, H_kv, S)."""
    s, dt = self.spec, self.recent_dtype

    def lane(q, main, recent):
      x = _decode(q, main, dt)
      if recent is None:
        return x
      p = self.positions
      use = (p >= 0) & (p >= _float_from(q, s.residual, self.next)[:, None,
                                                                     None])
      w = _gather(recent, jnp.maximum(p, 0) % recent.shape[2])
      return jnp.where(use[..., None], w, x)

    return (lane(s.keys, self.keys, self.recent_keys),
            lane(s.values, self.values, self.recent_values), self.positions)

  def append(self, k, v, positions) -> "KVCache":
    """Adds tokens k, v (B, T, H_kv, D) at positions (B, T) (without
    attention weights: attention-scored policies see none this step)."""
    self._check(k, v, positions)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if self.spec.policy is None:
      return self._append_positional(kh, vh, positions)
    return self._admit(kh, vh, positions, None)

  def observe(self, probs, q_positions) -> "KVCache":
    """Adds attention weights over read()'s slots, (B, H_kv, G, T, S), to
    the accumulator of a stateful policy."""
    pol = self.spec.policy
    if pol is None or not pol.stateful:
      return self
    return dataclasses.replace(self, scores=self.scores + pol.increment(
        _real_rows(probs, q_positions), 0))

  def evict(self, scores, keep: int) -> "KVCache":
    """Keeps the `keep` highest-scoring entries per (row, kv head) (scores
    (B, H_kv|1, S)); the others become empty slots."""
    if not 0 <= keep <= self.capacity:
      raise CompressionError(f"layer {self.layer}: evict keep={keep} is not "
                             f"in [0, {self.capacity}]")
    sc = jnp.where(self.positions[:, :scores.shape[1]] < 0, -jnp.inf,
                   scores.astype(jnp.float32))
    top = jax.lax.top_k(sc, self.capacity)[1]  # descending
    drop = top[..., keep:]
    return dataclasses.replace(
        self, positions=_scatter(self.positions, drop,
                                 jnp.full(drop.shape, NO_POSITION)),
        fresh=False)

  def attention(self, q, k, v, positions, *, scale: float,
                window: int | None = None, rotary: Any = None):
    """One layer's step: returns (out (B, T, H, D), store)."""
    self._check(k, v, positions)
    # An empty store made inside the same jit is a compile-time constant:
    # XLA then constant-folds reductions over it (seconds per prefill
    # compile at S x T = 64 x 256). The barrier keeps it a runtime value.
    self = jax.lax.optimization_barrier(self)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    spec, pol = self.spec, self.spec.policy
    if pol is None:
      store = self._append_positional(kh, vh, positions)
      if spec.attention == "pallas":
        from compressjax.kv import sparse
        return sparse.store_attention(self, store, q, positions,
                                      scale=scale, window=window), store
      keys, values, kpos = store.read_heads()
      out, _ = attend_parts(q, [(keys, values, kpos)], positions,
                            scale=scale, window=window)
      return out, store
    budget = self.capacity
    pw, sinks = pol.stream_mask(budget)
    nxt = jnp.maximum(self.next, jnp.max(positions, axis=1) + 1)
    new = self._encode_new(kh, vh)  # once: attended over, then admitted
    nk, nv = self._new_view(new, kh, vh, positions, nxt)
    sink_q = None
    if pol.reposition and sinks:
      if rotary is None:
        raise CompressionError(
            f"layer {self.layer}: {pol.name} with reposition=True moves sink "
            "keys to positions within the cache, which needs the model's "
            "RoPE; this model has learned positions: use reposition=False")
      shift = jnp.maximum(positions - (budget - 1), 0)
      sink_q = rotary(q, -shift)
    keys, values, kpos = self.read_heads()
    pos_h = positions[:, None, :]
    out = probs = None
    if spec.attention == "pallas":
      from compressjax.kv import sparse
      out, probs = sparse.evicting_attention(
          self, q, (keys, values, kpos), (nk, nv, pos_h), positions,
          scale=scale, window=window, policy_window=pw, sinks=sinks,
          sink_q=sink_q)
    if out is None:
      out, probs = attend_parts(q, [(keys, values, kpos), (nk, nv, pos_h)],
                                positions, scale=scale, window=window,
                                policy_window=pw, sinks=sinks, sink_q=sink_q)
    return out, self._admit(kh, vh, positions,
                            probs if pol.needs_probs else None, new)

  # -- internals
  def _check(self, k, v, positions):
    b, t = positions.shape
    want = (self.positions.shape[0], t, self.kv_heads, self.head_dim)
    if tuple(k.shape) != want or tuple(v.shape) != want:
      raise CompressionError(
          f"layer {self.layer}: keys {tuple(k.shape)} / values "
          f"{tuple(v.shape)} do not fit this KV cache (batch, tokens, "
          f"kv_heads, head_dim) = {want}: the cache was built for another "
          "model or batch; make it with this model's init_cache")
    if self.spec.policy is None and t > self.capacity:
      raise CompressionError(
          f"layer {self.layer}: {t} tokens exceed the KV cache capacity "
          f"{self.capacity}; make the cache with a larger capacity")
    if self.spec.policy is None and is_concrete(positions) and is_concrete(
        self.next) and int(jnp.max(positions)) >= self.capacity:
      raise CompressionError(
          f"layer {self.layer}: position {int(jnp.max(positions))} does not "
          f"fit the KV cache capacity {self.capacity}; make the cache with "
          "capacity >= prompt + generated tokens")

  def _encode_new(self, kh, vh):
    """The new tokens' per-token entries (keys, values) (`_encode`)."""
    s, dt = self.spec, self.recent_dtype
    return _encode(s.keys, kh, dt), _encode(s.values, vh, dt)

  def _new_view(self, entries, kh, vh, positions, nxt):
    """The new tokens as attention sees them: float inside the window,
    else their dequantized `entries` (`_encode_new`)."""
    s, dt = self.spec, self.recent_dtype

    def lane(q, e, x):
      if q is None:
        return x.astype(dt)
      deq = _decode(q, e, dt)
      use = positions >= _float_from(q, s.residual, nxt)[:, None]
      return jnp.where(use[:, None, :, None], x.astype(dt), deq)

    return lane(s.keys, entries[0], kh), lane(s.values, entries[1], vh)

  def _update_recent(self, q, recent, x, positions, nxt):
    """Writes the new tokens into a lane's float window (slot = position
    mod F; only the last F positions, so slots do not collide)."""
    if recent is None:
      return None
    f = recent.shape[2]
    ok = (positions >= 0) & (positions >= (nxt - f)[:, None])
    slot = jnp.where(ok, jnp.maximum(positions, 0) % f, _DROP)[:, None]
    return _scatter(recent, slot, x)

  def _append_positional(self, kh, vh, positions) -> "KVCache":
    """No policy: slot = position."""
    s, dt = self.spec, self.recent_dtype
    nxt = jnp.maximum(self.next, jnp.max(positions, axis=1) + 1)
    slot = jnp.where(positions >= 0, positions, _DROP)[:, None]  # (B, 1, T)
    t = positions.shape[1]

    def lane(q, main, recent, x):
      if q is not None and q.axis == "channel":
        main = self._flush_groups(q, main, recent, x, positions, nxt)
      else:
        main = _map_entries(lambda a, n: _scatter(a, slot, n), self.capacity,
                            main, _encode(q, x, dt))
      return main, self._update_recent(q, recent, x, positions, nxt)

    keys, rk = lane(s.keys, self.keys, self.recent_keys, kh)
    values, rv = lane(s.values, self.values, self.recent_values, vh)
    pos = _scatter(self.positions, slot,
                   jnp.broadcast_to(positions[:, None], (positions.shape[0],
                                                         1, t)))
    return dataclasses.replace(self, keys=keys, values=values, positions=pos,
                               recent_keys=rk, recent_values=rv, next=nxt,
                               fresh=False)

  def _flush_groups(self, q, main, recent, x, positions, nxt):
    """Per-channel lane: quantizes the groups of `group_size` positions
    that this append completes and moves out of the float window (KIVI:
    keys are quantized a group of tokens at a time). Sources: the float
    window (older tokens) or the new tokens."""
    g, r = q.group_size, self.spec.residual
    b, h, t, d = x.shape
    f = recent.shape[2]
    done_old = jnp.maximum(self.next - r, 0) // g
    done_new = jnp.maximum(nxt - r, 0) // g
    k = t // g + 1  # at most this many groups complete in one append
    grp = done_old[:, None] + jnp.arange(k)  # (B, K)
    active = grp < done_new[:, None]
    pos = (grp[..., None] * g + jnp.arange(g)).reshape(b, k * g)
    from_new = _gather(x, _row_index(positions, pos)[:, None])
    from_old = _gather(recent, (pos % f)[:, None])
    src = jnp.where((pos >= self.next[:, None])[:, None, :, None],
                    from_new.astype(jnp.float32),
                    from_old.astype(jnp.float32))
    qa = q.quantize(q.rotate_in(src))
    gp = g * q.bits // 8  # packed rows per group
    rows = (grp[..., None] * gp + jnp.arange(gp)).reshape(b, k * gp)
    rows = jnp.where(jnp.repeat(active, gp, axis=1), rows, _DROP)[:, None]
    gidx = jnp.where(active, grp, _DROP)[:, None]
    return KVCodes(codes=_scatter(main.codes, rows, qa.codes),
                  scale=_scatter(main.scale, gidx, qa.scale),
                  zero=None if main.zero is None else _scatter(
                      main.zero, gidx, qa.zero),
                  shape=main.shape, dtype=main.dtype, fmt=main.fmt,
                  axis=main.axis)

  def _admit(self, kh, vh, positions, probs, entries=None) -> "KVCache":
    """Policy: scores the S stored + T new candidates, keeps the best S.
    `entries`: the new tokens' `_encode_new`, when already made."""
    s, pol = self.spec, self.spec.policy
    b, h, t, _ = kh.shape
    n = self.capacity
    nxt = jnp.maximum(self.next, jnp.max(positions, axis=1) + 1)
    ek, ev = entries if entries is not None else self._encode_new(kh, vh)
    new_pos = jnp.broadcast_to(positions[:, None], (b, h, t))
    cand_pos = jnp.concatenate([self.positions, new_pos], axis=2)
    inc = None
    if probs is not None:
      inc = pol.increment(_real_rows(probs, positions), t)
    if pol.stateful:
      acc = jnp.concatenate([self.scores, jnp.zeros((b, h, t), jnp.float32)],
                            axis=2)
      acc = acc if inc is None else acc + inc
    elif pol.needs_probs:
      acc = jnp.zeros((b, 1, n + t), jnp.float32) if inc is None else inc
    else:
      acc = None
    sc = pol.score(acc, cand_pos, nxt, n, self.layer)
    sc = jnp.where(cand_pos[:, :sc.shape[1]] < 0, -jnp.inf, sc)
    rk = self._update_recent(s.keys, self.recent_keys, kh, positions, nxt)
    rv = self._update_recent(s.values, self.recent_values, vh, positions,
                             nxt)
    if t == 1:
      # Evict the lowest-scoring candidate (the last one among ties, as
      # top_k keeps the first); index n is the new token itself.
      e = (n + t - 1 - jnp.argmin(sc[..., ::-1], axis=-1))[..., None]
      slot = jnp.where(e < n, e, _DROP)  # (B, h, 1)
      put = lambda a, x: _scatter(a, slot, x)  # noqa: E731
      keys = _map_entries(put, n, self.keys, ek)
      values = _map_entries(put, n, self.values, ev)
      pos = put(self.positions, new_pos)
      scores = None
      if pol.stateful:
        scores = put(acc[..., :n], acc[..., n:])
    else:
      keep = jax.lax.top_k(sc, n)[1]  # (B, h, n)
      take = lambda a, x: _gather(jnp.concatenate([a, x], axis=2), keep)  # noqa
      keys = _map_entries(take, n, self.keys, ek)
      values = _map_entries(take, n, self.values, ev)
      pos = _gather(cand_pos, keep)
      scores = _gather(acc, keep) if pol.stateful else None
    return dataclasses.replace(
        self, keys=keys, values=values, positions=pos, recent_keys=rk,
        recent_values=rv, scores=scores, next=nxt, fresh=False)


jax.tree_util.register_dataclass(
    KVCache, data_fields=["keys", "values", "positions", "recent_keys",
                          "recent_values", "scores", "next"],
    meta_fields=["spec", "layer", "fresh"])


__all__ = ["KVCache", "KVSpec", "Pyramid", "Uniform"]
