"""Running unmodified Flax models (linen, NNX, or any function) on compressed
trees.

`run(model, tree, *args)` traces the model with every compressed leaf stood in
for by an abstract dense array, then evaluates the traced program with a small
interpreter in which compressed leaves stay compressed: a matmul
(`dot_general`, which Dense, DenseGeneral, Einsum and Linear lower to) or a
convolution that consumes one goes to `compressjax.runtime.dispatch`; a dtype
cast is folded into it; any other use materializes the leaf exactly. The
interpreter emits ordinary jax ops, so it composes with `jax.jit`, `jax.grad`
(with respect to float leaves: scales, factors, uncompressed params), `vmap`
and sharding.

Control flow is seen through: a higher-order primitive whose operands include
a compressed leaf is emitted again through its public jax API with a body that
this interpreter evaluates, the leaf crossing the boundary as its pytree
children (`_HIGHER_ORDER` lists them; the names are the same in jax 0.10 and
0.12, only the parameters differ):
  pjit/jit, closed_call, core_call   inlined
  scan (lax.scan, fori_loop, nn.scan) closed-over leaves stay compressed; a
      leaf stacked along the scanned axis (nn.scan's per-layer params) is
      sliced per iteration into a compressed leaf (`stacked_parts`)
  remat2 (jax.checkpoint, nn.remat)   jax.checkpoint with the same policy
  cond (lax.cond, lax.switch, nn.cond), while (lax.while_loop)
  custom_jvp_call, custom_vjp_call    the forward runs the body compressed
      (matmuls dispatch); the user's derivative rule is kept and applied at
      the leaf's exact dense value, differentiated through `materialize`, so
      gradients with respect to float parts equal those of the materialized
      tree (the rule, written for dense weights, materializes the leaf when
      differentiated). Dropping the rule would silently change straight-
      through or stabilized gradients.
A loop-carried compressed leaf is materialized (a carry must be dense).
"""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from compressjax.core.base import CompressedLeaf, NotStackable, materialize
from compressjax.core.errors import CompressionError, TreeMismatchError
from compressjax.core.tree import is_compressed, leaves_with_paths
from compressjax.core.input_transform import InputTransform
from compressjax.runtime import dispatch

_INLINE = {"pjit", "jit", "closed_call", "core_call"}


class Lazy:
  """A param flowing through the program, to be used as `dtype`: a compressed
  leaf (kept compressed up to the dispatch point), or a dense param whose
  matmul inputs an observer wants to see (calibration)."""

  __slots__ = ("leaf", "dtype", "path", "observer")

  def __init__(self, leaf: Any, dtype, path: str | None = None,
               observer: Callable | None = None):
    self.leaf, self.dtype = leaf, jnp.dtype(dtype)
    self.path, self.observer = path, observer

  def force(self):
    return materialize(self.leaf).astype(self.dtype)

  def cast(self, dtype) -> "Lazy":
    return Lazy(self.leaf, dtype, self.path, self.observer)


def _force(x):
  return x.force() if isinstance(x, Lazy) else x


def _bind(eqn, invals):
  bp = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bp if isinstance(bp, tuple) else ((), bp)  # jax < 0.7
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is None:
    return eqn.primitive.bind(*subfuns, *invals, **params)
  with ctx:
    return eqn.primitive.bind(*subfuns, *invals, **params)


def _open(j) -> tuple[Any, Any]:
  """(jaxpr, consts) of a ClosedJaxpr (jax 0.10) or an open Jaxpr (0.12)."""
  return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())


def _forced(outs) -> list:
  return [_force(o) for o in outs]


def _observed(vals) -> bool:
  return any(isinstance(x, Lazy) and x.observer is not None for x in vals)


def _no_observers(vals, what: str) -> None:
  """Observers (calibration) run at trace time in the caller's trace; inside
  a loop or branch body they would capture the body's tracers."""
  for x in vals:
    if isinstance(x, Lazy) and x.observer is not None:
      raise CompressionError(
          f"calibration cannot observe a matmul inside a {what} body: its "
          "inputs exist only inside the loop or branch. Skip this param with "
          "a rule, or calibrate an unrolled copy of the model", x.path)


