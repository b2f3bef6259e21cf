"""Magnitude pruning: unstructured (per-layer or global threshold), N:M, block
and channel patterns.

Scores are |w| for elements and the L2 norm of a block (or channel) for
structured patterns; the lowest-scoring `round(sparsity * count)` units are
removed (ties broken by position, so results are deterministic) by the shared
selector (`sparsity.select`, as Wanda, SparseGPT and sparse training). This is the
magnitude baseline of SparseGPT (Frantar & Alistarh 2023, Sec. 5) and Wanda
(Sun et al. 2023, Sec. 4); N:M keeps the N largest of every M consecutive
weights along the input axis (Mishra et al. 2021, NVIDIA 2:4).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout
from compressjax.core.errors import CompressionError
from compressjax.core.tree import INPUT_AXIS
from compressjax.core.base import Stage, compress_inside, inner_arrays
from compressjax.core import rules as rules_lib
from compressjax.core.rules import option
from compressjax.core.sparse import (NMSparseArray, SparseArray,
                                     dense_to_blocks, index_bits)
from compressjax.core.tree import leaves_with_paths
from compressjax.core import transform as transform_lib
from compressjax.sparsity.select import keep_top_n_of_m, prune_lowest

PATTERNS = ("unstructured", "nm", "block", "channel")


def block_shape(shape, pattern: str, block=None, channel_axis=None):
  nd = len(shape)
  if pattern == "unstructured":
    return (1,) * nd
  if pattern == "block":
    return tuple(block)
  # channel: remove whole slices of `channel_axis` (default: input features)
  ax = INPUT_AXIS if channel_axis is None else channel_axis % nd
  return tuple(1 if d == ax else s for d, s in enumerate(shape))


def block_scores(w, block):
  b = dense_to_blocks(jnp.asarray(w, jnp.float32), block)
  nd = w.ndim
  return jnp.sqrt(jnp.sum(b * b, axis=tuple(range(nd, 2 * nd))))


def sparse_from_mask(w, keep_blocks, block, pattern: str,
                     kept: int | None = None) -> SparseArray:
  """Builds a SparseArray from dense w and a boolean mask over the block grid
  (traceable under jit when the number of `kept` blocks is given)."""
  w = jnp.asarray(w)
  bsz = math.prod(block)
  flat_keep = keep_blocks.reshape(-1)
  blocks = dense_to_blocks(w, block).reshape(-1, bsz)
  if kept is None:
    kept = int(np.asarray(flat_keep).sum())
  idx = jnp.nonzero(flat_keep, size=kept)[0]
  values = blocks[idx].reshape(-1)
  return SparseArray(values=values, mask=layout.pack(flat_keep, 1, 0),
                     shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name,
                     block=tuple(block), pattern=pattern)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def nm_from_keep(w, keep, n: int, m: int, axis: int) -> NMSparseArray:
  """NMSparseArray of w keeping the positions in `keep` (a mask with exactly
  n of every m along `axis`): kept values and their in-run positions, in
  order."""
  x = jnp.moveaxis(jnp.asarray(w), axis, -1)
  kp = jnp.moveaxis(keep, axis, -1)
  runs = x.reshape(x.shape[:-1] + (x.shape[-1] // m, m))
  kr = kp.reshape(runs.shape)
  if n * m <= 64:  # one-hot on the rank of each kept weight: no sort
    rank = jnp.cumsum(kr, axis=-1) - 1
    hit = kr[..., None, :] & (rank[..., None, :] == jnp.arange(n)[:, None])
    pos = jnp.sum(jnp.where(hit, jnp.arange(m), 0), -1)
  else:  # kept positions first, in order
    pos = jnp.argsort(~kr, axis=-1, stable=True)[..., :n]
  vals = jnp.take_along_axis(runs, pos, axis=-1)
  flat = lambda a: jnp.moveaxis(a.reshape(x.shape[:-1] + (-1,)), -1, axis)
  return NMSparseArray(
      values=flat(vals),
      indices=layout.pack(flat(pos.astype(jnp.uint8)), index_bits(m), axis),
      shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, n=n, m=m,
      axis=axis)


def nm_sparsify(w, n: int, m: int, axis: int | None = None,
                scores=None) -> NMSparseArray:
  """Keeps the n largest-|w| of every m consecutive elements along `axis`
  (or the n largest `scores`, an array shaped like w: Wanda, a given mask;
  ties: the earlier position), selected by `select.keep_top_n_of_m`."""
  w = jnp.asarray(w)
  axis = INPUT_AXIS if axis is None else axis % w.ndim
  sc = jnp.abs(w.astype(jnp.float32)) if scores is None else jnp.asarray(
      scores, jnp.float32)
  return nm_from_keep(w, keep_top_n_of_m(sc, n, m, axis), n, m, axis)


def _check_axis(path: str, name: str, axis, nd: int) -> None:
  """An axis option must name an axis: out of range is an error, no wrap."""
  if axis is None:
    return
  if isinstance(axis, bool) or not isinstance(axis, int) or not (
      -nd <= axis < nd):
    raise CompressionError(f"{name}={axis!r} is not an axis of a rank-{nd} "
                           f"param; give an int in [-{nd}, {nd - 1}]", path)


def check_sparse_config(path: str, shape, cfg: Mapping[str, Any]) -> None:
  pattern = cfg.get("pattern", "unstructured")
  nd = len(shape)
  if pattern == "channel":
    _check_axis(path, "channel_axis", cfg.get("channel_axis"), nd)
  if pattern not in PATTERNS:
    raise CompressionError(f"unknown sparsity pattern {pattern!r}; use one of "
                           f"{PATTERNS}", path)
  if pattern == "nm":
    n, m = cfg.get("n"), cfg.get("m")
    if n is None or m is None or not 0 < n < m:
      raise CompressionError(f"N:M sparsity needs 0 < N < M, got {n}:{m}; "
                             "e.g. n=2, m=4", path)
    if m > 256:
      raise CompressionError(f"M={m} is too large (at most 256)", path)
    axis = cfg.get("axis")
    _check_axis(path, "axis", axis, nd)
    axis = INPUT_AXIS if axis is None else axis % nd
    if shape[axis] % m:
      raise CompressionError(
          f"M={m} does not divide in_features {shape[axis]} (axis {axis} of "
          f"shape {tuple(shape)}); choose an M that divides it or skip this "
          "param with a rule", path)
    return
  s = cfg.get("sparsity")
  if s is None or not 0.0 <= s < 1.0:
    raise CompressionError(f"sparsity must be in [0, 1), got {s}", path)
  if pattern == "block":
    block = cfg.get("block")
    if block is None or len(block) != nd or any(
        b < 1 or d % b for d, b in zip(shape, block)):
      raise CompressionError(
          f"block {block} does not tile shape {tuple(shape)}; give one block "
          "size per dimension, each dividing it", path)
  if cfg.get("scope", "layer") not in ("layer", "global"):
    raise CompressionError("scope must be 'layer' or 'global'", path)
  if cfg.get("scope", "layer") == "global" and pattern != "unstructured":
    raise CompressionError("a global threshold is for unstructured sparsity "
                           "only", path)


def _sparsify_leaf(path, leaf, cfg, state):
  # what sparsifying may follow is the leaf type's to say (Stage order)
  return compress_inside(leaf, Stage.SPARSIFY,
                         lambda p, x, _: _sparsify_dense(x, cfg, state), path)


def _sparsify_dense(leaf, cfg, state):
  pattern = cfg.get("pattern", "unstructured")
  if pattern == "nm":
    return nm_sparsify(leaf, cfg["n"], cfg["m"], cfg.get("axis"))
  block = block_shape(leaf.shape, pattern, cfg.get("block"),
                      cfg.get("channel_axis"))
  scores = block_scores(leaf, block)
  if cfg.get("scope", "layer") == "global":
    # Ties at the threshold are pruned too, so slightly more may go.
    keep = scores > state.extra["threshold"]
  else:
    keep = prune_lowest(scores, round(cfg["sparsity"] * scores.size))
  return sparse_from_mask(leaf, keep, block, pattern)


def _global_threshold(params, plan):
  """One magnitude threshold across all selected (global-scope) leaves."""
  chosen = [(p, l) for p, l in leaves_with_paths(params)
            if p in plan and plan.configs[p].get("scope") == "global"]
  if not chosen:
    return {}
  sparsities = {plan.configs[p]["sparsity"] for p, _ in chosen}
  if len(sparsities) != 1:
    raise CompressionError("global sparsity needs one target sparsity for "
                           f"all its params, got {sorted(sparsities)}")
  s = sparsities.pop()
  mags = jnp.concatenate([jnp.abs(jnp.asarray(x, jnp.float32)).ravel()
                          for p, l in chosen
                          for _, x, _ in inner_arrays(l, Stage.SPARSIFY, p)])
  n_prune = round(s * mags.size)
  if n_prune == 0:
    return {"threshold": -1.0}
  return {"threshold": jnp.sort(mags)[n_prune - 1]}


def _check(path, leaf, cfg):
  for p, x, _ in inner_arrays(leaf, Stage.SPARSIFY, path):
    check_sparse_config(p, x.shape, cfg)


@rules_lib.options
class SparsifyOptions(rules_lib.Options):
  """Magnitude sparsification (see module doc)."""

  transform: ClassVar[str] = "sparsify"
  sparsity: float = option(0.5, "fraction of weights (or blocks) removed",
                           **rules_lib.interval(0, 1, hi_open=True))
  pattern: Literal[PATTERNS] = option(
      "unstructured", "what is removed: single weights, N of every M, "
      "blocks of `block`, or whole slices of `channel_axis`")
  n: int | None = option(None, "N:M: weights kept per run", check=lambda v:
                         v >= 1, must="be >= 1")
  m: int | None = option(None, "N:M: run length along `axis`",
                         check=lambda v: 2 <= v <= 256, must="be in [2, 256]")
  axis: int | None = option(None, "N:M axis (None: the input axis)")
  block: tuple[int, ...] | None = option(
      None, "pattern='block': block shape, one size per dimension",
      check=lambda b: all(x >= 1 for x in b), must="hold sizes >= 1")
  channel_axis: int | None = option(
      None, "pattern='channel': the axis whose slices go (None: input axis)")
  scope: Literal["layer", "global"] = option(
      "layer", "unstructured: one threshold per layer or across all")


@transform_lib.builder(SparsifyOptions, positional=("sparsity",))
def sparsify(*, options, rules, default) -> transform_lib.Transform:
  """Magnitude sparsification transform (see module doc).

  pattern='unstructured' (scope 'layer' or 'global'), 'nm' (n of every m along
  `axis`, default the input axis), 'block' (`block` shape) or 'channel'
  (whole slices of `channel_axis`, default the input axis).
  """
  return transform_lib.leaf_transform("sparsify", options, _sparsify_leaf,
                                      _check, rules, default,
                                      precompute=_global_threshold)
