"""Candidate settings per layer, and the table of their exact costs and scores.

A `Candidate` is one way to compress one layer: a sequence of stages, each a
transform builder (any compressjax transform taking `rules=` and `default=`,
e.g. `T.quantize`, `functools.partial(T.gptq, stats)`, `T.low_rank`) with the
config that layer gets from it. Zero stages leaves the layer dense; two stages
give mixtures (sparsify then quantize the kept values). A candidate is applied
to one layer by running its transforms on a tree holding only that leaf, at
its own path (so calibration statistics keyed by path are found), with an
exact-path rule: for leaf-wise transforms (all of them but a global
magnitude threshold, whose leaf depends on the other layers) the leaf it
produces is the leaf the full-tree transform produces, so its `nbytes` is
the candidate's exact cost (HAWQ-v2 and its successors use a size formula
instead; here the storage itself is counted; `Allocation.apply` checks the
realized bytes against the plan).

`build_table` compresses every selected layer with every candidate once and
records bytes and sensitivity scores (see `sensitivity`); the solvers
(`solve`) pick one candidate per layer from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from compressjax.core.base import array_nbytes, materialize
from compressjax.core.errors import CompressionError
from compressjax.core.rules import (Predicate, Rule, RuleLike, default_filter,
                                    resolve)
from compressjax.core.transform import Transform, chain
from compressjax.core.tree import leaves_with_paths

Builder = Callable[..., Transform]


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
  """One transform of a candidate: `build(rules=..., default=None)` gives the
  transform; `config` is this layer's rule config for it."""

  build: Builder
  config: Mapping[str, Any]


# Last rule of every plan: params the plan does not name stay as they are
# (transforms whose default would otherwise pick them: gptq, wanda, ...).
SKIP_REST = Rule(".*", skip=True)


def exact_rules(configs: Mapping[str, Mapping[str, Any]]) -> list[Rule]:
  """One rule per path (matching exactly that path) with its config, then
  SKIP_REST: what every per-layer plan hands a transform."""
  return [Rule(re.escape(p), dict(c)) for p, c in configs.items()] + [
      SKIP_REST]


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
  """A named per-layer setting: its stages run in order (none: dense)."""

  label: str
  stages: tuple[Stage, ...] = ()

  def transform(self, path: str) -> Transform:
    """The candidate as a transform touching only `path`."""
    rule = re.escape(path)
    return chain(*[s.build(rules=[(rule, dict(s.config))], default=None)
                   for s in self.stages])

  def compress(self, path: str, leaf: Any) -> Any:
    """The leaf this candidate makes of `leaf` (the param at `path`)."""
    if not self.stages:
      return leaf
    out = self.transform(path).apply(single_leaf_tree(path, leaf))
    return dict(leaves_with_paths(out))[path]

  def __repr__(self):
    return f"Candidate({self.label!r})"


DENSE = Candidate("dense")


def builder_name(build: Builder) -> str:
  while isinstance(build, functools.partial):
    build = build.func
  return getattr(build, "__name__", type(build).__name__)


def _label(build: Builder, config: Mapping[str, Any]) -> str:
  parts = ",".join(f"{k}={v}" for k, v in config.items())
  return f"{builder_name(build)}({parts})"


def candidate(build: Builder, label: str | None = None, **config
              ) -> Candidate:
  """A one-stage candidate, e.g. `candidate(T.quantize, bits=3,
  group_size=128)` or `candidate(partial(T.gptq, stats), bits=3)`."""
  return Candidate(label or _label(build, config), (Stage(build, config),))


def mixture(label: str, *stages: tuple[Builder, Mapping[str, Any]]
            ) -> Candidate:
  """A multi-stage candidate, e.g. `mixture('2:4+int4', (T.sparsify,
  dict(pattern='nm', n=2, m=4)), (T.quantize, dict(bits=4)))`."""
  if not stages:
    raise CompressionError("a mixture needs at least one (build, config) "
                           "stage; use DENSE for an uncompressed option")
  return Candidate(label, tuple(Stage(b, dict(c)) for b, c in stages))


def sparsity_grid(build: Builder, levels: Sequence[float], **extra
                  ) -> list[Candidate]:
  """One candidate per sparsity level, labelled e.g. 'wanda 60%'."""
  return [candidate(build, f"{builder_name(build)} {s:.0%}", sparsity=s,
                    **extra) for s in levels]


def rank_grid(build: Builder, ratios: Sequence[float], **extra
              ) -> list[Candidate]:
  """Low-rank candidates by parameter ratio (rank = ratio * mn / (m + n))."""
  return [candidate(build, f"{builder_name(build)} r{r:g}", rank_ratio=r,
                    **extra) for r in ratios]


