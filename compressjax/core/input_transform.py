"""InputTransform: a weight whose matmul first transforms its input.

    y = act_quant( rotate(x * scale, signs, block) ) @ weight

- `scale` (K,) float or None: per-input-channel scale on the activations, the
  explicit form of AWQ's and SmoothQuant's x / s when s cannot be folded into
  the op before (weight then holds diag(s) W).
- `signs` (K,) int8 +-1 or None with `block`: a randomized Hadamard rotation
  R = diag(signs) H_block applied online to x (weight then holds R^T W), the
  fallback where a rotation cannot be folded into the previous layer.
- `act` None | "int8" | "fp8_e4m3" | "fp8_e5m2": dynamic per-token activation
  quantization (W8A8 when weight is int8), done by the runtime's dispatch.
- `weight`: a dense array or any compressed leaf (QArray, sparse, ...) of
  `shape`, contracted over `contract` (`core.contraction`; default from the
  shape, (0,) for a 2-D (K, N) kernel). K is the contraction flattened in
  the declared order: scale and signs act on x's contracted axes flattened
  the same way (a DenseGeneral out-projection (heads, head_dim, d) takes
  x (..., heads, head_dim) and scales its heads * head_dim channels).

materialize() is the effective weight, diag(scale) R weight on the (K, N)
view, so that x @ materialize() equals the layer without activation quantization: the
activation quantizer is a run-time op and only exists on the matmul path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core import hadamard
from compressjax.core.base import (CompressedLeaf, compressed_leaf, describe,
                                   is_concrete, materialize)
from compressjax.core.contraction import (MatrixLayout, default_contract,
                                          matrix_dims, matrix_operand)

ACT_FORMATS = (None, "int8", "fp8_e4m3", "fp8_e5m2")


@compressed_leaf
class InputTransform(CompressedLeaf):
  data_fields = ("weight", "scale", "signs")
  meta_fields = ("block", "act", "shape", "dtype", "contract")

  weight: Any
  scale: Any
  signs: Any
  block: int
  act: str | None
  shape: tuple[int, ...]
  dtype: str
  contract: tuple[int, ...] | None = None  # None: default_contract(shape)

  def __post_init__(self):
    c = (default_contract(self.shape) if self.contract is None
         else tuple(int(a) for a in self.contract))
    object.__setattr__(self, "contract", c)

  @property
  def layout(self) -> MatrixLayout:
    return MatrixLayout(tuple(self.shape), tuple(self.contract))

  @property
  def sparsity(self) -> float:
    return getattr(self.weight, "sparsity", 0.0)

  def describe(self) -> str:
    parts = (["x*s"] if self.scale is not None else []) + (
        [f"hadamard{self.block}"] if self.signs is not None else []) + (
            [f"a:{self.act}"] if self.act else [])
    return f"{describe(self.weight)} [{', '.join(parts)}]"

  def _targets(self, op):
    return {"weight": True}  # the (transformed) weight is compressed

  def transform_input(self, x):
    """The float part of the input transform (scale, then rotation) of x
    (..., K): the contracted channels flattened last."""
    xf = x.astype(jnp.float32)
    if self.scale is not None:
      xf = xf * self.scale.astype(jnp.float32)
    if self.signs is not None:
      xf = hadamard.rotate(xf, self.signs, self.block, axis=-1)
    return xf

  def operand(self, x, dims):
    """(x', dims') for an op x . leaf with dimension numbers `dims` that
    contracts exactly this leaf's axes (no batch dims): x' is x with its
    contracted channels transformed (`transform_input`), dims' multiply x'
    by the weight with the op's output layout. None for any other op."""
    op = matrix_operand(x, self.contract, dims)
    if op is None:
      return None
    xm, lead = op
    return (self.transform_input(xm).reshape(lead + self.layout.in_shape),
            matrix_dims(len(lead), self.contract))

  def materialize(self) -> jax.Array:
    w = materialize(self.weight).astype(jnp.float32)
    if self.signs is None and self.scale is None:
      return w.astype(self.dtype)
    lay = self.layout
    w = lay.to_matrix(w)
    if self.signs is not None:  # R W = diag(signs) H W (H symmetric)
      w = hadamard.fwht(w, axis=0, block=self.block) * self.signs.astype(
          jnp.float32)[:, None]
    if self.scale is not None:
      w = w * self.scale.astype(jnp.float32)[:, None]
    return lay.from_matrix(w).astype(self.dtype)

  def validate(self) -> None:
    if len(self.shape) < 2:
      self._fail(f"needs a kernel of rank >= 2, got shape {self.shape}")
    c = tuple(self.contract)
    if not c or len(set(c)) != len(c) or any(
        not 0 <= a < len(self.shape) for a in c):
      self._fail(f"contraction axes {c} are not distinct axes of shape "
                 f"{tuple(self.shape)}")
    k = self.layout.k
    self._expect("weight", self.weight, tuple(self.shape))
    if self.scale is not None:
      self._expect("scale", self.scale, (k,), kind="f")
    if self.signs is not None:
      self._expect("signs", self.signs, (k,), kind="i")
      if not hadamard.is_power_of_two(self.block) or k % self.block:
        self._fail(f"rotation block {self.block} must be a power of two "
                   f"dividing the {k} contracted inputs")
      if is_concrete(self.signs) and not bool(jnp.all(
          jnp.abs(self.signs) == 1)):
        self._fail("signs must all be +1 or -1")
    if self.act not in ACT_FORMATS:
      self._fail(f"act {self.act!r} is not one of {ACT_FORMATS}")
    super().validate()
