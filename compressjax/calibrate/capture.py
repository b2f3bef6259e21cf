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

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from compressjax.core.errors import CompressionError
from compressjax.core.rules import Predicate, RuleLike, default_filter, resolve
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


def capture(model: Any, params: Any, batches: Iterable[Any], *,
            rules: Sequence[RuleLike] | None = None,
            default: Predicate | None = default_filter,
            method: str | Callable | None = None,
            progress: Callable[[int], None] | None = None
            ) -> dict[str, LayerStats]:
  """Streams `batches` (each an array or a tuple of model args) through the
  model; returns {param path: LayerStats} for the selected params."""
  plan = resolve(params, {}, rules, default, transform="capture")
  paths = frozenset(plan.configs)
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
  for i, batch in enumerate(batches):
    args = batch if isinstance(batch, tuple) else (batch,)
    s = jstep(params, args)
    total = s if total is None else jax.tree.map(
        lambda a, b: a + b, total, s, is_leaf=lambda x: isinstance(
            x, LayerStats))
    if progress:
      progress(i + 1)
  if total is None:
    raise CompressionError("capture got no batches")
  missing = sorted(paths - set(total))
  if missing:
    raise CompressionError(f"selected params never used by a matmul: "
                           f"{missing[:5]}; skip them with a rule")
  return total
