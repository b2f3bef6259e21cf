"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1).

With W in GPTQ's layout (rows = outputs, columns = inputs; a Flax kernel
transposed) and H = (2/N) X^T X from calibration:
  dead columns (H_jj = 0): H_jj = 1, W[:, j] = 0;
  act-order: permute columns by diag(H) descending;
  H += lambda I with lambda = damp * mean(diag H);
  U = upper Cholesky factor of H^-1;
  for each block of B columns, for each column j of it:
      q_j = quant(w_j); e = (w_j - q_j) / U_jj; W[:, j:block end] -= e U[j, j:]
  then one lazy update of the later columns: W[:, later] -= E U[block, later].
Inside a block the rank-1 updates run on slabs of 16 columns, with one matmul
per slab for the rest of the block (the same arithmetic, regrouped), and U
comes from one Cholesky plus a triangular inverse (`core/linalg.py`).
Group scales are computed when a group starts, from the updated weights of
that group (or up front from the original weights with `static_groups`, which
act-order with groups implies, so groups stay contiguous in the stored QArray).
Any element format with an absmax scale works (int, fp8/fp6/fp4, NF4): the
column rounding is the format's own. The result is the same QArray as
round-to-nearest produces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core import rules as rules_lib
from compressjax.core import transform as transform_lib
from compressjax.core.base import CompressedLeaf
from compressjax.core.errors import CompressionError
from compressjax.core.format import Format
from compressjax.core.input_transform import InputTransform
from compressjax.core.contraction import MatrixLayout
from compressjax.core.linalg import hinv_upper
from compressjax.core.qarray import QArray, pack_codes
from compressjax.core.rules import option
from compressjax.formats.scaled import store_scale
from compressjax.quantization.rtn import _is_float_dtype, resolve_format

_HI = jax.lax.Precision.HIGHEST


def _scale_zero(cols, fmt, scale_dtype="float32"):
  """Per-row scale (and zero) of a group of columns (N, g): the format's own
  rule (`Format.scale_zero`), the scale rounded to what `scale_dtype` stores
  (up, as RTN) before any code is chosen, so the codes and error feedback
  use the stored scale."""
  s, z = fmt.scale_zero(cols, lambda v, fn: fn(v, axis=1),
                        lambda v: store_scale(v, scale_dtype))
  s = s.astype(jnp.float32)
  return s, jnp.zeros_like(s) if z is None else z


_SLAB = 16  # columns per rank-1 slab: the per-column update stays in cache


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "block_size", "act_order", "static_groups",
    "scale_dtype"))
