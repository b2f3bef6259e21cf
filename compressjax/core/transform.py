"""Compression transforms as small init/update pairs, composed with `chain`.

Like an optax `GradientTransformation`, a `Transform` is a pair of pure
functions:

  state = t.init(params)                 # resolve rules, validate, precompute
  new_params, state = t.update(params, state)

`init` resolves the rules into a per-path plan (and fails early, naming the
path, on bad configs); it may precompute things that span layers, such as a
global magnitude threshold. `update` rewrites the leaves. `t.apply(params)`
does both. `chain(t1, t2, ...)` applies transforms in turn, so
`chain(sparsify(...), quantize(...))` gives sparse + quantized leaves, and
`chain(a, b).apply(p)` is exactly `b.apply(a.apply(p))`.

Builders. A transform's per-param options are one `Options` dataclass
(`core/rules.py`); `@builder(TheOptions, positional=(...))` turns
`build(*args, options, rules, default)` into the public builder whose keyword
arguments are those options (plus `rules` and `default`), checked when it is
called: an unknown name fails with the nearest valid one, a value of the
wrong type or range fails naming the option, and the rules are compiled (each
rule's options checked) right there, before any param is seen.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

from compressjax.core.base import CompressedLeaf, is_concrete
from compressjax.core.errors import CompressionError
from compressjax.core.rules import (Options, Plan, Predicate, RulesLike,
                                    check_default, compile_rules,
                                    default_filter, nearest, resolve)
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
                   rules: RulesLike = None,
                   default: Predicate | None = default_filter,
                   precompute: Callable[[Any, Plan], Mapping[str, Any]] | None = None
                   ) -> Transform:
  """Builds a Transform that rewrites each selected leaf with `leaf_fn`.

  With a typed `base` (an `Options`), the rules are compiled (checked) here,
  when the transform is built."""
  check_default(default, name)
  if isinstance(base, Options):
    rules = compile_rules(rules, base)

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
    if not isinstance(state, LeafState):
      raise CompressionError(
          f"{name}.update needs the state its init returned, got "
          f"{type(state).__name__}")

    def one(path, leaf):
      if path not in state.plan:
        return leaf
      cfg = state.plan.configs[path]
      if check is not None:  # again: update may see other params than init
        check(path, leaf, cfg)
      out = leaf_fn(path, leaf, cfg, state)
      if isinstance(out, CompressedLeaf) and all(
          is_concrete(x) for x in jax.tree.leaves(out)):
        out.validate()
      return out
    return map_with_paths(one, params), state

  return Transform(init, update)


# ---------------------------------------------------------------------------
# chain
# ---------------------------------------------------------------------------

def _abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


class Chain(Transform):
  """Transforms applied in order (see `chain`); `parts` are the transforms."""

  parts: tuple[Transform, ...]

  def __new__(cls, *parts: Transform):
    for i, t in enumerate(parts):
      if not isinstance(t, Transform):
        what = type(t).__name__
        fix = ("; call it to build the transform (e.g. T.quantize(4), not "
               "T.quantize)" if callable(t) else "")
        raise CompressionError(f"chain: argument {i} is a {what}, not a "
                               f"Transform{fix}")
    n = len(parts)

    def init(params):
      # each part is initialized on what its predecessors produce
      states = []
      for k, t in enumerate(parts):
        s = t.init(params)
        states.append(s)
        if k + 1 < n:
          if _abstract(params):  # shapes only (jax.eval_shape): trace
            try:
              params = jax.eval_shape(lambda p, t=t, s=s: t.update(p, s)[0],
                                      params)
            except jax.errors.ConcretizationTypeError as e:
              raise CompressionError(
                  f"chain.init got shapes only (jax.ShapeDtypeStruct), but "
                  f"part {k} reads values to compress, so the parts after it "
                  "cannot be initialized on its output; pass concrete "
                  f"arrays ({type(e).__name__})") from None
          else:
            params, s = t.update(params, s)
            states[-1] = s
      return tuple(states)

    def update(params, states):
      if not isinstance(states, tuple) or len(states) != n:
        got = (f"a state of length {len(states)}" if isinstance(
            states, (tuple, list)) else f"a {type(states).__name__}")
        raise CompressionError(
            f"chain of {n} transforms got {got}; pass the tuple of {n} "
            "states this chain's init returned")
      new_states = []
      for t, s in zip(parts, states):
        params, s = t.update(params, s)
        new_states.append(s)
      return params, tuple(new_states)

    self = super().__new__(cls, init, update)
    self.parts = tuple(parts)
    return self

  def apply(self, params: Any) -> Any:
    for t in self.parts:  # one pass: no part runs twice
      params = t.apply(params)
    return params


def chain(*transforms: Transform) -> Transform:
  """Applies transforms in order; the state is the tuple of their states.

  Each part is initialized on the output of the parts before it, so
  `chain(a, b).apply(p)` and `chain(a, b).update(p, chain(a, b).init(p))`
  both equal `b.apply(a.apply(p))`, also when an `init` reads values (a
  global threshold, a predicate rule). `apply` runs each part once; the
  explicit init/update pair runs every part but the last twice (init needs
  their outputs). `update` refuses a state that is not `init`'s tuple.
  """
  return Chain(*transforms)


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------

_P = inspect.Parameter
_RESERVED = ("options", "rules", "default")


def builder(options_cls: type[Options], *, positional: Sequence[str] = ()):
  """Decorator: `build(*args, options, rules, default)` -> the public
  builder, whose arguments are build's own (e.g. `stats`, `groups`), the
  option fields (`positional` ones may be passed by position, after build's
  positional arguments) and `rules=None`, `default=default_filter`.

  Calling it checks every name (the nearest valid one on a typo), builds the
  options (type and range checks) and compiles the rules, then calls build.
  """
  names = options_cls.names()
  for p in positional:
    if p not in names:
      raise TypeError(f"positional option {p!r} is not a field of "
                      f"{options_cls.__name__}")

  def wrap(build):
    own = inspect.signature(build).parameters
    missing = [r for r in _RESERVED if r not in own]
    if missing:
      raise TypeError(f"{build.__name__} must take {missing}")
    lead = [p for p in own.values() if p.name not in _RESERVED and p.kind in (
        _P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    tail = [p for p in own.values() if p.name not in _RESERVED and
            p.kind is _P.KEYWORD_ONLY]
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = options_cls.hints()
    opt = lambda n, kind: _P(n, kind, default=fields[n].default,
                             annotation=hints[n])
    params = (lead + [opt(n, _P.POSITIONAL_OR_KEYWORD) for n in positional]
              + [opt(n, _P.KEYWORD_ONLY) for n in names if n not in positional]
              + tail + [_P("rules", _P.KEYWORD_ONLY, default=None,
                           annotation="RulesLike"),
                        _P("default", _P.KEYWORD_ONLY, default=default_filter,
                           annotation="Predicate | None")])
    sig = inspect.Signature(params, return_annotation=Transform)
    name = options_cls.transform
    accepted = tuple(sig.parameters)

    @functools.wraps(build)
    def public(*args, **kw):
      for k in kw:
        if k not in accepted:
          raise CompressionError(
              f"{name}: unknown argument {k!r}{nearest(k, accepted)} "
              f"(options: {', '.join(names)}; also "
              f"{', '.join(a for a in accepted if a not in names)})")
      try:
        bound = sig.bind(*args, **kw)
      except TypeError as e:
        raise CompressionError(f"{name}: {e}; see help({name})") from None
      bound.apply_defaults()
      a = dict(bound.arguments)
      opts = options_cls(**{n: a.pop(n) for n in names})
      rules = compile_rules(a.pop("rules"), opts)
      default = a.pop("default")
      check_default(default, name)
      return build(**a, options=opts, rules=rules, default=default)

    public.__signature__ = sig
    public.__doc__ = ((build.__doc__ or "").rstrip() +
                      "\n\nOptions (per param; rules override them):\n" +
                      options_cls.doc() +
                      "\n\nrules: list of rules or dict {pattern: options}; "
                      "default: predicate for unmatched params "
                      "(default_filter), None for rules only.")
    public.options = options_cls
    return public

  return wrap
