"""Calibrated compression, one-shot or sequential (block by block).

One-shot: capture every layer's statistics on the float model once, then
compress all layers (fast; each layer sees float inputs).

Sequential (GPTQ, Frantar et al. 2022, Sec. 4 "step-by-step"; SparseGPT,
Frantar & Alistarh 2023, Sec. 3.5): the selected params are split into stages
in execution order, by default one per block (the path up to the first
component ending in `_<n>`, e.g. 'params/block_3'; params outside blocks, like
the head, are a stage each). Stage i is calibrated by running the model with
stages < i already compressed, so each layer is fitted to the inputs it will
really see, errors of earlier blocks included.

`build(stats)` returns the calibrated transform (e.g.
`lambda s: gptq(s, 4, group_size=128)`); for each stage it is applied to the
sub-tree of params under the stage's prefix (params in the same block that are
not compressed, e.g. norms, are there for transforms that fold into them).
Every stage runs the whole model over the calibration batches: cost is
(#stages x forward), simple and model-agnostic; memory stays that of one-shot
capture.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp

from compressjax.calibrate.capture import LayerStats, capture
from compressjax.core.errors import CompressionError
from compressjax.core.rules import Predicate, RuleLike, default_filter, resolve
from compressjax.core.tree import leaves_with_paths
from compressjax.runtime.interpret import apply, as_function
from compressjax.core.transform import Transform

Build = Callable[[Mapping[str, LayerStats]], Transform]
_INDEXED = re.compile(r"(.*_)?\d+$")


def execution_order(model: Any, params: Any, batch: Any, paths,
                    method=None) -> list[str]:
  """Selected param paths in the order the forward pass multiplies by them
  (abstract trace, no compute)."""
  order: list[str] = []
  fn = as_function(model, params, method)
  args = batch if isinstance(batch, tuple) else (batch,)

  def observe(path, x, dims):
    if path not in order:
      order.append(path)

  jax.eval_shape(lambda p, a: apply(fn, p, *a, observe=observe,
                                    observe_paths=frozenset(paths)),
                 params, args)
  return order


def block_prefix(path: str) -> str:
  """'params/block_3/attn/query/kernel' -> 'params/block_3'; a param outside
  indexed blocks is its own module: 'params/head/kernel' -> 'params/head'."""
  parts = path.split("/")
  for i, p in enumerate(parts[:-1]):
    if _INDEXED.fullmatch(p):
      return "/".join(parts[:i + 1])
  return "/".join(parts[:-1])


def stages_of(order: Sequence[str],
              stages: Sequence[str] | Callable[[str], str] | None = None
              ) -> list[tuple[str, list[str]]]:
  """Groups paths (in execution order) into (prefix, paths) stages.

  `stages`: None (one per block, `block_prefix`), a function path -> prefix,
  or a list of prefixes (each path goes to the longest prefix it starts
  with; a path under none is an error)."""
  if stages is None:
    key = block_prefix
  elif callable(stages):
    key = stages
  else:
    prefixes = sorted(stages, key=len, reverse=True)

    def key(path):
      for p in prefixes:
        if path == p or path.startswith(p.rstrip("/") + "/"):
          return p.rstrip("/")
      raise CompressionError(f"param is under none of the stage prefixes "
                             f"{list(stages)}; add one", path)
  out: dict[str, list[str]] = {}
  for p in order:
    out.setdefault(key(p), []).append(p)
  return list(out.items())


def _subtree(tree: Any, prefix: str) -> Any:
  node = tree
  for part in prefix.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise CompressionError(
          f"stage prefix {prefix!r} is not a sub-tree of nested dicts "
          f"(sequential calibration needs dict params, e.g. linen variables "
          f"or nnx.State.to_pure_dict())")
    node = node[part]
  return _nest(prefix, node)


def _nest(prefix: str, node: Any) -> Any:
  for part in reversed(prefix.split("/")):
    node = {part: node}
  return node


def _graft(tree: Any, prefix: str, sub: Any) -> Any:
  """Copy of `tree` with the node at `prefix` replaced by sub's node there."""
  for part in prefix.split("/"):
    sub = sub[part]

  def put(node, parts):
    if not parts:
      return sub
    new = dict(node)
    new[parts[0]] = put(node[parts[0]], parts[1:])
    return type(node)(new) if not isinstance(node, dict) else new

  return put(tree, prefix.split("/"))


def _batches(batches: Iterable[Any]) -> list[Any]:
  out = list(batches)
  if not out:
    raise CompressionError("calibration got no batches")
  return out


def one_shot(model: Any, params: Any, batches: Iterable[Any], build: Build, *,
             rules: Sequence[RuleLike] | None = None,
             default: Predicate | None = default_filter,
             method: str | Callable | None = None) -> Any:
  """Capture once on the float model, compress every layer."""
  stats = capture(model, params, _batches(batches), rules=rules,
                  default=default, method=method)
  return build(stats).apply(params)


def sequential(model: Any, params: Any, batches: Iterable[Any], build: Build,
               *, stages: Sequence[str] | Callable[[str], str] | None = None,
               rules: Sequence[RuleLike] | None = None,
               default: Predicate | None = default_filter,
               method: str | Callable | None = None,
               progress: bool | Callable[[str], None] = True) -> Any:
  """Compresses stage by stage, each calibrated on the outputs of the
  already-compressed stages before it. `rules`/`default` select the params
  to calibrate (as for `capture`); `build`'s transform decides how."""
  batches = _batches(batches)
  log = (progress if callable(progress) else
         (lambda m: logging.info("%s", m)) if progress else (lambda m: None))
  plan = resolve(params, {}, rules, default, transform="sequential")
  order = execution_order(model, params, batches[0], plan.configs, method)
  unused = sorted(set(plan.configs) - set(order))
  if unused:
    raise CompressionError(f"selected params never used by a matmul: "
                           f"{unused[:5]}; skip them with a rule")
  groups = stages_of(order, stages)
  tree = params
  start = time.time()
  for i, (prefix, paths) in enumerate(groups):
    t0 = time.time()
    want = frozenset(paths)
    stats = capture(model, tree, batches, default=lambda p, x: p in want,
                    method=method)
    t1 = time.time()
    sub = _subtree(tree, prefix)
    # Rules aimed at other stages match nothing here: not worth a warning.
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
      out = build(stats).apply(sub)
    finally:
      logging.set_verbosity(level)
    jax.block_until_ready(jax.tree.leaves(out))
    tree = _graft(tree, prefix, out)
    log(f"stage {i + 1}/{len(groups)} {prefix}: {len(paths)} layers, "
        f"calibrated {t1 - t0:.1f}s, compressed {time.time() - t1:.1f}s "
        f"(total {time.time() - start:.0f}s)")
  return tree
