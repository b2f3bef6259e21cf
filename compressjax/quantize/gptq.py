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
Group scales are computed when a group starts, from the updated weights of
that group (or up front from the original weights with `static_groups`, which
act-order with groups implies, so groups stay contiguous in the stored QArray).
Any element format with an absmax scale works (int, fp8/fp6/fp4, NF4): the
column rounding is the format's own. The result is the same QArray as
round-to-nearest produces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.core.qarray import QArray
from compressjax.formats.integer import IntFormat
from compressjax.quantize.rtn import resolve_format
from pallas_kernels import layout


def _scale_zero(cols, fmt):
  """Per-row scale (and zero) of a group of columns (N, g)."""
  if getattr(fmt, "symmetric", True):
    s = jnp.max(jnp.abs(cols), axis=1) / fmt.max_value
    z = jnp.zeros_like(s)
  else:
    hi = jnp.maximum(cols.max(1), 0.)
    lo = jnp.minimum(cols.min(1), 0.)
    s = (hi - lo) / (fmt.qmax - fmt.qmin)
    s = jnp.where(s > 0, s, 1.0)
    z = jnp.clip(jnp.round(-lo / s), fmt.qmin, fmt.qmax)
  return jnp.where(s > 0, s, 1.0), z


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "block_size", "act_order", "static_groups"))
def _gptq(w, h, *, fmt, group_size: int, block_size: int,
          damp: float, act_order: bool, static_groups: bool):
  n, k = w.shape
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[None, :], 0.0, w)
  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
  w, h = w[:, perm], h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k)
  l = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((l, True), jnp.eye(k))
  u = jnp.linalg.cholesky(hinv).T  # upper: hinv = u^T u
  g = k // group_size
  w_orig = w[:, jnp.argsort(perm)]
  if static_groups:
    s_all, z_all = jax.vmap(lambda c: _scale_zero(c, fmt), in_axes=1,
                            out_axes=0)(w_orig.reshape(n, g, group_size))
  else:
    s_all = jnp.ones((g, n)); z_all = jnp.zeros((g, n))
  q_all = jnp.zeros((n, k))
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    u1 = u[i1:i2, i1:i2]

    def col(j, carry):
      w1, q1, e1, s_all, z_all = carry
      c = i1 + j
      grp = perm[c] // group_size
      if not static_groups:  # a group starts here: scales from updated W
        cols = jax.lax.dynamic_slice_in_dim(w1, j, group_size, axis=1)
        s_new, z_new = _scale_zero(cols, fmt)
        start = c % group_size == 0
        s_all = jnp.where(start, s_all.at[grp].set(s_new), s_all)
        z_all = jnp.where(start, z_all.at[grp].set(z_new), z_all)
      s, z = s_all[grp], z_all[grp]
      wj = w1[:, j]
      q = fmt.round(wj / s + z)
      err = (wj - (q - z) * s) / u1[j, j]
      mask = (jnp.arange(i2 - i1) > j).astype(w1.dtype)
      w1 = w1 - err[:, None] * (u1[j] * mask)[None, :]
      return (w1, q1.at[:, j].set(q), e1.at[:, j].set(err), s_all, z_all)

    init = (w[:, i1:i2], jnp.zeros((n, i2 - i1)), jnp.zeros((n, i2 - i1)),
            s_all, z_all)
    _, q1, e1, s_all, z_all = jax.lax.fori_loop(0, i2 - i1, col, init)
    q_all = q_all.at[:, i1:i2].set(q1)
    w = w.at[:, i2:].add(-jnp.matmul(e1, u[i1:i2, i2:],
                                     precision=jax.lax.Precision.HIGHEST))
  q_all = q_all[:, jnp.argsort(perm)]
  return q_all, s_all, z_all


def gptq_quantize(w, hessian, *, bits: int = 4, format: str | None = None,
                  group_size: int | None = None,
                  symmetric: bool = True, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, path: str = "<array>") -> QArray:
  """GPTQ of a Flax kernel w (K_in, N_out) given H (K_in x K_in)."""
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise CompressionError("GPTQ needs a 2-D kernel (in, out)", path)
  k, n = w.shape
  if hessian.shape != (k, k):
    raise CompressionError(f"Hessian {hessian.shape} does not match "
                           f"in_features {k}", path)
  fmt = resolve_format(dict(bits=bits, format=format, symmetric=symmetric),
                       path)
  if isinstance(fmt, str) or getattr(fmt, "scale_rule", "absmax") != "absmax":
    raise CompressionError(f"GPTQ needs an element format with an absmax "
                           f"scale (int, fp8/6/4, nf4), not {format}", path)
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
  q, s, z = _gptq(jnp.asarray(w, jnp.float32).T,
                  jnp.asarray(hessian, jnp.float32), fmt=fmt, group_size=gs,
                  block_size=bs, damp=float(damp), act_order=act_order,
                  static_groups=static)
  stored = fmt.encode(q.T)
  codes = layout.pack(stored, fmt.bits, 0) if fmt.bits < 8 else stored
  return QArray(codes=codes, scale=s.astype(jnp.float32),
                zero=None if getattr(fmt, "symmetric", True) else z.astype(
                    jnp.uint8),
                shape=(k, n), dtype=jnp.dtype(w.dtype).name, fmt=fmt, axis=0)


def gptq(stats, bits: int = 4, *, format: str | None = None, group_size: int | None = None,
         symmetric: bool = True, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, static_groups: bool = False,
         rules=None, default=None):
  """GPTQ transform over a tree, given `compressjax.calibrate.capture` stats
  (one-shot: every layer calibrated on the float model's activations)."""
  from compressjax import transform as T
  from compressjax.core.rules import default_filter

  def leaf(path, w, cfg, state):
    if path not in stats:
      raise CompressionError("no calibration statistics for this param; "
                             "capture with the same rules", path)
    return gptq_quantize(w, stats[path].hessian, path=path, **cfg)

  def check(path, w, cfg):
    if cfg.get("group_size") and w.shape[0] % cfg["group_size"]:
      raise CompressionError(
          f"group_size {cfg['group_size']} does not divide in_features "
          f"{w.shape[0]}", path)

  base = dict(bits=bits, format=format, group_size=group_size,
              symmetric=symmetric,
              block_size=block_size, damp=damp, act_order=act_order,
              static_groups=static_groups)
  return T.leaf_transform("gptq", base, leaf, check, rules,
                          default or default_filter)
