"""The contract every compressed leaf follows.

A compressed leaf is a frozen dataclass registered as a pytree: its array
children (codes, scales, values, factors — possibly other compressed leaves) are
pytree children, its metadata (original shape and dtype, format, contraction
axes, ...) is static. It has `validate()`, an exact `materialize()` and
`nbytes`, the real storage of its children.

What belongs to a leaf type lives on the type, so that reports and algorithms
never switch on types:
  describe()     short format text for reports, nested ('2:4(int4 g128)')
  sparsity       fraction of elements not stored; rank: the factor rank or None
  stage          the compression that produced it (`Stage`), None for wrappers
                 (InputTransform, PactInput) that carry a `weight`
  targets(op)    the children a later compression `op` works on instead of the
                 leaf itself (sparse values, a low-rank residual, a wrapped
                 weight), or a CompressionError saying why op cannot follow;
                 `compress_inside` and `inner_arrays` walk them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable, ClassVar, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.errors import CompressionError


class _Registry(dict):
  """Leaf classes by name; a miss (e.g. restoring a tree whose leaf type was
  never imported) is a CompressionError, not a KeyError."""

  def __missing__(self, name):
    raise CompressionError(
        f"unknown compressed leaf type {name!r}; known: {sorted(self)}. "
        "Training-time leaves (FakeQuant, ...) are defined in compressjax.train"
        ": import that module before restoring")


LEAF_TYPES: dict[str, type] = _Registry()
# ml_dtypes floats (bfloat16, fp8) have numpy kind 'V', so ask jnp instead.
_KINDS = {"f": jnp.floating, "i": jnp.signedinteger, "u": jnp.unsignedinteger}


class Stage(enum.IntEnum):
  """Compressions in the order they compose: a leaf made by one stage accepts
  only later stages, on the children its `targets` names."""

  FACTORIZE = 0
  SPARSIFY = 1
  QUANTIZE = 2

  @property
  def verb(self) -> str:
    return self.name.lower()


_PAST = {Stage.FACTORIZE: "factorized", Stage.SPARSIFY: "sparse",
         Stage.QUANTIZE: "quantized"}


def array_nbytes(x: Any) -> int:
  if x is None:
    return 0
  if isinstance(x, CompressedLeaf):
    return x.nbytes
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def is_concrete(x: Any) -> bool:
  """True when x holds values (not a tracer or an abstract shape)."""
  return isinstance(x, np.ndarray) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def materialize(x: Any):
  """Dense value of a compressed leaf; arrays pass through."""
  return x.materialize() if isinstance(x, CompressedLeaf) else x


def describe(x: Any) -> str:
  """Short format text of a leaf ('dense' for a plain array)."""
  return x.describe() if isinstance(x, CompressedLeaf) else "dense"


def nested(outer: str, inner: Any) -> str:
  d = describe(inner)
  return outer if d == "dense" else f"{outer}({d})"


class NotStackable(ValueError):
  """A compressed leaf cannot be sliced exactly along its leading axis."""


class CompressedLeaf:
  """Base class. Subclasses declare `data_fields` and `meta_fields`."""

  data_fields: ClassVar[tuple[str, ...]] = ()
  meta_fields: ClassVar[tuple[str, ...]] = ()
  stage: ClassVar[Stage | None] = None
  shape: tuple[int, ...]
  dtype: str

  # -- array-like metadata of the dense value it stands for ---------------
  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def dense_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (all children, recursively)."""
    return sum(array_nbytes(getattr(self, f)) for f in self.data_fields)

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(self.size, 1)

  # -- behaviour asked by reports and algorithms ---------------------------
  def unstack(self, n: int):
    """This leaf stacked along a leading axis of length n (a scanned layer
    axis): (parts, build), where every part carries that axis first and
    build(slices) is the leaf of one index; None to let the runtime slice
    each child of the leaf's rank (`runtime.interpret.stacked_parts`).
    Raises NotStackable when no exact slicing exists."""
    return None

  def describe(self) -> str:
    return type(self).__name__

  @property
  def sparsity(self) -> float:
    """Structural sparsity: fraction of elements not stored."""
    return 0.0

  @property
  def rank(self) -> int | None:
    return None

  def _targets(self, op: Stage) -> dict[str, bool]:
    """Children that `op` compresses -> whether they keep this leaf's axes
    (so layout options such as `axis` carry over). Called for op > stage."""
    raise CompressionError(
        f"cannot {op.verb} a {type(self).__name__}; skip this param with a "
        "rule")

  def targets(self, op: Stage) -> dict[str, bool]:
    """What a later compression `op` works on inside this leaf (see module
    doc); CompressionError (without a path) when op cannot follow."""
    st = self.stage
    if st is not None and op == st:
      raise CompressionError(
          f"cannot {op.verb} a {type(self).__name__}: the param is already "
          f"{_PAST[st]}; {op.verb} once, or skip it with a rule")
    if st is not None and op < st:
      raise CompressionError(
          f"cannot {op.verb} a {type(self).__name__}: {op.verb} first, then "
          f"{st.verb} (chain({op.verb}(...), {st.verb}(...)))")
    return self._targets(op)

  def children(self) -> dict[str, Any]:
    return {f: getattr(self, f) for f in self.data_fields}

  def materialize(self) -> jax.Array:
    raise NotImplementedError

  def validate(self) -> None:
    """Checks invariants; raises CompressionError. Nested leaves too."""
    for c in self.children().values():
      if isinstance(c, CompressedLeaf):
        c.validate()

  def _fail(self, msg: str):
    raise CompressionError(f"invalid {type(self).__name__}: {msg}")

  def _expect(self, name: str, x: Any, shape: tuple[int, ...] | None = None,
              kind: str | None = None):
    if x is None:
      self._fail(f"{name} is missing")
    if shape is not None and tuple(x.shape) != tuple(shape):
      self._fail(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if kind is not None and not any(
        jnp.issubdtype(jnp.dtype(x.dtype), _KINDS[k]) for k in kind):
      self._fail(f"{name} has dtype {x.dtype}, expected kind {kind!r}")

  def __repr__(self):
    meta = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.meta_fields)
    kids = ", ".join(
        f"{k}={type(v).__name__}{tuple(getattr(v, 'shape', ()))}"
        for k, v in self.children().items() if v is not None)
    return f"{type(self).__name__}({meta}; {kids})"


