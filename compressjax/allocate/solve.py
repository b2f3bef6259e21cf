"""Choosing one candidate per layer under a size budget.

The problem is a multiple-choice knapsack: with s_lk the score (sensitivity)
and b_lk the exact bytes of candidate k in layer l,
  minimize sum_l s_l,k(l)  subject to  sum_l b_l,k(l) <= B,
the additive surrogate of HAWQ-v2's bit allocation (Dong et al. 2020,
Sec. 3.2: integer programming over per-layer bit widths under a size
budget). Solvers:
  milp    binary x_lk, sum_k x_lk = 1 per layer, sum b x <= B, through
          scipy.optimize.milp (HiGHS) with both optimality gaps at 0: optimal
          up to HiGHS's tolerances (~1e-7 of the largest score; single-layer
          moves that still gain are applied after); the rounded solution's
          integer bytes are checked against B (and the constraint tightened
          by any excess, which tolerances can allow)
  dp      dynamic programming over bytes in units of u: exact when u is the
          gcd of all costs; when that needs more than `max_cells` cells, costs
          are rounded UP to a coarser unit, so the result still fits the true
          budget (then `exact` is False)
  greedy  the usual baseline: every layer at its cheapest candidate, then
          repeatedly the upgrade with the largest score decrease per extra
          byte that still fits
The result is an `Allocation`: exact-path rules for every transform the
chosen candidates use, composable with all of them, and the planned bytes,
which `apply` checks against the compressed tree.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from compressjax.allocate.candidates import (SKIP_REST, Builder, Candidate,
                                             Table, builder_name, exact_rules)
from compressjax.core.base import array_nbytes
from compressjax.core.errors import CompressionError
from compressjax.core.rules import Rule
from compressjax.core.transform import Transform, chain
from compressjax.core.tree import leaves_with_paths

SOLVERS = ("milp", "dp", "greedy")


# ----------------------------------------------------------------------------
# budget


def resolve_budget(table: Table, *, bytes: int | None = None,
                   bits_per_weight: float | None = None) -> int:
  """Budget in bytes over the table's layers, from bytes or average bits."""
  if (bytes is None) == (bits_per_weight is None):
    raise CompressionError("give exactly one of bytes= or bits_per_weight= "
                           "for the budget")
  n = table.n_weights
  if bits_per_weight is not None:
    if not (isinstance(bits_per_weight, (int, float)) and
            math.isfinite(bits_per_weight) and bits_per_weight > 0):
      raise CompressionError(f"bits_per_weight must be a positive number, "
                             f"got {bits_per_weight!r}")
    budget = int(math.floor(bits_per_weight * n / 8 + 1e-9))
  else:
    if not isinstance(bytes, (int, np.integer)) or bytes <= 0:
      raise CompressionError(f"bytes must be a positive integer, got "
                             f"{bytes!r}")
    budget = int(bytes)
  bpw = lambda b: 8.0 * b / max(n, 1)
  if budget > table.dense_bytes:
    raise CompressionError(
        f"budget of {budget:,} bytes ({bpw(budget):.3f} bits/weight) is above "
        f"the uncompressed size of the allocated layers, "
        f"{table.dense_bytes:,} bytes ({bpw(table.dense_bytes):.2f} bits/"
        f"weight); give at most that (a budget above float compresses "
        "nothing)")
  low = [int(c.min()) for c in table.costs()]
  if budget < sum(low):
    worst = int(np.argmax(low))
    layer = table.layers[worst]
    k = int(np.argmin(layer.nbytes))
    raise CompressionError(
        f"budget of {budget:,} bytes ({bpw(budget):.3f} bits/weight) is below "
        f"the smallest plan, every layer at its cheapest candidate: "
        f"{sum(low):,} bytes ({bpw(sum(low)):.3f} bits/weight). Raise the "
        f"budget, or add cheaper candidates (fewer bits, more sparsity, lower "
        f"rank); the largest cheapest cost is this layer's "
        f"{layer.candidates[k].label!r}, {low[worst]:,} bytes", layer.path)
  return budget


# ----------------------------------------------------------------------------
# solvers on plain arrays (lists of per-layer cost and score vectors)


