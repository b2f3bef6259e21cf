"""Sparse leaves, stored compactly.

`SparseArray` (unstructured, block and channel patterns): the array is cut into
blocks of shape `block` (all ones = unstructured; a whole row or column =
channel). A packed 1-bit mask over the block grid (row-major, LSB-first, see
`pallas_kernels.layout`) says which blocks are kept; `values` holds the kept
blocks' elements, block after block in grid order, each block in row-major
order. Storage: kept values + 1 bit per block.

`NMSparseArray` (N:M): along `axis`, every run of M consecutive elements keeps
exactly N. `values` has that axis shrunk to K*N/M (kept elements in order) and
`indices` gives each kept element's position 0..M-1 inside its run, packed at
ceil(log2 M) bits. Storage: kept values + N*ceil(log2 M) bits per M elements.

`values` may itself be a compressed leaf (e.g. a QArray: sparse + int4).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout
from compressjax.core.base import (CompressedLeaf, Stage, compressed_leaf,
                                   is_concrete, materialize, nested)


def index_bits(m: int) -> int:
  return max(1, math.ceil(math.log2(m)))


def blocks_to_dense(blocks, shape, block):
  """(g0..gk, b0..bk) -> dense `shape` (interleaving grid and block dims)."""
  k = len(shape)
  perm = [i for d in range(k) for i in (d, k + d)]
  return jnp.transpose(blocks, perm).reshape(shape)


def dense_to_blocks(x, block):
  """dense -> (g0..gk, b0..bk)."""
  k = x.ndim
  grid = tuple(s // b for s, b in zip(x.shape, block))
  inter = tuple(v for pair in zip(grid, block) for v in pair)
  perm = list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2))
  return jnp.transpose(x.reshape(inter), perm)


@compressed_leaf
class SparseArray(CompressedLeaf):
  """Block-bitmask sparse array (unstructured / block / channel)."""

  data_fields = ("values", "mask")
  meta_fields = ("shape", "dtype", "block", "pattern")
  stage = Stage.SPARSIFY

  values: Any
  mask: Any
  shape: tuple[int, ...]
  dtype: str
  block: tuple[int, ...]
  pattern: str

  @property
  def grid(self) -> tuple[int, ...]:
    return tuple(s // b for s, b in zip(self.shape, self.block))

  @property
  def num_kept(self) -> int:
    return int(np.prod(self.values.shape))

  @property
  def sparsity(self) -> float:
    return 1.0 - self.num_kept / max(self.size, 1)

  def describe(self) -> str:
    return nested(f"{self.pattern} {self.sparsity:.0%}", self.values)

  def _targets(self, op):
    # the kept values are a flat list: the array's axes do not apply to them
    return {"values": False}

  def block_mask(self):
    n = math.prod(self.grid)
    return layout.unpack(self.mask, 1, n, 0).astype(bool)

  def dense_mask(self):
    bm = self.block_mask().reshape(self.grid + (1,) * self.ndim)
    full = jnp.broadcast_to(bm, self.grid + tuple(self.block))
    return blocks_to_dense(full, self.shape, self.block)

  def materialize(self) -> jax.Array:
    bsz = math.prod(self.block)
    vals = materialize(self.values).reshape(-1, bsz)
    keep = self.block_mask()
    idx = jnp.clip(jnp.cumsum(keep) - 1, 0, max(vals.shape[0] - 1, 0))
    if vals.shape[0] == 0:
      blocks = jnp.zeros((keep.shape[0], bsz), self.dtype)
    else:
      blocks = jnp.where(keep[:, None], vals[idx], 0).astype(self.dtype)
    blocks = blocks.reshape(self.grid + tuple(self.block))
    return blocks_to_dense(blocks, self.shape, self.block)

  def validate(self) -> None:
    if len(self.block) != len(self.shape) or any(
        b < 1 or s % b for s, b in zip(self.shape, self.block)):
      self._fail(f"block {self.block} does not tile shape {self.shape}")
    n = math.prod(self.grid)
    self._expect("mask", self.mask, (layout.packed_length(n, 1),), kind="u")
    if self.values.ndim != 1 or self.values.shape[0] % math.prod(self.block):
      self._fail(f"values must be 1-D with a whole number of blocks, got "
                 f"shape {tuple(self.values.shape)}")
    if is_concrete(self.mask):
      kept = int(np.asarray(self.block_mask()).sum())
      if kept * math.prod(self.block) != self.values.shape[0]:
        self._fail(f"mask keeps {kept} blocks but values hold "
                   f"{self.values.shape[0] // math.prod(self.block)}")
    super().validate()


@compressed_leaf
class NMSparseArray(CompressedLeaf):
  """N:M structured sparse array: kept values + packed in-run indices."""

  data_fields = ("values", "indices")
  meta_fields = ("shape", "dtype", "n", "m", "axis")
  stage = Stage.SPARSIFY

  values: Any
  indices: Any
  shape: tuple[int, ...]
  dtype: str
  n: int
  m: int
  axis: int

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def describe(self) -> str:
    return nested(f"{self.n}:{self.m}", self.values)

  def _targets(self, op):
    # values keep every axis (the run axis shrunk by N/M)
    return {"values": True}

  @property
  def kept_shape(self) -> tuple[int, ...]:
    s = list(self.shape)
    s[self.axis] = s[self.axis] // self.m * self.n
    return tuple(s)

  def positions(self):
    """uint8 in-run positions, shape == kept_shape."""
    return layout.unpack(self.indices, index_bits(self.m),
                          self.kept_shape[self.axis], self.axis)

  def materialize(self) -> jax.Array:
    ax = self.axis
    v = jnp.moveaxis(materialize(self.values), ax, -1)
    p = jnp.moveaxis(self.positions(), ax, -1)
    runs = v.shape[-1] // self.n
    v = v.reshape(v.shape[:-1] + (runs, self.n))
    p = p.reshape(p.shape[:-1] + (runs, self.n))
    hit = p[..., None] == jnp.arange(self.m, dtype=p.dtype)  # (.., runs, n, m)
    dense = jnp.sum(jnp.where(hit, v[..., None], 0), axis=-2)
    dense = dense.reshape(dense.shape[:-2] + (runs * self.m,))
    return jnp.moveaxis(dense, -1, ax).astype(self.dtype)

  def validate(self) -> None:
    if not 0 < self.n < self.m:
      self._fail(f"N:M needs 0 < N < M, got {self.n}:{self.m}")
    if self.shape[self.axis] % self.m:
      self._fail(f"M={self.m} does not divide axis {self.axis} of {self.shape}")
    self._expect("values", self.values, self.kept_shape)
    s = list(self.kept_shape)
    s[self.axis] = layout.packed_length(s[self.axis], index_bits(self.m))
    self._expect("indices", self.indices, tuple(s), kind="u")
    super().validate()
