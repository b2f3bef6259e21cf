"""Budgeted compression: per-layer sensitivity, and the choice of one setting
per layer (bits, sparsity, rank, mixtures) under a size budget.

    from compressjax import allocate as A
    cands = [A.candidate(T.quantize, bits=b, group_size=128) for b in (2, 3, 4)]
    table = A.build_table(params, cands, stats=stats)        # bytes + scores
    plan = A.solve(table, bits_per_weight=3.0, proxy="output")
    compressed = T.quantize(rules=plan.rules).apply(params)  # or plan.apply
"""

from compressjax.allocate.candidates import (DENSE, Candidate, LayerOptions,
                                             Stage, Table, build_table,
                                             candidate, mixture,
                                             rank_grid, selected_layers,
                                             sparsity_grid)
from compressjax.allocate.rank import (energy_ranks, factor_params, rank_rules,
                                       singular_values)
from compressjax.allocate.sensitivity import (LossDelta, correlations,
                                              fisher_diagonal, hessian_trace,
                                              layer_scores,
                                              spearman)
from compressjax.allocate.solve import (SKIP_REST, SOLVERS, Allocation, fixed,
                                        resolve_budget, solve, solve_dp,
                                        solve_greedy, solve_milp, uniform)
from compressjax.allocate.sparsity import (erk_densities, erk_sparsities,
                                           outlier_ratios, owl_sparsities,
                                           sparsity_rules, weighted_sparsity)

__all__ = [
    "Allocation", "Candidate", "DENSE", "LayerOptions", "LossDelta",
    "SKIP_REST", "SOLVERS", "Stage", "Table", "build_table", "candidate",
    "correlations", "energy_ranks", "erk_densities", "erk_sparsities",
    "factor_params", "fisher_diagonal", "fixed", "hessian_trace",
    "layer_scores", "mixture", "outlier_ratios",
    "owl_sparsities", "rank_grid", "rank_rules",
    "resolve_budget", "selected_layers", "singular_values", "solve",
    "solve_dp", "solve_greedy", "solve_milp", "sparsity_grid",
    "sparsity_rules", "spearman", "uniform", "weighted_sparsity",
]
