"""Codebook quantization fitted by Lloyd's algorithm (1-D k-means).

For each group (per tensor, or groups of `group_size` consecutive slices along
the input axis) the 2^bits centroids minimize sum_i (w_i - c(w_i))^2 (Lloyd
1982, Least squares quantization in PCM): start from evenly spaced quantiles,
then alternate nearest-centroid assignment and centroid = mean of its members
(an empty cell keeps its centroid), ending on a centroid update so the stored
centroids are the exact means of their members. No step increases the error.
Result: a `CodebookArray` (indices packed at `bits`, codebook in `codebook_dtype`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.codebook import CodebookArray
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


def quantize_codebook(w, bits: int = 3, *, group_size: int | None = None,
                      axis: int = 0, iters: int = 30,
                      codebook_dtype: Any = jnp.float32) -> CodebookArray:
  w = jnp.asarray(w)
  x = jnp.moveaxis(w.astype(jnp.float32), axis, 0)
  n = x.shape[0]
  g = 1 if group_size is None else n // group_size
  flat = x.reshape(g, -1)
  cb, idx = jax.vmap(lambda v: lloyd(v, 2**bits, iters))(flat)
  cb = cb.astype(codebook_dtype)
  idx = jnp.moveaxis(idx.reshape(x.shape), 0, axis).astype(jnp.uint8)
  return CodebookArray(indices=layout.pack(idx, bits, axis), codebook=cb,
                       shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name,
                       bits=bits, axis=axis)
