"""Truncated SVD low-rank factorization.

W (viewed as m x n) = U S V^T; keeping the r largest singular values gives
A = U_r S_r^(1/2) (m x r), B = S_r^(1/2) V_r^T (r x n). By Eckart–Young the
error ||W - AB||_F = sqrt(sum_{i>r} s_i^2) is the smallest of any rank-r
matrix. Rank is fixed, a parameter ratio (r = floor(ratio * m * n / (m + n)),
the ASVD convention), or the smallest r keeping an `energy` fraction of
sum s_i^2. With `residual=True` the exact remainder W - AB is kept as a leaf
(to be compressed further, e.g. chain(low_rank(...), quantize(...)) gives
low-rank plus a quantized residual).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.core.base import Stage, compress_inside, inner_arrays
from compressjax.core.lowrank import LowRank, lowrank_layout
from compressjax.core import rules as rules_lib
from compressjax.core.rules import option
from compressjax.core import transform as transform_lib


def matrix_shape(shape, contract=None) -> tuple[int, int]:
  """(K, N) of the matrix a LowRank of `shape` factors (`lowrank_layout`:
  over `contract`, by default every axis but the last)."""
  lay = lowrank_layout(shape, contract)
  return lay.k, lay.n


def choose_rank(s: np.ndarray, m: int, n: int, cfg: Mapping[str, Any],
                path: str) -> int:
  if cfg.get("rank") is not None:
    return int(cfg["rank"])
  if cfg.get("rank_ratio") is not None:
    return max(1, int(cfg["rank_ratio"] * m * n / (m + n)))
  e = np.cumsum(np.asarray(s, np.float64) ** 2)
  return int(np.searchsorted(e, cfg["energy"] * e[-1] * (1 - 1e-12)) + 1)


def check_lowrank_config(path: str, shape, cfg: Mapping[str, Any],
                         contract=None) -> None:
  if len(shape) < 2:
    raise CompressionError("low-rank needs an array of rank >= 2", path)
  if contract is not None and (
      not contract or len(set(contract)) != len(contract)
      or len(contract) >= len(shape)
      or any(not 0 <= a < len(shape) for a in contract)):
    raise CompressionError(
        f"contraction axes {tuple(contract)} must be distinct axes of shape "
        f"{tuple(shape)} leaving an output axis; calibrate this param's own "
        "matmul", path)
  m, n = matrix_shape(shape, contract)
  given = [k for k in ("rank", "rank_ratio", "energy") if cfg.get(k) is not None]
  if len(given) != 1:
    raise CompressionError("give exactly one of rank, rank_ratio, energy "
                           f"(got {given or 'none'})", path)
  r = cfg.get("rank")
  if r is not None and not 1 <= r <= min(m, n):
    raise CompressionError(
        f"rank {r} is outside [1, min(m, n) = {min(m, n)}] for a {m}x{n} "
        "matrix; lower the rank or use rank_ratio", path)
  ratio = cfg.get("rank_ratio")
  if ratio is not None and not 0 < ratio <= 1:
    raise CompressionError(f"rank_ratio must be in (0, 1], got {ratio}", path)
  if ratio is not None and int(ratio * m * n / (m + n)) > min(m, n):
    raise CompressionError(
        f"rank_ratio {ratio} gives rank {int(ratio * m * n / (m + n))} > "
        f"min(m, n) = {min(m, n)}; lower it", path)
  en = cfg.get("energy")
  if en is not None and not 0 < en <= 1:
    raise CompressionError(f"energy must be in (0, 1], got {en}", path)


def factorize(w, *, rank=None, rank_ratio=None, energy=None,
              residual: bool = False, path: str = "<array>") -> LowRank:
  w = jnp.asarray(w)
  LowRankOptions(rank=rank, rank_ratio=rank_ratio, energy=energy,
                 residual=residual)  # types and ranges
  cfg = dict(rank=rank, rank_ratio=rank_ratio, energy=energy)
  check_lowrank_config(path, w.shape, cfg)
  m, n = matrix_shape(w.shape)
  x = w.astype(jnp.float32).reshape(m, n)
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  r = choose_rank(s, m, n, cfg, path)  # host copy only for energy
  root = jnp.sqrt(s[:r])
  a = (u[:, :r] * root).astype(w.dtype)
  b = (root[:, None] * vt[:r]).astype(w.dtype)
  lr = LowRank(a=a, b=b, residual=None, shape=tuple(w.shape),
               dtype=jnp.dtype(w.dtype).name)
  if residual:
    rest = (x.reshape(w.shape) - lr.product().reshape(w.shape)).astype(w.dtype)
    lr = LowRank(a=a, b=b, residual=rest, shape=lr.shape, dtype=lr.dtype)
  return lr


def _lowrank_leaf(path, leaf, cfg, state=None):
  # what factorizing may follow is the leaf type's to say (Stage order)
  return compress_inside(leaf, Stage.FACTORIZE,
                         lambda p, x, _: factorize(x, path=p, **cfg), path)


def _check(path, leaf, cfg):
  for p, x, _ in inner_arrays(leaf, Stage.FACTORIZE, path):
    check_lowrank_config(p, x.shape, cfg)


@rules_lib.options
class LowRankOptions(rules_lib.Options):
  """Truncated-SVD factorization; give exactly one of rank, rank_ratio,
  energy."""

  transform: ClassVar[str] = "low_rank"
  rank: int | None = option(None, "kept singular values",
                            check=lambda r: r >= 1, must="be >= 1")
  rank_ratio: float | None = option(
      None, "parameter ratio: r = floor(ratio * m * n / (m + n))",
      **rules_lib.interval(0, 1, lo_open=True))
  energy: float | None = option(
      None, "smallest r keeping this fraction of sum s_i^2",
      **rules_lib.interval(0, 1, lo_open=True))
  residual: bool = option(False, "keep W - AB as a leaf to compress further")


@transform_lib.builder(LowRankOptions, positional=("rank",))
def low_rank(*, options, rules, default) -> transform_lib.Transform:
  """Truncated-SVD transform (see module doc); give one of rank, rank_ratio,
  energy."""
  return transform_lib.leaf_transform("low_rank", options, _lowrank_leaf,
                                      _check, rules, default)
