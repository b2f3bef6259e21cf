"""Per-layer sensitivity of a compressed setting, without an evaluation each.

With dW = W - Q(W) the error a candidate makes in layer l (kernel layout,
K_in x N_out, used as x @ W):
  weight  ||dW||_F^2
  output  ||X dW||_F^2 = tr(dW^T G dW), G = X^T X the captured Gram of the
          layer's calibration inputs (no new forward pass; GPTQ's objective)
  hawq    Tr(H_l) / n_l * ||dW||^2 / 2: HAWQ-v2 (Dong et al. 2020, Sec. 3,
          Eq. 5 up to the constant), with Tr(H_l), the trace of the loss
          Hessian's diagonal block of layer l, from Hutchinson's estimator
          Tr(H_l) ~ E_v[v_l^T (H v)_l], v Rademacher (Avron & Toledo 2011;
          HAWQ-v2 Algorithm 1) through Hessian-vector products
  fisher  sum_ij F_ij dW_ij^2 / 2 with F the empirical diagonal Fisher
          E_n[g_n^2] of per-example gradients: the second-order Taylor term
          of the loss with H ~ F (Optimal Brain Damage's diagonal; the
          gradient term vanishes at a trained minimum)
  loss    the exact change of the loss when only layer l is compressed: one
          evaluation per (layer, candidate), the slow ground truth the
          proxies are checked against (`correlations`, Spearman's rho).
Losses are `loss_fn(params, batch)` averaged over `batches`.

Hutchinson draws one v over all layers at once (as HAWQ-v2 / PyHessian):
E[v_l^T H_lm v_m] = 0 for l != m, so each layer's estimate is unbiased.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.core.rules import Predicate, RuleLike, default_filter, resolve
from compressjax.core.tree import is_float_array, leaves_with_paths, map_with_paths

_HI = jax.lax.Precision.HIGHEST
PROXIES = ("weight", "output", "hawq", "fisher")


@jax.jit
def _weight_error(dw):
  return jnp.sum(dw * dw)


@jax.jit
def _output_error(dw, gram):
  d = dw.reshape(gram.shape[0], -1)
  return jnp.sum(d * jnp.matmul(gram, d, precision=_HI))


@jax.jit
def _fisher_error(dw, f):
  return 0.5 * jnp.sum(f * dw * dw)


def layer_scores(w, w_hat, *, path: str = "<array>", gram=None,
                 trace: float | None = None, fisher=None) -> dict[str, float]:
  """Proxy scores of replacing w by w_hat (see module doc)."""
  w = jnp.asarray(w, jnp.float32)
  dw = w - jnp.asarray(w_hat, jnp.float32)
  sq = float(_weight_error(dw))
  out = {"weight": sq}
  if gram is not None:
    gram = jnp.asarray(gram, jnp.float32)
    if gram.shape != (w.shape[0], w.shape[0]):
      raise CompressionError(f"Gram {tuple(gram.shape)} does not match "
                             f"in_features {w.shape[0]} of {tuple(w.shape)}",
                             path)
    out["output"] = float(_output_error(dw, gram))
  if trace is not None:
    out["hawq"] = 0.5 * float(trace) / w.size * sq
  if fisher is not None:
    f = jnp.asarray(fisher, jnp.float32)
    if f.shape != w.shape:
      raise CompressionError(f"Fisher diagonal {tuple(f.shape)} does not "
                             f"match the weight {tuple(w.shape)}", path)
    out["fisher"] = float(_fisher_error(dw, f))
  return out


# ----------------------------------------------------------------------------
# estimators over the loss


def _check_loss_inputs(params, batches, what):
  if batches is None or len(batches) == 0:
    raise CompressionError(f"{what} needs at least one batch")
  bad = [p for p, x in leaves_with_paths(params) if not is_float_array(x)]
  if bad:
    raise CompressionError(f"{what} differentiates the loss by every param; "
                           f"these are not float arrays: {bad[:5]} (pass the "
                           "float params, e.g. materialize_tree(tree))")


def _paths(params, rules, default) -> list[str]:
  plan = resolve(params, {}, rules, default, transform="sensitivity")
  paths = [p for p, _ in leaves_with_paths(params) if p in plan]
  if not paths:
    raise CompressionError("no layer selected; check rules and default")
  return paths


def hessian_trace(loss_fn: Callable[[Any, Any], Any], params: Any,
                  batches: Sequence[Any], *, key: jax.Array,
                  samples: int = 32,
                  rules: Sequence[RuleLike] | None = None,
                  default: Predicate | None = default_filter,
                  return_stderr: bool = False):
  """Hutchinson estimate of Tr(H_l) per selected layer (HAWQ-v2, Alg. 1).

  H is the Hessian of the mean of loss_fn(params, b) over `batches`. Returns
  {path: trace} (and {path: standard error of the mean} with
  return_stderr)."""
  _check_loss_inputs(params, batches, "hessian_trace")
  if samples < 1:
    raise CompressionError(f"samples must be >= 1, got {samples}")
  paths = set(_paths(params, rules, default))

  @jax.jit
  def hvp(p, v, b):
    return jax.jvp(lambda q: jax.grad(loss_fn)(q, b), (p,), (v,))[1]

  @jax.jit
  def draw(k, params):
    def one(path, x):
      if path not in paths:
        return jnp.zeros_like(x)
      kk = jax.random.fold_in(k, zlib.crc32(path.encode()))
      return jax.random.rademacher(kk, x.shape, x.dtype)
    return map_with_paths(one, params)

  @jax.jit
  def quad(v, hv):
    return {p: jnp.sum(a * b) for (p, a), (_, b) in zip(
        leaves_with_paths(v), leaves_with_paths(hv)) if p in paths}

  est = {p: [] for p in paths}
  for s in range(samples):
    v = draw(jax.random.fold_in(key, s), params)
    hv = None
    for b in batches:
      h = hvp(params, v, b)
      hv = h if hv is None else jax.tree.map(jnp.add, hv, h)
    hv = jax.tree.map(lambda x: x / len(batches), hv)
    for p, x in quad(v, hv).items():
      est[p].append(float(x))
  order = [p for p, _ in leaves_with_paths(params) if p in paths]
  tr = {p: float(np.mean(est[p])) for p in order}
  if not return_stderr:
    return tr
  se = {p: float(np.std(est[p], ddof=1) / math.sqrt(samples))
        if samples > 1 else float("inf") for p in order}
  return tr, se


def fisher_diagonal(loss_fn: Callable[[Any, Any], Any], params: Any,
                    batches: Sequence[Any], *,
                    rules: Sequence[RuleLike] | None = None,
                    default: Predicate | None = default_filter
                    ) -> dict[str, jax.Array]:
  """Empirical diagonal Fisher E_n[(d loss_n / dW)^2] per selected layer.

  Every leaf of a batch has a leading example axis; loss_fn is called on
  one example at a time (a leading axis of 1) under vmap."""
  _check_loss_inputs(params, batches, "fisher_diagonal")
  paths = _paths(params, rules, default)

  def select(g):
    d = dict(leaves_with_paths(g))
    return {p: d[p] for p in paths}

  @jax.jit
  def batch_sum(p, b):
    def one(x):
      g = jax.grad(loss_fn)(p, jax.tree.map(lambda a: a[None], x))
      return jax.tree.map(jnp.square, select(g))
    sq = jax.vmap(one)(b)
    return jax.tree.map(lambda a: a.sum(0), sq)

  total, count = None, 0
  for b in batches:
    n = jax.tree.leaves(b)[0].shape[0]
    s = batch_sum(params, b)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    count += n
  return {p: total[p] / count for p in paths}


class LossDelta:
  """loss(params with one layer replaced) - loss(params), over `batches`.

  The replacement is materialized to the layer's dtype, so one compiled loss
  serves every (layer, candidate)."""

  def __init__(self, loss_fn: Callable, params: Any, batches: Sequence[Any]):
    _check_loss_inputs(params, batches, "the 'loss' proxy")
    self.params = params
    self.batches = list(batches)
    self._f = jax.jit(loss_fn)
    self.base = self.mean(params)

  def mean(self, params) -> float:
    # float64 accumulation over batches; each batch in float32
    return float(np.mean([float(self._f(params, b)) for b in self.batches]))

  def __call__(self, path: str, leaf: Any) -> float:
    from compressjax.core.base import materialize
    old = dict(leaves_with_paths(self.params))[path]
    new = jnp.asarray(materialize(leaf)).astype(old.dtype)
    p = map_with_paths(lambda q, x: new if q == path else x, self.params)
    return self.mean(p) - self.base


# ----------------------------------------------------------------------------
# rank correlation


def rank(x) -> np.ndarray:
  """Ranks 0..n-1 with ties given their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x))
  r[order] = np.arange(len(x))
  _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
  return (np.bincount(inv, weights=r) / counts)[inv]