def _flatten(vals) -> tuple[list, Callable[[list], list]]:
  """Lazy values -> their leaf's arrays, so they can cross into a body that
  a jax API traces; `rebuild` turns the body's arrays back into Lazy."""
  flat, specs = [], []
  for x in vals:
    if isinstance(x, Lazy):
      leaves, treedef = jax.tree.flatten(x.leaf)
      specs.append((len(leaves), treedef, x))
      flat += leaves
    else:
      specs.append((1, None, None))
      flat.append(x)

  def rebuild(arrays) -> list:
    out, i = [], 0
    for n, treedef, lazy in specs:
      if treedef is None:
        out.append(arrays[i])
      else:
        out.append(Lazy(jax.tree.unflatten(treedef, arrays[i:i + n]),
                        lazy.dtype, lazy.path, lazy.observer))
      i += n
    return out
  return flat, rebuild


class Stacked(NamedTuple):
  """A compressed leaf stacked along a leading axis of length n: `parts` are
  its arrays that carry that axis (leading dim n); `build(slices)`, given
  each part's slice at one index, is the compressed leaf of that index."""
  parts: list
  build: Callable[[list], CompressedLeaf]




def stacked_parts(leaf: CompressedLeaf, n: int) -> Stacked:
  """Splits a compressed leaf stacked along its leading axis (length n).

  The slice at index i is the same leaf type with `shape[1:]`, `axis - 1`
  (the dense axis its groups, packing or N:M runs follow) and its children
  indexed: a child of the leaf's rank is indexed at i along its leading axis
  (at 0 where that axis has size 1, i.e. broadcast over the stack; nested
  leaves recursively); a child of another rank (a codebook table, a
  low-rank factor, a sparse value list) is shared by every index. That is
  exact for leaves whose dense value at index i depends only on the
  children's entries at i (QArray, NMSparseArray, CodebookArray and their
  nestings, with axis >= 1). Any other layout makes the sliced leaf fail its
  own `validate()` (checked here on shapes), which raises NotStackable.
  """
  if leaf.ndim < 2 or leaf.shape[0] != n:
    raise NotStackable(f"shape {tuple(leaf.shape)} is not stacked along a "
                       f"leading axis of length {n}")
  own = leaf.unstack(n)  # leaves that store another layout slice themselves
  if own is not None:
    parts, build = own
    _check_slice(build, parts)
    return Stacked(parts, build)
  meta: dict[str, Any] = {"shape": tuple(leaf.shape[1:])}
  if "axis" in leaf.meta_fields:
    if leaf.axis == 0:
      raise NotStackable(
          "its axis 0 (along which it groups, packs or runs) is the stacked "
          "axis; compress stacked params along axis >= 1, e.g. with "
          "rules=[(r'.*scanned.*kernel', dict(axis=1))]")
    meta["axis"] = leaf.axis - 1
  parts: list = []
  fixed: dict[str, Any] = {}
  sliced: dict[str, tuple[int, int, Callable | None]] = {}
  for f in leaf.data_fields:
    c = getattr(leaf, f)
    if getattr(c, "ndim", None) != leaf.ndim:
      fixed[f] = c
    elif c.shape[0] == n:
      if isinstance(c, CompressedLeaf):
        sub = stacked_parts(c, n)
        sliced[f] = (len(parts), len(sub.parts), sub.build)
        parts += sub.parts
      else:
        sliced[f] = (len(parts), 1, None)
        parts.append(c)
    elif c.shape[0] == 1:
      if isinstance(c, CompressedLeaf):
        sub = stacked_parts(c, 1)
        fixed[f] = sub.build([p[0] for p in sub.parts])
      else:
        fixed[f] = c[0]
    else:
      raise NotStackable(f"its {f} has shape {tuple(c.shape)}, whose leading "
                         f"axis is neither {n} nor 1")

  def build(slices) -> CompressedLeaf:
    kids = dict(fixed)
    for f, (i, k, sub_build) in sliced.items():
      kids[f] = slices[i] if sub_build is None else sub_build(slices[i:i + k])
    return dataclasses.replace(leaf, **kids, **meta)

  _check_slice(build, parts)
  return Stacked(parts, build)


def _check_slice(build, parts) -> None:
  try:
    build([jax.ShapeDtypeStruct(tuple(p.shape[1:]), p.dtype)
           for p in parts]).validate()
  except CompressionError as e:
    raise NotStackable(f"its per-index slice would be invalid ({e})") from None


