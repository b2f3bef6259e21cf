"""LowRank: w_hat = cast_dtype(from_matrix(A @ B) + residual), in float32.

A is (K, r), B is (r, N) for the array's (K, N) matrix view over its
contraction axes `contract` (`core.contraction.MatrixLayout`: K the
contracted axes flattened in the declared order, N the rest). The default
(None) contracts every axis but the last: (prod(shape[:-1]), shape[-1]), right
for Dense (in, out), conv HWIO and an out-projection (heads, head_dim, d); an
in-projection (d, heads, head_dim) contracts (0,). `runtime` multiplies
x @ A @ B whenever an op contracts exactly these axes. `residual` is None, a
dense array or any compressed leaf (e.g. a QArray: low-rank plus quantized
residual). A and B may be compressed too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.base import (CompressedLeaf, Stage, compressed_leaf,
                                   describe, materialize)
from compressjax.core.contraction import MatrixLayout
from compressjax.core.errors import CompressionError


def lowrank_layout(shape, contract=None) -> MatrixLayout:
  """The (K, N) view a LowRank of `shape` factors: over `contract`, or (None)
  every axis but the last."""
  shape = tuple(shape)
  c = (tuple(range(len(shape) - 1)) if contract is None
       else tuple(int(a) for a in contract))
  return MatrixLayout(shape, c)


@compressed_leaf
class LowRank(CompressedLeaf):
  data_fields = ("a", "b", "residual")
  meta_fields = ("shape", "dtype", "contract")
  stage = Stage.FACTORIZE

  a: Any
  b: Any
  residual: Any
  shape: tuple[int, ...]
  dtype: str
  contract: tuple[int, ...] | None = None  # None: all axes but the last

  def __post_init__(self):
    object.__setattr__(self, "contract", lowrank_layout(
        self.shape, self.contract).contract)

  @property
  def layout(self) -> MatrixLayout:
    return lowrank_layout(self.shape, self.contract)

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
    return self.layout.k, self.layout.n

  def product(self):
    a = materialize(self.a).astype(jnp.float32)
    b = materialize(self.b).astype(jnp.float32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

  def materialize(self) -> jax.Array:
    w = self.layout.from_matrix(self.product())
    if self.residual is not None:
      w = w + materialize(self.residual).astype(jnp.float32)
    return w.astype(self.dtype)

  def validate(self) -> None:
    c = tuple(self.contract)
    if not c or len(set(c)) != len(c) or any(
        not 0 <= a < len(self.shape) for a in c) or len(c) == len(self.shape):
      self._fail(f"contraction axes {c} must be distinct axes of shape "
                 f"{tuple(self.shape)}, leaving at least one output axis")
    m, n = self.matrix_shape
    r = self.a.shape[-1] if self.a is not None else -1
    self._expect("a", self.a, (m, r), kind="f")
    self._expect("b", self.b, (r, n), kind="f")
    if r > min(m, n):
      self._fail(f"rank {r} exceeds min(m, n) = {min(m, n)}")
    if self.residual is not None:
      self._expect("residual", self.residual, tuple(self.shape))
    super().validate()
