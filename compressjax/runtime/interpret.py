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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from compressjax.core.base import CompressedLeaf, materialize
from compressjax.core.errors import TreeMismatchError
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
        x = lhs
        if isinstance(lazy.leaf, InputTransform) and dims[0][0] == (
            lhs.ndim - 1,):
          x = lazy.leaf.transform_input(lhs)
        lazy.observer(lazy.path, x, dims)
      return dispatch.dot_general(
          lhs.leaf if lazy is lhs else lhs, rhs.leaf if lazy is rhs else rhs,
          dims, lhs_leaf=lazy is lhs, dtype=lazy.dtype, **p)
  if name == "conv_general_dilated" and isinstance(invals[1], Lazy) and not \
      isinstance(invals[0], Lazy):
    return dispatch.conv_general_dilated(invals[0], invals[1].leaf,
                                         dtype=invals[1].dtype, **eqn.params)
  if name in _INLINE and "jaxpr" in eqn.params:
    closed = eqn.params["jaxpr"]
    inner, consts = (closed.jaxpr, closed.consts) if hasattr(
        closed, "consts") else (closed, ())
    return eval_jaxpr(inner, consts, *invals)
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


def apply(fn: Callable[..., Any], tree: Any, *args,
          observe: Callable | None = None,
          observe_paths: frozenset[str] = frozenset(), **kwargs) -> Any:
  """Calls `fn(tree, *args, **kwargs)` with compressed leaves kept compressed.

  Array leaves of args/kwargs are traced; other values (flags, strings) are
  passed to `fn` as they are. `observe(path, x, dimension_numbers)` is called
  (at trace time) with the input `x` of every matmul whose right operand is
  the param at a path in `observe_paths`.
  """
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_compressed)
  paths = [p for p, _ in leaves_with_paths(tree)]
  arg_leaves, arg_def = jax.tree.flatten((args, kwargs))
  dyn = [i for i, x in enumerate(arg_leaves) if _is_array(x)]

  def flat_fn(tree_leaves, dyn_args):
    al = list(arg_leaves)
    for i, x in zip(dyn, dyn_args):
      al[i] = x
    a, k = jax.tree.unflatten(arg_def, al)
    return fn(jax.tree.unflatten(treedef, tree_leaves), *a, **k)

  spec = lambda x: jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(
      x.dense_dtype if isinstance(x, CompressedLeaf) else x.dtype))
  tree_specs = [spec(x) if hasattr(x, "shape") else x for x in leaves]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
      tree_specs, [spec(arg_leaves[i]) for i in dyn])
  def value(p, x):
    obs = observe if p in observe_paths else None
    if isinstance(x, CompressedLeaf):
      return Lazy(x, x.dense_dtype, p, obs)
    return Lazy(x, x.dtype, p, obs) if obs else x
  values = [value(p, x) for p, x in zip(paths, leaves) if hasattr(x, "shape")]
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
        **kwargs) -> Any:
  """The entry point: runs a model on a (possibly compressed) params tree.

  Args:
    model: a `flax.linen.Module` (called as `model.apply(tree, ...)`, so
      `tree` is the variables dict, e.g. {'params': ...}); a `flax.nnx.Module`
      (`tree` is its `nnx.Param` state, compressed; other state is taken from
      the model); or any function `fn(tree, *args, **kwargs)`.
    tree: the compressed tree.
    method: linen method to apply, or NNX method name (default __call__).
  """
  fn = as_function(model, tree, method)
  try:
    return apply(fn, tree, *args, **kwargs)
  except Exception as e:  # flax scope errors name the missing/bad param
    if "ScopeParam" in type(e).__name__:
      raise TreeMismatchError(
          f"the params tree does not match the model: {e}. Compress the "
          "tree returned by model.init(...) without renaming or reshaping "
          "params") from None
    raise