def slice_leading(leaf: CompressedLeaf, i: int) -> CompressedLeaf:
  """Index i of a compressed leaf stacked along its leading axis, as a
  compressed leaf (see `stacked_parts`)."""
  st = stacked_parts(leaf, leaf.shape[0])
  return st.build([p[i] for p in st.parts])


def _scan_counts(params) -> tuple[int, int]:
  if "num_consts" in params:  # jax 0.10
    return params["num_consts"], params["num_carry"]
  consts, carry, _ = params["ft_in"].unpack()  # jax 0.12: (consts, carry, xs)
  return len(consts), len(carry)


def _scan(eqn, invals):
  p = eqn.params
  body, body_consts = _open(p["jaxpr"])
  nc, nk = _scan_counts(p)
  consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  _no_observers(invals, "lax.scan")
  carry = [_as_input(_force(c), v) for c, v in zip(
      carry, eqn.invars[nc:nc + nk])]
  xs_flat, builders = [], []
  for x in xs:
    if isinstance(x, Lazy) and isinstance(x.leaf, CompressedLeaf):
      try:
        st = stacked_parts(x.leaf, p["length"])
      except NotStackable as e:
        warnings.warn(
            f"param '{x.path}' is stacked along a scanned axis but cannot be "
            f"sliced as a compressed leaf: {e}. It is materialized before the "
            "loop (exact, but dense in memory)", stacklevel=2)
      else:
        builders.append((len(st.parts), st.build, x))
        xs_flat += st.parts
        continue
    builders.append((1, None, None))
    xs_flat.append(_force(x))

  def step(c, xs_slice):
    xs_i, i = [], 0
    for n, build, lazy in builders:
      xs_i.append(xs_slice[i] if build is None else Lazy(
          build(xs_slice[i:i + n]), lazy.dtype, lazy.path))
      i += n
    outs = _forced(eval_jaxpr(body, body_consts, *consts, *c, *xs_i))
    return outs[:nk], outs[nk:]

  carry_out, ys = jax.lax.scan(step, carry, xs_flat, length=p["length"],
                               reverse=p["reverse"], unroll=p["unroll"])
  return list(carry_out) + list(ys)


def _while(eqn, invals):
  p = eqn.params
  cond, cond_consts = _open(p["cond_jaxpr"])
  body, body_consts = _open(p["body_jaxpr"])
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cc, bc, carry = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  _no_observers(invals, "lax.while_loop")
  carry = [_as_input(_force(c), v) for c, v in zip(carry, eqn.invars[cn + bn:])]
  return list(jax.lax.while_loop(
      lambda c: _force(eval_jaxpr(cond, cond_consts, *cc, *c)[0]),
      lambda c: _forced(eval_jaxpr(body, body_consts, *bc, *c)), carry))


def _cond(eqn, invals):
  _no_observers(invals, "lax.cond")
  flat, rebuild = _flatten(invals[1:])
  branches = [
      (lambda j, c: lambda *a: _forced(eval_jaxpr(j, c, *rebuild(a))))(
          *_open(b)) for b in eqn.params["branches"]]
  return jax.lax.switch(_force(invals[0]), branches, *flat)


def _remat(eqn, invals):
  body, consts = _open(eqn.params["jaxpr"])
  if _observed(invals):  # calibration: forward only, observers need the
    return eval_jaxpr(body, consts, *invals)  # caller's trace
  flat, rebuild = _flatten(invals)
  fn = jax.checkpoint(lambda *a: _forced(eval_jaxpr(body, consts,
                                                    *rebuild(a))),
                      prevent_cse=eqn.params.get("prevent_cse", True),
                      policy=eqn.params.get("policy"))
  return fn(*flat)


def _custom_parts(eqn, invals):
  """(inline result or None, flat args, compressed forward, dense reference)
  of a custom_jvp/custom_vjp call."""
  j = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
  body, consts = _open(j)
  if _observed(invals):
    return eval_jaxpr(body, consts, *invals), None, None, None
  flat, rebuild = _flatten(invals)
  forward = lambda *a: _forced(eval_jaxpr(body, consts, *rebuild(a)))
  # The user's primitive with its rule, on the exact dense leaf:
  # differentiating it goes through materialize and then the rule.
  dense = lambda *a: _bind(eqn, _forced(rebuild(a)))
  return None, flat, forward, dense


