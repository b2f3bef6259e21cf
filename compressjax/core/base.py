"""The contract every compressed leaf follows.

A compressed leaf is a frozen dataclass registered as a pytree: its array
children (codes, scales, values, factors — possibly other compressed leaves) are
pytree children, its metadata (original shape and dtype, format, axis, ...) is
static. It has `validate()`, an exact `materialize()` and `nbytes`, the real
storage of its children.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.errors import CompressionError

LEAF_TYPES: dict[str, type] = {}
# ml_dtypes floats (bfloat16, fp8) have numpy kind 'V', so ask jnp instead.
_KINDS = {"f": jnp.floating, "i": jnp.signedinteger, "u": jnp.unsignedinteger}


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


class CompressedLeaf:
  """Base class. Subclasses declare `data_fields` and `meta_fields`."""

  data_fields: ClassVar[tuple[str, ...]] = ()
  meta_fields: ClassVar[tuple[str, ...]] = ()
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


def compressed_leaf(cls):
  """Class decorator: frozen dataclass + pytree registration + registry."""
  cls = dataclasses.dataclass(frozen=True, repr=False, eq=False)(cls)
  jax.tree_util.register_dataclass(
      cls, data_fields=list(cls.data_fields), meta_fields=list(cls.meta_fields))
  LEAF_TYPES[cls.__name__] = cls
  return cls
