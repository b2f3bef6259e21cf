"""Energy rank allocation under a parameter budget."""

import numpy as np
import pytest

import compressjax as cj
from compressjax import allocate as A
from compressjax.core.errors import CompressionError
from compressjax.core.tree import leaves_with_paths
from tests.allocate.fixtures import mlp

T = cj.transforms


def energy_reference(sv, shapes, budget):
  """Linear scan over every breakpoint: the largest common energy fraction
  whose ranks fit."""
  frac = {p: np.cumsum(s ** 2) / np.sum(s ** 2) for p, s in sv.items()}
  best = None
  for e in sorted({0.0, *np.concatenate(list(frac.values()))}):
    r = {p: min(int(np.sum(f < e * (1 - 1e-12))) + 1, len(f))
         for p, f in frac.items()}
    if sum(r[p] * sum(shapes[p]) for p in r) <= budget:
      best = r
  return best


@pytest.mark.parametrize("whiten", [False, True])
def test_energy_ranks_are_the_largest_common_energy_that_fits(whiten):
  _, v, stats, _ = mlp()
  shapes = {p: x.shape for p, x in leaves_with_paths(v) if x.ndim == 2}
  sv = A.singular_values(v, stats if whiten else None)
  for budget in (200, 700, 1500, 2000):
    got = A.energy_ranks(v, budget=budget, stats=stats if whiten else None)
    assert got == energy_reference(sv, shapes, budget)
    assert A.factor_params(v, got) <= budget


def test_whitened_singular_values_are_those_of_the_cholesky_factor():
  _, v, stats, _ = mlp()
  p = "params/layers_0/kernel"
  w = np.asarray(dict(leaves_with_paths(v))[p], np.float64)
  g = np.asarray(stats[p].gram, np.float64)
  want = np.linalg.svd(np.linalg.cholesky(g).T @ w, compute_uv=False)
  got = A.singular_values(v, stats)[p]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4 * want[0])


def test_rank_rules_drive_low_rank_and_budget_errors():
  _, v, stats, _ = mlp()
  ranks = A.energy_ranks(v, ratio=0.4)
  out = T.low_rank(rules=A.rank_rules(ranks)).apply(v)
  got = {p: x.rank for p, x in leaves_with_paths(out) if cj.is_compressed(x)}
  assert got == ranks
  with pytest.raises(CompressionError, match="below rank 1 everywhere"):
    A.energy_ranks(v, budget=100)
  with pytest.raises(CompressionError, match="exactly one of"):
    A.energy_ranks(v)