def _custom_jvp(eqn, invals):
  inline, flat, forward, dense = _custom_parts(eqn, invals)
  if flat is None:
    return inline
  fn = jax.custom_jvp(forward)

  def rule(primals, tangents):
    _, t_out = jax.jvp(dense, primals, tangents)
    return forward(*primals), t_out
  fn.defjvp(rule)
  return fn(*flat)


def _custom_vjp(eqn, invals):
  inline, flat, forward, dense = _custom_parts(eqn, invals)
  if flat is None:
    return inline
  fn = jax.custom_vjp(forward)

  def fwd(*a):
    _, pullback = jax.vjp(dense, *a)  # a pytree: its residuals
    return forward(*a), pullback
  fn.defvjp(fwd, lambda pullback, ct: pullback(ct))
  return fn(*flat)


def _as_input(x, var):
  """A literal loop input as an array of the traced type (a Python scalar
  would be weakly typed where the body's output is not)."""
  if isinstance(x, (jax.Array, jax.core.Tracer)):
    return x
  return jnp.asarray(x, var.aval.dtype)


_HIGHER_ORDER: dict[str, Callable] = {
    "scan": _scan, "while": _while, "cond": _cond,
    "remat2": _remat, "checkpoint": _remat,
    "custom_jvp_call": _custom_jvp, "custom_vjp_call": _custom_vjp,
    "custom_vjp_call_jaxpr": _custom_vjp,  # jax < 0.7
}


def _lazy_eqn(eqn, invals):
  """Evaluates an equation some of whose inputs are Lazy."""
  name = eqn.primitive.name
  if name == "convert_element_type" and isinstance(invals[0], Lazy):
    return invals[0].cast(eqn.params["new_dtype"])
  if name == "dot_general":
    lhs, rhs = invals
    if isinstance(lhs, Lazy) != isinstance(rhs, Lazy):
      lazy = lhs if isinstance(lhs, Lazy) else rhs
      p = dict(eqn.params)
      dims = p.pop("dimension_numbers")
      if lazy.observer is not None and lazy is rhs:
        # Observers see the input the stored weight multiplies: for an
        # InputTransform, x after its scale/rotation (calibrating a rotated
        # or smoothed model).
        x, odims = lhs, dims
        if isinstance(lazy.leaf, InputTransform):
          x, odims = lazy.leaf.operand(lhs, dims) or (lhs, dims)
        lazy.observer(lazy.path, x, odims)
      return dispatch.dot_general(
          lhs.leaf if lazy is lhs else lhs, rhs.leaf if lazy is rhs else rhs,
          dims, lhs_leaf=lazy is lhs, dtype=lazy.dtype, **p)
  if name == "conv_general_dilated" and isinstance(invals[1], Lazy) and not \
      isinstance(invals[0], Lazy):
    if invals[1].observer is not None:  # calibration: the conv's params
      invals[1].observer(invals[1].path, invals[0], dict(eqn.params))
    return dispatch.conv_general_dilated(invals[0], invals[1].leaf,
                                         dtype=invals[1].dtype, **eqn.params)
  if name in _INLINE and "jaxpr" in eqn.params:
    return eval_jaxpr(*_open(eqn.params["jaxpr"]), *invals)
  if name in _HIGHER_ORDER:
    return _HIGHER_ORDER[name](eqn, invals)
  return _bind(eqn, [_force(x) for x in invals])


