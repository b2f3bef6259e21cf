"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot", Algorithm 1).

Notation as in GPTQ: W has rows = outputs, columns = inputs (a Flax kernel
transposed; the code works on the kernel itself, so a "column" j of W is row j
of the kernel) and H = (2/N) X^T X from calibration.
  dead columns (H_jj = 0): H_jj = 1, W[:, j] = 0 (they are pruned first);
  H += lambda I with lambda = damp * mean(diag H);
  U = upper Cholesky factor of H^-1 (H^-1 = U^T U), so U_jj^2 is the [H^-1]_jj
      of the OBS step for column j once columns < j are fixed (Sec. 3.2);
  for each block of B_s columns (`block_size`, 128; "adaptive mask selection",
  Sec. 3.3): prune the round(p * rows * B_s) weights of the block with the
  lowest w_c^2 / U_cc^2 (ties by position, input-major), then for each column j:
      q_j = M_j * w_j  (quant(M_j * w_j) in joint mode, Sec. 3.5)
      e = (w_j - q_j) / U_jj;  W[:, j:] -= e U[j, j:]           (OBS update)
  N:M: at every M-th column j, each row keeps the N of W[:, j:j+M] with the
  largest w^2 / U^2 (ties to the earlier position), from the updated weights.
Updates are applied lazily (Sec. 3.4): rank-1 inside a slab of a few columns,
one matmul for the rest of the block after each slab, one for the later
columns after each block; mathematically the same as the per-column update.

