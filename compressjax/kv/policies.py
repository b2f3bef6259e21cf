"""Eviction policies: which tokens a KV store with a token budget keeps.

A policy is a small scoring function over the store's candidates (the
tokens it holds plus the ones being appended): the store keeps the `budget`
highest-scoring candidates per (row, kv head) and evicts the rest (see
`kv.store`). Scores of +inf are protected (always kept), empty slots and
padding score -inf. A policy may keep an accumulator per stored token
(`stateful`), updated from the attention weights the layer just computed
over the candidates (`increment`), and says which candidates a query may see
when several tokens arrive in one call (`stream_mask`), so a prefill attends
exactly as a token-by-token run would.

  Window       sliding window: keep the most recent tokens (score = position).
  SinkWindow   StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language
               Models with Attention Sinks", Sec. 3.2): the first `sinks`
               tokens plus a recent window; with `reposition`, the position
               of a token is its position in the cache (Sec. 3.2, "we focus
               on positions within the cache"), here for RoPE: sink keys are
               seen at virtual positions next to the window.
  H2O          Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", Alg. 1: the
               score of a token is the attention it has received, summed over
               every query so far (and the query heads of its kv head); the
               most recent `recent` fraction of the budget is kept as well
               (half / half in the paper), the rest are heavy hitters, per
               head.
  SnapKV       Li et al. 2024, "SnapKV: LLM Knows What You are Looking for
               Before Generation", Sec. 4.2, Eq. 1-2: the last `window`
               queries of a call (the observation window) vote with their
               attention, votes are max-pooled over `kernel` neighbouring
               positions, the top ones kept per head plus the window.
               Decoding one token at a time, each new query votes (the
               paper compresses the prompt only; with a fixed budget, the
               votes keep accumulating).
  TOVA         Oren et al. 2024, "Transformers are Multi-State RNNs", Sec. 4:
               evict the token with the lowest attention weight from the
               current (last) query, averaged over heads (one choice per
               layer).
  Random       a control: uniform random scores.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from compressjax.core.errors import CompressionError

INF = float("inf")


class Policy:
  """Base class: a frozen dataclass per policy (hashable, static)."""

  name: ClassVar[str] = "policy"
  per_head: ClassVar[bool] = False   # choices per kv head (else per layer)
  stateful: ClassVar[bool] = False   # keeps an accumulator per stored token
  needs_probs: ClassVar[bool] = False  # scores use attention weights
  reposition: bool = False

  def min_budget(self) -> int:
    """Smallest budget (tokens per layer and head) the policy works with."""
    return 1

  def check(self, budget: int, layer: int) -> None:
    if budget < self.min_budget():
      raise CompressionError(
          f"layer {layer}: {self.name}: a budget of {budget} tokens is too "
          f"small; it needs at least {self.min_budget()} (raise the budget or"
          " change the policy's window / sinks)")

  def stream_mask(self, budget: int) -> tuple[int | None, int]:
    """(window, sinks): a query at position i sees candidate j iff
    i - j < window or j < sinks (window None: every earlier token)."""
    del budget
    return None, 0

  def observed_rows(self, t: int) -> int:
    """How many of the last query rows of a call `increment` reads."""
    return t if self.needs_probs else 0

  def increment(self, probs, num_new: int):
    """(B, H_kv, G, T, N) float32 attention over the N candidates (the
    last `num_new` are the new tokens, in position order) -> (B, h, N),
    h = H_kv (per head) or 1."""
    raise NotImplementedError

  def score(self, acc, positions, next_position, budget: int, layer: int):
    """Scores (B, h, N) of the candidates. acc: the accumulator (stateful),
    this call's increment (needs_probs), else None; positions (B, H_kv, N)
    (NO_POSITION where empty); next_position (B,) one past the newest."""
    raise NotImplementedError


def _shared(positions):
  return positions[:, :1].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Window(Policy):
  """Keeps the `budget` most recent tokens."""

  name: ClassVar[str] = "window"

  def stream_mask(self, budget):
    return budget, 0

  def score(self, acc, positions, next_position, budget, layer):
    return _shared(positions)


@dataclasses.dataclass(frozen=True)
class SinkWindow(Policy):
  """StreamingLLM: `sinks` first tokens + the most recent ones."""

  name: ClassVar[str] = "sink"
  sinks: int = 4
  reposition: bool = True

  def __post_init__(self):
    if self.sinks < 1:
      raise CompressionError(f"sink: sinks must be >= 1, got {self.sinks} "
                             "(use Window for none)")

  def min_budget(self):
    return self.sinks + 1

  def stream_mask(self, budget):
    return budget - self.sinks, self.sinks

  def score(self, acc, positions, next_position, budget, layer):
    p = _shared(positions)
    return jnp.where(p < self.sinks, INF, p)


def _recent(p, next_position, n):
  return p >= (next_position[:, None, None] - n).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
  """Heavy hitters (accumulated attention) + the most recent tokens."""

  name: ClassVar[str] = "h2o"
  per_head: ClassVar[bool] = True
  stateful: ClassVar[bool] = True
  needs_probs: ClassVar[bool] = True
  recent: float = 0.5  # fraction of the budget kept for the recent window

  def __post_init__(self):
    if not 0 <= self.recent < 1:
      raise CompressionError(f"h2o: recent must be in [0, 1), got "
                             f"{self.recent}")

  def recent_tokens(self, budget: int) -> int:
    return int(math.floor(budget * self.recent))

  def increment(self, probs, num_new):
    return probs.sum(axis=(2, 3))

  def score(self, acc, positions, next_position, budget, layer):
    p = positions.astype(jnp.float32)
    return jnp.where(_recent(p, next_position, self.recent_tokens(budget)),
                     INF, acc)


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
  """Observation-window votes, pooled, top-k per head + the window."""

  name: ClassVar[str] = "snapkv"
  per_head: ClassVar[bool] = True
  stateful: ClassVar[bool] = True
  needs_probs: ClassVar[bool] = True
  window: int = 32
  kernel: int = 7
  pooling: str = "max"

  def __post_init__(self):
    if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
      raise CompressionError(f"snapkv: window must be >= 1 and kernel odd, "
                             f"got window={self.window} kernel={self.kernel}")
    if self.pooling not in ("max", "avg"):
      raise CompressionError(f"snapkv: pooling must be 'max' or 'avg', got "
                             f"{self.pooling!r}")

  def min_budget(self):
    return self.window + 1

  def observed_rows(self, t):
    return min(self.window, t)

  def increment(self, probs, num_new):
    votes = probs[:, :, :, -self.window:].sum(axis=(2, 3))
    if self.kernel == 1 or num_new < 2:
      return votes
    old, new = votes[..., :-num_new], votes[..., -num_new:]
    pad = self.kernel // 2
    if self.pooling == "max":
      pooled = jax.lax.reduce_window(new, -jnp.inf, jax.lax.max,
                                     (1, 1, self.kernel), (1, 1, 1),
                                     ((0, 0), (0, 0), (pad, pad)))
    else:
      pooled = jax.lax.reduce_window(new, 0.0, jax.lax.add,
                                     (1, 1, self.kernel), (1, 1, 1),
                                     ((0, 0), (0, 0), (pad, pad))) / self.kernel
    return jnp.concatenate([old, pooled], axis=-1)

  def score(self, acc, positions, next_position, budget, layer):
    p = positions.astype(jnp.float32)
    return jnp.where(_recent(p, next_position, self.window), INF, acc)


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
  """Lowest attention weight from the current query, averaged over heads."""

  name: ClassVar[str] = "tova"
  needs_probs: ClassVar[bool] = True

  def observed_rows(self, t):
    return 1

  def increment(self, probs, num_new):
    return probs[:, :, :, -1].mean(axis=(1, 2))[:, None]

  def score(self, acc, positions, next_position, budget, layer):
    return acc


@dataclasses.dataclass(frozen=True)
class Random(Policy):
  """Uniform random scores (a control); deterministic given `seed`."""

  name: ClassVar[str] = "random"
  seed: int = 0

  def score(self, acc, positions, next_position, budget, layer):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed),
                                                layer), jnp.max(next_position))
    b, _, n = positions.shape
    return jax.random.uniform(key, (b, 1, n))


POLICIES: dict[str, type] = {
    c.name: c for c in (Window, SinkWindow, H2O, SnapKV, TOVA, Random)}
POLICIES["streaming_llm"] = SinkWindow


def get(policy: Any, **kwargs) -> Policy:
  """A policy object from a Policy or a name in POLICIES (kwargs: its
  fields)."""
  if isinstance(policy, Policy):
    if kwargs:
      return dataclasses.replace(policy, **kwargs)
    return policy
  if policy not in POLICIES:
    raise CompressionError(f"unknown KV eviction policy {policy!r}; use one "
                           f"of {', '.join(sorted(POLICIES))} (or None to "
                           "keep every token)")
  return POLICIES[policy](**kwargs)
