"""PactInput: a deployed PACT-trained kernel (Choi et al. 2018, "PACT:
Parameterized Clipping Activation", eq. 1-2).

    y = pact(x, alpha) @ weight,  pact(x) = round(clip(x, lo, alpha) / d) * d

with lo = 0 and d = alpha / (2^bits - 1), or, `signed`, lo = -alpha and
d = alpha / (2^(bits-1) - 1). `weight` is any compressed leaf (the QArray that
QAT's export produces) and `alpha` the learned scalar clip. Like
InputTransform, materialize() is the weight: the input quantizer exists only
on the matmul path (`compressjax.runtime.dispatch`). It lives in core, with
every deployable leaf, so a checkpoint of it restores in any process.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.base import (CompressedLeaf, compressed_leaf, describe,
                                   materialize)


def pact_levels(bits: int, signed: bool) -> int:
  """Positive levels of the PACT grid: alpha / levels is its step."""
  return 2**(bits - 1) - 1 if signed else 2**bits - 1


def pact_forward(x, alpha, bits: int, signed: bool):
  """The PACT quantizer's value (no gradient rule; QAT adds its STE)."""
  lo = -alpha if signed else jnp.zeros_like(alpha)
  d = alpha / pact_levels(bits, signed)
  return jnp.round(jnp.clip(x, lo, alpha) / d) * d


@compressed_leaf
class PactInput(CompressedLeaf):
  """Weight whose matmul input is PACT-quantized (module doc)."""

  data_fields = ("weight", "alpha")
  meta_fields = ("bits", "signed", "shape", "dtype")

  weight: Any
  alpha: Any
  bits: int
  signed: bool
  shape: tuple[int, ...]
  dtype: str

  @property
  def sparsity(self) -> float:
    return getattr(self.weight, "sparsity", 0.0)

  def describe(self) -> str:
    return f"{describe(self.weight)} [pact{self.bits}]"

  def _targets(self, op):
    return {"weight": True}

  def quantize_input(self, x):
    xf = x.astype(jnp.float32)
    return pact_forward(xf, self.alpha.astype(jnp.float32), self.bits,
                        self.signed)

  def materialize(self) -> jax.Array:
    return materialize(self.weight).astype(self.dtype)

  def validate(self) -> None:
    if len(self.shape) != 2:
      self._fail(f"needs a 2-D (in, out) weight, got shape {self.shape}")
    self._expect("weight", self.weight, tuple(self.shape))
    self._expect("alpha", self.alpha, (), kind="f")
    if not 2 <= self.bits <= 8:
      self._fail(f"bits must be in [2, 8], got {self.bits}")
    super().validate()
