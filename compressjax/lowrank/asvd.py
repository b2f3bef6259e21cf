"""ASVD: activation-aware SVD (Yuan et al. 2023, "ASVD: Activation-aware
Singular Value Decomposition for Compressing Large Language Models", arXiv
2312.05821, Sec. 3: the magnitude-based scaling matrix S).

Input channels with large activations matter more to the layer's output, so
ASVD scales them before truncating. In Flax layout (W is K_in x N_out, used
as x @ W) with calibration activations X (tokens x K_in):
  S = diag(s),  s_j = (mean_t |x_tj|)^alpha     (alpha = 0.5 by default)
  S W = U Sigma V^T,  truncated to rank r
  W_hat = S^-1 U_r Sigma_r V_r^T                (the paper's
                                                 W ~ U' Sigma' (V'^T S^-1) in
                                                 its (out, in) layout)
stored as A = S^-1 U_r Sigma_r^(1/2) (K x r), B = Sigma_r^(1/2) V_r^T (r x N),
so x @ W_hat = (x @ A) @ B. Since S W_hat = trunc_r(S W), ||S (W - W_hat)||_F
is the tail sqrt(sum_{i>r} sigma_i(S W)^2), the smallest of any rank r: the
best fit of W for inputs whose channel j has size s_j. Every row of W_hat is
W's row projected onto span(V_r). Rank: `rank`, `rank_ratio`
(r = floor(ratio * m * n / (m + n)): the factors hold at most `ratio` of W's
parameters, the paper's parameter ratio; same as svd.py) or `energy`
(smallest r keeping that fraction of sum sigma_i(S W)^2). With all channel
scales equal ASVD is plain truncated SVD.

A channel that never fires (mean |x_j| = 0) would need S^-1 = inf; its mean
is clamped to EPS * max_j mean|x_j| first (relative, not the reference code's
absolute +1e-6, so ASVD stays invariant to rescaling X; all-zero statistics
give S = I). Such a channel weighs ~EPS^alpha as much as the largest one; its
row of W_hat stays the (bounded) projection above. Not included: the paper's
sensitivity-based per-layer rank search (STRS); give per-layer ranks via
rules instead.

Multi-axis kernels (DenseGeneral / Einsum, e.g. an in-projection
(d, heads, head_dim) contracting (0,) or an out-projection (heads, head_dim,
d) contracting (0, 1)): the statistics' contraction (`LayerStats.view`, the
mechanism GPTQ and Wanda use) gives the (K, N) matrix this factorizes, and
the LowRank leaf keeps that contraction, so `runtime` runs x @ A @ B.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core import transform as transform_lib
from compressjax.core.errors import CompressionError
from compressjax.core.base import CompressedLeaf, Stage, inner_arrays
from compressjax.core.lowrank import LowRank, lowrank_layout
from compressjax.core import rules as rules_lib
from compressjax.core.rules import option
from compressjax.lowrank.svd import (LowRankOptions, check_lowrank_config,
                                     choose_rank, matrix_shape)

EPS = 1e-6  # floor on mean|x_j|, relative to the largest channel's mean


def activation_scale(mean_abs, alpha: float = 0.5) -> jax.Array:
  """s_j = max(mean|x_j|, EPS * max_k mean|x_k|)^alpha (all ones if X = 0)."""
  m = jnp.abs(jnp.asarray(mean_abs, jnp.float32))
  top = jnp.max(m)
  m = jnp.where(top > 0, jnp.maximum(m, EPS * top), 1.0)
  return m ** alpha


def _check_alpha(path: str, alpha) -> None:
  if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)
          and alpha >= 0):
    raise CompressionError(f"alpha must be a finite number >= 0, got {alpha}",
                           path)


def check_features(path: str, shape, vec_shape, what: str,
                   contract=None) -> None:
  m, n = matrix_shape(shape, contract)
  if tuple(vec_shape) != (m,):
    raise CompressionError(
        f"{what} has shape {tuple(vec_shape)} but the kernel {tuple(shape)} "
        f"has {m} input features (rows of its {m}x{n} matrix view over axes "
        f"{lowrank_layout(shape, contract).contract}); calibrate this "
        "param's own matmul, or skip it with a rule", path)


def asvd_factorize(w, mean_abs, *, alpha: float = 0.5, rank=None,
                   rank_ratio=None, energy=None, residual: bool = False,
                   contract=None, path: str = "<array>") -> LowRank:
  """ASVD of a Flax kernel w (K_in, N_out) given mean |x_j| over K_in; or
  of any kernel's (K, N) view over its `contract`ed axes (statistics'
  `LayerStats.contract`; None: every axis but the last)."""
  w = jnp.asarray(w)
  AsvdOptions(alpha=alpha, rank=rank, rank_ratio=rank_ratio, energy=energy,
              residual=residual)  # types and ranges
  cfg = dict(rank=rank, rank_ratio=rank_ratio, energy=energy)
  check_lowrank_config(path, w.shape, cfg, contract)
  _check_alpha(path, alpha)
  mean_abs = jnp.asarray(mean_abs)
  check_features(path, w.shape, mean_abs.shape, "mean_abs", contract)
  if not bool(jnp.all(jnp.isfinite(mean_abs))):
    raise CompressionError("activation statistics contain NaN or Inf; "
                           "recapture them", path)
  lay = lowrank_layout(w.shape, contract)
  m, n = lay.k, lay.n
  x = lay.to_matrix(w.astype(jnp.float32))
  s = activation_scale(mean_abs, alpha)
  u, sv, vt = jnp.linalg.svd(s[:, None] * x, full_matrices=False)
  r = choose_rank(sv, m, n, cfg, path)  # host copy only for energy
  root = jnp.sqrt(sv[:r])
  a = ((u[:, :r] * root) / s[:, None]).astype(w.dtype)  # undo S on inputs
  b = (root[:, None] * vt[:r]).astype(w.dtype)
  return lowrank_leaf(w, x, a, b, residual, lay.contract)


def lowrank_leaf(w, x, a, b, residual: bool, contract=None) -> LowRank:
  """LowRank leaf of w whose (K, N) view over `contract` is x; the residual
  is exact against the stored (cast) factors."""
  lr = LowRank(a=a, b=b, residual=None, shape=tuple(w.shape),
               dtype=jnp.dtype(w.dtype).name, contract=contract)
  if residual:
    rest = lr.layout.from_matrix(x - lr.product()).astype(w.dtype)
    lr = dataclasses.replace(lr, residual=rest)
  return lr


def layer_stats(stats: Mapping[str, Any], path: str):
  if stats is None or path not in stats:
    raise CompressionError("no calibration statistics for this param; "
                           "capture with the same rules (or skip it)", path)
  return stats[path]


def reject_compressed(path: str, leaf) -> None:
  """Calibrated factorizations take float kernels: the leaf type says why
  factorizing cannot follow it, wrappers are refused here."""
  if isinstance(leaf, CompressedLeaf):
    list(inner_arrays(leaf, Stage.FACTORIZE, path))
    raise CompressionError(f"cannot factorize a {type(leaf).__name__}: "
                           "calibrated factorization needs the float kernel; "
                           "apply it first", path)


@rules_lib.options
class AsvdOptions(LowRankOptions):
  """ASVD (see module doc); give exactly one of rank, rank_ratio, energy."""

  transform: ClassVar[str] = "asvd"
  alpha: float = option(0.5, "s_j = mean|x_j| ** alpha",
                        **rules_lib.interval(0))


@transform_lib.builder(AsvdOptions)
def asvd(stats: Mapping[str, Any], *, options, rules,
         default) -> transform_lib.Transform:
  """ASVD transform (see module doc) given `compressjax.calibrate.capture`
  stats ({path: LayerStats}, using `mean_abs`); give one of rank,
  rank_ratio, energy. With residual=True, chain a quantize to get low-rank
  plus a quantized residual."""

  def leaf(path, w, cfg, state):
    reject_compressed(path, w)
    st = layer_stats(stats, path)
    return asvd_factorize(w, st.mean_abs, path=path, contract=st.contract,
                          **cfg)

  def check(path, w, cfg):
    st = layer_stats(stats, path)
    check_lowrank_config(path, w.shape, cfg, st.contract)
    _check_alpha(path, cfg.get("alpha"))
    check_features(path, w.shape, np.shape(st.abs_sum), "mean_abs",
                   st.contract)

  return transform_lib.leaf_transform("asvd", options, leaf, check, rules,
                                      default)
