"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration",
Sec. 3.2, eq. 4-5).

Weights on input channels with large activations matter more, so AWQ scales
them up before quantizing (Flax layout: W is K_in x N_out, y = x @ W):

  s(alpha) = mean_t |x_tj| ** alpha,  normalized s / sqrt(max(s) min(s))
  W_hat(alpha) = diag(1/s) Q(diag(s) W)                            (eq. 4)
  alpha* = argmin over alpha in {0, 1/n, ..., (n-1)/n} of
           || X W - X W_hat(alpha) ||^2 summed over the group's consumers (eq. 5)

Since ||X D||_F^2 = tr(D^T G D) with the Gram G = X^T X, the search needs only
the captured statistics (`compressjax.calibrate.capture`), no activations. The
loss is reported as a mean over tokens and outputs. alpha = 0 gives s = 1,
i.e. plain round-to-nearest, so the chosen scale is never worse than RTN on
this loss. As in the reference code the loss is on the consumers' outputs of
the float model's activations (one-shot); the reference measures it after the
whole attention / MLP module, we on the linear outputs (exact from G).

Then the clipping search (the reference's auto_clip): per output channel and
quantization group of the scaled weight W' = diag(s) W, shrink the range the
quantizer sees by r in 1, 1 - 1/n_clip, ... (int(max_shrink * n_clip)
candidates, the first being no clipping), quantize, and keep the r with the
lowest error of that group's partial output, d^T G'_gg d with
G' = diag(1/s) G diag(1/s) the Gram of x / s (its diagonal block for the
group). So clipping never increases that per-group error; the QArray just
gets smaller scales. Symmetric: clip to +-r max|w| as the reference. With a
zero point we clip to [r min(w, 0), r max(w, 0)]: the reference's +-r max|w|
puts both ends at -lo / scale = (2^b - 1) / 2, an exact rounding tie of the
zero point, whose outcome then depends on float rounding details (jit vs
not); shrinking the group's own range keeps its zero point.

Scales fold into the producer of the group's input where `groups` say so
(`compressjax.quantization.scaling`); elsewhere the consumer becomes
InputTransform(weight=QArray of diag(s) W, scale=1/s). Defaults as in the
paper: 4 bits, groups of 128 inputs, zero point (asymmetric), 20 grid points,
max shrink 0.5 over 20 steps. The weights are the same QArrays round-to-nearest
produces (`quantize_array`), so any integer bit width or element format works.

