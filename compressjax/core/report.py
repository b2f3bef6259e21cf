"""Measurement: true bytes, bits per weight, compression ratio, per-layer error.

Bytes are what the tree really stores: every array child of a compressed leaf
(codes, scales, zero points, kept values, packed masks and indices, factors)
at its own dtype. Bits per weight divide by the number of elements of the
dense array the leaf stands for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core import base
from compressjax.core.base import CompressedLeaf, array_nbytes, materialize
from compressjax.core.errors import TreeMismatchError
from compressjax.core.tree import leaves_with_paths


def tree_nbytes(tree: Any) -> int:
  """Bytes stored by a (compressed) tree."""
  return sum(array_nbytes(x) for _, x in leaves_with_paths(tree)
             if hasattr(x, "shape"))


def num_weights(tree: Any) -> int:
  return sum(math.prod(x.shape) for _, x in leaves_with_paths(tree)
             if hasattr(x, "shape"))


def bits_per_weight(tree: Any) -> float:
  return 8.0 * tree_nbytes(tree) / max(num_weights(tree), 1)


def compression_ratio(original: Any, compressed: Any) -> float:
  return tree_nbytes(original) / max(tree_nbytes(compressed), 1)


def describe(leaf: Any) -> str:
  """Short format string, nested: e.g. '2:4(int4 g128)' (the leaf's own)."""
  return base.describe(leaf)


def sparsity(leaf: Any) -> float:
  """Structural sparsity (fraction of elements not stored)."""
  return leaf.sparsity if isinstance(leaf, CompressedLeaf) else 0.0


@dataclasses.dataclass(frozen=True)
class LayerReport:
  path: str
  format: str
  shape: tuple[int, ...]
  orig_bytes: int
  bytes: int
  bits_per_weight: float
  sparsity: float
  rank: int | None
  rel_error: float | None

  @property
  def ratio(self) -> float:
    return self.orig_bytes / max(self.bytes, 1)


def _rel_error(w, w_hat) -> float:
  w = jnp.asarray(w, jnp.float32)
  d = jnp.linalg.norm(w - jnp.asarray(w_hat, jnp.float32))
  n = jnp.linalg.norm(w)
  return float(d / n) if float(n) > 0 else float(d)


def layer_report(original: Any, compressed: Any,
                 errors: bool = True) -> list[LayerReport]:
  """Per-param figures for every leaf of `compressed` (matched by path with
  the same shape in `original`, the tree it was compressed from)."""
  orig = dict(leaves_with_paths(original))
  rows = []
  for path, leaf in leaves_with_paths(compressed):
    if not hasattr(leaf, "shape"):
      continue
    w = orig.get(path)
    if w is None or tuple(getattr(w, "shape", ())) != tuple(leaf.shape):
      what = ("has no param at this path" if w is None else
              f"has shape {tuple(getattr(w, 'shape', ()))} here, the "
              f"compressed tree {tuple(leaf.shape)}")
      raise TreeMismatchError(
          f"the original tree {what}: summary/layer_report compare a "
          "compressed tree with the tree it was compressed from; pass that "
          "tree (the same structure, e.g. both NNX states or both linen "
          "variable dicts)", path)
    ob = array_nbytes(w)
    err = 0.0
    if isinstance(leaf, CompressedLeaf):
      err = _rel_error(materialize(w), leaf.materialize()) if errors else None
    rows.append(LayerReport(
        path=path, format=describe(leaf), shape=tuple(leaf.shape),
        orig_bytes=int(ob), bytes=int(array_nbytes(leaf)),
        bits_per_weight=8.0 * array_nbytes(leaf) / max(math.prod(leaf.shape), 1),
        sparsity=sparsity(leaf),
        rank=leaf.rank if isinstance(leaf, CompressedLeaf) else None,
        rel_error=err))
  seen = {r.path for r in rows}
  extra = [p for p, w in orig.items() if hasattr(w, "shape") and p not in seen]
  if extra:
    raise TreeMismatchError(
        "the compressed tree has no param at this path, the original has: "
        "summary/layer_report compare a compressed tree with the tree it was "
        "compressed from; pass trees of the same structure",
        extra[0])
  return rows


def summary(original: Any, compressed: Any, errors: bool = True) -> str:
  """A readable per-layer table with a total row."""
  rows = layer_report(original, compressed, errors)
  head = ("path", "format", "shape", "bits/w", "sparsity", "rel.err",
          "bytes", "ratio")
  lines = []
  for r in rows:
    lines.append((r.path, r.format, "x".join(map(str, r.shape)),
                  f"{r.bits_per_weight:.3f}", f"{r.sparsity:.2f}",
                  "-" if r.rel_error is None else f"{r.rel_error:.4f}",
                  f"{r.bytes:,}", f"{r.ratio:.2f}x"))
  tb, ob = sum(r.bytes for r in rows), sum(r.orig_bytes for r in rows)
  nw = sum(math.prod(r.shape) for r in rows)
  lines.append(("TOTAL", "", f"{nw:,} w", f"{8 * tb / max(nw, 1):.3f}", "", "",
                f"{tb:,}", f"{ob / max(tb, 1):.2f}x"))
  widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))
  out = [fmt(head), fmt(["-" * w for w in widths])]
  out += [fmt(l) for l in lines]
  return "\n".join(out)