def eval_jaxpr(jaxpr, consts, *args):
  """Evaluates a jaxpr whose inputs may be Lazy compressed leaves."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(v, val):
    if not isinstance(v, jcore.DropVar):
      env[v] = val

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, Lazy) for x in invals):
      out = _lazy_eqn(eqn, invals)
    else:
      out = _bind(eqn, invals)
    outs = out if eqn.primitive.multiple_results else [out]
    for v, x in zip(eqn.outvars, outs):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _check_leaves(tree: Any) -> None:
  """Every compressed leaf must match its own metadata before anything runs
  (shape checks only under tracing)."""
  for p, x in leaves_with_paths(tree):
    if isinstance(x, CompressedLeaf):
      try:
        x.validate()
      except CompressionError as e:
        raise CompressionError(
            f"{e}. The compressed leaf does not match its own metadata (were "
            "its arrays replaced, reshaped or taken from another model?): "
            "compress the param again, or restore the tree with cj.restore",
            p) from None


def _unused(jaxpr, n: int) -> list[int]:
  """Indices of the first n inputs that no equation or output reads."""
  used = {v for e in jaxpr.eqns for v in e.invars
          if not isinstance(v, jcore.Literal)}
  used |= {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  return [i for i, v in enumerate(jaxpr.invars[:n]) if v not in used]


def _param_in_traceback(e: BaseException, traced) -> tuple[str, Any] | None:
  """(path, tracer) of the param held by the innermost frame of the
  exception's traceback (or its cause's) that holds one."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    frames = [f for f, _ in traceback.walk_tb(e.__traceback__)]
    for frame in reversed(frames):
      for v in frame.f_locals.values():
        for p, t in traced:
          if v is t:
            return p, t
    e = e.__cause__ or e.__context__
  return None


def apply(fn: Callable[..., Any], tree: Any, *args,
          observe: Callable | None = None,
          observe_paths: frozenset[str] = frozenset(),
          allow_unused: bool | None = True, **kwargs) -> Any:
  """Calls `fn(tree, *args, **kwargs)` with compressed leaves kept compressed.

  Array leaves of args/kwargs are traced; other values (flags, strings) are
  passed to `fn` as they are. `observe(path, x, dimension_numbers)` is called
  (at trace time) with the input `x` of every matmul whose right operand is
  the param at a path in `observe_paths` (for a convolution whose kernel it
  is, with the dict of the convolution's params instead). Params of `tree` that `fn` never
  reads raise TreeMismatchError with `allow_unused=False`, are named in a
  warning with None, and pass silently with True.
  """
  _check_leaves(tree)
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_compressed)
  paths = [p for p, _ in leaves_with_paths(tree)]
  arg_leaves, arg_def = jax.tree.flatten((args, kwargs))
  dyn = [i for i, x in enumerate(arg_leaves) if _is_array(x)]
  traced: list[tuple[str, Any]] = []  # the params' tracers, for errors

  def flat_fn(tree_leaves, dyn_args):
    traced[:] = [(p, t) for p, t in zip(paths, tree_leaves)
                 if hasattr(t, "shape")]
    al = list(arg_leaves)
    for i, x in zip(dyn, dyn_args):
      al[i] = x
    a, k = jax.tree.unflatten(arg_def, al)
    return fn(jax.tree.unflatten(treedef, tree_leaves), *a, **k)

  spec = lambda x: jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(
      x.dense_dtype if isinstance(x, CompressedLeaf) else x.dtype))
  tree_specs = [spec(x) if hasattr(x, "shape") else x for x in leaves]
  try:
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        tree_specs, [spec(arg_leaves[i]) for i in dyn])
  except CompressionError:
    raise
  except (TypeError, ValueError) as e:
    hit = _param_in_traceback(e, traced) if "shape" in str(e) else None
    if hit is None:
      raise
    shapes = [tuple(arg_leaves[i].shape) for i in dyn]
    raise CompressionError(
        f"the model failed at an op on this param (dense shape "
        f"{tuple(hit[1].shape)}) with inputs of shapes {shapes}: "
        f"{str(e).splitlines()[0]} Check the inputs against the model, e.g. "
        "the input width it was built or initialized with", hit[0]) from None
  shaped = [(p, x) for p, x in zip(paths, leaves) if hasattr(x, "shape")]
  if allow_unused is not True and len(shaped) == len(leaves):
    unused = [shaped[i][0] for i in _unused(closed.jaxpr, len(shaped))]
    if unused:
      msg = (f"the model never reads {len(unused)} param(s) of the tree: "
             f"{unused[:8]}{' ...' if len(unused) > 8 else ''}. Fine for a "
             "method that uses part of the model (then pass "
             "allow_unused=True); otherwise they belong to another model: "
             "pass the tree this model produced (model.init(...) or "
             "nnx.state(model, nnx.Param))")
      if allow_unused is False:
        raise TreeMismatchError(msg, unused[0])
      logging.warning("%s", msg)

  def value(p, x):
    obs = observe if p in observe_paths else None
    if isinstance(x, CompressedLeaf):
      return Lazy(x, x.dense_dtype, p, obs)
    return Lazy(x, x.dtype, p, obs) if obs else x
  values = [value(p, x) for p, x in shaped]
  values += [arg_leaves[i] for i in dyn]
  outs = eval_jaxpr(closed.jaxpr, closed.consts, *values)
  return jax.tree.unflatten(jax.tree.structure(out_shape),
                            [_force(o) for o in outs])


