"""SVD-LLM: truncation-aware data whitening (Wang et al. 2024, "SVD-LLM:
Truncation-aware Singular Value Decomposition for Large Language Model
Compression", arXiv 2403.07378: truncation-aware data whitening).

In Flax layout (W is K_in x N_out, used as x @ W) with calibration inputs X
(tokens x K_in) and their Gram matrix X^T X = L L^T (L lower Cholesky):
  ||X (W - W_hat)||_F^2 = tr((W - W_hat)^T L L^T (W - W_hat))
                        = ||L^T W - L^T W_hat||_F^2.
So with M = L^T W = U Sigma V^T (the whitened weight) and
  W_hat = L^-T trunc_r(M) = L^-T U_r Sigma_r V_r^T,
Theorem (the paper's truncation-aware whitening result, here in Flax layout):
the data-aware loss is exactly the truncated singular values of the whitened
weight, ||X (W - W_hat)||_F^2 = sum_{i>r} sigma_i(M)^2, and by Eckart–Young
no rank-r W_hat does better. Stored as A = L^-T U_r Sigma_r^(1/2) (K x r),
B = Sigma_r^(1/2) V_r^T (r x N). `energy` therefore keeps that fraction of
||X W||_F^2 = sum sigma_i^2 (the output energy on the calibration data);
`rank_ratio` is svd.py's parameter ratio, r = floor(ratio * m * n / (m + n)).

Numerics (float32, Precision.HIGHEST matmuls, on device):
  * Jacobi equilibration: G = D G_hat D with D = sqrt(diag G), so G_hat has a
    unit diagonal and L = D chol(G_hat). LLM activations have per-channel
    outliers (diag G spanning many orders of magnitude). Cholesky itself
    hardly cares (it is nearly invariant to diagonal scaling), but a jitter
    lambda * mean(diag G) * I would swamp the low-energy channels; on G_hat
    the jitter below is relative to each channel's own energy. A dead channel
    (G_jj = 0) gets D_jj = the root mean of the live G_jj, so it is
    regularized like an average channel.
  * Jitter: Cholesky of G_hat + lambda I for lambda in JITTER = (0, 1e-6,
    1e-5, ..., 1e-1), taking the first without NaN (jnp.linalg.cholesky
    returns NaN when the matrix is not positive definite, e.g. rank-deficient
    X^T X from few tokens or dead channels). With jitter the theorem holds
    for the regularized Gram X^T X + lambda D^2: the loss minimized is
    ||X dW||^2 + lambda ||D dW||^2, a ridge that keeps W_hat bounded on
    directions the data never excites.
  * Why not float64: Cholesky and triangular solves are backward stable, so
    float32 gives the exact answer for a Gram within ~K * eps (relative) of
    the true one; measured against a float64 reference the data-aware loss
    agrees to ~1e-7 relative even with diag G spanning 1e12 (K = 256).
    float64 would need jax_enable_x64 or a host round trip of every layer.
Multi-axis kernels factor their (K, N) view over the statistics'
contraction, as in ASVD (`asvd.py`). Not included: the paper's post-truncation parameter update (sequential
low-rank LoRA fine-tuning), which needs training.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from compressjax.core import transform as transform_lib
from compressjax.core.errors import CompressionError
from compressjax.core import rules as rules_lib
from compressjax.core.lowrank import lowrank_layout
from compressjax.lowrank.asvd import (check_features, lowrank_leaf, layer_stats,
                                      reject_compressed)
from compressjax.lowrank.svd import (LowRankOptions, check_lowrank_config,
                                     choose_rank)

JITTER = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # relative to unit diag
_HP = jax.lax.Precision.HIGHEST


@jax.jit
def _equilibrate(gram):
  g = gram.astype(jnp.float32)
  g = 0.5 * (g + g.T)  # exact symmetry for Cholesky
  dg = jnp.diag(g)
  live = dg > 0
  fill = jnp.sum(jnp.where(live, dg, 0.)) / jnp.maximum(jnp.sum(live), 1)
  d = jnp.sqrt(jnp.where(live, dg, fill))
  return d, g / d[:, None] / d[None, :]


@jax.jit
def _cholesky(gh, lam):
  return jnp.linalg.cholesky(gh + lam * jnp.eye(gh.shape[0], dtype=gh.dtype))


def whitening(gram, path: str = "<array>"
              ) -> tuple[jax.Array, jax.Array, float]:
  """(d, L_hat, lambda) with X^T X + lambda diag(d)^2 = (D L_hat)(D L_hat)^T,
  L_hat lower triangular; the first lambda of JITTER that works."""
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise CompressionError(f"gram must be square, got shape {gram.shape}",
                           path)
  if not bool(jnp.all(jnp.isfinite(gram))):
    raise CompressionError("calibration gram X^T X contains NaN or Inf; "
                           "recapture the statistics", path)
  dg = jnp.diag(gram)
  if bool(jnp.any(dg < 0)) or not bool(jnp.any(dg > 0)):
    raise CompressionError("calibration gram X^T X is all zero or has a "
                           "negative diagonal; capture on nonzero inputs",
                           path)
  d, gh = _equilibrate(gram)
  for lam in JITTER:
    l = _cholesky(gh, jnp.float32(lam))
    if not bool(jnp.any(jnp.isnan(l))):
      return d, l, lam
  raise CompressionError(f"X^T X is not positive definite even with jitter "
                         f"{JITTER[-1]} * diag; check the statistics", path)


def svd_llm_factorize(w, gram, *, rank=None, rank_ratio=None, energy=None,
                      residual: bool = False, contract=None,
                      path: str = "<array>"):
  """SVD-LLM of a Flax kernel w (K_in, N_out) given gram = X^T X (K_in^2);
  or of any kernel's (K, N) view over its `contract`ed axes (statistics'
  `LayerStats.contract`; None: every axis but the last)."""
  w = jnp.asarray(w)
  SvdLlmOptions(rank=rank, rank_ratio=rank_ratio, energy=energy,
                residual=residual)  # types and ranges
  cfg = dict(rank=rank, rank_ratio=rank_ratio, energy=energy)
  check_lowrank_config(path, w.shape, cfg, contract)
  gram = jnp.asarray(gram)
  check_features(path, w.shape, gram.shape[:1], "gram", contract)
  lay = lowrank_layout(w.shape, contract)
  m, n = lay.k, lay.n
  x = lay.to_matrix(w.astype(jnp.float32))
  d, lh, _ = whitening(gram, path)
  # L^T W = L_hat^T (D W): the whitened weight, whose tail is the loss
  mw = jnp.matmul(lh.T, d[:, None] * x, precision=_HP)
  u, sv, vt = jnp.linalg.svd(mw, full_matrices=False)
  r = choose_rank(sv, m, n, cfg, path)  # host copy only for energy
  root = jnp.sqrt(sv[:r])
  # undo the whitening: A = L^-T U_r Sigma_r^(1/2) = D^-1 L_hat^-T (...)
  a = jsl.solve_triangular(lh, u[:, :r] * root, lower=True, trans="T")
  a = (a / d[:, None]).astype(w.dtype)
  b = (root[:, None] * vt[:r]).astype(w.dtype)
  return lowrank_leaf(w, x, a, b, residual, lay.contract)


@rules_lib.options
class SvdLlmOptions(LowRankOptions):
  """SVD-LLM (see module doc); give exactly one of rank, rank_ratio,
  energy."""

  transform: ClassVar[str] = "svd_llm"


@transform_lib.builder(SvdLlmOptions)
def svd_llm(stats: Mapping[str, Any], *, options, rules,
            default) -> transform_lib.Transform:
  """SVD-LLM transform (see module doc) given `compressjax.calibrate.capture`
  stats ({path: LayerStats}, using `gram`); give one of rank, rank_ratio,
  energy. `chain(svd_llm(stats, ..., residual=True), quantize(4, ...))`
  gives low-rank plus a quantized residual (quantize quantizes a LowRank's
  residual when it has one, else its factors)."""

  def leaf(path, w, cfg, state):
    reject_compressed(path, w)
    st = layer_stats(stats, path)
    return svd_llm_factorize(w, st.gram, path=path, contract=st.contract,
                             **cfg)

  def check(path, w, cfg):
    st = layer_stats(stats, path)
    check_lowrank_config(path, w.shape, cfg, st.contract)
    check_features(path, w.shape, np.shape(st.gram)[:1], "gram",
                   st.contract)

  return transform_lib.leaf_transform("svd_llm", options, leaf, check, rules,
                                      default)
