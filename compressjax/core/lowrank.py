"""LowRank: w_hat = cast_dtype(reshape(A @ B) + residual), in float32.

A is (m, r), B is (r, n) where the array is viewed as (prod(shape[:-1]),
shape[-1]). `residual` is None, a dense array or any compressed leaf (e.g. a
QArray: low-rank plus quantized residual). A and B may be compressed too.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.base import (CompressedLeaf, Stage, compressed_leaf,
                                   describe, materialize)
from compressjax.core.errors import CompressionError


@compressed_leaf
class LowRank(CompressedLeaf):
  data_fields = ("a", "b", "residual")
  meta_fields = ("shape", "dtype")
  stage = Stage.FACTORIZE

  a: Any
  b: Any
  residual: Any
  shape: tuple[int, ...]
  dtype: str

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def sparsity(self) -> float:
    return 0.0 if self.residual is None else getattr(
        self.residual, "sparsity", 0.0)

  def describe(self) -> str:
    s = f"rank {self.rank}"
    return s if self.residual is None else f"{s} + {describe(self.residual)}"

  def _targets(self, op):
    if self.residual is not None:
      return {"residual": True}
    if op == Stage.SPARSIFY:
      raise CompressionError(
          "low-rank param has no residual to sparsify; factorize with "
          "residual=True, or sparsify before factorizing")
    return {"a": False, "b": False}  # quantize both factors

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return math.prod(self.shape[:-1]), self.shape[-1]

  def product(self):
    a = materialize(self.a).astype(jnp.float32)
    b = materialize(self.b).astype(jnp.float32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

  def materialize(self) -> jax.Array:
    w = self.product().reshape(self.shape)
    if self.residual is not None:
      w = w + materialize(self.residual).astype(jnp.float32)
    return w.astype(self.dtype)

  def validate(self) -> None:
    m, n = self.matrix_shape
    r = self.a.shape[-1] if self.a is not None else -1
    self._expect("a", self.a, (m, r), kind="f")
    self._expect("b", self.b, (r, n), kind="f")
    if r > min(m, n):
      self._fail(f"rank {r} exceeds min(m, n) = {min(m, n)}")
    if self.residual is not None:
      self._expect("residual", self.residual, tuple(self.shape))
    super().validate()