def _check_arrays(costs, scores):
  if len(costs) != len(scores) or not costs:
    raise CompressionError(f"need one cost and one score vector per layer, "
                           f"got {len(costs)} and {len(scores)}")
  cs, ss = [], []
  for i, (c, s) in enumerate(zip(costs, scores)):
    c, s = np.asarray(c), np.asarray(s, np.float64)
    if c.ndim != 1 or c.shape != s.shape or c.size == 0:
      raise CompressionError(f"layer {i}: costs {c.shape} and scores "
                             f"{s.shape} must be equal non-empty vectors")
    if not np.issubdtype(c.dtype, np.integer) or np.any(c < 0):
      raise CompressionError(f"layer {i}: costs must be integer bytes >= 0")
    if not np.all(np.isfinite(s)):
      raise CompressionError(f"layer {i}: scores must be finite")
    cs.append(c.astype(np.int64)); ss.append(s)
  return cs, ss


def total(costs, choice) -> int:
  return int(sum(int(c[k]) for c, k in zip(costs, choice)))


def objective(scores, choice) -> float:
  return float(math.fsum(float(s[k]) for s, k in zip(scores, choice)))


def _infeasible(costs, budget):
  low = sum(int(c.min()) for c in costs)
  if low > budget:
    raise CompressionError(f"budget {budget:,} bytes is below the smallest "
                           f"plan ({low:,} bytes: every layer at its cheapest "
                           "candidate); raise it or add cheaper candidates")


def solve_milp(costs, scores, budget: int, *, time_limit: float | None = None
               ) -> list[int]:
  """Exact multiple-choice knapsack through scipy.optimize.milp (HiGHS)."""
  from scipy import optimize, sparse

  costs, scores = _check_arrays(costs, scores)
  _infeasible(costs, budget)
  sizes = [len(c) for c in costs]
  n, L = sum(sizes), len(sizes)
  flat_s = np.concatenate(scores)
  scale = float(np.max(np.abs(flat_s))) or 1.0
  flat_c = np.concatenate(costs).astype(np.float64)
  rows = np.repeat(np.arange(L), sizes)
  one = sparse.csr_array((np.ones(n), (rows, np.arange(n))), shape=(L, n))
  options = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "presolve": True}
  if time_limit is not None:
    options["time_limit"] = float(time_limit)
  ub = float(budget)
  starts = np.cumsum([0] + sizes[:-1])
  for _ in range(8):
    cons = [optimize.LinearConstraint(one, 1, 1),
            optimize.LinearConstraint(flat_c[None, :], -np.inf, ub)]
    with warnings.catch_warnings():  # mip_abs_gap goes to HiGHS verbatim
      warnings.simplefilter("ignore", RuntimeWarning)
      res = optimize.milp(flat_s / scale, integrality=np.ones(n),
                          bounds=optimize.Bounds(0, 1), constraints=cons,
                          options=options)
    if res.x is None:
      raise CompressionError(f"MILP found no plan ({res.message}); the "
                             "budget may be infeasible, or raise time_limit")
    x = np.round(res.x).astype(np.int64)
    choice = []
    for l in range(L):
      xl = x[starts[l]:starts[l] + sizes[l]]
      if xl.sum() != 1:
        raise CompressionError(f"MILP returned a non-integral plan for "
                               f"layer {l} ({res.message})")
      choice.append(int(np.argmax(xl)))
    excess = total(costs, choice) - budget
    if excess <= 0:
      return _polish(costs, scores, budget, choice)
    ub -= excess  # a tolerance let it over; tighten by what it went over
  raise CompressionError("MILP kept exceeding the budget by rounding; use "
                         "solver='dp'")


def _polish(costs, scores, budget, choice):
  """1-opt moves that lower the objective and still fit: removes what
  HiGHS's tolerances (~1e-7 of the largest score) can leave behind."""
  choice = list(choice)
  used = total(costs, choice)
  improved = True
  while improved:
    improved = False
    for l, (c, s) in enumerate(zip(costs, scores)):
      k0 = choice[l]
      ok = (s < s[k0]) & (used - c[k0] + c <= budget)
      if ok.any():
        k = int(np.flatnonzero(ok)[np.argmin(s[ok])])
        used += int(c[k] - c[k0])
        choice[l] = k
        improved = True
  return choice


