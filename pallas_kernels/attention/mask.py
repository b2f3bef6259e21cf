"""Attention masks as a small algebra, compiled ahead of time to block metadata.

A mask says which (query, key) pairs may attend. Every mask is a frozen,
hashable dataclass with `shape = (q_len, kv_len)` and an elementwise
definition `mask_fn(q_ids, kv_ids)` written with plain operators, so the same
formula runs on numpy index grids (for compilation) and on jnp iotas inside a
kernel tile (`Mask.tile`). Masks combine with `&` / `|` (`And`, `Or`);
`MultiHeadMask` gives one mask per head.

`compile_mask` turns a mask into `MaskInfo`, the compact, static block
metadata that a block-sparse FlashAttention-2 kernel (Dao 2023, "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", Alg. 1
forward / Alg. 2 backward) walks instead of the full (q block, kv block) grid.
The sequence axes are padded to whole blocks (padded rows and columns are
masked out); each (q block, kv block) pair is then

  * empty   - nothing attends: never listed, so never fetched nor computed;
  * full    - everything attends: listed, the kernel applies no element mask;
  * partial - listed, the kernel applies the element mask of that block.

Element masks of partial blocks: one uniform mechanism. Every partial block's
(block_q, block_kv) boolean mask is stored in a deduplicated table
`partial_masks[u]` and referenced by `mask_ids`; the kernel loads the tile of
the id it is given. The table works for every mask, structured or not
(`NumpyMask`), and deduplication keeps it small for structured masks (a causal
mask with block_q == block_kv has a single distinct partial block). The
structured masks' jnp formulas (`Mask.tile`) are an optimisation a kernel may
use instead of the table; the kernels in this package do not.

Metadata (Hu = number of distinct head masks after deduplication, nq / nk =
q / kv blocks):

  head_map[h]             distinct-mask index of logical mask head h
  block_mask[hu, i, k]    0 empty, 1 partial, 2 full
  kv_indices[hu, i, j]    j-th non-empty kv block of q block i, in order;
                          padded (j >= kv_counts) by repeating the last valid
                          index (0 if none), so a pipeline never fetches anew
  kv_counts[hu, i]        number of non-empty kv blocks of q block i
  kv_full[hu, i, j]       1 if that block is full, 0 if partial
  kv_mask_ids[hu, i, j]   row of `partial_masks` for a partial block (for full
                          / padding entries: the previous partial id, so the
                          table tile is not refetched)
  q_indices, q_counts, q_full, q_mask_ids [hu, k, j]
                          the transpose: per kv block k, its non-empty q blocks
                          (used by the dK/dV backward kernel)
  partial_masks[u, bq, bk] deduplicated element masks of partial blocks (at
                          least one entry, all True, when there are none)

Compilation builds the dense (q_len, kv_len) boolean mask in numpy; it is
meant for sequence lengths where that fits in host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Sequence

import jax.numpy as jnp
import numpy as np


class Mask:
  """Base class: an elementwise (q_len, kv_len) boolean attention mask."""

  shape: tuple[int, int]

  def mask_fn(self, q_ids, kv_ids):
    """Elementwise mask on broadcastable integer index arrays (numpy or jnp)."""
    raise NotImplementedError

  def to_dense(self) -> np.ndarray:
    """The dense (q_len, kv_len) boolean numpy mask."""
    q_len, kv_len = self.shape
    q = np.arange(q_len, dtype=np.int64)[:, None]
    k = np.arange(kv_len, dtype=np.int64)[None, :]
    return np.broadcast_to(np.asarray(self.mask_fn(q, k), bool), self.shape)

  def tile(self, q_offset, kv_offset, block_q: int, block_kv: int):
    """The (block_q, block_kv) jnp mask tile at element offsets (q_offset,
    kv_offset), built from iotas (usable inside a kernel); positions beyond
    `shape` are False."""
    import jax.lax as lax
    q = q_offset + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)
    k = kv_offset + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
    inside = (q < self.shape[0]) & (k < self.shape[1])
    return inside & self.mask_fn(q, k)

  def __and__(self, other: "Mask") -> "Mask":
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    return Or(self, other)


def _shape(shape) -> tuple[int, int]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2 or min(shape) <= 0:
    raise ValueError(f"mask shape must be (q_len, kv_len) > 0, got {shape}")
  return shape


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Everything attends."""
  shape: tuple[int, int]

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape(self.shape))

  def mask_fn(self, q_ids, kv_ids):
    return (q_ids >= 0) & (kv_ids >= 0)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """Query q attends key k iff k <= q + offset (offset = kv_len - q_len
  aligns the last query with the last key, as in decoding with a cache)."""
  shape: tuple[int, int]
  offset: int = 0

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape(self.shape))

  def mask_fn(self, q_ids, kv_ids):
    return kv_ids <= q_ids + self.offset


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """Sliding window: q attends k iff q - window_left <= k <= q + window_right
  (a window of None is unbounded on that side)."""
  shape: tuple[int, int]
  window_left: int | None
  window_right: int | None

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape(self.shape))

  def mask_fn(self, q_ids, kv_ids):
    out = (q_ids >= 0) & (kv_ids >= 0)
    if self.window_left is not None:
      out = out & (kv_ids >= q_ids - self.window_left)
    if self.window_right is not None:
      out = out & (kv_ids <= q_ids + self.window_right)
    return out