def _gptq(w, h, *, fmt, group_size: int, block_size: int,
          damp: float, act_order: bool, static_groups: bool,
          scale_dtype: str = "float32"):
  """w: the Flax kernel (K, N) in float32, so GPTQ's column j is row j here
  (contiguous). Returns (q (K, N) code values, scales (G, N), zeros (G, N))."""
  k, n = w.shape
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
  w_orig = w
  w, h = w[perm], h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k)
  u = hinv_upper(h)
  ut = u.T  # lazy updates read contiguous rows
  g = k // group_size
  if static_groups:
    s_all, z_all = jax.vmap(lambda c: _scale_zero(c.T, fmt, scale_dtype))(
        w_orig.reshape(g, group_size, n))
  else:
    s_all = jnp.ones((g, n)); z_all = jnp.zeros((g, n))
  qs = []
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    nb = i2 - i1
    u1 = u[i1:i2, i1:i2]
    d1 = jnp.diag(u1)
    sb = next(d for d in range(min(_SLAB, nb), 0, -1)
              if nb % d == 0 and group_size % d == 0)
    rows = jnp.arange(sb)

    def slab_step(t, carry, i1=i1, nb=nb, sb=sb, u1=u1, d1=d1, rows=rows):
      w1, q1, s_all, z_all = carry
      s0 = t * sb
      if not static_groups:  # a group starts here: scales from updated W
        grp = (i1 + s0) // group_size
        cols = jax.lax.dynamic_slice_in_dim(w1, s0, min(group_size, nb), 0)
        s_new, z_new = _scale_zero(cols.T, fmt, scale_dtype)
        start = (i1 + s0) % group_size == 0
        s_all = jnp.where(start, s_all.at[grp].set(s_new), s_all)
        z_all = jnp.where(start, z_all.at[grp].set(z_new), z_all)
      us = jax.lax.dynamic_slice(u1, (s0, s0), (sb, sb))
      ds = jax.lax.dynamic_slice_in_dim(d1, s0, sb)

      def column(j, c):
        slab, q, e = c
        gi = perm[i1 + s0 + j] // group_size
        sc, zc = s_all[gi], z_all[gi]
        wj = slab[j]
        code = fmt.round(wj / sc + zc)
        err = (wj - (code - zc) * sc) / ds[j]
        slab = slab - (us[j] * (rows > j))[:, None] * err[None, :]
        return slab, q.at[j].set(code), e.at[j].set(err)

      init = (jax.lax.dynamic_slice_in_dim(w1, s0, sb, 0),
              jnp.zeros((sb, n)), jnp.zeros((sb, n)))
      _, q, e = jax.lax.fori_loop(0, sb, column, init)
      # the block's later columns get this slab's errors in one matmul
      ur = jax.lax.dynamic_slice_in_dim(u1, s0, sb, 0)
      ur = ur * (jnp.arange(nb) >= s0 + sb)[None, :]
      w1 = w1 - jnp.matmul(ur.T, e, precision=_HI)
      return (w1, jax.lax.dynamic_update_slice_in_dim(q1, q, s0, 0),
              s_all, z_all), e

    def body(t, carry):
      (w1, q1, s_all, z_all), e1 = carry
      out, e = slab_step(t, (w1, q1, s_all, z_all))
      return out, jax.lax.dynamic_update_slice_in_dim(e1, e, t * sb, 0)

    init = ((w[i1:i2], jnp.zeros((nb, n)), s_all, z_all), jnp.zeros((nb, n)))
    (_, q1, s_all, z_all), e1 = jax.lax.fori_loop(0, nb // sb, body, init)
    if i2 < k:  # lazy update of all later columns by this block's errors
      w = w.at[i2:].add(-jnp.matmul(ut[i2:, i1:i2], e1, precision=_HI))
    qs.append(q1)
  q = jnp.concatenate(qs, 0)[jnp.argsort(perm)]
  return q, s_all, z_all


def gptq_quantize(w, hessian, *, bits: int | None = None, format=None,
                  group_size: int | None = None,
                  symmetric: bool = True, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, scale_dtype: Any = jnp.float32,
                  path: str = "<array>") -> QArray:
  """GPTQ of a Flax kernel w (K_in, ...) given H (K_in x K_in): axis 0 is
  contracted (calibration captures that Hessian), every other axis is an
  output feature (e.g. an Einsum in-projection (d, heads, head_dim)). Scales
  are stored in `scale_dtype` (float16: exactly what a GPTQ checkpoint
  holds, see `models.gptq_export`)."""
  w = jnp.asarray(w)
  GptqOptions(bits=bits, format=format, group_size=group_size,
              symmetric=symmetric, block_size=block_size, damp=damp,
              act_order=act_order, static_groups=static_groups,
              scale_dtype=scale_dtype)
  if w.ndim < 2:
    raise CompressionError("GPTQ needs a kernel (in, out...) of rank >= 2",
                           path)
  lay = MatrixLayout(tuple(w.shape), (0,))
  k, n = lay.k, lay.n
  if hessian.shape != (k, k):
    raise CompressionError(f"Hessian {hessian.shape} does not match "
                           f"in_features {k}", path)
  fmt = resolve_format(dict(bits=bits, format=format, symmetric=symmetric),
                       path, default_bits=4)
  if not fmt.capabilities.calibrated:
    raise CompressionError(f"GPTQ needs an element format with an absmax "
                           f"scale (int, fp8/6/4, nf4), not {fmt.name}", path)
  gs = group_size or k
  if k % gs:
    raise CompressionError(f"group_size {gs} does not divide in_features {k}",
                           path)
  # Whole groups per block, so a group's scales see its updated weights.
  bs = min(max(block_size // gs, 1) * gs, k) if group_size else min(
      block_size, k)
  # Per channel (no groups), the scales come from the whole original W, as in
  # the reference implementation; act-order with groups implies static groups.
  static = static_groups or act_order or group_size is None
  q, s, z = _gptq(lay.to_matrix(jnp.asarray(w, jnp.float32)),
                  jnp.asarray(hessian, jnp.float32), fmt=fmt, group_size=gs,
                  block_size=bs, damp=float(damp), act_order=act_order,
                  static_groups=static, scale_dtype=jnp.dtype(scale_dtype).name)
  return QArray(codes=pack_codes(fmt.encode(q), fmt.bits),
                scale=s.astype(scale_dtype),
                zero=z.astype(jnp.uint8) if fmt.capabilities.zero_point
                else None, shape=tuple(w.shape),
                dtype=jnp.dtype(w.dtype).name, fmt=fmt, contract=lay.contract)


@rules_lib.options
class GptqOptions(rules_lib.Options):
  """GPTQ (Algorithm 1; see module doc)."""

  transform: ClassVar[str] = "gptq"
  bits: int | None = option(
      None, "integer bits when format is None (None: 4); with a format, "
      "optional and then equal to the format's bits")
  format: str | Format | None = option(
      None, "an element format with an absmax scale (int, fp8/6/4, nf4)")
  group_size: int | None = option(
      None, "inputs per scale (None: per output feature)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(True, "False: integer codes with a zero point")
  block_size: int = option(128, "columns per lazy-update block B",
                           check=lambda b: b >= 1, must="be >= 1")
  damp: float = option(0.01, "lambda = damp * mean(diag H) added to H",
                       **rules_lib.interval(0))
  act_order: bool = option(False, "process columns by diag(H) descending")
  static_groups: bool = option(False, "group scales from the original W")
  scale_dtype: Any = option(jnp.float32, "dtype the scales are stored in",
                            check=_is_float_dtype, must="be a float dtype")


@transform_lib.builder(GptqOptions, positional=("bits",))
def gptq(stats, *, options, rules, default) -> transform_lib.Transform:
  """GPTQ transform over a tree, given `compressjax.calibrate.capture` stats
  (one-shot: every layer calibrated on the float model's activations)."""

  def leaf(path, w, cfg, state):
    if path not in stats:
      raise CompressionError("no calibration statistics for this param; "
                             "capture with the same rules", path)
    if isinstance(w, InputTransform):
      # Rotated / scaled layer: capture observed the transformed input, so
      # its Hessian is that of the input the inner weight multiplies.
      if isinstance(w.weight, CompressedLeaf):
        raise CompressionError("GPTQ needs the InputTransform's weight in "
                               "float; it is already compressed", path)
      return dataclasses.replace(w, weight=gptq_quantize(
          w.weight, stats[path].hessian, path=path, **cfg))
    return gptq_quantize(w, stats[path].hessian, path=path, **cfg)

  def check(path, w, cfg):
    if cfg.get("group_size") and w.shape[0] % cfg["group_size"]:
      raise CompressionError(
          f"group_size {cfg['group_size']} does not divide in_features "
          f"{w.shape[0]}", path)

  return transform_lib.leaf_transform("gptq", options, leaf, check, rules,
                                      default)
