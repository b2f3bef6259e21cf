"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", Sec. 4, eq. 3-4).

Activation outliers sit in a few input channels and ruin per-token int8
activations; weights are easy. SmoothQuant migrates the difficulty with a
per-channel scale (Flax layout: W is K_in x N_out, Y = X W):

  Y = (X diag(s)^-1) (diag(s) W)                                  (eq. 3)
  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)                      (eq. 4)

with max|X_j| over calibration tokens (`LayerStats.abs_max`) and max|W_j| over
row j of all the kernels consuming X. Then the smoothed activation
X^_j = X_j / s_j and weight W^_j = s_j W_j have
  max|X^_j| = (max|X_j| max|W_j|)^(1 - alpha),
  max|W^_j| = (max|X_j| max|W_j|)^alpha,
equal at alpha = 0.5 (the paper's default; larger alpha moves more of the
range into the weights). The scale folds into the producer of X where
`groups` allow (`compressjax.quantization.scaling`), else stays explicit.

Then W8A8: every consumer becomes InputTransform(weight=int8 symmetric
per-output-channel QArray of diag(s) W, scale=1/s or None when folded,
act="int8"), so at run time its input is quantized per token (dynamic) and
the dispatch multiplies int8 x int8 with int32 accumulation. (With act=None a
folded consumer is just the QArray: weight-only smoothing.)

Multi-axis kernels (DenseGeneral / Einsum): j runs over the contracted
elements of the kernel's (K, N) view over the statistics' contraction
(`scaling`'s module doc); the QArray keeps that contraction.

A channel with max|X_j| = 0 or max|W_j| = 0 gets s_j = 1 (the formula would
give 0 or inf; the reference clamps at 1e-5, which would blow up such a
channel should it ever fire).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp

from compressjax.core import transform as transform_lib
from compressjax.core.errors import CompressionError
from compressjax.core.input_transform import ACT_FORMATS
from compressjax.core import rules as rules_lib
from compressjax.core.rules import option
from compressjax.formats.integer import IntFormat
from compressjax.quantization.rtn import check_quant_config, quantize_array
from compressjax.quantization.scaling import (ScaleGroup, consumer_weight,
                                          scale_transform, with_weight)


def weight_max(weights) -> jax.Array:
  """max|W_j| over the rows j of all the given (K, N_i) kernels."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)),
                                    axis=1) for w in weights]), axis=0)


def smooth_scale(act_max, w_max, alpha: float = 0.5) -> jax.Array:
  """eq. 4: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (1 where either is 0)."""
  a = jnp.abs(jnp.asarray(act_max, jnp.float32))
  w = jnp.abs(jnp.asarray(w_max, jnp.float32))
  ok = (a > 0) & (w > 0)
  a, w = jnp.where(ok, a, 1.0), jnp.where(ok, w, 1.0)
  return jnp.where(ok, a ** alpha / w ** (1.0 - alpha), 1.0)


@jax.jit
def _group_scale(act_max, weights, alpha):
  return smooth_scale(act_max, weight_max(weights), alpha)


@functools.partial(jax.jit, static_argnames=("bits", "contract"))
def _quantize(w, *, bits, contract):
  # symmetric per output channel, s = absmax / (2^(b-1) - 1) as the paper
  return quantize_array(w, format=IntFormat(bits, narrow_range=True),
                        axis=contract)


def _check_alpha(path, alpha):
  if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)
          and 0 <= alpha <= 1):
    raise CompressionError(f"smoothquant alpha must be in [0, 1], got "
                           f"{alpha!r}", path)


def _check_cfg(path, shape, contract, cfg):
  _check_alpha(path, cfg["alpha"])
  if cfg["act"] not in ACT_FORMATS:
    raise CompressionError(f"act {cfg['act']!r} is not one of {ACT_FORMATS}",
                           path)
  check_quant_config(path, shape, dict(bits=cfg["weight_bits"],
                                       axis=contract))


@rules_lib.options
class SmoothQuantOptions(rules_lib.Options):
  """SmoothQuant W8A8 (see module doc); alpha must agree within a scale
  group."""

  transform: ClassVar[str] = "smoothquant"
  alpha: float = option(0.5, "migration strength of eq. 4",
                        **rules_lib.interval(0, 1))
  act: Literal[ACT_FORMATS] = option(
      "int8", "run-time activation format (None: weight-only smoothing)")
  weight_bits: int = option(8, "weight bits (symmetric, per channel)")


@transform_lib.builder(SmoothQuantOptions, positional=("alpha",))
def smoothquant(stats: Mapping[str, Any], *,
                groups: Sequence[ScaleGroup] | None = None, options, rules,
                default) -> transform_lib.Transform:
  """SmoothQuant W8A8 transform (see module doc) given
  `compressjax.calibrate.capture` stats (uses `abs_max`). `groups` as in
  `awq`; rules override alpha, act, weight_bits per param (alpha must agree
  within a group)."""

  def group_scale(g, sel, mats, configs, st, alpha):
    _check_alpha(sel[0], alpha)
    # every consumer sees x / s, so all of them bound max|W_j|
    return _group_scale(st.abs_max, tuple(mats[c] for c in g.consumers),
                        jnp.float32(alpha))

  def finish(path, leaf, cfg, st, s):
    qa = _quantize(consumer_weight(leaf), bits=cfg["weight_bits"],
                   contract=tuple(st.contract))
    return with_weight(leaf, qa, act=cfg["act"])

  return scale_transform("smoothquant", stats, groups, options=options,
                         rules=rules, default=default, agree="alpha",
                         check_cfg=_check_cfg, group_scale=group_scale,
                         finish=finish)