@dataclasses.dataclass(frozen=True)
class ChunkedMask(Mask):
  """Causal attention within chunks of `chunk_size` positions: q attends k iff
  q // chunk_size == k // chunk_size and k <= q."""
  shape: tuple[int, int]
  chunk_size: int

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape(self.shape))
    if self.chunk_size <= 0:
      raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}")

  def mask_fn(self, q_ids, kv_ids):
    return (q_ids // self.chunk_size == kv_ids // self.chunk_size) & (
        kv_ids <= q_ids)


@dataclasses.dataclass(frozen=True)
class SinkWindowMask(Mask):
  """Attention sinks plus a causal sliding window: q attends k iff k <= q and
  (k < sinks or q - k < window)."""
  shape: tuple[int, int]
  sinks: int
  window: int

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape(self.shape))

  def mask_fn(self, q_ids, kv_ids):
    return (kv_ids <= q_ids) & ((kv_ids < self.sinks) |
                                (q_ids - kv_ids < self.window))


@dataclasses.dataclass(frozen=True, eq=False)
class NumpyMask(Mask):
  """An arbitrary dense boolean (q_len, kv_len) mask. Hashed and compared by
  content. Its `mask_fn` gathers from the array (fine in numpy / plain jnp,
  not meant for kernels: kernels use the compiled partial-mask table)."""
  array: np.ndarray

  def __post_init__(self):
    a = np.array(self.array, dtype=bool, copy=True)
    if a.ndim != 2:
      raise ValueError(f"NumpyMask needs a 2-D array, got shape {a.shape}")
    a.setflags(write=False)
    object.__setattr__(self, "array", a)
    object.__setattr__(self, "_hash",
                       hash((a.shape, np.packbits(a).tobytes())))

  @property
  def shape(self) -> tuple[int, int]:
    return _shape(self.array.shape)

  def mask_fn(self, q_ids, kv_ids):
    if isinstance(q_ids, np.ndarray) and isinstance(kv_ids, np.ndarray):
      return self.array[q_ids, kv_ids]
    return jnp.asarray(self.array)[q_ids, kv_ids]

  def to_dense(self) -> np.ndarray:
    return self.array

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return (isinstance(other, NumpyMask) and self._hash == other._hash and
            np.array_equal(self.array, other.array))


@dataclasses.dataclass(frozen=True)
class _Binary(Mask):
  """Elementwise combination `_op` of two masks of the same shape."""
  a: Mask
  b: Mask

  def __post_init__(self):
    if self.a.shape != self.b.shape:
      raise ValueError(f"shape mismatch: {self.a.shape} vs {self.b.shape}")

  @property
  def shape(self):
    return self.a.shape

  def mask_fn(self, q_ids, kv_ids):
    return self._op(self.a.mask_fn(q_ids, kv_ids),
                    self.b.mask_fn(q_ids, kv_ids))

  def to_dense(self):
    return self._op(self.a.to_dense(), self.b.to_dense())


class And(_Binary):
  """Elementwise conjunction of two masks of the same shape."""
  _op = staticmethod(operator.and_)


class Or(_Binary):
  """Elementwise disjunction of two masks of the same shape."""
  _op = staticmethod(operator.or_)


@dataclasses.dataclass(frozen=True)
class MultiHeadMask:
  """One mask per head (all of the same shape)."""
  masks: tuple[Mask, ...]

  def __post_init__(self):
    masks = tuple(self.masks)
    if not masks:
      raise ValueError("MultiHeadMask needs at least one mask")
    if any(not isinstance(m, Mask) for m in masks):
      raise TypeError("MultiHeadMask takes Mask instances")
    if len({m.shape for m in masks}) != 1:
      raise ValueError(f"head masks differ in shape: {[m.shape for m in masks]}")
    object.__setattr__(self, "masks", masks)

  @property
  def shape(self) -> tuple[int, int]:
    return self.masks[0].shape

  @property
  def num_heads(self) -> int:
    return len(self.masks)

  def to_dense(self) -> np.ndarray:
    """Dense (num_heads, q_len, kv_len) boolean mask."""
    return np.stack([m.to_dense() for m in self.masks])


def dense_mask(mask: Mask | MultiHeadMask) -> np.ndarray:
  """Dense (heads, q_len, kv_len) boolean mask; heads is 1 for a single Mask
  (shared by every head)."""
  if isinstance(mask, MultiHeadMask):
    return mask.to_dense()
  return mask.to_dense()[None]


