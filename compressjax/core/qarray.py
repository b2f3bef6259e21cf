"""QArray: codes in a number format, with per-group scales and zero points.

A QArray stores the (K, N) matrix of its array over the declared contraction
axes `contract` (`core/contraction.py`: K = the contraction flattened in the
declared order, N = every other axis, the output features):

  codes  (ceil(K * bits / 8), N) stored integers, packed along K
         (`pallas_kernels.layout`) below 8 bits, else (K, N)
  scale  (G, N), (G, 1) float or None; G groups of K / G consecutive rows.
         (1, N) is per output feature ("per channel": one scale per element
         of every non-contracted axis), (G, N) per group along the
         contraction, (1, 1) per tensor. The scale may itself be a compressed
         leaf (MX's E8M0 block scales, double-quantized scales): it is
         materialized first, with no special case.
  zero   None or integer zero points of the scale's shape

Definition (exact): matrix = (decode(codes) - zero) * scale in float32, the
per-group values repeated over their rows; w_hat = cast_dtype(matrix laid
back out to `shape`). Matmul kernels consume codes and scales as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout
from compressjax.core.base import (CompressedLeaf, NotStackable, Stage,
                                   compressed_leaf, materialize)
from compressjax.core.contraction import (MatrixLayout, apply_groups,
                                          split_columns, unstacked_layout)
from compressjax.core.format import Format


def pack_codes(stored, bits: int):
  """(K, N) stored integers -> the codes a QArray keeps (packed along K)."""
  return layout.pack(stored, bits, 0) if bits < 8 else stored


@compressed_leaf
class QArray(CompressedLeaf):
  """Quantized array. Children: codes, scale, zero (or None)."""

  data_fields = ("codes", "scale", "zero")
  meta_fields = ("shape", "dtype", "fmt", "contract")
  stage = Stage.QUANTIZE

  codes: Any
  scale: Any  # array, compressed leaf, or None (codes are the values)
  zero: Any
  shape: tuple[int, ...]
  dtype: str
  fmt: Format
  contract: tuple[int, ...]

  @property
  def layout(self) -> MatrixLayout:
    return MatrixLayout(tuple(self.shape), tuple(self.contract))

  @property
  def groups(self) -> int:
    return 1 if self.scale is None else self.scale.shape[0]

  @property
  def group_size(self) -> int:
    return self.layout.k // self.groups

  @property
  def granularity(self) -> str:
    if self.scale is None:
      return "none"
    g, c = self.scale.shape
    if g == 1:
      return "channel" if c == self.layout.n and c > 1 else "tensor"
    return "group"

  @property
  def packed(self) -> bool:
    return self.fmt.bits < 8

  def unstack(self, n: int):
    """Stacked along axis 0, an output axis (see `CompressedLeaf.unstack`):
    every index owns a run of N / n stored columns."""
    shape, contract = unstacked_layout(self.shape, self.contract, n)
    return self.split_columns(n, shape, contract)

  def split_columns(self, n: int, shape, contract):
    """(parts, build) splitting the stored (K, N) matrix into n runs of
    columns; build gives the QArray of one run with `shape` / `contract`.
    Per-column scales and zeros split with it (also a compressed (G, N)
    scale, by its own columns); (G, 1) ones are shared."""
    big = self.layout.n
    parts, builds = [split_columns(self.codes, n)], []

    def child(c):
      if c is None or c.shape[-1] != big or big == 1:
        return lambda sl, c=c: c  # shared by every index
      if isinstance(c, CompressedLeaf):
        if not isinstance(c, QArray) or tuple(c.contract) != (0,) or len(
            c.shape) != 2:
          raise NotStackable(f"its compressed scale {type(c).__name__} "
                             f"{tuple(c.shape)} has no column split")
        sp, sb = c.split_columns(n, (c.shape[0], big // n), (0,))
      else:
        sp, sb = [split_columns(c, n)], lambda sl: sl[0]
      at = len(parts)
      parts.extend(sp)
      return lambda sl: sb(sl[at:at + len(sp)])

    scale, zero = child(self.scale), child(self.zero)

    def build(sl):
      return dataclasses.replace(self, codes=sl[0], scale=scale(sl),
                                 zero=zero(sl), shape=tuple(shape),
                                 contract=tuple(contract))
    return parts, build

  def describe(self) -> str:
    g = {"tensor": "t", "channel": "c", "none": "t"}.get(
        self.granularity, f"g{self.group_size}")
    return f"{self.fmt.name} {g}"

  def stored_codes(self):
    """Unpacked stored integers, the (K, N) matrix."""
    if not self.packed:
      return self.codes
    return layout.unpack(self.codes, self.fmt.bits, self.layout.k, 0)

  def code_values(self):
    """float32 (q - zero), the (K, N) matrix before scaling."""
    q = self.fmt.decode(self.stored_codes())
    if self.zero is not None:
      q = apply_groups(q, self.zero.astype(jnp.float32), lambda a, b: a - b)
    return q

  def scale_values(self):
    """float32 scales (G, N) or (G, 1), materialized when compressed."""
    if self.scale is None:
      return jnp.ones((1, 1), jnp.float32)
    return materialize(self.scale).astype(jnp.float32)

  def matrix(self):
    """The dequantized (K, N) matrix in float32."""
    w = self.code_values()
    if self.scale is not None:  # None: the codes are the values (E8M0)
      w = apply_groups(w, self.scale_values(), lambda a, b: a * b)
    return w

  def materialize(self) -> jax.Array:
    return self.layout.from_matrix(self.matrix()).astype(self.dtype)

  def validate(self) -> None:
    shape, contract = tuple(self.shape), tuple(self.contract)
    nd = len(shape)
    if not isinstance(self.fmt, Format):
      self._fail(f"fmt must be a Format object, got {self.fmt!r}")
    if not contract or len(set(contract)) != len(contract) or any(
        not 0 <= a < nd for a in contract):
      self._fail(f"contraction axes {contract} are not distinct axes of "
                 f"shape {shape}")
    k, n = self.layout.k, self.layout.n
    self._expect("codes", self.codes,
                 (layout.packed_length(k, self.fmt.bits), n))
    if np.dtype(self.codes.dtype) != np.dtype(self.fmt.storage_dtype):
      self._fail(f"codes dtype {self.codes.dtype} != format storage "
                 f"{np.dtype(self.fmt.storage_dtype)}")
    if self.scale is None:
      if self.zero is not None:
        self._fail("a zero point needs a scale")
      return super().validate()
    self._expect("scale", self.scale, kind="f")
    s = tuple(self.scale.shape)
    if len(s) != 2 or s[1] not in (1, n) or s[0] < 1 or k % s[0]:
      self._fail(f"scale has shape {s}; expected (G, {n}) or (G, 1) with G "
                 f"dividing the contraction K={k}")
    if self.zero is not None:
      self._expect("zero", self.zero, s, kind="iu")
    super().validate()
