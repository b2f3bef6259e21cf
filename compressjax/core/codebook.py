"""CodebookArray: packed indices into small learned codebooks.

Like a QArray it stores the (K, N) matrix of its array over the contraction
axes `contract` (`core/contraction.py`). `codebook` is (G, 2^bits) float: rows
of the matrix fall in G groups of K / G consecutive rows (one group = per
tensor), and matrix[i, j] = codebook[group(i), index[i, j]]. `indices` are
`bits` wide, packed along K (layout in `pallas_kernels.layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.base import CompressedLeaf, Stage, compressed_leaf
from compressjax.core.contraction import (MatrixLayout, split_columns,
                                          unstacked_layout)
from pallas_kernels import layout


@compressed_leaf
class CodebookArray(CompressedLeaf):
  data_fields = ("indices", "codebook")
  meta_fields = ("shape", "dtype", "bits", "contract")
  stage = Stage.QUANTIZE

  indices: Any
  codebook: Any
  shape: tuple[int, ...]
  dtype: str
  bits: int
  contract: tuple[int, ...]

  @property
  def layout(self) -> MatrixLayout:
    return MatrixLayout(tuple(self.shape), tuple(self.contract))

  @property
  def groups(self) -> int:
    return self.codebook.shape[0]

  def unstack(self, n: int):
    """Stacked along axis 0, an output axis (`CompressedLeaf.unstack`):
    every index owns a run of N / n index columns; codebooks are per group
    of rows, shared by every index."""
    shape, contract = unstacked_layout(self.shape, self.contract, n)
    return [split_columns(self.indices, n)], lambda sl: dataclasses.replace(
        self, indices=sl[0], shape=shape, contract=contract)

  def describe(self) -> str:
    return f"codebook{self.bits} x{self.groups}"

  def codes(self):
    """Unpacked indices, the (K, N) matrix."""
    return layout.unpack(self.indices, self.bits, self.layout.k, 0)

  def materialize(self) -> jax.Array:
    idx = self.codes().astype(jnp.int32)
    k, n = idx.shape
    vals = jnp.take_along_axis(self.codebook.astype(jnp.float32),
                               idx.reshape(self.groups, -1), axis=1)
    return self.layout.from_matrix(vals.reshape(k, n)).astype(self.dtype)

  def validate(self) -> None:
    if not 1 <= self.bits <= 8:
      self._fail(f"bits {self.bits} outside [1, 8]")
    nd = len(self.shape)
    if not self.contract or any(not 0 <= a < nd for a in self.contract):
      self._fail(f"contraction axes {self.contract} do not fit shape "
                 f"{self.shape}")
    self._expect("codebook", self.codebook, kind="f")
    if self.codebook.ndim != 2 or self.codebook.shape[1] != 2**self.bits:
      self._fail(f"codebook must be (groups, {2**self.bits}), got "
                 f"{tuple(self.codebook.shape)}")
    k, n = self.layout.k, self.layout.n
    if k % self.groups:
      self._fail(f"{self.groups} groups do not divide the contraction K={k}")
    self._expect("indices", self.indices,
                 (layout.packed_length(k, self.bits), n), kind="u")