def single_leaf_tree(path: str, leaf: Any) -> dict:
  """Nested dicts holding `leaf` alone, at the same '/'-joined path."""
  tree: Any = leaf
  for key in reversed(path.split("/")):
    tree = {key: tree}
  return tree


# ----------------------------------------------------------------------------
# the table

CandidatesLike = Union[Sequence[Candidate],
                       Mapping[str, Sequence[Candidate]],
                       Callable[[str, Any], Sequence[Candidate]]]


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """One layer's candidates with their exact bytes and scores."""

  path: str
  shape: tuple[int, ...]
  dense_bytes: int
  candidates: tuple[Candidate, ...]
  nbytes: np.ndarray                 # int64, one per candidate
  scores: Mapping[str, np.ndarray]   # proxy name -> float64 per candidate

  @property
  def n_weights(self) -> int:
    return math.prod(self.shape)

  def index(self, label: str) -> int:
    for i, c in enumerate(self.candidates):
      if c.label == label:
        return i
    raise CompressionError(
        f"no candidate labelled {label!r} (have "
        f"{[c.label for c in self.candidates]})", self.path)


@dataclasses.dataclass(frozen=True)
class Table:
  """Candidates, bytes and scores of every allocated layer (tree order)."""

  layers: tuple[LayerOptions, ...]

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(l.path for l in self.layers)

  @property
  def n_weights(self) -> int:
    return sum(l.n_weights for l in self.layers)

  @property
  def dense_bytes(self) -> int:
    return sum(l.dense_bytes for l in self.layers)

  @property
  def proxies(self) -> tuple[str, ...]:
    names = set.intersection(*(set(l.scores) for l in self.layers)) \
        if self.layers else set()
    return tuple(sorted(names))

  def costs(self) -> list[np.ndarray]:
    return [l.nbytes for l in self.layers]

  def scores(self, proxy: str) -> list[np.ndarray]:
    if proxy not in self.proxies:
      raise CompressionError(
          f"the table has no {proxy!r} scores (has {list(self.proxies)}); "
          "give build_table the inputs that proxy needs (stats for "
          "'output', hessian_trace for 'hawq', fisher for 'fisher', loss_fn "
          "and batches for 'loss')")
    return [np.asarray(l.scores[proxy], np.float64) for l in self.layers]

  def with_scores(self, proxy: str, values: Sequence[np.ndarray]
                  ) -> "Table":
    """A copy with another score per candidate (e.g. a custom proxy)."""
    if len(values) != len(self.layers):
      raise CompressionError(f"{len(values)} score arrays for "
                             f"{len(self.layers)} layers")
    out = []
    for l, v in zip(self.layers, values):
      v = np.asarray(v, np.float64)
      if v.shape != l.nbytes.shape:
        raise CompressionError(f"{v.shape[0] if v.ndim else 0} scores for "
                               f"{len(l.candidates)} candidates", l.path)
      out.append(dataclasses.replace(l, scores={**l.scores, proxy: v}))
    return Table(tuple(out))


def _candidates_for(candidates: CandidatesLike, path: str, leaf: Any
                    ) -> tuple[Candidate, ...]:
  if callable(candidates) and not isinstance(candidates, (list, tuple)):
    got = candidates(path, leaf)
  elif isinstance(candidates, Mapping):
    if path not in candidates:
      raise CompressionError(
          "no candidates given for this layer; add its path to the "
          "candidates mapping or leave it out of the allocated layers "
          "(rules=[(path, None)])", path)
    got = candidates[path]
  else:
    got = candidates
  got = tuple(got)
  if not got:
    raise CompressionError(
        "empty candidate list; give at least one candidate (DENSE keeps the "
        "layer uncompressed)", path)
  for c in got:
    if not isinstance(c, Candidate):
      raise CompressionError(
          f"candidates must be Candidate objects (see allocate.candidate), "
          f"got {type(c).__name__}", path)
  labels = [c.label for c in got]
  if len(set(labels)) != len(labels):
    raise CompressionError(f"candidate labels repeat: {labels}; give each "
                           "its own label", path)
  return got


def selected_layers(params: Any, rules: Sequence[RuleLike] | None = None,
                    default: Predicate | None = default_filter
                    ) -> list[tuple[str, Any]]:
  """(path, leaf) of the layers an allocation covers, in tree order."""
  plan = resolve(params, {}, rules, default, transform="allocate")
  return [(p, l) for p, l in leaves_with_paths(params) if p in plan]