Joint quantization stores the kept values as a QArray that materializes to
exactly the in-pass quantized weights. N:M: absmax scales per output channel
from the (dead-zeroed) original weights, or with `group_size` g per group of g
kept values along the input axis (g*M/N inputs), computed when the group
starts from its updated weights (as GPTQ's groups); both over the weights the
N:M rule would keep at that point, so the grid fits the kept values (a weight
that outgrows it later is clipped and the OBS update absorbs the error).
Unstructured: the kept values are a flat list, so one scale per tensor (from
the original weights); grouped scales have no exact layout there and are
refused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from compressjax.core import rules as rules_lib
from compressjax.core import transform as transform_lib
from compressjax.core.base import CompressedLeaf
from compressjax.core.format import Format
from compressjax.core.errors import CompressionError
from compressjax.core.linalg import hinv_upper as _hinv_upper
from compressjax.core.qarray import QArray, pack_codes
from compressjax.core.rules import option
from compressjax.core.sparse import NMSparseArray, index_bits
from compressjax.quantization.gptq import _scale_zero
from compressjax.quantization.rtn import resolve_format
from compressjax.sparsity.magnitude import (check_sparse_config, nm_sparsify,
                                            sparse_from_mask)
from pallas_kernels import layout

_HI = jax.lax.Precision.HIGHEST
_SLAB = 16  # columns per rank-1 slab: keeps the per-column update in cache


def _block_keep(scores, n_prune):
  """Keep mask pruning the n_prune (traced) lowest scores, ties by position.

  Scores are >= 0, so their int32 bit patterns sort like the floats: 31 steps
  of bisection find the n_prune-th smallest exactly (much cheaper than a sort).
  """
  bits = jax.lax.bitcast_convert_type(scores, jnp.int32)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    # per-column float counts (exact, <= B) vectorize far better than one sum
    ok = jnp.sum(jnp.sum((bits <= mid).astype(jnp.float32), axis=0).astype(
        jnp.int32)) >= n_prune
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, t = jax.lax.fori_loop(0, 31, step, (jnp.int32(-1), jnp.int32(0x7F800000)))
  below, tie = bits < t, bits == t
  need = n_prune - jnp.sum(below)
  # Usually every tie goes; only a real tie needs the (slow) flat cumsum.
  first = jax.lax.cond(
      jnp.sum(tie) <= need, lambda: tie,
      lambda: tie & (jnp.cumsum(tie.reshape(-1)).reshape(tie.shape) <= need))
  return ~(below | first)


def _nm_keep(scores, n: int):
  """(M, cols) scores -> keep the n largest per column (ties: earlier)."""
  m = scores.shape[0]
  if m <= 16:  # pairwise ranks: no sort in the inner loop
    a, b = scores[:, None, :], scores[None, :, :]
    pos = jnp.arange(m)
    ahead = (b > a) | ((b == a) & (pos[None, :, None] < pos[:, None, None]))
    return ahead.sum(1) < n
  order = jnp.argsort(-scores, axis=0, stable=True)
  return jnp.argsort(order, axis=0) < n


def _predicted_kept(x, d, n: int, m: int):
  """x (rows, cols) with only the weights that the N:M selection would keep
  right now (the rest zeroed): group scales then fit the kept values."""
  r, cols = x.shape
  sc = (x * x / (d * d)[:, None]).reshape(r // m, m, cols)
  sc = sc.transpose(1, 0, 2).reshape(m, -1)
  keep = _nm_keep(sc, n).reshape(m, r // m, cols).transpose(1, 0, 2)
  return jnp.where(keep.reshape(r, cols), x, 0.0)


def _slab_size(count: int, unit: int, span: int | None) -> int:
  """Largest slab <= _SLAB dividing the block, a multiple of the N:M run and
  dividing a quantization group's span (so groups start on slab starts)."""
  best = unit
  for d in range(unit, max(_SLAB, unit) + 1, unit):
    if count % d == 0 and (span is None or span % d == 0):
      best = d
  return best


@functools.partial(jax.jit, static_argnames=(
    "nm", "n", "m", "block_size", "fmt", "span"))
def _sparsegpt(w, h, n_prune, *, damp, nm: bool, n: int, m: int,
               block_size: int, fmt, span: int | None):
  """w: kernel (K, cols) float32; n_prune: weights to prune per block (traced,
  so other sparsities reuse the compiled code). Returns (w_hat, keep, codes,
  scale, zero) in kernel layout, whether w_hat is finite, and the kept count."""
  k, cols = w.shape
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
  u = _hinv_upper(h)
  ut = u.T  # lazy updates read contiguous columns of U
  quant = fmt is not None
  if quant and span is None:  # static: per output channel (N:M) or tensor
    s, z = _scale_zero(_predicted_kept(w, jnp.diag(u), n, m).T if nm
                       else w.reshape(1, -1), fmt)
    s_all, z_all = s[None, :], z[None, :]
  elif quant:
    s_all = jnp.ones((k // span, cols)); z_all = jnp.zeros((k // span, cols))
  else:
    s_all = z_all = jnp.zeros((1, 1))
  qs, keeps, codes = [], [], []
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    nb = i2 - i1
    u1 = u[i1:i2, i1:i2]
    d1 = jnp.diag(u1)
    w1 = w[i1:i2]
    if nm:
      keep1 = jnp.zeros((nb, cols), bool)  # chosen every M columns
    else:
      keep1 = _block_keep(w1 * w1 / (d1 * d1)[:, None],
                          n_prune[i1 // block_size])
    sb = _slab_size(nb, m if nm else 1, span)
    rows = jnp.arange(sb)

    def slab_step(t, carry, i1=i1, nb=nb, sb=sb, rows=rows, u1=u1, d1=d1):
      w1, keep1, q1, c1, e1, s_all, z_all = carry
      s0 = t * sb
      if quant and span is not None:  # a group starts: scales from updated W
        g = (i1 + s0) // span
        grp = jax.lax.dynamic_slice_in_dim(w1, s0, min(span, nb), 0)
        dg = jax.lax.dynamic_slice_in_dim(d1, s0, min(span, nb))
        s_new, z_new = _scale_zero(_predicted_kept(grp, dg, n, m).T, fmt)
        start = (i1 + s0) % span == 0
        s_all = jnp.where(start, s_all.at[g].set(s_new), s_all)
        z_all = jnp.where(start, z_all.at[g].set(z_new), z_all)
      us = jax.lax.dynamic_slice(u1, (s0, s0), (sb, sb))
      ds = jax.lax.dynamic_slice_in_dim(d1, s0, sb)

      def column(j, c):
        slab, kp, q, cd, e = c
        wj, kj = slab[j], kp[j]
        if quant:
          gi = 0 if span is None else (i1 + s0 + j) // span
          sc, zc = s_all[gi], z_all[gi]
          code = fmt.round(wj / sc + zc)
          qj = jnp.where(kj, (code - zc) * sc, 0.0)
          cd = cd.at[j].set(code)
        else:
          qj = jnp.where(kj, wj, 0.0)
        err = (wj - qj) / ds[j]
        slab = slab - (us[j] * (rows > j))[:, None] * err[None, :]
        return slab, kp, q.at[j].set(qj), cd, e.at[j].set(err)

      def run(r, c):  # N:M: choose the run's mask from the updated weights
        slab, kp = c[0], c[1]
        r0 = r * m
        ws = jax.lax.dynamic_slice_in_dim(slab, r0, m, 0)
        dr = jax.lax.dynamic_slice_in_dim(ds, r0, m)
        kp = jax.lax.dynamic_update_slice_in_dim(
            kp, _nm_keep(ws * ws / (dr * dr)[:, None], n), r0, 0)
        return jax.lax.fori_loop(0, m, lambda i, c: column(r0 + i, c),
                                 (slab, kp) + c[2:])

      init = (jax.lax.dynamic_slice_in_dim(w1, s0, sb, 0),
              jax.lax.dynamic_slice_in_dim(keep1, s0, sb, 0),
              jnp.zeros((sb, cols)),
              jnp.zeros((sb, cols)) if quant else None,
              jnp.zeros((sb, cols)))
      if nm:
        _, kp, q, cd, e = jax.lax.fori_loop(0, sb // m, run, init)
      else:
        _, kp, q, cd, e = jax.lax.fori_loop(0, sb, column, init)
      # lazy update of the block's later columns by this slab's errors
      ur = jax.lax.dynamic_slice_in_dim(u1, s0, sb, 0)
      ur = ur * (jnp.arange(nb) >= s0 + sb)[None, :]
      w1 = w1 - jnp.matmul(ur.T, e, precision=_HI)
      put = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, s0, 0)
      return (w1, put(keep1, kp), put(q1, q),
              put(c1, cd) if quant else None, put(e1, e), s_all, z_all)

    init = (w1, keep1, jnp.zeros((nb, cols)),
            jnp.zeros((nb, cols)) if quant else None, jnp.zeros((nb, cols)),
            s_all, z_all)
    _, keep1, q1, c1, e1, s_all, z_all = jax.lax.fori_loop(
        0, nb // sb, slab_step, init)
    if i2 < k:  # lazy update of all later columns by this block's errors
      w = w.at[i2:].add(-jnp.matmul(ut[i2:, i1:i2], e1, precision=_HI))
    qs.append(q1); keeps.append(keep1); codes.append(c1)
  cat = lambda xs: jnp.concatenate(xs, 0)
  q, keep = cat(qs), cat(keeps)
  return (q, keep, cat(codes) if quant else None, s_all, z_all,
          jnp.all(jnp.isfinite(q)), jnp.sum(keep))


def _nm_from_keep(x, keep, n: int, m: int):
  """NMSparseArray of x keeping the positions in `keep` (exactly n of every m
  along axis 0): as nm_sparsify(x, n, m, 0, scores=keep), without its sort."""
  if n * m > 64:
    return nm_sparsify(x, n, m, 0, scores=keep)
  k = x.shape[0]
  xr = x.reshape(k // m, m, -1)
  kr = keep.reshape(k // m, m, -1)
  rank = jnp.cumsum(kr, axis=1) - 1  # index of each kept weight in its run
  hit = kr[:, :, None] & (rank[:, :, None] == jnp.arange(n)[None, :, None])
  pos = jnp.sum(jnp.where(hit, jnp.arange(m)[None, :, None, None], 0), 1)
  vals = jnp.sum(jnp.where(hit, xr[:, :, None], jnp.zeros((), x.dtype)), 1)
  kept_shape = (k // m * n,) + x.shape[1:]
  return NMSparseArray(
      values=vals.astype(x.dtype).reshape(kept_shape),
      indices=layout.pack(pos.astype(jnp.uint8).reshape(kept_shape),
                          index_bits(m), 0),
      shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name, n=n, m=m, axis=0)


@functools.partial(jax.jit, static_argnames=(
    "shape", "dtype", "nm", "n", "m", "kept", "fmt"))
def _assemble(q, keep, codes, s, z, *, shape, dtype, nm, n, m, kept, fmt):
  """Dense pass outputs -> sparse leaf (+ packed kept codes, scale, zero)."""
  w_hat = q.reshape(shape).astype(dtype)
  keep = keep.reshape(shape)
  take = (lambda x: _nm_from_keep(x, keep, n, m)) if nm else (
      lambda x: sparse_from_mask(x, keep, (1,) * len(shape), "unstructured",
                                 kept=kept))
  leaf = take(w_hat)
  if fmt is None:
    return leaf, None, None, None
  vals = take(fmt.encode(codes).reshape(shape)).values
  # the QArray's (K, N) matrix: kept values along the input axis by outputs
  vals = pack_codes(vals.reshape(vals.shape[0], -1), fmt.bits)
  if nm:  # per output channel or group of the kept values
    s = s.reshape(s.shape[0], -1)
  else:  # one scale for the flat list of kept values
    s = s.reshape(1, 1)
  z = z.reshape(s.shape).astype(jnp.uint8)
  return leaf, vals, s.astype(jnp.float32), z


def _resolve(path, shape, cfg):
  """Checks a config against a kernel shape; returns (fmt or None, span)."""
  pattern = cfg.get("pattern", "unstructured")
  if len(shape) < 2:
    raise CompressionError("SparseGPT needs a kernel of rank >= 2 with the "
                           "input axis first", path)
  if pattern not in ("unstructured", "nm"):
    raise CompressionError(f"SparseGPT supports pattern 'unstructured' or "
                           f"'nm', not {pattern!r}; use sparsify(...) for "
                           "block or channel patterns", path)
  check_sparse_config(path, shape, dict(cfg, axis=0))
  bs = cfg.get("block_size", 128)
  if not isinstance(bs, int) or bs < 1:
    raise CompressionError(f"block_size must be a positive int, got {bs}",
                           path)
  if cfg.get("bits") is None and cfg.get("format") is None:
    if cfg.get("group_size") is not None:
      raise CompressionError("group_size is for joint quantization; give "
                             "bits or format too", path)
    return None, None
  fmt = resolve_format(dict(bits=cfg.get("bits"), format=cfg.get("format"),
                            symmetric=cfg.get("symmetric", True)), path)
  if not fmt.capabilities.calibrated:
    raise CompressionError(
        f"joint quantization needs an element format with an absmax scale "
        f"(int, fp8/6/4, nf4), not {fmt.name}; prune first, then "
        "quantize (chain(sparsegpt(...), quantize(...)))", path)
  g = cfg.get("group_size")
  if g is None:
    return fmt, None
  if pattern == "unstructured":
    raise CompressionError(
        "joint quantization of unstructured SparseGPT stores one scale per "
        "tensor (the kept values are a flat list, with no exact layout for "
        "per-group scales); drop group_size, use pattern='nm', or prune first "
        "and then quantize (chain(sparsegpt(...), quantize(..., "
        "group_size=g)))", path)
  n, m = cfg["n"], cfg["m"]
  kept = shape[0] // m * n
  if g < 1 or g % n or kept % g:
    raise CompressionError(
        f"group_size {g} counts kept values along the input axis: it must be "
        f"a multiple of N={n} and divide the {kept} kept values per output "
        f"(in_features {shape[0]} * {n}/{m})", path)
  return fmt, g * m // n


def sparsegpt_prune(w, hessian, *, sparsity: float = 0.5,
                    pattern: str = "unstructured", n: int = 2, m: int = 4,
                    block_size: int = 128, damp: float = 0.01,
                    bits: int | None = None, format: str | None = None,
                    group_size: int | None = None, symmetric: bool = True,
                    path: str = "<array>"):
  """SparseGPT of a Flax kernel w (K_in, ...) given H (K_in x K_in).

  Returns a SparseArray (unstructured, 1x1 blocks) or an NMSparseArray (N of
  every M along the input axis); with `bits` or `format`, its values are a
  QArray holding the jointly quantized weights (see module doc).
  """
  w = jnp.asarray(w)
  cfg = SparseGptOptions(sparsity=sparsity, pattern=pattern, n=n, m=m,
                         block_size=block_size, damp=damp, bits=bits,
                         format=format, group_size=group_size,
                         symmetric=symmetric)
  fmt, span = _resolve(path, w.shape, cfg)
  k = w.shape[0]
  if tuple(hessian.shape) != (k, k):
    raise CompressionError(f"Hessian {tuple(hessian.shape)} does not match "
                           f"in_features {k}", path)
  nm = pattern == "nm"
  unit = span if span else (m if nm else 1)
  bs = min(max(block_size // unit, 1) * unit, k)  # whole runs / groups
  w2 = jnp.asarray(w, jnp.float32).reshape(k, -1)
  n_prune = jnp.asarray([round(sparsity * min(bs, k - i) * w2.shape[1])
                         for i in range(0, k, bs)], jnp.int32)
  q, keep, codes, s, z, finite, kept = _sparsegpt(
      w2, jnp.asarray(hessian, jnp.float32), n_prune, damp=float(damp), nm=nm,
      n=n, m=m, block_size=bs, fmt=fmt, span=span)
  if not bool(finite):
    raise CompressionError("SparseGPT produced non-finite weights: the "
                           "Hessian is not positive definite after damping; "
                           "raise damp or check the calibration data", path)
  kept = int(kept)
  leaf, codes, scale, zero = _assemble(
      q, keep, codes, s, z, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name,
      nm=nm, n=n, m=m, kept=kept, fmt=fmt)
  if fmt is None:
    return leaf
  vals = QArray(codes=codes, scale=scale,
                zero=zero if fmt.capabilities.zero_point else None,
                shape=(kept,) if not nm else leaf.kept_shape,
                dtype=jnp.dtype(w.dtype).name, fmt=fmt, contract=(0,))
  return dataclasses.replace(leaf, values=vals)


@rules_lib.options
class SparseGptOptions(rules_lib.Options):
  """SparseGPT (Algorithm 1; see module doc); bits or format adds joint
  quantization."""

  transform: ClassVar[str] = "sparsegpt"
  sparsity: float = option(0.5, "fraction of weights removed",
                           **rules_lib.interval(0, 1, hi_open=True))
  pattern: Literal["unstructured", "nm"] = option(
      "unstructured", "unstructured (adaptive mask per block) or N:M",
      hint="use sparsify(...) for block or channel patterns")
  n: int = option(2, "N:M: weights kept per run", check=lambda v: v >= 1,
                  must="be >= 1")
  m: int = option(4, "N:M: run length along the input axis",
                  check=lambda v: 2 <= v <= 256, must="be in [2, 256]")
  block_size: int = option(128, "columns per mask-selection block B_s",
                           check=lambda b: b >= 1, must="be >= 1")
  damp: float = option(0.01, "lambda = damp * mean(diag H) added to H",
                       **rules_lib.interval(0))
  bits: int | None = option(None, "joint quantization: integer bits")
  format: str | Format | None = option(
      None, "joint quantization: an element format with an absmax scale")
  group_size: int | None = option(
      None, "joint quantization: kept values per scale (N:M only)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(True, "joint quantization: False adds a zero "
                           "point")


@transform_lib.builder(SparseGptOptions, positional=("sparsity",))
def sparsegpt(stats, *, options, rules, default) -> transform_lib.Transform:
  """SparseGPT transform over a tree, given `compressjax.calibrate.capture`
  stats (one-shot: every layer pruned with the float model's activations)."""

  def check(path, w, cfg):
    if isinstance(w, CompressedLeaf):
      raise CompressionError(
          f"SparseGPT needs a float kernel, not a {type(w).__name__}; apply "
          "it first (chain(sparsegpt(...), quantize(...)))", path)
    _resolve(path, w.shape, cfg)
    if path not in stats:
      raise CompressionError("no calibration statistics for this param; "
                             "capture with the same rules", path)

  def leaf(path, w, cfg, state):
    return sparsegpt_prune(w, stats[path].hessian, path=path, **cfg)

  return transform_lib.leaf_transform("sparsegpt", options, leaf, check,
                                      rules, default)
