"""CodebookArray: packed indices into small learned codebooks.

w_hat[i] = cast_dtype(codebook[g(i), index[i]]) where g(i) is the group of
element i: groups of `shape[axis] // codebook.shape[0]` consecutive slices along
`axis` (one group = per-tensor). `codebook` is (G, 2^bits) float; indices are
`bits` wide and packed along `axis` (layout in `pallas_kernels.layout`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.base import CompressedLeaf, compressed_leaf
from pallas_kernels import layout


@compressed_leaf
class CodebookArray(CompressedLeaf):
  data_fields = ("indices", "codebook")
  meta_fields = ("shape", "dtype", "bits", "axis")

  indices: Any
  codebook: Any
  shape: tuple[int, ...]
  dtype: str
  bits: int
  axis: int

  @property
  def groups(self) -> int:
    return self.codebook.shape[0]

  def codes(self):
    return layout.unpack(self.indices, self.bits, self.shape[self.axis],
                         self.axis)

  def materialize(self) -> jax.Array:
    idx = jnp.moveaxis(self.codes(), self.axis, 0).astype(jnp.int32)
    vals = jnp.take_along_axis(self.codebook.astype(jnp.float32),
                               idx.reshape(self.groups, -1), axis=1)
    return jnp.moveaxis(vals.reshape(idx.shape), 0, self.axis).astype(
        self.dtype)

  def validate(self) -> None:
    if not 1 <= self.bits <= 8:
      self._fail(f"bits {self.bits} outside [1, 8]")
    self._expect("codebook", self.codebook, kind="f")
    if self.codebook.ndim != 2 or self.codebook.shape[1] != 2**self.bits:
      self._fail(f"codebook must be (groups, {2**self.bits}), got "
                 f"{tuple(self.codebook.shape)}")
    if self.shape[self.axis] % self.groups:
      self._fail(f"{self.groups} groups do not divide axis {self.axis} of "
                 f"{self.shape}")
    s = list(self.shape)
    s[self.axis] = layout.packed_length(s[self.axis], self.bits)
    self._expect("indices", self.indices, tuple(s), kind="u")
