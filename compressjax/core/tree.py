"""Param-path utilities shared by every layer."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

_TREE = jax.tree_util

# Flax kernels put input features first: Dense (in, out), DenseGeneral and
# Einsum (in, ...). Quantization groups, packing, N:M runs and channel pruning
# default to this axis; rules override it (e.g. axis=2 for HWIO conv kernels).
INPUT_AXIS = 0


def key_str(k: Any) -> str | None:
  """One path entry as text; NNX `.value` accessors are dropped."""
  if isinstance(k, _TREE.DictKey):
    return str(k.key)
  if isinstance(k, _TREE.SequenceKey):
    return str(k.idx)
  if isinstance(k, _TREE.GetAttrKey):
    return None if k.name == "value" else k.name
  if isinstance(k, _TREE.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: tuple) -> str:
  """'/'-joined param path, e.g. 'params/Dense_0/kernel'."""
  return "/".join(s for s in (key_str(k) for k in path) if s is not None)


def is_compressed(x: Any) -> bool:
  from compressjax.core.base import CompressedLeaf
  return isinstance(x, CompressedLeaf)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """(path, leaf) pairs where compressed leaves count as single leaves."""
  flat, _ = _TREE.tree_flatten_with_path(tree, is_leaf=is_compressed)
  return [(path_str(p), leaf) for p, leaf in flat]


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """tree_map over (path, leaf), compressed leaves treated as leaves."""
  return _TREE.tree_map_with_path(
      lambda p, x: fn(path_str(p), x), tree, is_leaf=is_compressed)


def iter_compressed(tree: Any) -> Iterator[tuple[str, Any]]:
  for p, leaf in leaves_with_paths(tree):
    if is_compressed(leaf):
      yield p, leaf


def is_float_dtype(dtype: Any) -> bool:
  # jnp, not np: ml_dtypes floats (bfloat16, fp8) are not np.floating.
  return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)


def is_float_array(x: Any) -> bool:
  return hasattr(x, "dtype") and is_float_dtype(x.dtype)


def materialize_tree(tree: Any) -> Any:
  """Replace every compressed leaf by its exact dense value."""
  return jax.tree.map(
      lambda x: x.materialize() if is_compressed(x) else x, tree,
      is_leaf=is_compressed)


def partition_float(tree: Any) -> tuple[Any, Any]:
  """Split a (compressed) tree into (float_part, rest) for `jax.grad`.

  Inexact leaves go to the first tree, everything else (integer codes, masks,
  indices) to the second; the other side holds None. `combine` undoes it.
  """
  def is_f(x):
    return is_float_array(x)
  flo = jax.tree.map(lambda x: x if is_f(x) else None, tree)
  rest = jax.tree.map(lambda x: None if is_f(x) else x, tree)
  return flo, rest


def _is_none_or_compressed(x: Any) -> bool:
  return x is None or is_compressed(x)


def _first_difference(a: Any, b: Any) -> str:
  """Where two trees first differ: a path in one only, or a node whose
  type or static metadata differs."""
  fa = dict((path_str(p), x) for p, x in _TREE.tree_flatten_with_path(
      a, is_leaf=_is_none_or_compressed)[0])
  fb = dict((path_str(p), x) for p, x in _TREE.tree_flatten_with_path(
      b, is_leaf=_is_none_or_compressed)[0])
  for p in fa:
    if p not in fb:
      return f"{p!r} is in the first tree only"
  for p in fb:
    if p not in fa:
      return f"{p!r} is in the second tree only"
  for p, x in fa.items():
    y = fb[p]
    if type(x) is not type(y) and None not in (x, y):
      return (f"{p!r} is a {type(x).__name__} in the first tree, a "
              f"{type(y).__name__} in the second")
    if is_compressed(x) and is_compressed(y) and (
        _TREE.tree_structure(x) != _TREE.tree_structure(y)):
      return f"{p!r} has other static metadata (format, shape, ...)"
  return "the containers differ (dict vs list, key order or node types)"


def combine(float_part: Any, rest: Any) -> Any:
  """Inverse of `partition_float`: both halves must come from one tree."""
  from compressjax.core.errors import TreeMismatchError
  sa = _TREE.tree_structure(float_part, is_leaf=lambda x: x is None)
  sb = _TREE.tree_structure(rest, is_leaf=lambda x: x is None)
  if sa != sb:
    raise TreeMismatchError(
        f"combine: the two trees differ in structure: "
        f"{_first_difference(float_part, rest)}; pass the two halves that "
        "partition_float returned for the same tree (after jax.grad, the "
        "gradient of the float half has that half's structure)")

  def pick(path, a, b):
    if a is not None and b is not None:
      raise TreeMismatchError(
          "combine: both trees hold a value here; pass the float half first "
          "and the rest second, as partition_float returns them",
          path_str(path))
    return b if a is None else a

  return _TREE.tree_map_with_path(pick, float_part, rest,
                                  is_leaf=lambda x: x is None)
