"""A model's program cut at stage boundaries, for sequential calibration.

Sequential calibration (GPTQ Sec. 4; SparseGPT Sec. 3.5) compresses stage by
stage, each calibrated on the inputs the compressed stages before it produce.
Rerunning the whole model per stage costs (#stages x forward), growing with
depth squared. Instead, the model (any linen / NNX module or function) is
traced once per batch shape into one flat jaxpr, and cut where each stage
starts: before the first equation that reads a param under the stage's
prefix (its norms included). The values alive at a cut (the residual stream,
masks, rotary tables: whatever later equations read) are the stage's
inputs; they are cached per batch, and each stage runs only its own segment
of the program: once with its float params and observers (statistics), once
with its compressed params (the next stage's inputs). Cost: one forward in
total, plus one segment per stage; memory: two sets of cut values per batch.

Why the program and not a per-block function from the model zoo: it needs
nothing from the model (user models, NNX, decoders with masks and rotary
embeddings alike), and the cut values are exactly what flows in, whatever the
block computes. Segments that print the same (identical blocks) share one
compiled function, so compilation does not grow with depth either.

A model is not cut (`Program.why` says why; sequential then reruns the whole
model per stage) when a stage's params are read before an earlier stage's
(a scan over stacked layers, one call spanning several blocks), when an
observed param's matmul falls outside its own stage's segment, or when a
param itself (not a value computed from it) would cross a cut.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from compressjax.core.base import CompressedLeaf
from compressjax.core.tree import is_compressed, leaves_with_paths
from compressjax.runtime.interpret import Lazy, eval_jaxpr


def _is_var(v) -> bool:
  return not isinstance(v, jcore.Literal)


def under(path: str, prefix: str) -> bool:
  """`path` is `prefix` or a param inside it."""
  return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def param_leaves(params: Any) -> list:
  """The flat list of params (compressed leaves whole) that `Program`'s
  methods take: flatten a tree once and run every batch's program on it."""
  return jax.tree.leaves(params, is_leaf=is_compressed)


_FNS: dict[Any, Callable] = {}  # compiled segment functions, by structure
_MAX_FNS = 256


def _segment_fn(kind: str, jaxpr, text: str, observed: tuple,
                shapes: tuple) -> Callable:
  """One jitted function per distinct segment (its printed form `text`) and
  use: kind 'observe' -> {position: LayerStats}; 'advance' -> the values at
  the segment's end."""
  from compressjax.calibrate.capture import observer  # no import cycle
  key = (kind, text, observed, shapes)
  if key in _FNS:
    return _FNS[key]
  if len(_FNS) >= _MAX_FNS:
    _FNS.pop(next(iter(_FNS)))

  def values(pvals, observe):
    out = []
    for j, x in enumerate(pvals):
      obs = observe if j in observed else None
      if isinstance(x, CompressedLeaf):
        out.append(Lazy(x, x.dense_dtype, f"#{j}", obs))
      else:
        out.append(Lazy(x, x.dtype, f"#{j}", obs) if obs else x)
    return out

  if kind == "observe":
    def fn(pvals, live, consts, weights):
      found, observe = observer(weights, dict(
          (f"#{j}", s) for j, s in zip(observed, shapes)))
      eval_jaxpr(jaxpr, (), *values(pvals, observe), *live, *consts)
      return found
  else:
    def fn(pvals, live, consts):
      outs = eval_jaxpr(jaxpr, (), *values(pvals, None), *live, *consts)
      return [o.force() if isinstance(o, Lazy) else o for o in outs]
  _FNS[key] = jax.jit(fn)
  return _FNS[key]


