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
Each stage's inputs are cached per batch and the stage runs only its own part
of the model (`calibrate.program`: the traced program cut at stage
boundaries), so the cost is one forward plus one pass per stage, linear in
depth; models that cannot be cut rerun the whole model per stage (cost
#stages x forward, memory that of one-shot capture). Batches as `capture`'s
(token masks keep padding out of the statistics); the data's description is
logged and is each stage's `Stats.description`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.calibrate.capture import (Accumulator, Batch, LayerStats,
                                           Stats, batch_list, capture,
                                           describe, takes_mask)
from compressjax.calibrate.program import Program, param_leaves, under
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
  (abstract trace, no compute). `batch`: model args (an array or a tuple)
  or a `Batch`."""
  order: list[str] = []
  fn = as_function(model, params, method)
  if not isinstance(batch, Batch):
    batch = Batch(batch if isinstance(batch, tuple) else (batch,))

  def observe(path, x, dims):
    if path not in order:
      order.append(path)

  jax.eval_shape(lambda p, a, k: apply(fn, p, *a, observe=observe,
                                       observe_paths=frozenset(paths), **k),
                 params, batch.args, dict(batch.kwargs))
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
        if under(path, p):
          return p.rstrip("/")
      raise CompressionError(f"param is under none of the stage prefixes "
                             f"{list(stages)}; add one", path)
  out: dict[str, list[str]] = {}
  for p in order:
    out.setdefault(key(p), []).append(p)
  return list(out.items())


def _key(node: Any, part: str, prefix: str) -> Any:
  """The key of `node` whose path string is `part` (NNX lists have int
  keys: 'blocks/0' is node['blocks'][0])."""
  if isinstance(node, Mapping):
    for k in node:
      if str(k) == part:
        return k
  raise CompressionError(
      f"stage prefix {prefix!r} is not a sub-tree of nested mappings "
      f"(sequential calibration needs dict-like params: linen variables, an "
      f"nnx.State or its to_pure_dict())")


def _subtree(tree: Any, prefix: str) -> Any:
  node = tree
  keys = []
  for part in prefix.split("/"):
    k = _key(node, part, prefix)
    keys.append(k)
    node = node[k]
  for k in reversed(keys):
    node = {k: node}
  return node


def _graft(tree: Any, prefix: str, sub: Any) -> Any:
  """Copy of `tree` with the node at `prefix` replaced by sub's node there."""
  parts = prefix.split("/")
  for part in parts:
    sub = sub[_key(sub, part, prefix)]

  def put(node, parts):
    if not parts:
      return sub
    k = _key(node, parts[0], prefix)
    new = dict(node)
    new[k] = put(node[k], parts[1:])
    return new if type(node) is dict else type(node)(new)

  return put(tree, parts)


def _batches(model, batches, method, attention_mask) -> tuple[list, dict]:
  if attention_mask is None:
    attention_mask = takes_mask(model, method)
  out, source = batch_list(batches, attention_mask)
  if not out:
    raise CompressionError("calibration got no batches")
  return out, describe(out, source=source)


def one_shot(model: Any, params: Any, batches: Iterable[Any], build: Build, *,
             rules: Sequence[RuleLike] | None = None,
             default: Predicate | None = default_filter,
             method: str | Callable | None = None,
             attention_mask: bool | None = None) -> Any:
  """Capture once on the float model, compress every layer."""
  stats = capture(model, params, batches, rules=rules, default=default,
                  method=method, attention_mask=attention_mask)
  return build(stats).apply(params)


def _signature(b: Batch):
  return jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype))
                      if hasattr(x, "shape") else x,
                      (b.args, dict(b.kwargs), b.weights is None))


