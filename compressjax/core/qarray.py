"""QArray: integer (or other format) codes with scales and zero points.

Definition (exact): w_hat = cast_dtype((decode(codes) - zero) * scale), computed
in float32, where `scale` and `zero` are repeated over groups of
`group_size = shape[axis] // scale.shape[axis]` consecutive elements along
`axis` and broadcast over every other dimension where they have size 1. So a
scale of shape (1, N) for a (K, N) kernel is per output channel, (K/g, N) is
per group of g along the contraction axis, (1, 1) is per tensor.

Codes of fewer than 8 bits are packed along `axis` (layout in
`pallas_kernels.layout`). `scale` may itself be a compressed leaf (e.g. the
power-of-two block scales of MX formats, or double-quantized NF4 scales); it
is materialized first, with no special case.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout
from compressjax.core.base import CompressedLeaf, compressed_leaf, materialize
from compressjax.core.format import Format


def apply_groups(x, s, axis: int, fn):
  """fn(x, s) with s repeated over groups of x along `axis` (exact, no copy)."""
  n, g = x.shape[axis], s.shape[axis]
  if g in (1, n):
    return fn(x, s)
  gs = n // g
  xs = x.reshape(x.shape[:axis] + (g, gs) + x.shape[axis + 1:])
  ss = s.reshape(s.shape[:axis] + (g, 1) + s.shape[axis + 1:])
  return fn(xs, ss).reshape(x.shape)


@compressed_leaf
class QArray(CompressedLeaf):
  """Quantized array. Children: codes, scale, zero (or None)."""

  data_fields = ("codes", "scale", "zero")
  meta_fields = ("shape", "dtype", "fmt", "axis")

  codes: Any
  scale: Any  # array, compressed leaf, or None (codes are the values)
  zero: Any
  shape: tuple[int, ...]
  dtype: str
  fmt: Format
  axis: int

  @property
  def group_size(self) -> int:
    if self.scale is None:
      return self.shape[self.axis]
    return self.shape[self.axis] // self.scale.shape[self.axis]

  @property
  def granularity(self) -> str:
    if self.scale is None:
      return "none"
    if all(d == 1 for d in self.scale.shape):
      return "tensor"
    return "channel" if self.scale.shape[self.axis] == 1 else "group"

  @property
  def packed(self) -> bool:
    return self.fmt.bits < 8

  def stored_codes(self):
    """Unpacked stored integers, shape == self.shape."""
    if not self.packed:
      return self.codes
    return layout.unpack(self.codes, self.fmt.bits, self.shape[self.axis],
                          self.axis)

  def code_values(self):
    """float32 (q - zero): the integer grid before scaling."""
    q = self.fmt.decode(self.stored_codes())
    if self.zero is not None:
      q = apply_groups(q, self.zero.astype(jnp.float32), self.axis,
                       lambda a, b: a - b)
    return q

  def scale_values(self):
    """float32 scales (materialized when the scale is itself compressed)."""
    if self.scale is None:
      return jnp.ones((1,) * len(self.shape), jnp.float32)
    return materialize(self.scale).astype(jnp.float32)

  def materialize(self) -> jax.Array:
    w = self.code_values()
    if self.scale is not None:  # None: the codes are the values (E8M0 scales)
      w = apply_groups(w, self.scale_values(), self.axis, lambda a, b: a * b)
    return w.astype(self.dtype)

  def validate(self) -> None:
    shape, axis = tuple(self.shape), self.axis
    if not 0 <= axis < max(len(shape), 1):
      self._fail(f"axis {axis} out of range for shape {shape}")
    codes_shape = list(shape)
    if shape:
      codes_shape[axis] = layout.packed_length(shape[axis], self.fmt.bits)
    self._expect("codes", self.codes, tuple(codes_shape))
    if np.dtype(self.codes.dtype) != np.dtype(self.fmt.storage_dtype):
      self._fail(f"codes dtype {self.codes.dtype} != format storage "
                 f"{np.dtype(self.fmt.storage_dtype)}")
    if self.scale is None:
      if self.zero is not None:
        self._fail("a zero point needs a scale")
      return super().validate()
    self._expect("scale", self.scale, kind="f")
    if self.scale.ndim != len(shape):
      self._fail(f"scale rank {self.scale.ndim} != array rank {len(shape)}")
    for d, (n, s) in enumerate(zip(shape, self.scale.shape)):
      ok = s in (1, n) or (d == axis and n % s == 0)
      if not ok:
        self._fail(f"scale dim {d} has size {s}, which is neither 1, {n}, nor "
                   f"a group count dividing {n} along axis {axis}")
    if self.zero is not None:
      self._expect("zero", self.zero, tuple(self.scale.shape), kind="iu")
    super().validate()
