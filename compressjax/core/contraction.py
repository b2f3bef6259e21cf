"""Contraction axes of a kernel, and the (K, N) matrix a quantized leaf stores.

A matmul-like op contracts some axes of a kernel with its input (the
*contraction*, K = their product, flattened in the declared order) and keeps
the others (the *output features*, N = their product, in increasing axis
order). Quantized leaves store that matrix: codes (K, N) packed along K,
scales per group of consecutive rows of K and per output feature.

Default contraction (shape only; right for Flax's conventions, where input
features come first):
  1-D and 2-D           (0,)            Dense / Linear (in, out)
  3-D (a, b, c), a > c  (0,)            DenseGeneral / Einsum in-projection
                                        (d_model, heads, head_dim)
  3-D, a <= c           (0, 1)          out-projection (heads, head_dim,
                                        d_model); 1-D conv (width, in, out)
  n-D, n >= 4           (0, ..., n-2)   conv HWIO (kh, kw, in, out) and 3-D
                                        convs: all but the output channels
Anything else (MoE (experts, in, out), Gemma's (3, heads, d, head_dim) qkv)
needs a rule, e.g. `(r".*experts.*", dict(axis=1))`. A wrong declaration
never makes `compressjax.run` inexact: the dispatcher uses the stored matrix
only when an op's dimension numbers contract exactly these axes, and
materializes the leaf otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from compressjax.core.errors import CompressionError


def default_contract(shape: Sequence[int]) -> tuple[int, ...]:
  """The contraction axes assumed for a kernel of this shape (module doc)."""
  nd = len(shape)
  if nd <= 2:
    return (0,)
  if nd == 3:
    return (0,) if shape[0] > shape[2] else (0, 1)
  return tuple(range(nd - 1))


def normalize_contract(axes: Any, shape: Sequence[int],
                       path: str = "<array>") -> tuple[int, ...]:
  """Validated contraction axes (None: the default). An int means one axis;
  negative axes count from the end; out of range is an error, not a wrap."""
  nd = len(shape)
  if nd == 0:
    raise CompressionError(
        "cannot quantize a 0-D (scalar) param: it has no axis to group along; "
        "skip it with a rule (pattern, None)", path)
  if axes is None:
    return default_contract(shape)
  many = isinstance(axes, (tuple, list))
  seq = tuple(axes) if many else (axes,)
  if not seq or not all(isinstance(a, numbers.Integral) and
                        not isinstance(a, bool) for a in seq):
    raise CompressionError(
        f"axis must be an int or a tuple of ints (the contraction axes), got "
        f"{axes!r}", path)
  bad = [a for a in seq if not -nd <= a < nd]
  if bad:
    raise CompressionError(
        f"axis {bad[0]} out of range for shape {tuple(shape)} (rank {nd}); "
        f"give contraction axes in [-{nd}, {nd - 1}]", path)
  out = tuple(int(a) % nd for a in seq)
  if len(set(out)) != len(out):
    raise CompressionError(f"axis {axes!r} repeats an axis", path)
  return out


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """The (K, N) matrix view of an array of `shape` contracted over
  `contract`: rows are the contraction flattened in the declared order,
  columns the remaining axes flattened in increasing order."""

  shape: tuple[int, ...]
  contract: tuple[int, ...]

  @property
  def rest(self) -> tuple[int, ...]:
    return tuple(d for d in range(len(self.shape)) if d not in self.contract)

  @property
  def perm(self) -> tuple[int, ...]:
    return self.contract + self.rest

  @property
  def k(self) -> int:
    return math.prod(self.shape[d] for d in self.contract)

  @property
  def n(self) -> int:
    return math.prod(self.shape[d] for d in self.rest)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[d] for d in self.rest)

  @property
  def in_shape(self) -> tuple[int, ...]:
    """The contracted axes' sizes, in the declared order (K's row-major
    shape: a per-input-channel vector (K,) reshaped to it)."""
    return tuple(self.shape[d] for d in self.contract)

  @property
  def is_identity(self) -> bool:
    return self.perm == tuple(range(len(self.shape)))

  def to_matrix(self, x):
    if not self.is_identity:
      x = jnp.transpose(x, self.perm)
    return x.reshape(self.k, self.n)

  def from_matrix(self, m):
    x = m.reshape(tuple(self.shape[d] for d in self.perm))
    if self.is_identity:
      return x
    inv = [0] * len(self.perm)
    for i, d in enumerate(self.perm):
      inv[d] = i
    return jnp.transpose(x, inv)


def apply_groups(x, s, fn: Callable):
  """fn(x, s) for a (K, N) matrix x and per-group values s of shape (G, N)
  or (G, 1): s is repeated over groups of K/G consecutive rows (exact)."""
  k, g = x.shape[0], s.shape[0]
  if g in (1, k):
    return fn(x, s)
  xs = x.reshape((g, k // g) + x.shape[1:])
  return fn(xs, s[:, None]).reshape(x.shape)


def group_reduce(x, groups: int, fn: Callable, per_tensor: bool = False):
  """fn over each group of a (K, N) matrix: (G, N), or (1, 1) per tensor."""
  if per_tensor:
    return fn(x, axis=(0, 1), keepdims=True)
  k, n = x.shape
  return fn(x.reshape(groups, k // groups, n), axis=1)


def group_sum_to(x, shape: tuple[int, int]):
  """Sums a (K, N) matrix over the elements sharing one entry of a per-group
  array of `shape` ((G, N) or (G, 1)); the adjoint of `apply_groups`."""
  k, n = x.shape
  g = shape[0]
  x = x.reshape(g, k // g, n).sum(1)
  return x.sum(1, keepdims=True) if shape[1] == 1 and n != 1 else x


def unstacked_layout(shape: Sequence[int], contract: Sequence[int], n: int
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shape and contraction axes of one index of a matrix leaf stacked along
  axis 0 (length n). Axis 0 must be an output axis: it is then the major
  part of the flattened columns N, so index i owns the i-th run of N / n
  columns. Raises NotStackable otherwise."""
  from compressjax.core.base import NotStackable
  if len(shape) < 2 or shape[0] != n:
    raise NotStackable(f"shape {tuple(shape)} is not stacked along a leading "
                       f"axis of length {n}")
  if 0 in contract:
    raise NotStackable(
        "its axis 0 (a contraction axis, along which it groups and packs) is "
        "the stacked axis; compress stacked params with the layer axis as an "
        "output axis, e.g. rules=[(r'.*scanned.*kernel', dict(axis=1))]")
  return tuple(shape[1:]), tuple(a - 1 for a in contract)