class _Cached:
  """Stage inputs cached per batch: one `Program` per batch signature. The
  methods take the tree's `param_leaves`, flattened once for all batches."""

  def __init__(self, fn, tree, blist, groups, observed_all):
    self.blist = blist
    self.programs = {}
    self.of_batch = []
    for b in blist:
      key = str(_signature(b))
      if key not in self.programs:
        self.programs[key] = Program(
            fn, tree, b.args, b.kwargs,
            [(prefix, paths) for prefix, paths in groups])
      self.of_batch.append(self.programs[key])
    whys = {p.why for p in self.programs.values() if p.why}
    self.why = "; ".join(sorted(whys)) if whys else None
    self.live = None

  def start(self, leaves):
    self.live = [p.start(leaves, b.args, b.kwargs)
                 for p, b in zip(self.of_batch, self.blist)]

  def stats(self, i, leaves, shapes, want) -> dict[str, LayerStats]:
    acc = Accumulator()
    for k, (p, b, live) in enumerate(zip(self.of_batch, self.blist,
                                         self.live)):
      w = None if b.weights is None else jnp.asarray(b.weights)
      acc.add(k, p.observe(i, leaves, live, w, shapes))
    return acc.result(want)

  def advance(self, i, leaves):
    self.live = [p.advance(i, leaves, live)
                 for p, live in zip(self.of_batch, self.live)]


def sequential(model: Any, params: Any, batches: Iterable[Any], build: Build,
               *, stages: Sequence[str] | Callable[[str], str] | None = None,
               rules: Sequence[RuleLike] | None = None,
               default: Predicate | None = default_filter,
               method: str | Callable | None = None,
               progress: bool | Callable[[str], None] = True,
               attention_mask: bool | None = None,
               cache_inputs: bool = True) -> Any:
  """Compresses stage by stage, each calibrated on the outputs of the
  already-compressed stages before it. `rules`/`default` select the params
  to calibrate (as for `capture`); `build`'s transform decides how; batches
  and `attention_mask` as for `capture`. With `cache_inputs` (default) each
  stage runs only its own part of the model on cached inputs
  (`calibrate.program`); models that cannot be cut, or False, rerun the
  whole model per stage."""
  blist, desc = _batches(model, batches, method, attention_mask)
  log = (progress if callable(progress) else
         (lambda m: logging.info("%s", m)) if progress else (lambda m: None))
  logging.info("calibration data: %s", json.dumps(desc, default=str))
  plan = resolve(params, {}, rules, default, transform="sequential")
  order = execution_order(model, params, blist[0], plan.configs, method)
  unused = sorted(set(plan.configs) - set(order))
  if unused:
    raise CompressionError(f"selected params never used by a matmul or "
                           f"convolution: {unused[:5]}; skip them with a "
                           "rule")
  groups = stages_of(order, stages)
  shapes = {p: tuple(x.shape) for p, x in leaves_with_paths(params)
            if p in plan.configs}
  tree = params
  leaves = None  # the current tree flattened (once per stage)
  cache = None
  if cache_inputs:
    cache = _Cached(as_function(model, params, method), tree, blist, groups,
                    plan.configs)
    if cache.why:
      log(f"sequential: rerunning the whole model per stage ({cache.why})")
      cache = None
    else:
      leaves = param_leaves(tree)
      cache.start(leaves)
  start = time.time()
  for i, (prefix, paths) in enumerate(groups):
    t0 = time.time()
    want = frozenset(paths)
    if cache is not None:
      stats = Stats(cache.stats(i, leaves, shapes, paths), desc)
    else:
      stats = capture(model, tree, blist, default=lambda p, x: p in want,
                      method=method, attention_mask=attention_mask)
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
    t2 = time.time()
    if cache is not None and i + 1 < len(groups):
      leaves = param_leaves(tree)  # also the next stage's statistics'
      cache.advance(i, leaves)
      jax.block_until_ready(cache.live)
    log(f"stage {i + 1}/{len(groups)} {prefix}: {len(paths)} layers, "
        f"calibrated {t1 - t0:.1f}s, compressed {t2 - t1:.1f}s"
        + (f", inputs of the next {time.time() - t2:.1f}s"
           if cache is not None else "")
        + f" (total {time.time() - start:.0f}s)")
  return tree
