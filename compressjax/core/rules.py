"""Which params a transform touches: rules over '/'-joined param paths.

A rule is a regex (fullmatch against the path) or a predicate `(path, leaf) ->
bool`, with config overrides for the leaves it matches, or `skip=True` to leave
them alone. Rules are tried in order and the first match wins. A leaf that no
rule matches is compressed with the transform's base config when `default`
accepts it (by default: floating arrays of rank >= 2 that are not embeddings,
norms or biases). Rules that matched nothing are reported.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence, Union

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


@dataclasses.dataclass(frozen=True)
class Rule:
  """Config overrides for params whose path matches `pattern`.

  Attributes:
    pattern: regex, matched with `re.fullmatch` against the '/'-joined path, or
      a predicate `(path, leaf) -> bool`.
    config: keyword overrides of the transform's base config.
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

  def matches(self, path: str, leaf: Any) -> bool:
    if isinstance(self.pattern, str):
      return re.fullmatch(self.pattern, path) is not None
    return bool(self.pattern(path, leaf))

  @property
  def label(self) -> str:
    p = self.pattern
    return p if isinstance(p, str) else getattr(p, "__name__", repr(p))


RuleLike = Union[Rule, tuple, str]


def as_rule(r: RuleLike) -> Rule:
  """Accepts Rule, (pattern, config_dict), (pattern, None) = skip, or pattern."""
  if isinstance(r, Rule):
    return r
  if isinstance(r, str) or callable(r):
    return Rule(r)
  if isinstance(r, tuple) and len(r) == 2:
    pat, cfg = r
    return Rule(pat, skip=True) if cfg is None else Rule(pat, dict(cfg))
  raise CompressionError(f"cannot read {r!r} as a rule: use Rule(pattern, "
                         "config) or a (pattern, config_or_None) tuple")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Resolved rules: per-path config, and the rules that matched nothing."""

  configs: Mapping[str, Mapping[str, Any]]
  unmatched: tuple[str, ...]

  def __contains__(self, path: str) -> bool:
    return path in self.configs


def resolve(tree: Any, base: Mapping[str, Any],
            rules: Sequence[RuleLike] | None = None,
            default: Predicate | None = default_filter,
            transform: str = "transform") -> Plan:
  rules = [as_rule(r) for r in (rules or ())]
  hits = [0] * len(rules)
  configs = {}
  for path, leaf in leaves_with_paths(tree):
    for i, rule in enumerate(rules):
      if rule.matches(path, leaf):
        hits[i] += 1
        if not rule.skip:
          configs[path] = {**base, **rule.config}
        break
    else:
      if default is not None and default(path, leaf):
        configs[path] = dict(base)
  unmatched = tuple(r.label for r, h in zip(rules, hits) if h == 0)
  for label in unmatched:
    logging.warning("%s: rule %r matched no parameter", transform, label)
  return Plan(configs, unmatched)