Multi-axis kernels (DenseGeneral / Einsum, e.g. (heads, head_dim, d)
contracting (0, 1)): everything above is on the kernel's (K, N) view over
the statistics' contraction (the view GPTQ and Wanda use; `scaling`'s module
doc): s has one entry per contracted element, the searches run on the view,
and the QArray keeps the contraction (its storage is that view's RTN).

Deviations: a channel that never fires (mean |x_j| = 0) has its mean floored
at 1e-6 of the largest one (relative, instead of the reference's absolute
clamp of s at 1e-4, so AWQ is invariant to rescaling X). The reference skips
the clip search for query/key (their error enters through softmax, not
linearly); reproduce that with a rule such as
`(r".*attn/(query|key)/kernel", dict(n_clip=0))`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core import transform as transform_lib
from compressjax.core.contraction import MatrixLayout
from compressjax.core.errors import CompressionError
from compressjax.core import rules as rules_lib
from compressjax.core.format import Format
from compressjax.core.rules import option
from compressjax.quantization.rtn import (check_quant_config, quantize_array,
                                      resolve_format)
from compressjax.quantization.scaling import (ScaleGroup, consumer_weight,
                                          gram_of_scaled, scale_transform,
                                          with_weight)

_HI = jax.lax.Precision.HIGHEST
EPS = 1e-6  # floor on mean|x_j|, relative to the largest channel's
_QKEYS = ("bits", "format", "group_size", "symmetric")


def awq_scale(mean_abs, alpha) -> jax.Array:
  """s = mean|x|^alpha (floored), normalized by sqrt(max(s) min(s))."""
  m = jnp.abs(jnp.asarray(mean_abs, jnp.float32))
  top = jnp.max(m)
  m = jnp.where(top > 0, jnp.maximum(m, EPS * top), 1.0)
  s = m ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def alpha_grid(n_grid: int) -> np.ndarray:
  """The paper's grid: n_grid points i / n_grid in [0, 1)."""
  return np.arange(n_grid, dtype=np.float32) / n_grid


def shrink_grid(max_shrink: float, n_clip: int) -> tuple[float, ...]:
  """Clip ratios 1 - i / n_clip for i < max_shrink * n_clip (1 = no clip)."""
  n = int(math.floor(max_shrink * n_clip + 1e-9)) if n_clip else 0
  return tuple(1.0 - i / n_clip for i in range(n)) or (1.0,)


def _qcfg(bits=4, format=None, group_size=128, symmetric=False):
  return (("bits", bits), ("format", format), ("group_size", group_size),
          ("symmetric", bool(symmetric)))


def _fake_quant(w, q):
  """quantize_array(w, ...).materialize() in float32: the format's own
  `fake_quantize` (no packed codes: much faster to compile inside the
  searches); tests check the two agree."""
  cfg = dict(q)
  return resolve_format(cfg, "<array>").fake_quantize(
      w, contract=(0,), group_size=cfg["group_size"])


@functools.partial(jax.jit, static_argnames=("qcfgs", "n_grid"))
def _scale_losses(weights, gram, mean_abs, *, qcfgs, n_grid):
  """Sum over consumers of tr(D^T G D), D = W - diag(1/s) Q(diag(s) W)."""
  gram = gram.astype(jnp.float32)

  def loss(alpha):
    s = awq_scale(mean_abs, alpha)[:, None]
    tot = jnp.float32(0)
    for w, q in zip(weights, qcfgs):
      wf = w.astype(jnp.float32)
      d = wf - _fake_quant(s * wf, q) / s
      tot = tot + jnp.sum(d * jnp.matmul(gram, d, precision=_HI))
    return tot

  return jax.lax.map(loss, jnp.asarray(alpha_grid(n_grid)))


@functools.partial(jax.jit, static_argnames=("qcfgs", "n_grid"))
def _scale_search(weights, gram, mean_abs, norm, *, qcfgs, n_grid):
  losses = _scale_losses(weights, gram, mean_abs, qcfgs=qcfgs,
                         n_grid=n_grid) / jnp.maximum(norm, 1)
  i = jnp.argmin(losses)  # first minimum: alpha = 0 wins ties
  return losses, i, awq_scale(mean_abs, i / n_grid)


class ScaleSearch(NamedTuple):
  scale: jax.Array   # (K,) the normalized s at the best alpha
  alpha: float
  losses: jax.Array  # (n_grid,) output MSE per grid point


def _search(weights, qcfgs, gram, mean_abs, count, n_grid) -> ScaleSearch:
  n_out = sum(int(w.shape[1]) for w in weights)
  losses, i, s = _scale_search(tuple(weights), jnp.asarray(gram),
                               jnp.asarray(mean_abs),
                               jnp.asarray(count, jnp.float32) * n_out,
                               qcfgs=tuple(qcfgs), n_grid=n_grid)
  return ScaleSearch(s, int(i) / n_grid, losses)


def search_scale(weights, gram, mean_abs, *, bits: int = 4,
                 format: str | None = None, group_size: int | None = 128,
                 symmetric: bool = False, n_grid: int = 20,
                 count=1.0) -> ScaleSearch:
  """AWQ's alpha grid search (eq. 5) for kernels (K, N_i) sharing one input
  with Gram `gram` (K, K) over `count` tokens and mean |x| `mean_abs` (K,)."""
  weights = [weights] if hasattr(weights, "shape") else list(weights)
  _check_search(n_grid, 0.0, 0, "<array>")
  q = _qcfg(bits, format, group_size, symmetric)
  for w in weights:
    check_quant_config("<array>", w.shape, dict(q))
  return _search([jnp.asarray(w) for w in weights], [q] * len(weights), gram,
                 mean_abs, count, n_grid)


def _bounds(wf, gs: int, symmetric: bool):
  """Per (group, output) range that RTN maps onto the code range."""
  k, n = wf.shape
  g = wf.reshape(k // gs, gs, n)
  if symmetric:
    hi = jnp.max(jnp.abs(g), axis=1)
    return -hi, hi
  return jnp.minimum(g.min(1), 0.), jnp.maximum(g.max(1), 0.)


def clip_weight(w, ratio, *, symmetric: bool):
  """w clipped to ratio * its range, per group of inputs (ratio (K/g, N)):
  +-r max|w| (symmetric), [r min(w, 0), r max(w, 0)] (zero point)."""
  wf = w.astype(jnp.float32)
  gs = w.shape[0] // ratio.shape[0]
  lo, hi = _bounds(wf, gs, symmetric)
  rep = lambda b: jnp.repeat(b * ratio, gs, axis=0)
  return jnp.clip(wf, rep(lo), rep(hi)).astype(w.dtype)


def _clip_errors_impl(w, gram, *, q, shrinks):
  k, n = w.shape
  cfg = dict(q)
  gs = cfg["group_size"] or k
  ng = k // gs
  wf = w.astype(jnp.float32)
  idx = jnp.arange(ng)
  blocks = gram.astype(jnp.float32).reshape(ng, gs, ng, gs)[idx, :, idx, :]

  def err(r):
    wc = clip_weight(wf, jnp.full((ng, n), r), symmetric=cfg["symmetric"])
    d = (wf - _fake_quant(wc, q)).reshape(ng, gs, n)
    return jnp.einsum("gin,gij,gjn->gn", d, blocks, d, precision=_HI)

  ratios = jnp.asarray(shrinks, jnp.float32)
  errs = jax.lax.map(err, ratios)  # (C, ng, N)
  best = jnp.argmin(errs, axis=0)  # first minimum: the least clipping
  return ratios[best], errs


_clip_errors = jax.jit(_clip_errors_impl, static_argnames=("q", "shrinks"))


@functools.partial(jax.jit, static_argnames=("q", "shrinks", "lay"))
def _quantize_scaled(w, gram, scale, *, q, shrinks, lay: MatrixLayout):
  """Clip search on the (K, N) view of w = diag(s) W against the Gram of
  x / s, then RTN over the same contraction."""
  if len(shrinks) > 1:
    wm = lay.to_matrix(w)
    ratio, _ = _clip_errors_impl(wm, gram_of_scaled(gram, scale), q=q,
                                 shrinks=shrinks)
    w = lay.from_matrix(clip_weight(wm, ratio,
                                    symmetric=dict(q)["symmetric"]))
  return quantize_array(w, axis=lay.contract, **dict(q))


class ClipSearch(NamedTuple):
  ratio: jax.Array    # (K / group, N) chosen shrink of each group's range
  weight: jax.Array   # (K, N) the clipped weight, to be quantized
  errors: jax.Array   # (candidates, K / group, N) group-output MSE sums / count


def _clip(w, q, gram, count, shrinks) -> ClipSearch:
  ratio, errs = _clip_errors(jnp.asarray(w), jnp.asarray(gram), q=q,
                             shrinks=shrinks)
  errs = errs / jnp.maximum(jnp.asarray(count, jnp.float32), 1)
  return ClipSearch(ratio, clip_weight(jnp.asarray(w), ratio,
                                       symmetric=dict(q)["symmetric"]), errs)


def search_clip(w, gram, *, bits: int = 4, format: str | None = None,
                group_size: int | None = 128, symmetric: bool = False,
                max_shrink: float = 0.5, n_clip: int = 20,
                count=1.0) -> ClipSearch:
  """AWQ's clipping search for one (already scaled) kernel w (K, N) whose
  input has Gram `gram` (K, K) over `count` tokens."""
  _check_search(1, max_shrink, n_clip, "<array>")
  q = _qcfg(bits, format, group_size, symmetric)
  check_quant_config("<array>", jnp.shape(w), dict(q))
  return _clip(w, q, gram, count, shrink_grid(max_shrink, n_clip))


def awq_quantize(w, gram, scale, *, bits: int = 4, format: str | None = None,
                 group_size: int | None = 128, symmetric: bool = False,
                 max_shrink: float = 0.5, n_clip: int = 20,
                 contract=None, path: str = "<array>"):
  """Quantizes a scaled kernel w = diag(s) W after the clip search, given the
  Gram of the original input; the result is a `quantize_array` QArray over
  the `contract`ed axes (None: `core.contraction.default_contract`), whose
  (K, N) view the Gram (K, K) and scale (K,) are of."""
  q = _qcfg(bits, format, group_size, symmetric)
  _, c = check_quant_config(path, jnp.shape(w), dict(q, axis=contract))
  _check_search(1, max_shrink, n_clip, path)
  lay = MatrixLayout(tuple(jnp.shape(w)), c)
  if jnp.shape(gram) != (lay.k, lay.k) or jnp.shape(scale) != (lay.k,):
    raise CompressionError(
        f"gram {jnp.shape(gram)} and scale {jnp.shape(scale)} must be over "
        f"the {lay.k} contracted inputs (axes {c} of shape {lay.shape}); "
        "pass the statistics' contraction as contract=", path)
  return _quantize_scaled(jnp.asarray(w), jnp.asarray(gram),
                          jnp.asarray(scale), q=q,
                          shrinks=shrink_grid(max_shrink, n_clip), lay=lay)


def _check_search(n_grid, max_shrink, n_clip, path):
  if not isinstance(n_grid, int) or n_grid < 1:
    raise CompressionError(f"n_grid must be a positive int, got {n_grid}",
                           path)
  if not isinstance(n_clip, int) or n_clip < 0:
    raise CompressionError(f"n_clip must be an int >= 0 (0: no clip "
                           f"search), got {n_clip}", path)
  if not (isinstance(max_shrink, (int, float)) and 0 <= max_shrink < 1):
    raise CompressionError(f"max_shrink must be in [0, 1), got {max_shrink}",
                           path)


def _check_cfg(path, shape, contract, cfg):
  check_quant_config(path, shape, dict({k: cfg[k] for k in _QKEYS},
                                       axis=contract))
  _check_search(cfg["n_grid"], cfg["max_shrink"], cfg["n_clip"], path)


@rules_lib.options
class AwqOptions(rules_lib.Options):
  """AWQ (see module doc); n_grid must agree within a scale group."""

  transform: ClassVar[str] = "awq"
  bits: int = option(4, "integer bits when format is None")
  group_size: int | None = option(
      128, "inputs per scale (None: per output channel)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(False, "False: integer codes with a zero point")
  format: str | Format | None = option(None, "a format name instead of bits")
  n_grid: int = option(20, "alpha grid points i / n_grid in [0, 1)",
                       check=lambda n: n >= 1, must="be >= 1")
  max_shrink: float = option(0.5, "clip search: largest range shrink",
                             **rules_lib.interval(0, 1, hi_open=True))
  n_clip: int = option(20, "clip search steps (0: no clip search)",
                       check=lambda n: n >= 0, must="be >= 0")


@transform_lib.builder(AwqOptions, positional=("bits",))
def awq(stats: Mapping[str, Any], *,
        groups: Sequence[ScaleGroup] | None = None, options, rules,
        default) -> transform_lib.Transform:
  """AWQ transform (see module doc) given `compressjax.calibrate.capture`
  stats. `groups` (e.g. `models.transformer.scale_groups(config)`) say which
  kernels share an input and where its scale folds; by default every selected
  kernel is its own group with an explicit input scale. Rules override any of
  the options per param (n_grid must agree within a group)."""

  def group_scale(g, sel, mats, configs, st, n_grid):
    qs = [_qcfg(**{k: configs[c][k] for k in _QKEYS}) for c in sel]
    return _search([mats[c] for c in sel], qs, st.gram, st.mean_abs,
                   st.count, n_grid).scale

  def finish(path, leaf, cfg, st, s):
    qa = awq_quantize(consumer_weight(leaf), st.gram, s, path=path,
                      contract=tuple(st.contract), **{
                          k: cfg[k] for k in _QKEYS + ("max_shrink",
                                                       "n_clip")})
    return with_weight(leaf, qa)

  return scale_transform("awq", stats, groups, options=options, rules=rules,
                         default=default, agree="n_grid",
                         check_cfg=_check_cfg, group_scale=group_scale,
                         finish=finish)
