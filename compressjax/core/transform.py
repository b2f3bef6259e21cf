"""Compression transforms as small init/update pairs, composed with `chain`.

Like an optax `GradientTransformation`, a `Transform` is a pair of pure
functions:

  state = t.init(params)                 # resolve rules, validate, precompute
  new_params, state = t.update(params, state)

`init` resolves the rules into a per-path plan (and fails early, naming the
path, on bad configs); it may precompute things that span layers, such as a
global magnitude threshold. `update` rewrites the leaves. `t.apply(params)`
does both. `chain(t1, t2, ...)` applies transforms in turn, so
`chain(sparsify(...), quantize(...))` gives sparse + quantized leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

from compressjax.core.base import CompressedLeaf, is_concrete
from compressjax.core.errors import CompressionError
from compressjax.core.rules import Plan, Predicate, RuleLike, default_filter, resolve
from compressjax.core.tree import is_float_array, leaves_with_paths, map_with_paths


class Transform(NamedTuple):
  init: Callable[[Any], Any]
  update: Callable[[Any, Any], tuple[Any, Any]]

  def apply(self, params: Any) -> Any:
    out, _ = self.update(params, self.init(params))
    return out


@dataclasses.dataclass(frozen=True)
class LeafState:
  """State of a leaf-wise transform: the plan, plus anything precomputed."""

  plan: Plan
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def unmatched_rules(self) -> tuple[str, ...]:
    return self.plan.unmatched


LeafFn = Callable[[str, Any, Mapping[str, Any], LeafState], Any]
CheckFn = Callable[[str, Any, Mapping[str, Any]], None]


def check_float_leaf(path: str, leaf: Any) -> None:
  """Rejects non-float leaves and (for concrete arrays) NaN or Inf."""
  if isinstance(leaf, CompressedLeaf):
    return
  if not is_float_array(leaf):
    raise CompressionError(
        f"cannot compress a non-float leaf of dtype "
        f"{getattr(leaf, 'dtype', type(leaf).__name__)}; add a rule "
        f"(pattern, None) that skips it", path)
  if is_concrete(leaf) and not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
    raise CompressionError(
        "weight contains NaN or Inf; fix the checkpoint or skip this param "
        "with a rule", path)


def leaf_transform(name: str, base: Mapping[str, Any], leaf_fn: LeafFn,
                   check: CheckFn | None = None,
                   rules: Sequence[RuleLike] | None = None,
                   default: Predicate | None = default_filter,
                   precompute: Callable[[Any, Plan], Mapping[str, Any]] | None = None
                   ) -> Transform:
  """Builds a Transform that rewrites each selected leaf with `leaf_fn`."""

  def init(params):
    plan = resolve(params, base, rules, default, transform=name)
    for path, leaf in leaves_with_paths(params):
      if path in plan:
        check_float_leaf(path, leaf)
        if check is not None:
          check(path, leaf, plan.configs[path])
    extra = precompute(params, plan) if precompute else {}
    return LeafState(plan, extra)

  def update(params, state):
    def one(path, leaf):
      if path not in state.plan:
        return leaf
      cfg = state.plan.configs[path]
      if check is not None:  # again: a chained leaf may differ from init's
        check(path, leaf, cfg)
      out = leaf_fn(path, leaf, cfg, state)
      if isinstance(out, CompressedLeaf) and all(
          is_concrete(x) for x in jax.tree.leaves(out)):
        out.validate()
      return out
    return map_with_paths(one, params), state

  return Transform(init, update)


def chain(*transforms: Transform) -> Transform:
  """Applies transforms in order; state is the tuple of their states.

  As in optax, every part is initialized on the same params; each part's
  `update` sees the output of the parts before it (and re-checks its config
  against the leaf it actually gets), so `chain(a, b).apply(p)` equals
  `b.apply(a.apply(p))`.
  """

  def init(params):
    return tuple(t.init(params) for t in transforms)

  def update(params, states):
    new_states = []
    for t, s in zip(transforms, states):
      params, s = t.update(params, s)
      new_states.append(s)
    return params, tuple(new_states)

  return Transform(init, update)
