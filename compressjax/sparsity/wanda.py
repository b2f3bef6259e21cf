"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models", Sec. 3).

Score of weight W_ij (input i, output j of the kernel's 2-D view: its
contracted axes flattened, by the rest; a Flax Dense kernel as it is) is
  S_ij = |W_ij| * ||X_i||_2,
with ||X_i||_2 the L2 norm of input feature i over all calibration tokens
(`LayerStats.norm`). Weights are compared per output (Eq. 2: within each output
neuron's incoming weights, i.e. down a kernel column) and the lowest
round(p * K) of every output are removed; N:M keeps the N highest scores in
each run of M consecutive inputs (along the last contracted axis). There is
no weight update, so this is magnitude pruning with another score: the masks
come from the shared selector (`sparsity.select`: one radix select per
output, no sort) and the leaves from `sparse_from_mask` / `nm_from_keep`.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from compressjax.core import rules as rules_lib
from compressjax.core import transform as transform_lib
from compressjax.core.base import CompressedLeaf
from compressjax.core.rules import option
from compressjax.core.errors import CompressionError
from compressjax.core.contraction import MatrixLayout
from compressjax.sparsity.magnitude import (check_sparse_config, nm_from_keep,
                                            sparse_from_mask)
from compressjax.sparsity.select import keep_top_n_of_m, prune_lowest


def wanda_scores(w, norm):
  """|W_ij| * ||X_i||_2 for a kernel w (K_in, ...) and norms (K_in,)."""
  w = jnp.asarray(w, jnp.float32)
  norm = jnp.asarray(norm, jnp.float32).reshape((-1,) + (1,) * (w.ndim - 1))
  return jnp.abs(w) * norm


def _check(path, view, norm_shape, cfg):
  shape = view.shape
  if len(shape) < 2:
    raise CompressionError("Wanda needs a kernel of rank >= 2 with the input "
                           "axis first", path)
  pattern = cfg.get("pattern", "unstructured")
  if pattern not in ("unstructured", "nm"):
    raise CompressionError(f"Wanda supports pattern 'unstructured' or 'nm', "
                           f"not {pattern!r}; use sparsify(...) for block or "
                           "channel patterns", path)
  check_sparse_config(path, shape, dict(cfg, axis=view.contract[-1]))
  if norm_shape is not None and tuple(norm_shape) != (view.k,):
    raise CompressionError(f"input norms {tuple(norm_shape)} do not match "
                           f"the {view.k} contracted inputs of shape "
                           f"{tuple(shape)} over axes {view.contract}", path)


def wanda_prune(w, norm, *, sparsity: float = 0.5,
                pattern: str = "unstructured", n: int = 2, m: int = 4,
                contract: tuple[int, ...] = (0,), path: str = "<array>"):
  """Wanda of a kernel w given per-input norms (K,) of its `contract`ed
  axes (K their product; default: a Flax kernel (K_in, ...)).

  Returns a SparseArray (unstructured: exactly round(sparsity * K) pruned
  per output) or an NMSparseArray (N of every M contracted inputs, along
  the last contracted axis).
  """
  w = jnp.asarray(w)
  WandaOptions(sparsity=sparsity, pattern=pattern, n=n, m=m)
  view = MatrixLayout(tuple(w.shape), tuple(contract))
  _check(path, view, jnp.shape(norm),
         dict(sparsity=sparsity, pattern=pattern, n=n, m=m))
  n_prune = round(sparsity * view.k)
  return _wanda(w, norm, view=view, nm=pattern == "nm", n=n, m=m,
                n_prune=n_prune, kept=(view.k - n_prune) * view.n)


@functools.partial(jax.jit, static_argnames=("view", "nm", "n", "m",
                                             "n_prune", "kept"))
def _wanda(w, norm, *, view, nm, n, m, n_prune, kept):
  scores = wanda_scores(view.to_matrix(w), norm)
  if nm:
    keep = keep_top_n_of_m(scores, n, m, 0)
    return nm_from_keep(w, view.from_matrix(keep), n, m, view.contract[-1])
  keep = prune_lowest(scores, n_prune, axis=0)  # per output, across inputs
  return sparse_from_mask(w, view.from_matrix(keep), (1,) * w.ndim,
                          "unstructured", kept=kept)


@rules_lib.options
class WandaOptions(rules_lib.Options):
  """Wanda pruning (see module doc)."""

  transform: ClassVar[str] = "wanda"
  sparsity: float = option(0.5, "fraction of each output's inputs removed",
                           **rules_lib.interval(0, 1, hi_open=True))
  pattern: Literal["unstructured", "nm"] = option(
      "unstructured", "per-output unstructured, or N of every M inputs",
      hint="use sparsify(...) for block or channel patterns")
  n: int = option(2, "N:M: weights kept per run", check=lambda v: v >= 1,
                  must="be >= 1")
  m: int = option(4, "N:M: run length along the input axis",
                  check=lambda v: 2 <= v <= 256, must="be in [2, 256]")


@transform_lib.builder(WandaOptions, positional=("sparsity",))
def wanda(stats, *, options, rules, default) -> transform_lib.Transform:
  """Wanda transform over a tree, given `compressjax.calibrate.capture` stats
  (the input-feature norms of every selected param)."""

  def check(path, w, cfg):
    if isinstance(w, CompressedLeaf):
      raise CompressionError(
          f"Wanda needs a float kernel, not a {type(w).__name__}; apply it "
          "first (chain(wanda(...), quantize(...)))", path)
    if path not in stats:
      raise CompressionError("no calibration statistics for this param; "
                             "capture with the same rules", path)
    _check(path, stats[path].view(w.shape), None, cfg)

  def leaf(path, w, cfg, state):
    return wanda_prune(w, stats[path].norm, contract=stats[path].contract,
                       path=path, **cfg)

  return transform_lib.leaf_transform("wanda", options, leaf, check, rules,
                                      default)