def _with_context(path: str, fn: Callable):
  try:
    return fn()
  except CompressionError as e:
    if e.path is not None:
      raise
    raise CompressionError(str(e), path) from None


def inner_arrays(leaf: Any, op: Stage, path: str,
                 keeps_layout: bool = True
                 ) -> Iterator[tuple[str, Any, bool]]:
  """(path, dense array, keeps the top leaf's axes) for every array `op`
  would compress in `leaf` (the leaf itself when it is dense)."""
  if not isinstance(leaf, CompressedLeaf):
    yield path, leaf, keeps_layout
    return
  tgt = _with_context(path, lambda: leaf.targets(op))
  for f, keep in tgt.items():
    yield from inner_arrays(getattr(leaf, f), op, f"{path}/{f}",
                            keeps_layout and keep)


def compress_inside(leaf: Any, op: Stage, fn: Callable[[str, Any, bool], Any],
                    path: str, keeps_layout: bool = True) -> Any:
  """`leaf` with fn(path, array, keeps_layout) applied to every array that
  `inner_arrays` yields, rebuilt around the results."""
  if not isinstance(leaf, CompressedLeaf):
    return fn(path, leaf, keeps_layout)
  tgt = _with_context(path, lambda: leaf.targets(op))
  return dataclasses.replace(leaf, **{
      f: compress_inside(getattr(leaf, f), op, fn, f"{path}/{f}",
                         keeps_layout and keep) for f, keep in tgt.items()})


def _guard_init(cls):
  """A constructor call with fields of another layout version (e.g. a
  checkpoint of an older QArray) fails with a CompressionError."""
  init = cls.__init__
  names = [f.name for f in dataclasses.fields(cls)]

  @functools.wraps(init)
  def __init__(self, *args, **kw):
    try:
      init(self, *args, **kw)
    except TypeError:
      unknown = sorted(set(kw) - set(names))
      missing = sorted(set(names[len(args):]) - set(kw))
      if not unknown and not missing:
        raise
      raise CompressionError(
          f"{cls.__name__} takes fields {names}; got unknown {unknown} and "
          f"missing {missing}. Data written for another layout version of "
          f"{cls.__name__} (e.g. an older checkpoint) cannot be rebuilt: "
          "compress the float params again") from None

  cls.__init__ = __init__
  return cls


def compressed_leaf(cls):
  """Class decorator: frozen dataclass + pytree registration + registry."""
  cls = dataclasses.dataclass(frozen=True, repr=False, eq=False)(cls)
  cls = _guard_init(cls)
  jax.tree_util.register_dataclass(
      cls, data_fields=list(cls.data_fields), meta_fields=list(cls.meta_fields))
  LEAF_TYPES[cls.__name__] = cls
  return cls