def split_columns(a, n: int):
  """(R, n * m) -> (n, R, m): column run i of a stored matrix first."""
  r, c = a.shape
  return jnp.moveaxis(a.reshape(r, n, c // n), 1, 0)


def matrix_operand(x, contract: tuple[int, ...], dims):
  """x as the (M, K) matrix that multiplies a leaf's stored (K, N) matrix
  when the op contracts exactly `contract` (in any order) and has no batch
  dimensions; None otherwise. Returns (x_mat, leading shape of the output)."""
  (lc, rc), (lb, rb) = dims
  if lb or rb or len(rc) != len(contract) or set(rc) != set(contract):
    return None
  pair = dict(zip(rc, lc))
  order = [pair[a] for a in contract]  # x's axes in the leaf's K order
  free = [d for d in range(x.ndim) if d not in order]
  xt = jnp.transpose(x, free + order) if free + order != list(
      range(x.ndim)) else x
  lead = tuple(x.shape[d] for d in free)
  k = 1
  for d in order:
    k *= x.shape[d]
  return xt.reshape(lead + (k,)), lead


def matrix_dims(lead: int, contract: Sequence[int]):
  """dot_general dimension numbers multiplying x (*lead, *in_shape) (a
  matrix operand reshaped to the leaf's contracted shape, declared order)
  by an array contracted over `contract`: output (*lead, *out_shape)."""
  return ((tuple(range(lead, lead + len(contract))), tuple(contract)),
          ((), ()))
