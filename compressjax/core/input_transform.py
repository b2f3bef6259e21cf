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
- `weight` (K, N): a dense array or any compressed leaf (QArray, sparse, ...).

materialize() is the effective weight, diag(scale) R weight, so that
x @ materialize() equals the layer without activation quantization: the
activation quantizer is a run-time op and only exists on the matmul path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core import hadamard
from compressjax.core.base import (CompressedLeaf, compressed_leaf, describe,
                                   is_concrete, materialize)

ACT_FORMATS = (None, "int8", "fp8_e4m3", "fp8_e5m2")


@compressed_leaf
class InputTransform(CompressedLeaf):
  data_fields = ("weight", "scale", "signs")
  meta_fields = ("block", "act", "shape", "dtype")

  weight: Any
  scale: Any
  signs: Any
  block: int
  act: str | None
  shape: tuple[int, ...]
  dtype: str

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
    """The float part of the input transform (scale, then rotation)."""
    xf = x.astype(jnp.float32)
    if self.scale is not None:
      xf = xf * self.scale.astype(jnp.float32)
    if self.signs is not None:
      xf = hadamard.rotate(xf, self.signs, self.block, axis=-1)
    return xf

  def materialize(self) -> jax.Array:
    w = materialize(self.weight).astype(jnp.float32)
    if self.signs is not None:  # R W = diag(signs) H W (H symmetric)
      w = hadamard.fwht(w, axis=0, block=self.block) * self.signs.astype(
          jnp.float32)[:, None]
    if self.scale is not None:
      w = w * self.scale.astype(jnp.float32)[:, None]
    return w.astype(self.dtype)

  def validate(self) -> None:
    if len(self.shape) != 2:
      self._fail(f"needs a 2-D (in, out) weight, got shape {self.shape}")
    k = self.shape[0]
    self._expect("weight", self.weight, tuple(self.shape))
    if self.scale is not None:
      self._expect("scale", self.scale, (k,), kind="f")
    if self.signs is not None:
      self._expect("signs", self.signs, (k,), kind="i")
      if not hadamard.is_power_of_two(self.block) or k % self.block:
        self._fail(f"rotation block {self.block} must be a power of two "
                   f"dividing in_features {k}")
      if is_concrete(self.signs) and not bool(jnp.all(
          jnp.abs(self.signs) == 1)):
        self._fail("signs must all be +1 or -1")
    if self.act not in ACT_FORMATS:
      self._fail(f"act {self.act!r} is not one of {ACT_FORMATS}")
    super().validate()
