"""Non-uniform layer sparsities for one-shot pruning: OWL and ERK.

OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity", Sec. 3, Eq. 4):
per layer (or per group of layers, e.g. a transformer block as in the paper)
the outlier ratio
  D_l = fraction of Wanda scores A_ij = |W_ij| * ||X_i||_2 above M * mean(A)
(over the group's scores together); densities are D mapped linearly onto
[0, 2*lam] and shifted so their mean is 1 - S:
  d_l = 2 lam (D_l - min D) / (max D - min D) - mean + (1 - S),
so layers with more outliers are pruned less, within [S - lam, S + lam]. The
mean is weighted by each layer's weight count (the paper's blocks are equal
in size, where this is its plain mean), so the total kept weights equal
(1 - S) of the selected ones. M = 5, lam = 0.08 are the paper's LLaMA values.

ERK (Evci et al. 2020, Sec. 3): density_l proportional to
sum(shape) / prod(shape), scaled to the target, layers above 1 made dense
(`erk_densities`; dynamic sparse training in `train.sparse` uses the same).

Both return {path: sparsity}; `sparsity_rules` turns that into exact-path
rules for any sparsity transform (T.sparsify, T.wanda, T.sparsegpt).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.core.rules import Predicate, Rule, RuleLike, default_filter
from compressjax.allocate.candidates import exact_rules, selected_layers
from compressjax.sparsity.wanda import wanda_scores


def erk_densities(shapes: Mapping[str, tuple], sparsity: float
                  ) -> dict[str, float]:
  """ERK: density_l = eps * sum(shape)/prod(shape), layers with density > 1
  made dense and eps recomputed over the rest (RigL's iteration)."""
  if sparsity == 0.0:
    return {p: 1.0 for p in shapes}
  size = {p: float(math.prod(s)) for p, s in shapes.items()}
  raw = {p: sum(s) / size[p] for p, s in shapes.items()}
  total = sum(size.values())
  dense: set[str] = set()
  while True:
    rest = [p for p in shapes if p not in dense]
    # eps * sum_rest raw*N + N_dense = (1 - s) * N_total
    rhs = (1.0 - sparsity) * total - sum(size[p] for p in dense)
    eps = rhs / sum(raw[p] * size[p] for p in rest)
    top = max(raw[p] for p in rest)
    # terminates: a lone remaining layer (or equal raws) gets eps*raw < 1
    if eps * top <= 1.0:
      break
    dense |= {p for p in rest if raw[p] == top}
  return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}


def _check_target(sparsity):
  if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
    raise CompressionError(f"target sparsity must be in [0, 1), got "
                           f"{sparsity!r}")


def erk_sparsities(params: Any, sparsity: float,
                   rules: Sequence[RuleLike] | None = None,
                   default: Predicate | None = default_filter
                   ) -> dict[str, float]:
  """ERK layer sparsities of the selected params for one-shot pruning."""
  _check_target(sparsity)
  layers = selected_layers(params, rules, default)
  if not layers:
    raise CompressionError("no layer selected for ERK; check rules/default")
  d = erk_densities({p: tuple(l.shape) for p, l in layers}, float(sparsity))
  return {p: 1.0 - d[p] for p, _ in layers}


def outlier_ratios(params: Any, stats: Mapping[str, Any], *, m: float = 5.0,
                   rules: Sequence[RuleLike] | None = None,
                   default: Predicate | None = default_filter,
                   group: Callable[[str], str] | None = None
                   ) -> dict[str, float]:
  """OWL's D per group (default: per layer), keyed by each layer's path."""
  if not (isinstance(m, (int, float)) and m > 0):
    raise CompressionError(f"outlier threshold m must be > 0, got {m!r}")
  layers = selected_layers(params, rules, default)
  if not layers:
    raise CompressionError("no layer selected for OWL; check rules/default")
  groups: dict[str, list[str]] = {}
  scores = {}
  for p, w in layers:
    if p not in stats:
      raise CompressionError("no calibration statistics for this layer; "
                             "capture with the same rules", p)
    norm = stats[p].norm
    if len(w.shape) < 2 or tuple(norm.shape) != (w.shape[0],):
      raise CompressionError(
          f"Wanda scores need a kernel (in, ...) and input norms of shape "
          f"({w.shape[0]},), got {tuple(w.shape)} and {tuple(norm.shape)}",
          p)
    scores[p] = np.asarray(wanda_scores(w, norm), np.float64).ravel()
    groups.setdefault(group(p) if group else p, []).append(p)
  out = {}
  for members in groups.values():
    a = np.concatenate([scores[p] for p in members])
    d = float(np.mean(a > m * a.mean()))
    out.update({p: d for p in members})
  return {p: out[p] for p, _ in layers}


def owl_sparsities(params: Any, stats: Mapping[str, Any], sparsity: float, *,
                   m: float = 5.0, lam: float = 0.08,
                   rules: Sequence[RuleLike] | None = None,
                   default: Predicate | None = default_filter,
                   group: Callable[[str], str] | None = None
                   ) -> dict[str, float]:
  """OWL layer sparsities (module doc); weighted mean = `sparsity`.

  group: maps a path to its group (e.g. lambda p: p.split('/')[1] for one
  ratio per transformer block, as in the paper); default per layer."""
  _check_target(sparsity)
  if not (isinstance(lam, (int, float)) and lam >= 0):
    raise CompressionError(f"lam must be >= 0, got {lam!r}")
  ratios = outlier_ratios(params, stats, m=m, rules=rules, default=default,
                          group=group)
  layers = dict(selected_layers(params, rules, default))
  paths = list(ratios)
  d = np.array([ratios[p] for p in paths])
  n = np.array([math.prod(layers[p].shape) for p in paths], np.float64)
  span = d.max() - d.min()
  a = 2 * lam * (d - d.min()) / span if span > 0 else np.zeros_like(d)
  dens = a - float(n @ a) / n.sum() + (1.0 - sparsity)
  out = {}
  for p, x in zip(paths, dens):
    s = 1.0 - float(x)
    if not 0.0 <= s < 1.0:
      raise CompressionError(
          f"OWL gives this layer sparsity {s:.4f}, outside [0, 1) (target "
          f"{sparsity}, lam {lam}); lower lam or move the target away from "
          "0 and 1", p)
    out[p] = s
  return out


def sparsity_rules(sparsities: Mapping[str, float], **config) -> list[Rule]:
  """Exact-path rules {path: sparsity} (plus `config` for every layer), then
  a rule skipping every other param: T.wanda(stats, rules=...)."""
  for p, s in sparsities.items():
    if not 0.0 <= s < 1.0:
      raise CompressionError(f"sparsity {s} outside [0, 1)", p)
  return exact_rules({p: {**config, "sparsity": float(s)}
                      for p, s in sparsities.items()})


def weighted_sparsity(params: Any, sparsities: Mapping[str, float]) -> float:
  """Fraction of the listed layers' weights pruned by `sparsities`."""
  from compressjax.core.tree import leaves_with_paths
  shapes = {p: x.shape for p, x in leaves_with_paths(params)}
  n = {p: math.prod(shapes[p]) for p in sparsities}
  return sum(sparsities[p] * n[p] for p in n) / max(sum(n.values()), 1)
