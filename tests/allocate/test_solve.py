"""Solvers vs brute force; budgets and their errors."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from compressjax import allocate as A
from compressjax.allocate.candidates import LayerOptions, Table
from compressjax.core.errors import CompressionError


def brute_force(costs, scores, budget):
  """(best objective, choice) over every combination, or None."""
  best = None
  for combo in itertools.product(*[range(len(c)) for c in costs]):
    if sum(int(c[k]) for c, k in zip(costs, combo)) <= budget:
      v = math.fsum(float(s[k]) for s, k in zip(scores, combo))
      if best is None or v < best[0]:
        best = (v, combo)
  return best


@st.composite
def instances(draw):
  n_layers = draw(st.integers(1, 4))
  costs, scores = [], []
  for _ in range(n_layers):
    k = draw(st.integers(1, 4))
    costs.append(np.array(draw(st.lists(st.integers(0, 60), min_size=k,
                                        max_size=k)), np.int64))
    scores.append(np.array(draw(st.lists(
        st.floats(-5, 100, allow_nan=False), min_size=k, max_size=k))))
  lo = sum(int(c.min()) for c in costs)
  hi = sum(int(c.max()) for c in costs)
  budget = draw(st.integers(lo, hi + 5))
  return costs, scores, budget


def _obj(scores, choice):
  return math.fsum(float(s[k]) for s, k in zip(scores, choice))


def _cost(costs, choice):
  return sum(int(c[k]) for c, k in zip(costs, choice))


@settings(max_examples=25, deadline=None)
@given(instances())
def test_exact_solvers_match_brute_force_and_greedy_never_wins(inst):
  costs, scores, budget = inst
  best, _ = brute_force(costs, scores, budget)
  # HiGHS is optimal to ~1e-7 of the largest (normalized) score
  tol = 1e-6 * len(costs) * max(1.0, max(abs(float(x)) for s in scores
                                          for x in s))
  m = A.solve_milp(costs, scores, budget)
  d, exact = A.solve_dp(costs, scores, budget)
  g = A.solve_greedy(costs, scores, budget)
  assert exact
  for choice in (m, d, g):
    assert _cost(costs, choice) <= budget
  assert _obj(scores, m) == pytest.approx(best, abs=tol)
  assert _obj(scores, d) == pytest.approx(best, abs=tol)
  assert _obj(scores, g) >= best - tol


@settings(max_examples=15, deadline=None)
@given(instances())
def test_coarse_dp_still_fits_the_true_budget(inst):
  costs, scores, budget = inst
  # 16 cells: costs rounded up to units of budget/16 (when that is coarser)
  try:
    choice, exact = A.solve_dp(costs, scores, budget, max_cells=1)
  except CompressionError as e:  # rounding up can leave no plan: said so
    assert "raise max_cells" in str(e)
    g = int(np.gcd.reduce(np.concatenate(costs))) or 1
    assert budget // g > 16
    return
  assert _cost(costs, choice) <= budget
  assert _obj(scores, choice) >= brute_force(costs, scores, budget)[0] - 1e-9
  if exact:  # gcd units fit: then it is optimal
    assert _obj(scores, choice) == pytest.approx(
        brute_force(costs, scores, budget)[0], abs=1e-9 * 200)


def test_greedy_can_lose_to_the_exact_solver():
  # one layer's big upgrade is worth more than the best-ratio small one
  costs = [np.array([0, 10]), np.array([0, 1])]
  scores = [np.array([9.5, 0.0]), np.array([1.0, 0.0])]
  assert A.solve_greedy(costs, scores, 10) == [0, 1]   # takes ratio 1/1
  assert A.solve_milp(costs, scores, 10) == [1, 0]     # objective 1 < 9.5
  assert A.solve_dp(costs, scores, 10)[0] == [1, 0]


def _table(costs, scores, n_weights=64):
  layers = []
  for i, (c, s) in enumerate(zip(costs, scores)):
    cands = tuple(A.Candidate(f"c{k}") for k in range(len(c)))
    layers.append(LayerOptions(
        path=f"l{i}/kernel", shape=(n_weights,), dense_bytes=4 * n_weights,
        candidates=cands, nbytes=np.asarray(c, np.int64),
        scores={"x": np.asarray(s, np.float64)}))
  return Table(tuple(layers))


def test_budget_in_bits_per_weight_is_floored_bytes():
  t = _table([[4, 16, 32], [4, 16, 32]], [[3, 2, 1], [3, 2, 1]],
             n_weights=16)
  # 32 weights at 3 bits = 12 bytes... of the 2 x 64 dense bytes
  assert A.resolve_budget(t, bits_per_weight=3.0) == 12
  assert A.resolve_budget(t, bits_per_weight=5.9) == 23
  plan = A.solve(t, bits_per_weight=12.0, proxy="x")  # 48 bytes
  assert plan.planned_bytes <= 48
  assert plan.choice == (2, 1) or plan.choice == (1, 2)
  assert plan.bits_per_weight == pytest.approx(8 * 48 / 32)


def test_budget_errors_name_the_layer_and_the_fix():
  t = _table([[8, 16], [40, 60]], [[2, 1], [2, 1]], n_weights=16)
  with pytest.raises(CompressionError, match=r"below the smallest plan.*"
                     r"cheaper candidates.*l1/kernel"):
    A.solve(t, bytes=47, proxy="x")
  with pytest.raises(CompressionError, match="above the uncompressed size"):
    A.solve(t, bytes=129, proxy="x")
  with pytest.raises(CompressionError, match="exactly one of"):
    A.solve(t, bytes=60, bits_per_weight=3, proxy="x")
  with pytest.raises(CompressionError, match="positive"):
    A.solve(t, bits_per_weight=float("nan"), proxy="x")
  with pytest.raises(CompressionError, match="unknown solver"):
    A.solve(t, bytes=60, proxy="x", solver="simplex")
  with pytest.raises(CompressionError, match="no 'loss' scores"):
    A.solve(t, bytes=60, proxy="loss")
  with pytest.raises(CompressionError, match="finite"):
    A.solve_milp([np.array([1])], [np.array([np.inf])], 3)


def test_custom_scores_and_summary():
  t = _table([[4, 16], [4, 16]], [[3, 1], [2, 1]], n_weights=16)
  t2 = t.with_scores("mine", [np.array([0., 5.]), np.array([0., 5.])])
  assert A.solve(t2, bytes=20, proxy="mine").choice == (0, 0)
  plan = A.solve(t2, bytes=20, proxy="x")
  assert plan.choice == (1, 0)  # layer 0 gains 2, layer 1 only 1
  text = plan.summary()
  assert "l0/kernel" in text and "TOTAL" in text and "budget 20" in text
  with pytest.raises(CompressionError, match="3 scores for 2 candidates"):
    t.with_scores("bad", [np.zeros(3), np.zeros(2)])
