"""Calibration capture: per-layer input statistics from an unmodified model.

`capture(model, params, batches)` runs the model (linen, NNX or a function)
through `compressjax.runtime` with an observer on every matmul whose weight is
a selected param, and accumulates, batch by batch and in float32:
  gram     X^T X        (K x K)      GPTQ / SparseGPT Hessians, SVD-LLM whitening
  abs_sum  sum |x_j|    (K,)         AWQ / ASVD activation scales
  sq_sum   sum x_j^2    (K,)         Wanda's ||X_j||_2
  abs_max  max |x_j|    (K,)         SmoothQuant
  count    number of tokens (rows of X)
Memory is bounded by the statistics, not the activations; each batch's step is
one jit-compiled call. A param used by several matmuls accumulates them all.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from compressjax.core.errors import CompressionError
from compressjax.core.rules import (Predicate, RulesLike, default_filter,
                                    resolve)
from compressjax.runtime.interpret import apply, as_function


@struct.dataclass
class LayerStats:
  gram: jax.Array
  abs_sum: jax.Array
  sq_sum: jax.Array
  abs_max: jax.Array
  count: jax.Array

  def __add__(self, o: "LayerStats") -> "LayerStats":
    return LayerStats(self.gram + o.gram, self.abs_sum + o.abs_sum,
                      self.sq_sum + o.sq_sum,
                      jnp.maximum(self.abs_max, o.abs_max),
                      self.count + o.count)

  @property
  def hessian(self):
    """GPTQ's H = (2 / N) X^T X."""
    return 2.0 * self.gram / jnp.maximum(self.count, 1)

  @property
  def mean_abs(self):
    return self.abs_sum / jnp.maximum(self.count, 1)

  @property
  def norm(self):
    """Per-input-feature L2 norm over all tokens (Wanda)."""
    return jnp.sqrt(self.sq_sum)


def _stats(x) -> LayerStats:
  xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  return LayerStats(gram=jnp.matmul(xf.T, xf, precision=hp),
                    abs_sum=jnp.abs(xf).sum(0), sq_sum=(xf * xf).sum(0),
                    abs_max=jnp.abs(xf).max(0),
                    count=jnp.asarray(xf.shape[0], jnp.float32))


def _finite(s: LayerStats) -> jax.Array:
  return (jnp.all(jnp.isfinite(s.gram)) & jnp.all(jnp.isfinite(s.abs_sum))
          & jnp.all(jnp.isfinite(s.abs_max)))


@jax.jit
def _merge(total, s, first_bad, i):
  """total + s; first_bad[j] = the first batch whose stats of layer j (in
  sorted path order) are not finite (-1: none yet). One dispatch a batch."""
  ok = jnp.stack([_finite(s[p]) for p in sorted(s)])
  first_bad = jnp.where((first_bad < 0) & ~ok, i, first_bad)
  total = jax.tree.map(lambda a, b: a + b, total, s,
                       is_leaf=lambda x: isinstance(x, LayerStats))
  return total, first_bad


def _describe(args) -> str:
  return ", ".join(
      f"{type(x).__name__}{tuple(x.shape)} {x.dtype}" if hasattr(x, "shape")
      else repr(x) for x in jax.tree.leaves(args))


def _batch_args(i: int, batch: Any, ref: Any) -> tuple[tuple, Any]:
  """The model args of batch i (an array, or a tuple of args), checked:
  array leaves only, and the structure and ranks of batch 0."""
  if isinstance(batch, list):
    raise CompressionError(
        f"calibration batch {i} is a list: pass each batch as an array or a "
        "tuple of model args (a list is ambiguous)")
  args = batch if isinstance(batch, tuple) else (batch,)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      args, is_leaf=lambda x: x is None)
  if not flat:
    raise CompressionError(f"calibration batch {i} holds no arrays")
  for p, x in flat:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      where = jax.tree_util.keystr(p)
      raise CompressionError(
          f"calibration batch {i}: argument {where} is a "
          f"{type(x).__name__} ({x!r:.40}), not an array; batches are "
          "arrays or tuples of arrays (the model's positional args)")
  sig = (treedef, tuple(len(x.shape) for _, x in flat))
  if ref is not None and sig != ref:
    raise CompressionError(
        f"calibration batch {i} ({_describe(args)}) differs in structure or "
        f"rank from batch 0; every batch must be the same kind of model "
        f"input")
  return args, sig