def solve_dp(costs, scores, budget: int, *, max_cells: int = 2_000_000
             ) -> tuple[list[int], bool]:
  """DP over bytes; returns (choice, exact). See module doc."""
  costs, scores = _check_arrays(costs, scores)
  _infeasible(costs, budget)
  L = len(costs)
  cells = max(16, min(int(max_cells), int(5e7) // L))
  g = int(np.gcd.reduce(np.concatenate(costs))) or 1
  unit = g
  exact = True
  if budget // g > cells:
    unit = -(-budget // cells)
    exact = False
  # rounding costs up keeps every DP-feasible plan inside the true budget
  units = [-(-c // unit) for c in costs]
  cap = budget // unit
  best = np.full(cap + 1, np.inf)
  best[0] = 0.0
  back = np.zeros((L, cap + 1), np.int32)
  for l, (u, s) in enumerate(zip(units, scores)):
    new = np.full(cap + 1, np.inf)
    arg = np.zeros(cap + 1, np.int32)
    for k in range(len(u)):
      w = int(u[k])
      if w > cap:
        continue
      cand = np.full(cap + 1, np.inf)
      cand[w:] = best[:cap + 1 - w] + s[k]
      better = cand < new
      new[better] = cand[better]
      arg[better] = k
    best = new
    back[l] = arg
  if not np.isfinite(best).any():
    raise CompressionError(
        f"no plan fits {budget:,} bytes after rounding costs up to units of "
        f"{unit:,} bytes; raise max_cells or use solver='milp'")
  c = int(np.argmin(best))  # first (cheapest) among equal objectives
  choice = []
  for l in range(L - 1, -1, -1):
    k = int(back[l, c])
    choice.append(k)
    c -= int(units[l][k])
  return choice[::-1], exact


def solve_greedy(costs, scores, budget: int) -> list[int]:
  """Cheapest everywhere, then best score decrease per byte while it fits."""
  costs, scores = _check_arrays(costs, scores)
  _infeasible(costs, budget)
  choice = [int(np.lexsort((s, c))[0]) for c, s in zip(costs, scores)]
  used = total(costs, choice)
  while True:
    best = None
    for l, (c, s) in enumerate(zip(costs, scores)):
      k0 = choice[l]
      dc = c - c[k0]
      ds = s[k0] - s
      ok = (ds > 0) & (used + dc <= budget)
      if not ok.any():
        continue
      with np.errstate(divide="ignore"):
        ratio = np.where(dc > 0, ds / np.maximum(dc, 1), np.inf)
      for k in np.flatnonzero(ok):
        key = (ratio[k], ds[k])
        if best is None or key > best[0]:
          best = (key, l, int(k))
    if best is None:
      return choice
    _, l, k = best
    used += int(costs[l][k] - costs[l][choice[l]])
    choice[l] = k


# ----------------------------------------------------------------------------
# plans over a table


@dataclasses.dataclass(frozen=True)
class Allocation:
  """One candidate per layer of `table`, and what it costs."""

  table: Table
  choice: tuple[int, ...]
  proxy: str | None
  solver: str
  budget: int | None = None
  exact: bool = True

  @property
  def chosen(self) -> dict[str, Candidate]:
    return {l.path: l.candidates[k]
            for l, k in zip(self.table.layers, self.choice)}

  @property
  def labels(self) -> dict[str, str]:
    return {p: c.label for p, c in self.chosen.items()}

  @property
  def planned_bytes(self) -> int:
    return total(self.table.costs(), self.choice)

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.planned_bytes / max(self.table.n_weights, 1)

  def objective(self, proxy: str | None = None) -> float:
    return objective(self.table.scores(proxy or self.proxy), self.choice)

  # -- rules and transforms ------------------------------------------------
  def stages(self) -> list[Builder]:
    """The distinct transform builders the plan uses, in application order
    (every candidate's stages keep their relative order)."""
    order: list[Builder] = []
    for c in self.chosen.values():
      builds = [s.build for s in c.stages]
      if len(set(map(id, builds))) != len(builds):
        raise CompressionError(f"candidate {c.label!r} applies one transform "
                               "builder twice; give each stage its own")
      prev = -1
      for b in builds:
        pos = next((i for i, o in enumerate(order) if o is b), None)
        if pos is None:
          order.insert(prev + 1, b)
          pos = prev + 1
        elif pos < prev:
          raise CompressionError(
              f"candidates apply {builder_name(b)} in different orders "
              "relative to other stages; one order for all layers is needed "
              "to chain them")
        prev = pos
    return order

  def rules_for(self, build: Builder) -> list[Rule]:
    """Exact-path rules (path -> this layer's config) for one transform
    builder, then a rule skipping every other param."""
    return exact_rules({path: s.config for path, c in self.chosen.items()
                        for s in c.stages if s.build is build})

  @property
  def rules(self) -> list[Rule]:
    """The rules list when the plan uses one transform (e.g.
    T.quantize(rules=plan.rules)); see rules_for for mixtures."""
    st = self.stages()
    if len(st) > 1:
      raise CompressionError(
          f"the plan uses several transforms ({[builder_name(b) for b in st]})"
          "; take each one's rules with plan.rules_for(build), or use "
          "plan.transform()")
    return self.rules_for(st[0]) if st else [SKIP_REST]

  def transform(self) -> Transform:
    """chain(build(rules=rules_for(build)) for each stage builder)."""
    return chain(*[b(rules=self.rules_for(b), default=None)
                   for b in self.stages()])

  def apply(self, params: Any, check: bool = True) -> Any:
    """Compresses `params` by the plan; checks the realized bytes of the
    allocated layers equal the planned bytes."""
    out = self.transform().apply(params)
    if check:
      got = self.realized_bytes(out)
      if got != self.planned_bytes:
        raise CompressionError(
            f"the compressed tree stores {got:,} bytes in the allocated "
            f"layers, the plan {self.planned_bytes:,}: a candidate is not "
            "leaf-wise (e.g. a global threshold) or params differ from the "
            "table's")
    return out

  def realized_bytes(self, tree: Any) -> int:
    leaves = dict(leaves_with_paths(tree))
    return sum(int(array_nbytes(leaves[p])) for p in self.table.paths)

  # -- reporting -------------------------------------------------------------
  def rows(self) -> list[dict]:
    sc = self.table.scores(self.proxy) if self.proxy else None
    out = []
    for i, (l, k) in enumerate(zip(self.table.layers, self.choice)):
      out.append(dict(path=l.path, candidate=l.candidates[k].label,
                      bytes=int(l.nbytes[k]),
                      bits_per_weight=8.0 * int(l.nbytes[k]) / l.n_weights,
                      score=None if sc is None else float(sc[i][k])))
    return out

  def summary(self) -> str:
    rows = self.rows()
    w = max(len(r["path"]) for r in rows)
    lines = [f"{'path':{w}s}  {'candidate':24s} {'bits/w':>7s} {'bytes':>10s}"
             f" {'score':>11s}"]
    for r in rows:
      sc = "-" if r["score"] is None else f"{r['score']:.4g}"
      lines.append(f"{r['path']:{w}s}  {r['candidate']:24s} "
                   f"{r['bits_per_weight']:7.3f} {r['bytes']:10,d} {sc:>11s}")
    lines.append(f"{'TOTAL':{w}s}  {self.solver:24s} "
                 f"{self.bits_per_weight:7.3f} {self.planned_bytes:10,d}"
                 + (f" budget {self.budget:,}" if self.budget else ""))
    return "\n".join(lines)


def solve(table: Table, *, bytes: int | None = None,
          bits_per_weight: float | None = None, proxy: str = "output",
          solver: str = "milp", max_cells: int = 2_000_000) -> Allocation:
  """Minimum summed `proxy` score under the budget (bytes or average bits per
  weight over the table's layers)."""
  if solver not in SOLVERS:
    raise CompressionError(f"unknown solver {solver!r}; use one of {SOLVERS}")
  budget = resolve_budget(table, bytes=bytes, bits_per_weight=bits_per_weight)
  costs, scores = table.costs(), table.scores(proxy)
  exact = solver != "greedy"
  if solver == "milp":
    choice = solve_milp(costs, scores, budget)
  elif solver == "dp":
    choice, exact = solve_dp(costs, scores, budget, max_cells=max_cells)
  else:
    choice = solve_greedy(costs, scores, budget)
  return Allocation(table, tuple(choice), proxy, solver, budget, exact)


def uniform(table: Table, label: str, proxy: str | None = None
            ) -> Allocation:
  """The candidate labelled `label` in every layer (the usual baseline)."""
  choice = tuple(l.index(label) for l in table.layers)
  return Allocation(table, choice, proxy, f"uniform {label}")


def fixed(table: Table, labels: dict[str, str], proxy: str | None = None,
          name: str = "fixed") -> Allocation:
  """A given label per layer path (e.g. from another allocation)."""
  missing = [p for p in table.paths if p not in labels]
  if missing:
    raise CompressionError(f"no label for layers {missing[:5]}")
  choice = tuple(l.index(labels[l.path]) for l in table.layers)
  return Allocation(table, choice, proxy, name)
