"""OWL and ERK layer sparsities against numpy references."""

import numpy as np
import pytest

import compressjax as cj
from compressjax import allocate as A
from compressjax.core.errors import CompressionError
from compressjax.core.tree import leaves_with_paths
from compressjax.train import sparse as train_sparse
from tests.allocate.fixtures import mlp

T = cj.transforms


def _kernels(v):
  return {p: np.asarray(x, np.float64) for p, x in leaves_with_paths(v)
          if x.ndim == 2}


def owl_reference(v, stats, s, m, lam):
  ks = _kernels(v)
  d, n = {}, {}
  for p, w in ks.items():
    a = np.abs(w) * np.sqrt(np.asarray(stats[p].sq_sum, np.float64))[:, None]
    d[p] = np.mean(a > m * a.mean())
    n[p] = w.size
  lo, hi = min(d.values()), max(d.values())
  a = {p: 2 * lam * (d[p] - lo) / (hi - lo) for p in d}
  mean = sum(a[p] * n[p] for p in d) / sum(n.values())
  return {p: 1 - (a[p] - mean + 1 - s) for p in d}, d


def test_owl_matches_numpy_and_keeps_the_weighted_target():
  _, v, stats, _ = mlp()
  got = A.owl_sparsities(v, stats, 0.6, m=3.0, lam=0.08)
  want, d = owl_reference(v, stats, 0.6, 3.0, 0.08)
  assert len(set(d.values())) == 3  # the layers do differ in outliers
  assert got == pytest.approx(want, abs=1e-12)
  assert A.weighted_sparsity(v, got) == pytest.approx(0.6, abs=1e-12)
  # more outliers, less pruning; spread 2 * lam
  order = sorted(d, key=d.get)
  assert [got[p] for p in order] == sorted(got.values(), reverse=True)
  assert max(got.values()) - min(got.values()) == pytest.approx(0.16)
  assert A.outlier_ratios(v, stats, m=3.0) == pytest.approx(d)


def test_owl_groups_lambda_zero_and_errors():
  _, v, stats, _ = mlp()
  ks = list(_kernels(v))
  grouped = A.owl_sparsities(
      v, stats, 0.5, m=3.0, group=lambda p: "a" if p == ks[2] else "b")
  assert grouped[ks[0]] == grouped[ks[1]] != grouped[ks[2]]
  assert A.weighted_sparsity(v, grouped) == pytest.approx(0.5, abs=1e-12)
  flat = A.owl_sparsities(v, stats, 0.7, lam=0.0)
  assert all(x == pytest.approx(0.7) for x in flat.values())
  with pytest.raises(CompressionError, match="outside.*lower lam"):
    A.owl_sparsities(v, stats, 0.5, m=3.0, lam=0.9)
  with pytest.raises(CompressionError, match=r"target sparsity.*\[0, 1\)"):
    A.owl_sparsities(v, stats, 1.0)
  with pytest.raises(CompressionError, match="no calibration statistics"):
    A.owl_sparsities(v, {}, 0.5)


def test_erk_is_train_sparse_erk_and_averages_to_the_target():
  _, v, _, _ = mlp()
  got = A.erk_sparsities(v, 0.6)
  ref = train_sparse.layer_densities(v, 0.6, "erk")
  assert got == pytest.approx({p: 1 - d for p, d in ref.items()})
  assert A.weighted_sparsity(v, got) == pytest.approx(0.6, abs=1e-12)
  # ERK: density proportional to sum(shape) / prod(shape)
  ks = _kernels(v)
  raw = {p: sum(w.shape) / w.size for p, w in ks.items()}
  ratio = {p: (1 - got[p]) / raw[p] for p in ks}
  assert len({round(r, 12) for r in ratio.values()}) == 1


def test_sparsity_rules_drive_any_sparsity_transform():
  _, v, stats, _ = mlp()
  s = A.owl_sparsities(v, stats, 0.6, m=3.0)
  out = T.wanda(stats, rules=A.sparsity_rules(s)).apply(v)
  for p, x in leaves_with_paths(out):
    if p in s:
      k = x.shape[0]
      assert x.sparsity == pytest.approx(round(s[p] * k) / k)
    else:
      assert not cj.is_compressed(x)
