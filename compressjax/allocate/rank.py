"""Rank allocation for low-rank factorization under a parameter budget.

By singular-value energy: one energy fraction e for every layer; layer l
keeps the smallest rank r_l(e) whose singular values hold e of its energy
sum_i sigma_i^2 (the `energy=` rule of `lowrank.svd`), and e is the largest
value whose ranks fit the budget of sum_l r_l (m_l + n_l) factor parameters.
With calibration statistics the singular values are those of the whitened
weight L^T W (SVD-LLM, `lowrank.svd_llm.whitening`), whose energy is the
layer's output energy ||X W||^2 on the calibration data. This is the usual
energy-threshold rule (e.g. the energy criterion of ASVD / SVD-LLM
baselines); by sensitivity, rank candidates go through the solver instead
(`candidates.rank_grid` + `solve.solve`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.allocate.candidates import exact_rules, selected_layers
from compressjax.core.errors import CompressionError
from compressjax.core.rules import Predicate, Rule, RuleLike, default_filter
from compressjax.lowrank.svd import matrix_shape
from compressjax.lowrank.svd_llm import whitening

_HI = jax.lax.Precision.HIGHEST


def singular_values(params: Any, stats: Mapping[str, Any] | None = None,
                    rules: Sequence[RuleLike] | None = None,
                    default: Predicate | None = default_filter
                    ) -> dict[str, np.ndarray]:
  """Singular values of each selected layer (whitened when stats given)."""
  out = {}
  for p, w in selected_layers(params, rules, default):
    if len(w.shape) < 2:
      raise CompressionError("low rank needs an array of rank >= 2", p)
    m, n = matrix_shape(w.shape)
    x = jnp.asarray(w, jnp.float32).reshape(m, n)
    if stats is not None:
      if p not in stats:
        raise CompressionError("no calibration statistics for this layer; "
                               "capture with the same rules", p)
      if stats[p].gram.shape != (m, m):
        raise CompressionError(f"Gram {tuple(stats[p].gram.shape)} does not "
                               f"match the {m}x{n} matrix view", p)
      d, lh, _ = whitening(stats[p].gram, p)
      x = jnp.matmul(lh.T, d[:, None] * x, precision=_HI)
    out[p] = np.asarray(jnp.linalg.svd(x, compute_uv=False), np.float64)
  if not out:
    raise CompressionError("no layer selected for rank allocation")
  return out


def energy_ranks(params: Any, *, budget: int | None = None,
                 ratio: float | None = None,
                 stats: Mapping[str, Any] | None = None,
                 rules: Sequence[RuleLike] | None = None,
                 default: Predicate | None = default_filter,
                 sv: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, int]:
  """Ranks by one common energy fraction under `budget` factor parameters
  (or `ratio` of the selected layers' dense parameters)."""
  layers = selected_layers(params, rules, default)
  shapes = {p: matrix_shape(w.shape) for p, w in layers}
  dense = sum(m * n for m, n in shapes.values())
  if (budget is None) == (ratio is None):
    raise CompressionError("give exactly one of budget= (factor parameters) "
                           "or ratio= (of the dense parameters)")
  if ratio is not None:
    if not 0 < ratio <= 1:
      raise CompressionError(f"ratio must be in (0, 1], got {ratio}")
    budget = int(ratio * dense)
  sv = sv if sv is not None else singular_values(params, stats, rules,
                                                 default)
  frac, cost = {}, {}
  for p, (m, n) in shapes.items():
    e = np.cumsum(np.asarray(sv[p], np.float64) ** 2)
    frac[p] = e / e[-1] if e[-1] > 0 else np.ones_like(e)
    cost[p] = m + n
  floor = sum(cost.values())
  if budget < floor:
    raise CompressionError(
        f"parameter budget {budget:,} is below rank 1 everywhere ({floor:,} "
        "factor parameters); raise it or leave layers out with rules")

  def ranks(e):
    return {p: min(int(np.searchsorted(f, e * (1 - 1e-12))) + 1, len(f))
            for p, f in frac.items()}

  def params_at(e):
    return sum(r * cost[p] for p, r in ranks(e).items())

  levels = np.unique(np.concatenate([[0.0], *frac.values()]))
  lo, hi = 0, len(levels) - 1  # params_at(levels[lo]) fits
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if params_at(levels[mid]) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return ranks(levels[lo])


def rank_rules(ranks: Mapping[str, int], **config) -> list[Rule]:
  """Exact-path rules {path: rank} (plus `config`), then skip the rest:
  T.low_rank(rules=...), T.svd_llm(stats, rules=...)."""
  return exact_rules({p: {**config, "rank": int(r), "rank_ratio": None,
                          "energy": None} for p, r in ranks.items()})


def factor_params(params: Any, ranks: Mapping[str, int]) -> int:
  from compressjax.core.tree import leaves_with_paths
  shapes = {p: matrix_shape(x.shape) for p, x in leaves_with_paths(params)}
  return sum(r * sum(shapes[p]) for p, r in ranks.items())