@dataclasses.dataclass(frozen=True, eq=False)
class MaskInfo:
  """Compiled block metadata of a mask (see the module docstring). All arrays
  are numpy int32 except `partial_masks` (bool) and `block_mask` (int8)."""
  shape: tuple[int, int]
  block_q: int
  block_kv: int
  head_map: np.ndarray
  block_mask: np.ndarray
  kv_indices: np.ndarray
  kv_counts: np.ndarray
  kv_full: np.ndarray
  kv_mask_ids: np.ndarray
  q_indices: np.ndarray
  q_counts: np.ndarray
  q_full: np.ndarray
  q_mask_ids: np.ndarray
  partial_masks: np.ndarray

  @property
  def num_heads(self) -> int:
    """Number of logical mask heads (1 for a single shared mask)."""
    return int(self.head_map.shape[0])

  @property
  def num_q_blocks(self) -> int:
    return int(self.block_mask.shape[1])

  @property
  def num_kv_blocks(self) -> int:
    return int(self.block_mask.shape[2])


def _lists(state: np.ndarray, ids: np.ndarray):
  """Per row of `state` (..., n) (0 empty, 1 partial, 2 full): the ordered
  non-empty positions, padded by repeating the last one; counts; full flags;
  mask ids forward-filled over full / padding entries."""
  nonempty = state > 0
  counts = nonempty.sum(-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  # Stable sort puts the non-empty positions first, in increasing order.
  order = np.argsort(~nonempty, axis=-1, kind="stable")
  j = np.arange(width)
  last = np.maximum(counts[..., None] - 1, 0)
  pos = np.minimum(j, last)                              # (..., width)
  indices = np.take_along_axis(order, pos, -1)
  indices = np.where(counts[..., None] > 0, indices, 0).astype(np.int32)
  valid = j < counts[..., None]
  st = np.take_along_axis(state, indices, -1)
  full = (valid & (st == 2)).astype(np.int32)
  partial = valid & (st == 1)
  mid = np.take_along_axis(ids, indices, -1)
  # Forward-fill partial ids over full / padding entries.
  src = np.where(partial, j, -1)
  src = np.maximum.accumulate(src, axis=-1)
  filled = np.take_along_axis(mid, np.maximum(src, 0), -1)
  mask_ids = np.where(src >= 0, filled, 0).astype(np.int32)
  return indices, counts, full, mask_ids


@functools.lru_cache(maxsize=64)
def _compile(mask, block_q: int, block_kv: int) -> MaskInfo:
  heads = mask.masks if isinstance(mask, MultiHeadMask) else (mask,)
  distinct: dict = {}
  head_map = np.array([distinct.setdefault(m, len(distinct)) for m in heads],
                      np.int32)
  q_len, kv_len = mask.shape
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  dense = np.zeros((len(distinct), nq * block_q, nk * block_kv), bool)
  for m, u in distinct.items():
    dense[u, :q_len, :kv_len] = m.to_dense()
  blocks = dense.reshape(len(distinct), nq, block_q, nk, block_kv)
  blocks = blocks.transpose(0, 1, 3, 2, 4)               # (Hu, nq, nk, bq, bk)
  any_ = blocks.any((-2, -1))
  all_ = blocks.all((-2, -1))
  state = np.where(all_, 2, np.where(any_, 1, 0)).astype(np.int8)

  partial = state == 1
  ids = np.zeros(state.shape, np.int32)
  if partial.any():
    flat = blocks[partial].reshape(int(partial.sum()), -1)
    table, inverse = np.unique(np.packbits(flat, axis=-1), axis=0,
                               return_inverse=True)
    ids[partial] = inverse.reshape(-1)
    partial_masks = np.unpackbits(table, axis=-1, count=block_q * block_kv)
    partial_masks = partial_masks.astype(bool).reshape(-1, block_q, block_kv)
  else:
    partial_masks = np.ones((1, block_q, block_kv), bool)

  kv = _lists(state, ids)
  qt = _lists(state.transpose(0, 2, 1), ids.transpose(0, 2, 1))
  arrays = (head_map, state) + kv + qt + (partial_masks,)
  for a in arrays:
    a.setflags(write=False)
  return MaskInfo(mask.shape, block_q, block_kv, *arrays)


def compile_mask(mask: Mask | MultiHeadMask, block_q: int,
                 block_kv: int) -> MaskInfo:
  """Compiles `mask` into block metadata for (block_q, block_kv) tiles.

  Identical head masks are compiled once (`head_map`); identical partial
  blocks are stored once. Results are cached by (mask, block sizes)."""
  if not isinstance(mask, (Mask, MultiHeadMask)):
    raise TypeError(f"expected a Mask or MultiHeadMask, got {type(mask)}")
  if block_q <= 0 or block_kv <= 0:
    raise ValueError(f"block sizes must be > 0, got {(block_q, block_kv)}")
  return _compile(mask, int(block_q), int(block_kv))


def density(info: MaskInfo) -> float:
  """Fraction of (head, q block, kv block) tiles that are non-empty, over the
  logical heads."""
  per_head = (info.block_mask > 0).mean(axis=(1, 2))
  return float(per_head[info.head_map].mean())


__all__: Sequence[str] = [
    "Mask", "FullMask", "CausalMask", "LocalMask", "ChunkedMask",
    "SinkWindowMask", "NumpyMask", "And", "Or", "MultiHeadMask", "MaskInfo",
    "compile_mask", "density", "dense_mask",
]