def spearman(a, b) -> float:
  """Spearman's rank correlation (Pearson's r of the tie-averaged ranks);
  NaN when either side is constant."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise CompressionError(f"spearman needs two 1-D arrays of one length, "
                           f"got {a.shape} and {b.shape}")
  ra, rb = rank(a), rank(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  den = math.sqrt(float(ra @ ra) * float(rb @ rb))
  return float(ra @ rb / den) if den > 0 else float("nan")


def correlations(table, truth: str = "loss",
                 proxies: Sequence[str] | None = None) -> dict[str, dict]:
  """Spearman's rho of each proxy with the ground truth over the table.

  'pooled': over every (layer, candidate) pair that changes the weights;
  'across_layers': for each candidate label shared by all layers, rho over
  the layers (which layer is most sensitive at this setting), then the mean
  over labels."""
  proxies = [p for p in (proxies or table.proxies) if p != truth]
  t = table.scores(truth)
  w = table.scores("weight")
  out = {}
  for name in proxies:
    s = table.scores(name)
    live = [(x, y) for ls, lt, lw in zip(s, t, w)
            for x, y, z in zip(ls, lt, lw) if z > 0]
    pooled = spearman([x for x, _ in live], [y for _, y in live]) \
        if len(live) > 1 else float("nan")
    labels = set.intersection(*(
        {c.label for c in l.candidates} for l in table.layers))
    per = {}
    for lab in sorted(labels):
      xs, ys, zs = [], [], []
      for l, ls, lt, lw in zip(table.layers, s, t, w):
        i = l.index(lab)
        xs.append(ls[i]); ys.append(lt[i]); zs.append(lw[i])
      if len(xs) > 2 and max(zs) > 0:
        per[lab] = spearman(xs, ys)
    vals = [v for v in per.values() if not math.isnan(v)]
    out[name] = dict(pooled=pooled,
                     across_layers=float(np.mean(vals)) if vals else
                     float("nan"), per_candidate=per)
  return out
