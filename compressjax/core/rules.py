"""Which params a transform touches, and with which options.

Options. Each transform declares its per-param options once, as a frozen
dataclass subclassing `Options` (built with the `@options` decorator); every
field is an `option(default, doc, check=..., must=...)`. That one declaration
gives the defaults, the builder's keyword arguments (`transform.builder`), the
docs (`Options.doc()`), the type and range checks (run whenever an instance is
made) and the "did you mean" of an unknown name. An `Options` instance is also
a read-only Mapping (name -> value), so leaf functions take `**options`.

Rules. A rule is a regex (fullmatch against the '/'-joined param path) or a
predicate `(path, leaf) -> bool`, with option overrides (a dict, or a whole
`Options` instance of the transform) for the leaves it matches, or
`skip=True` (a `(pattern, None)` tuple) to leave them alone. `rules` is a
list (first match wins) or a dict {pattern: config} (in insertion order). A
transform builder compiles its rules when it is built (`compile_rules`): an
unknown option, a value of the wrong type or out of range fails there, naming
the transform, the rule's pattern and the nearest valid option name. A leaf
that no rule matches gets the transform's base options when `default` accepts
it (`default_filter`: floating arrays of rank >= 2 that are not embeddings,
norms or biases); `default=None` means "rules only": nothing else is touched.
Rules that matched nothing are reported (logged, and in `Plan.unmatched`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import types
import typing
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, Union

import numpy as np
from absl import logging

from compressjax.core.errors import CompressionError
from compressjax.core.tree import is_float_dtype, leaves_with_paths

Predicate = Callable[[str, Any], bool]

_EXCLUDED = re.compile(r"(?i).*(embed|norm|bias).*")


def default_filter(path: str, leaf: Any) -> bool:
  """2-D and larger float kernels; not embeddings, norms or biases."""
  if not hasattr(leaf, "shape") or len(leaf.shape) < 2:
    return False
  if not is_float_dtype(leaf.dtype):
    return False
  return _EXCLUDED.fullmatch(path) is None


# ---------------------------------------------------------------------------
# Typed options
# ---------------------------------------------------------------------------

def nearest(name: str, valid: Sequence[str]) -> str:
  """' (did you mean 'x'?)' for the closest valid name, or ''."""
  m = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
  return f"; did you mean {m[0]!r}?" if m else ""


def option(default: Any, doc: str = "", *,
           check: Callable[[Any], bool] | None = None,
           must: str = "", hint: str = "") -> Any:
  """One option: its default, a line of doc, and an optional value check
  (`check(value)` true when valid; `must` says what is required, e.g.
  "be >= 0"; `hint` is added to any error, e.g. where else to look). None
  passes the check when the type allows None."""
  return dataclasses.field(default=default, metadata=dict(
      doc=doc, check=check, must=must, hint=hint))


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool,
                                                                np.bool_))


def _type_ok(v: Any, hint: Any) -> bool:
  if hint is Any:
    return True
  if hint is None or hint is type(None):
    return v is None
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    return any(_type_ok(v, h) for h in typing.get_args(hint))
  if origin is typing.Literal:
    return any(v is a if a is None or isinstance(a, bool) else
               (type(v) is type(a) and v == a) for a in typing.get_args(hint))
  if origin is tuple:
    args = typing.get_args(hint)
    if not isinstance(v, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_type_ok(x, args[0]) for x in v)
    return len(args) == len(v) and all(map(_type_ok, v, args))
  if hint is int:
    return _is_int(v)
  if hint is float:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
  if hint is bool:
    return isinstance(v, (bool, np.bool_))
  if origin is not None and origin.__module__ == "collections.abc":
    return callable(v) if origin.__name__ == "Callable" else isinstance(
        v, origin)
  return isinstance(v, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
  if hint is None or hint is type(None):
    return "None"
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    return " or ".join(_type_name(h) for h in typing.get_args(hint))
  if origin is typing.Literal:
    return "one of " + ", ".join(map(repr, typing.get_args(hint)))
  if origin is tuple:
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
      return f"a tuple of {_type_name(args[0])}"
    return f"a tuple ({', '.join(map(_type_name, args))})"
  if origin is not None:
    return getattr(origin, "__name__", str(hint))
  return getattr(hint, "__name__", str(hint))


def _literal_values(hint: Any) -> tuple:
  origin = typing.get_origin(hint)
  if origin is typing.Literal:
    return typing.get_args(hint)
  if origin in (Union, types.UnionType):
    return sum((_literal_values(h) for h in typing.get_args(hint)), ())
  return ()


def _wants_tuple(hint: Any) -> bool:
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    return any(_wants_tuple(h) for h in typing.get_args(hint))
  return origin is tuple


class Options(Mapping):
  """Base of a transform's per-param options (see the module doc).

  Subclasses are made with `@options` and set `transform` (the name used in
  errors). Instances are frozen, validated, hashable when their values are,
  and read as a Mapping of option name -> value.
  """

  transform: ClassVar[str] = "transform"

  # -- validation -------------------------------------------------------
  @classmethod
  def hints(cls) -> dict[str, Any]:
    h = cls.__dict__.get("_hints")
    if h is None:
      h = typing.get_type_hints(cls)
      cls._hints = h
    return {f.name: h[f.name] for f in dataclasses.fields(cls)}

  @classmethod
  def names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  def __post_init__(self):
    hints = self.hints()
    for f in dataclasses.fields(self):
      v, hint = getattr(self, f.name), hints[f.name]
      extra = f"; {f.metadata['hint']}" if f.metadata.get("hint") else ""
      if isinstance(v, list) and _wants_tuple(hint):
        v = tuple(v)  # frozen and hashable
        object.__setattr__(self, f.name, v)
      if not _type_ok(v, hint):
        lits = _literal_values(hint)
        if isinstance(v, str) and lits:  # a misspelt choice
          got = nearest(v, [a for a in lits if isinstance(a, str)])
        else:
          got = f", got {type(v).__name__}"
        raise CompressionError(
            f"{self.transform}: option {f.name}={v!r} must be "
            f"{_type_name(hint)}{got}{extra}")
      check = f.metadata.get("check")
      if check is not None and v is not None and not check(v):
        raise CompressionError(
            f"{self.transform}: option {f.name}={v!r} must "
            f"{f.metadata.get('must') or 'pass its check'}{extra}")

  @classmethod
  def unknown(cls, keys, where: str = "") -> None:
    """Raises on the first key that is not an option, naming the nearest."""
    names = cls.names()
    for k in keys:
      if k not in names:
        raise CompressionError(
            f"{cls.transform}{where}: unknown option {k!r}"
            f"{nearest(str(k), names)} (options: {', '.join(names)})")

  @classmethod
  def make(cls, where: str = "", **kw) -> "Options":
    cls.unknown(kw, where)
    return cls(**kw)

  def replace(self, where: str = "", **kw) -> "Options":
    """A validated copy with some options changed."""
    self.unknown(kw, where)
    return dataclasses.replace(self, **kw)

  # -- docs ---------------------------------------------------------------
  @classmethod
  def doc(cls) -> str:
    hints = cls.hints()
    lines = []
    for f in dataclasses.fields(cls):
      lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default "
                   f"{f.default!r}): {f.metadata.get('doc', '')}".rstrip())
    return "\n".join(lines)

  # -- Mapping ------------------------------------------------------------
  def __getitem__(self, k: str) -> Any:
    if k not in self.names():
      raise KeyError(k)
    return getattr(self, k)

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(dataclasses.fields(self))


def options(cls: type) -> type:
  """Class decorator: a frozen, keyword-only Options dataclass."""
  if not issubclass(cls, Options):
    raise TypeError(f"{cls.__name__} must subclass Options")
  cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
  cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\nOptions:\n" + cls.doc()
  return cls


def finite(lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> Callable:
  """Check: a finite number in [lo, hi] (open ends as asked)."""
  def ok(v):
    v = float(v)
    if not math.isfinite(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)
  return ok


def interval(lo=None, hi=None, *, lo_open=False, hi_open=False) -> dict:
  """check= and must= of a finite number in an interval."""
  a = "(" if lo_open else "["
  b = ")" if hi_open else "]"
  if hi is None:
    must = f"be a finite number {'>' if lo_open else '>='} {lo}"
  elif lo is None:
    must = f"be a finite number {'<' if hi_open else '<='} {hi}"
  else:
    must = f"be in {a}{lo}, {hi}{b}"
  return dict(check=finite(lo, hi, lo_open=lo_open, hi_open=hi_open),
              must=must)


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """Options for params whose path matches `pattern`.

  Attributes:
    pattern: regex, matched with `re.fullmatch` against the '/'-joined path, or
      a predicate `(path, leaf) -> bool`.
    config: overrides of the transform's base options (a dict), or a whole
      `Options` instance of that transform. Checked when the transform is
      built.
    skip: leave matching params uncompressed.
  """

  pattern: Union[str, Predicate]
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  skip: bool = False

  def __post_init__(self):
    if isinstance(self.pattern, str):
      try:
        re.compile(self.pattern)
      except re.error as e:
        raise CompressionError(
            f"rule regex {self.pattern!r} does not compile ({e}); fix the "
            "pattern or escape special characters with re.escape") from None
    elif not callable(self.pattern):
      raise CompressionError(
          f"rule pattern must be a regex string or a predicate (path, leaf) -> "
          f"bool, got {type(self.pattern).__name__}")
    if not isinstance(self.config, Mapping):
      raise CompressionError(
          f"rule {self.label!r}: config must be a dict of options (or an "
          f"Options instance; None in a (pattern, None) tuple skips), got "
          f"{type(self.config).__name__}")
    if not isinstance(self.skip, (bool, np.bool_)):
      raise CompressionError(f"rule {self.label!r}: skip must be a bool, got "
                             f"{type(self.skip).__name__}")

  def matches(self, path: str, leaf: Any) -> bool:
    if isinstance(self.pattern, str):
      return re.fullmatch(self.pattern, path) is not None
    return bool(self.pattern(path, leaf))

  @property
  def label(self) -> str:
    p = self.pattern
    return p if isinstance(p, str) else getattr(p, "__name__", repr(p))


RuleLike = Union[Rule, tuple, str, Predicate]
RulesLike = Union[Sequence[RuleLike], Mapping[Any, Any], None]


def as_rule(r: RuleLike) -> Rule:
  """Accepts Rule, (pattern, config), (pattern, None) = skip, or pattern."""
  if isinstance(r, Rule):
    return r
  if isinstance(r, str) or callable(r):
    return Rule(r)
  if isinstance(r, tuple) and len(r) == 2:
    pat, cfg = r
    return Rule(pat, skip=True) if cfg is None else Rule(pat, cfg)
  raise CompressionError(f"cannot read {r!r} as a rule: use Rule(pattern, "
                         "config) or a (pattern, config_or_None) tuple")


def _looks_like_one_rule(rules: Any) -> bool:
  return (isinstance(rules, tuple) and len(rules) == 2
          and (isinstance(rules[0], str) or callable(rules[0]))
          and (rules[1] is None or isinstance(rules[1], Mapping)))


def as_rules(rules: RulesLike, transform: str = "transform"
             ) -> tuple[Rule, ...]:
  """A list of rule-likes, or a dict {pattern: config_or_None}, as Rules."""
  if rules is None:
    return ()
  if isinstance(rules, Mapping):
    return tuple(as_rule((k, v)) for k, v in rules.items())
  if isinstance(rules, (str, Rule)) or _looks_like_one_rule(rules):
    raise CompressionError(
        f"{transform}: rules must be a list of rules (or a dict {{pattern: "
        f"config}}), got the single rule {rules!r}; wrap it in a list: rules=[...]")
  if not isinstance(rules, Sequence):
    raise CompressionError(
        f"{transform}: rules must be a list of rules or a dict {{pattern: "
        f"config}}, got {type(rules).__name__}")
  return tuple(as_rule(r) for r in rules)


def compile_rules(rules: RulesLike, base: Options) -> tuple[Rule, ...]:
  """Rules with their configs made into the full, validated options they
  give a matching param (base overridden by the rule's keys)."""
  cls = type(base)
  out = []
  for r in as_rules(rules, cls.transform):
    if r.skip:
      out.append(r)
      continue
    where = f": rule {r.label!r}"
    cfg = r.config
    try:
      if isinstance(cfg, Options):
        if type(cfg) is not cls:
          raise CompressionError(
              f"{cls.transform}{where}: config is a {type(cfg).__name__}, "
              f"not {cls.__name__}; give a dict of overrides or a "
              f"{cls.__name__}")
        opts = cfg
      else:
        opts = base.replace(where, **dict(cfg))
    except CompressionError as e:
      msg = str(e)
      if where not in msg:  # a type / range error raised by the dataclass
        msg = msg.replace(f"{cls.transform}: ", f"{cls.transform}{where}: ",
                          1)
      raise CompressionError(msg) from None
    out.append(dataclasses.replace(r, config=opts))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Resolved rules: per-path options, and the rules that matched nothing."""

  configs: Mapping[str, Mapping[str, Any]]
  unmatched: tuple[str, ...]

  def __contains__(self, path: str) -> bool:
    return path in self.configs


def check_default(default: Any, transform: str = "transform") -> None:
  if default is not None and not callable(default):
    raise CompressionError(
        f"{transform}: default must be a predicate (path, leaf) -> bool, or "
        f"None for rules only, got {type(default).__name__}")


def resolve(tree: Any, base: Mapping[str, Any],
            rules: RulesLike = None,
            default: Predicate | None = default_filter,
            transform: str = "transform") -> Plan:
  """Per-path options of the selected leaves (first matching rule, else the
  base options where `default` accepts the leaf; None: rules only). With a
  typed `base` (Options) the rules are compiled (checked) first."""
  check_default(default, transform)
  if isinstance(base, Options):
    rules = compile_rules(rules, base)
  else:
    rules = as_rules(rules, transform)
  hits = [0] * len(rules)
  configs = {}
  for path, leaf in leaves_with_paths(tree):
    for i, rule in enumerate(rules):
      if rule.matches(path, leaf):
        hits[i] += 1
        if not rule.skip:
          configs[path] = (rule.config if isinstance(rule.config, Options)
                           else {**base, **rule.config})
        break
    else:
      if default is not None and default(path, leaf):
        configs[path] = base if isinstance(base, Options) else dict(base)
  unmatched = tuple(r.label for r, h in zip(rules, hits) if h == 0)
  for label in unmatched:
    logging.warning("%s: rule %r matched no parameter", transform, label)
  return Plan(configs, unmatched)