def capture(model: Any, params: Any, batches: Iterable[Any], *,
            rules: RulesLike = None,
            default: Predicate | None = default_filter,
            method: str | Callable | None = None,
            progress: Callable[[int], None] | None = None
            ) -> dict[str, LayerStats]:
  """Streams `batches` (each an array or a tuple of model args) through the
  model; returns {param path: LayerStats} for the selected params.

  `rules`/`default` select the params as for a transform (`default=None`:
  rules only); a rule's option overrides are for the transform that uses
  the stats and are not read here. Fails, naming the batch, on a batch that
  is not arrays, that differs in structure or rank from batch 0, that the
  model rejects, or that makes a layer's statistics non-finite (NaN / Inf
  inputs, or X^T X overflowing float32), naming that layer too.
  """
  if hasattr(batches, "shape") or isinstance(batches, (str, bytes)):
    raise CompressionError(
        f"capture: batches must be an iterable of batches, got a "
        f"{type(batches).__name__}; pass [x] for a single batch")
  plan = resolve(params, {}, rules, default, transform="capture")
  paths = frozenset(plan.configs)
  if not paths:
    raise CompressionError(
        "capture selected no param: check `rules` and `default` (None means "
        "rules only; default_filter picks float kernels of rank >= 2 that "
        "are not embeddings, norms or biases)")
  fn = as_function(model, params, method)

  def step(params, args):
    found: dict[str, LayerStats] = {}

    def observe(path, x, dims):
      (lc, rc), (lb, rb) = dims
      if tuple(rc) != (0,) or tuple(lc) != (x.ndim - 1,) or lb or rb:
        raise CompressionError(
            f"calibration supports x @ W with W's input axis first; this "
            f"matmul has dimension numbers {dims}; skip the param with a rule",
            path)
      s = _stats(x)
      found[path] = found[path] + s if path in found else s

    apply(fn, params, *args, observe=observe, observe_paths=paths)
    return found

  jstep = jax.jit(step)
  total: dict[str, LayerStats] | None = None
  first_bad = None
  ref = None
  for i, batch in enumerate(batches):
    args, sig = _batch_args(i, batch, ref)
    ref = ref or sig
    try:
      s = jstep(params, args)
    except CompressionError as e:
      if "calibration batch" in str(e):
        raise
      raise CompressionError(  # e.g. the runtime's shape error, naming the param
          f"calibration batch {i} ({_describe(args)}) fails in the model: "
          f"{e}; check the batch's shape and dtype against the model's "
          "input") from None
    except Exception as e:  # shape / dtype errors from inside the model
      msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise CompressionError(
          f"calibration batch {i} ({_describe(args)}) fails in the model: "
          f"{type(e).__name__}: {msg[:300]}; check the batch's shape and "
          "dtype against the model's input") from e
    if total is None:
      total = jax.tree.map(jnp.zeros_like, s)
      first_bad = jnp.full((len(s),), -1, jnp.int32)
    total, first_bad = _merge(total, s, first_bad, i)
    if progress:
      progress(i + 1)
  if total is None:
    raise CompressionError("capture got no batches")
  bad = np.asarray(first_bad)
  if (bad >= 0).any():
    names = sorted(total)
    b = int(bad[bad >= 0].min())
    hit = [p for p in plan.configs if p in total and bad[names.index(p)] == b]
    raise CompressionError(
        f"calibration batch {b} (0-based) gives non-finite statistics (NaN "
        f"or Inf inputs, or X^T X overflowing float32) for {len(hit)} "
        f"layer(s), first {hit[0]!r}; fix or drop that batch (check the data "
        "and the float model's activations on it)", hit[0])
  missing = sorted(paths - set(total))
  if missing:
    raise CompressionError(f"selected params never used by a matmul: "
                           f"{missing[:5]}; skip them with a rule")
  return total