def build_table(params: Any, candidates: CandidatesLike, *,
                stats: Mapping[str, Any] | None = None,
                hessian_trace: Mapping[str, float] | None = None,
                fisher: Mapping[str, Any] | None = None,
                loss_fn: Callable[[Any, Any], Any] | None = None,
                batches: Sequence[Any] | None = None,
                rules: Sequence[RuleLike] | None = None,
                default: Predicate | None = default_filter,
                drop_unfit: bool = False,
                progress: Callable[[int, int], None] | None = None) -> Table:
  """Compresses every selected layer with each of its candidates once.

  Args:
    candidates: one list for every layer, a mapping path -> list, or a
      function (path, leaf) -> list.
    stats: `calibrate.capture` statistics: adds the 'output' proxy
      ||X dW||^2 = tr(dW^T X^T X dW) (no forward pass).
    hessian_trace: {path: Tr(H_l)} (`sensitivity.hessian_trace`): adds
      'hawq' = Tr(H_l)/n_l * ||dW||^2 / 2 (HAWQ-v2).
    fisher: {path: diagonal Fisher} (`sensitivity.fisher_diagonal`): adds
      'fisher' = sum F * dW^2 / 2.
    loss_fn, batches: adds 'loss', the exact change of the mean loss over
      `batches` when only this layer is compressed (slow ground truth).
    rules, default: which params are allocated (as for every transform).
    drop_unfit: leave out candidates that do not fit a layer (else raise).
  Every table has 'weight' = ||dW||_F^2. Bytes are `nbytes` of the leaf.
  """
  from compressjax.allocate import sensitivity  # scores live there

  layers = selected_layers(params, rules, default)
  if not layers:
    raise CompressionError("no layer selected for allocation; check rules "
                           "and default (the default picks float kernels of "
                           "rank >= 2, not embeddings, norms or biases)")
  if (loss_fn is None) != (batches is None):
    raise CompressionError("the 'loss' proxy needs both loss_fn and batches")
  ground = None
  if loss_fn is not None:
    ground = sensitivity.LossDelta(loss_fn, params, batches)
  total = sum(len(_candidates_for(candidates, p, l)) for p, l in layers)
  done = 0
  out = []
  for path, leaf in layers:
    cands = _candidates_for(candidates, path, leaf)
    w = materialize(leaf)
    kept, nbytes, scores = [], [], {}
    for cand in cands:
      try:
        comp = cand.compress(path, leaf)
      except CompressionError as e:
        if drop_unfit:
          done += 1
          continue
        raise CompressionError(
            f"candidate {cand.label!r} does not fit this layer of shape "
            f"{tuple(leaf.shape)}: {e}. Give this layer its own candidates "
            "(candidates=mapping or function of (path, leaf)) or pass "
            "drop_unfit=True", path) from None
      kept.append(cand)
      nbytes.append(int(array_nbytes(comp)))
      one = sensitivity.layer_scores(
          w, materialize(comp), path=path,
          gram=None if stats is None else _stats(stats, path).gram,
          trace=None if hessian_trace is None else _get(hessian_trace, path,
                                                        "hessian_trace"),
          fisher=None if fisher is None else _get(fisher, path, "fisher"))
      if ground is not None:
        one["loss"] = ground(path, comp)
      for k, v in one.items():
        scores.setdefault(k, []).append(v)
      done += 1
      if progress:
        progress(done, total)
    if not kept:
      raise CompressionError(
          f"none of the {len(cands)} candidates fits this layer of shape "
          f"{tuple(leaf.shape)}; give it candidates that fit", path)
    for k, v in scores.items():
      if not np.all(np.isfinite(v)):
        bad = [c.label for c, x in zip(kept, v) if not np.isfinite(x)]
        raise CompressionError(f"{k} score is not finite for candidates "
                               f"{bad}; check the statistics", path)
    out.append(LayerOptions(
        path=path, shape=tuple(leaf.shape), dense_bytes=int(array_nbytes(leaf)),
        candidates=tuple(kept), nbytes=np.asarray(nbytes, np.int64),
        scores={k: np.asarray(v, np.float64) for k, v in scores.items()}))
  return Table(tuple(out))


def _stats(stats, path):
  if path not in stats:
    raise CompressionError("no calibration statistics for this layer; "
                           "capture with the same rules", path)
  return stats[path]


def _get(m, path, what):
  if path not in m:
    raise CompressionError(f"{what} has no entry for this layer; compute it "
                           "over the same layers", path)
  return m[path]
