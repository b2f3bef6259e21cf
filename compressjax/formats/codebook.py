"""Codebook quantization fitted by Lloyd's algorithm (1-D k-means).

For each group (per tensor, or groups of `group_size` consecutive rows of the
(K, N) matrix over the contraction axes) the 2^bits centroids minimize
sum_i (w_i - c(w_i))^2 (Lloyd 1982, Least squares quantization in PCM): start
from evenly spaced quantiles, then alternate nearest-centroid assignment and
centroid = mean of its members (an empty cell keeps its centroid), ending on a
centroid update so the stored centroids are the exact means of their members.
No step increases the error. Result: a `CodebookArray` (indices packed at
`bits`, codebook in `codebook_dtype`). `CodebookFormat` is the scheme object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.codebook import CodebookArray
from compressjax.core.contraction import MatrixLayout, normalize_contract
from compressjax.core.errors import CompressionError
from compressjax.core.format import Capabilities, Format, register_format
from pallas_kernels import layout


def _assign(x, c):
  cs = jnp.sort(c)
  order = jnp.argsort(c)
  return order[jnp.searchsorted((cs[1:] + cs[:-1]) / 2, x)]


def lloyd(x, k: int, iters: int = 30):
  """1-D k-means of a flat float32 vector; returns (centroids, assignment)."""
  c = jnp.quantile(x, (jnp.arange(k) + 0.5) / k)

  def means(c, a):
    sums = jax.ops.segment_sum(x, a, k)
    cnt = jax.ops.segment_sum(jnp.ones_like(x), a, k)
    return jnp.where(cnt > 0, sums / jnp.maximum(cnt, 1), c)

  c, _ = jax.lax.scan(lambda c, _: (means(c, _assign(x, c)), None), c, None,
                      length=iters)
  # End on an update: the stored centroids are optimal for the stored indices.
  a = _assign(x, c)
  return means(c, a), a


@register_format
@dataclasses.dataclass(frozen=True)
class CodebookFormat(Format):
  """Lloyd-fitted codebook of 2^bits entries per group (a CodebookArray)."""

  kind = "codebook"
  bits: int = 3
  capabilities = Capabilities(groups=True)

  def __post_init__(self):
    if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
      raise CompressionError(f"codebook bits must be in [1, 8], got "
                             f"{self.bits}")

  @property
  def name(self) -> str:
    return f"codebook{self.bits}"

  @property
  def storage_dtype(self):
    return jnp.uint8

  def quantize(self, w, *, contract, group_size=None, per_tensor=False,
               scale_dtype=None, key=None) -> CodebookArray:
    return quantize_codebook(w, self.bits, group_size=group_size,
                             axis=contract)


def quantize_codebook(w, bits: int = 3, *, group_size: int | None = None,
                      axis=None, iters: int = 30,
                      codebook_dtype: Any = jnp.float32) -> CodebookArray:
  """Codebooks per group of `group_size` rows along the contraction `axis`
  (an int or tuple; default `core.contraction.default_contract`)."""
  w = jnp.asarray(w)
  lay = MatrixLayout(tuple(w.shape), normalize_contract(axis, w.shape))
  x = lay.to_matrix(w.astype(jnp.float32))
  g = 1 if group_size is None else lay.k // group_size
  cb, idx = jax.vmap(lambda v: lloyd(v, 2**bits, iters))(x.reshape(g, -1))
  idx = idx.reshape(lay.k, lay.n).astype(jnp.uint8)
  return CodebookArray(indices=layout.pack(idx, bits, 0),
                       codebook=cb.astype(codebook_dtype),
                       shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name,
                       bits=bits, contract=lay.contract)