def _expected_params_check(expected: Any, tree: Any, what: str) -> None:
  """Raises TreeMismatchError listing missing, extra and mis-shaped paths."""
  want = {p: tuple(x.shape) for p, x in leaves_with_paths(expected)}
  got = {p: tuple(x.shape) for p, x in leaves_with_paths(tree)
         if hasattr(x, "shape")}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shape = sorted(p for p in set(want) & set(got) if want[p] != got[p])
  if missing or extra or shape:
    parts = []
    if missing:
      parts.append(f"missing {missing[:5]}")
    if extra:
      parts.append(f"unexpected {extra[:5]}")
    if shape:
      parts.append("shape " + ", ".join(
          f"'{p}' {got[p]} != model's {want[p]}" for p in shape[:5]))
    raise TreeMismatchError(
        f"the params tree does not match {what}: " + "; ".join(parts) +
        ". Compress the tree the model itself produced (model.init(...) or "
        "nnx.state(model, nnx.Param)) without renaming or reshaping params")


def as_function(model: Any, tree: Any,
                method: str | Callable | None = None) -> Callable[..., Any]:
  """`fn(tree, *args, **kwargs)` for a linen Module, an nnx Module (whose
  `nnx.Param` state `tree` replaces) or a function; checks NNX structure."""
  from flax import linen as nn
  from flax import nnx

  if isinstance(model, nn.Module):
    if isinstance(tree, Mapping) and tree and "params" not in tree:
      raise TreeMismatchError(
          f"a linen model takes its variables dict {{'params': ...}}, but "
          f"this tree's top level is {sorted(map(str, tree))[:5]}: pass "
          "{'params': tree} (variables['params'] was passed instead of "
          "variables)", "params")
    return lambda t, *a, **k: model.apply(t, *a, method=method, **k)
  if isinstance(model, nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _expected_params_check(params, tree, type(model).__name__)

    def fn(t, *a, **k):
      m = nnx.merge(graphdef, t, rest)
      f = getattr(m, method) if isinstance(method, str) else (
          m if method is None else (lambda *aa, **kk: method(m, *aa, **kk)))
      return f(*a, **k)
    return fn
  if callable(model):
    return model
  raise TypeError(f"run() takes a linen Module, an nnx Module or a function, "
                  f"got {type(model).__name__}")


def run(model: Any, tree: Any, *args, method: str | Callable | None = None,
        allow_unused: bool | None = None, **kwargs) -> Any:
  """The entry point: runs a model on a (possibly compressed) params tree.

  Args:
    model: a `flax.linen.Module` (called as `model.apply(tree, ...)`, so
      `tree` is the variables dict, e.g. {'params': ...}); a `flax.nnx.Module`
      (`tree` is its `nnx.Param` state, compressed; other state is taken from
      the model); or any function `fn(tree, *args, **kwargs)`.
    tree: the compressed tree.
    method: linen method to apply, or NNX method name (default __call__).
    allow_unused: what to do with params of `tree` the model never reads:
      None (default) logs a warning naming them (a method may use part of
      the model, e.g. BERT's hidden states leave the pooler unread); False
      raises TreeMismatchError (strict: they usually mean the tree belongs
      to another model or was renamed); True accepts them silently.

  Bad trees fail on entry, before any compute: a compressed leaf failing its
  `validate()` raises CompressionError; a tree that does not match the model
  (missing, extra, mis-shaped or unused params; a linen variables dict
  without its 'params' level) raises TreeMismatchError; a shape error inside
  the model raises CompressionError naming the param involved.
  """
  fn = as_function(model, tree, method)
  try:
    return apply(fn, tree, *args, allow_unused=allow_unused, **kwargs)
  except Exception as e:  # flax scope errors name the missing/bad param
    if "ScopeParam" in type(e).__name__:
      raise TreeMismatchError(
          f"the params tree does not match the model: {e}. Compress the "
          "tree returned by model.init(...) without renaming or reshaping "
          "params") from None
    raise