class Program:
  """The flat program of `fn(params, *args, **kwargs)` for one batch
  signature, cut before each stage (see the module doc).

  Args:
    fn: the model as a function of (params, *args, **kwargs).
    params: the tree (float, or partly compressed).
    args, kwargs: one batch's model inputs (arrays are traced).
    stages: (prefix, observed paths) per stage, in execution order.
  """

  def __init__(self, fn: Callable, params: Any, args: tuple,
               kwargs: Mapping[str, Any],
               stages: Sequence[tuple[str, Sequence[str]]]):
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_compressed)
    self.paths = [p for p, _ in leaves_with_paths(params)]
    arg_leaves, arg_def = jax.tree.flatten((tuple(args), dict(kwargs)))
    self.dyn = [i for i, x in enumerate(arg_leaves) if hasattr(x, "shape")]

    def flat_fn(tree_leaves, dyn_args):
      al = list(arg_leaves)
      for i, x in zip(self.dyn, dyn_args):
        al[i] = x
      a, k = jax.tree.unflatten(arg_def, al)
      return fn(jax.tree.unflatten(treedef, tree_leaves), *a, **k)

    spec = lambda x: jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(  # noqa
        x.dense_dtype if isinstance(x, CompressedLeaf) else x.dtype))
    closed = jax.make_jaxpr(flat_fn)(
        [spec(x) for x in leaves], [spec(arg_leaves[i]) for i in self.dyn])
    self.jaxpr, self.consts = closed.jaxpr, list(closed.consts)
    self.n_params = len(leaves)
    self.stages = [(p, tuple(obs)) for p, obs in stages]
    self.why = self._cut()

  # -- analysis ---------------------------------------------------------------

  def _cut(self) -> str | None:
    jx = self.jaxpr
    pvar = {v: self.paths[i] for i, v in enumerate(jx.invars[:self.n_params])}
    # a param, or a cast of one: stays a lazy param value at run time
    lazy = dict(pvar)
    reads: list[set[str]] = []
    for e in jx.eqns:
      got = {lazy[v] for v in e.invars if _is_var(v) and v in lazy}
      reads.append(got)
      if e.primitive.name == "convert_element_type" and got:
        lazy[e.outvars[0]] = next(iter(got))
    stage_of = {}
    for i, (prefix, _) in enumerate(self.stages):
      for p in self.paths:
        if under(p, prefix):
          stage_of.setdefault(p, i)
    first = [None] * len(self.stages)
    for e, got in enumerate(reads):
      for p in got:
        i = stage_of.get(p)
        if i is not None and first[i] is None:
          first[i] = e
    if any(c is None for c in first):
      return "a stage's params are never read"
    if any(a >= b for a, b in zip(first, first[1:])):
      return ("stages are not read one after another (one equation reads "
              "several stages' params, e.g. a scan over stacked layers)")
    ends = first[1:] + [len(jx.eqns)]
    for i, (prefix, observed) in enumerate(self.stages):
      obs = set(observed)
      for e, got in enumerate(reads):
        if got & obs and not first[i] <= e < ends[i]:
          return (f"a param of stage {prefix!r} is multiplied outside its "
                  "segment (shared weights?)")
    self.cuts = [0] + first + [len(jx.eqns)]
    # where each value is defined (-1: an input) and last read
    define: dict[Any, int] = {}
    last: dict[Any, int] = {}
    order: list[Any] = []
    for v in jx.invars[self.n_params:]:
      define[v] = -1
      order.append(v)
    for e, eqn in enumerate(jx.eqns):
      for v in eqn.invars:
        if _is_var(v):
          last[v] = e
      for v in eqn.outvars:
        if not isinstance(v, jcore.DropVar):
          define[v] = e
          order.append(v)
    for v in jx.outvars:
      if _is_var(v):
        last[v] = len(jx.eqns)
    self.live = []
    for c in self.cuts:
      live = [v for v in order if define[v] < c <= last.get(v, -2)]
      if any(v in lazy for v in live):
        return "a param (or a cast of one) is used across a stage boundary"
      self.live.append(live)
    self.segments = []
    for s, (a, b) in enumerate(zip(self.cuts, self.cuts[1:])):
      eqns = jx.eqns[a:b]
      used = {v for eqn in eqns for v in eqn.invars if _is_var(v)}
      used |= {v for v in self.live[s + 1] if _is_var(v)}
      params = [j for j, v in enumerate(jx.invars[:self.n_params])
                if v in used]
      consts = [j for j, v in enumerate(jx.constvars) if v in used]
      invars = ([jx.invars[j] for j in params] + self.live[s]
                + [jx.constvars[j] for j in consts])
      outs = self.live[s + 1]
      seg = jcore.Jaxpr([], invars, outs, eqns, debug_info=jcore.DebugInfo(
          "calibration segment", None, tuple(f"in{k}" for k in
                                             range(len(invars))),
          tuple(f"out{k}" for k in range(len(outs)))))
      self.segments.append((seg, params, consts, []))
    return None

  # -- running ----------------------------------------------------------------

  def _segment(self, s: int):
    seg, pidx, cidx, text = self.segments[s]
    if not text:
      text.append(str(seg))  # printed once: the key of its compiled code
    return seg, pidx, cidx, text[0]

  def start(self, leaves: Sequence, args: tuple, kwargs: Mapping) -> list:
    """The values at the first stage's cut, for one batch; `leaves`: the
    params' `param_leaves`."""
    arg_leaves = jax.tree.leaves((tuple(args), dict(kwargs)))
    inputs = dict(zip(self.jaxpr.invars[self.n_params:],
                      [arg_leaves[i] for i in self.dyn]))
    live = [inputs[v] for v in self.live[0]]
    return self.advance(-1, leaves, live)

  def advance(self, stage: int, leaves: Sequence, live: list) -> list:
    """Runs stage `stage`'s segment (-1: the part before the first stage)
    on the current params (`param_leaves`): the values at the next cut."""
    seg, pidx, cidx, text = self._segment(stage + 1)
    fn = _segment_fn("advance", seg, text, (), ())
    return fn([leaves[j] for j in pidx], list(live),
              [self.consts[j] for j in cidx])

  def observe(self, stage: int, leaves: Sequence, live: list, weights,
              shapes: Mapping[str, tuple]) -> dict:
    """Statistics of stage `stage`'s observed params (`param_leaves`) on
    one batch."""
    seg, pidx, cidx, text = self._segment(stage + 1)
    want = set(self.stages[stage][1])
    pos = tuple(k for k, j in enumerate(pidx) if self.paths[j] in want)
    fn = _segment_fn("observe", seg, text, pos,
                     tuple(tuple(shapes[self.paths[pidx[k]]]) for k in pos))
    found = fn([leaves[j] for j in pidx], list(live),
               [self.consts[j] for j in cidx], weights)
    return {self.paths[pidx[int(k[1:])]]: s for k, s in found.items()}
