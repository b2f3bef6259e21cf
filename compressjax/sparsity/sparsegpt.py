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
from compressjax.core.contraction import MatrixLayout
from compressjax.core.format import Format
from compressjax.core.errors import CompressionError
from compressjax.core.linalg import ObsRule, obs_prepare, obs_sweep
from compressjax.core.qarray import QArray, pack_codes
from compressjax.core.rules import option
from compressjax.quantization.gptq import GroupRounding, slab_size
from compressjax.quantization.rtn import resolve_format
from compressjax.sparsity.magnitude import (check_sparse_config, nm_from_keep,
                                            sparse_from_mask)
from compressjax.sparsity.select import keep_top_n_of_m, prune_lowest

def _predicted_kept(x, d, n: int, m: int):
  """x (rows, cols) with only the weights that the N:M selection would keep
  right now (the rest zeroed): group scales then fit the kept values."""
  keep = keep_top_n_of_m(x * x / (d * d)[:, None], n, m, 0)
  return jnp.where(keep, x, 0.0)


class _SparseGpt(ObsRule):
  """SparseGPT's column rule for the OBS sweep (`core.linalg.obs_sweep`):
  the block's mask (unstructured: adaptive, from w^2 / U_jj^2 when the block
  starts; N:M: every M columns from the updated weights), then q_j = M_j w_j,
  or M_j quant(w_j) in joint mode (GPTQ's `GroupRounding`).
  State: (keep mask of the block (B, N), scales, zeros)."""

  def __init__(self, k, n_prune, *, nm, n, m, block, rounding):
    self.k, self.n_prune, self.nm, self.n, self.m = k, n_prune, nm, n, m
    self.block, self.q = block, rounding
    self.run = m if nm else 1

  def init(self, w, u):
    q = self.q.init() if self.q is not None else ()
    return jnp.zeros((self.block, w.shape[1]), bool), q

  def block_start(self, state, w1, d1, i1):
    if self.nm:
      return state
    sc = w1 * w1 / (d1 * d1)[:, None]
    real = (i1 + jnp.arange(self.block)) < self.k  # padded rows stay
    sc = jnp.where(real[:, None], sc, jnp.inf)
    keep = prune_lowest(sc, self.n_prune[i1 // self.block])
    return keep, state[1]

  def slab(self, state, w1, d1, s0, i1):
    if self.q is None:
      return state
    return state[0], self.q.slab(state[1], w1, d1, s0, i1)

  def run_start(self, state, ws, ds, r0, s0, i1):
    wr = jax.lax.dynamic_slice_in_dim(ws, r0, self.m, 0)
    dr = jax.lax.dynamic_slice_in_dim(ds, r0, self.m)
    keep = keep_top_n_of_m(wr * wr / (dr * dr)[:, None], self.n, self.m, 0)
    return (jax.lax.dynamic_update_slice_in_dim(state[0], keep, s0 + r0, 0),
            state[1])

  def column(self, state, wj, j, c):
    kj = state[0][j]
    if self.q is None:
      return state, jnp.where(kj, wj, 0.0), (jnp.where(kj, wj, 0.0), kj)
    code, qv = self.q.round(state[1], wj, c)
    qj = jnp.where(kj, qv, 0.0)
    return state, qj, (qj, kj, code)


@functools.partial(jax.jit, static_argnames=(
    "nm", "n", "m", "block_size", "fmt", "span"))
def _sparsegpt(w, h, n_prune, *, damp, nm: bool, n: int, m: int,
               block_size: int, fmt, span: int | None):
  """w: kernel (K, cols) float32; n_prune: weights to prune per block (traced,
  so other sparsities reuse the compiled code). Returns (w_hat, keep, codes,
  scale, zero) in kernel layout, whether w_hat is finite, and the kept count."""
  k, cols = w.shape
  w, u = obs_prepare(w, h, damp)
  rounding = None
  if fmt is not None and span is None:  # per output channel (N:M) or tensor
    s, z = GroupRounding.fit(_predicted_kept(w, jnp.diag(u), n, m).T if nm
                             else w.reshape(1, -1), fmt)
    rounding = GroupRounding(fmt, k, 1, cols, static=(s[None, :], z[None, :]),
                             group_of=lambda c: 0)
  elif fmt is not None:
    rounding = GroupRounding(
        fmt, span, k // span, cols,
        scale_input=lambda rows, d: _predicted_kept(rows, d, n, m))
  rule = _SparseGpt(k, n_prune, nm=nm, n=n, m=m, block=block_size,
                    rounding=rounding)
  (_, sz), outs = obs_sweep(w, u, rule, block=block_size,
                            slab=slab_size(block_size, m if nm else 1, span))
  q, keep = outs[0], outs[1]
  codes = outs[2] if fmt is not None else None
  s_all, z_all = sz if fmt is not None else (jnp.zeros((1, 1)),) * 2
  return (q, keep, codes, s_all, z_all, jnp.all(jnp.isfinite(q)),
          jnp.sum(keep))


@functools.partial(jax.jit, static_argnames=(
    "view", "dtype", "nm", "n", "m", "kept", "fmt"))
def _assemble(q, keep, codes, s, z, *, view, dtype, nm, n, m, kept, fmt):
  """Dense pass outputs on the 2-D view -> the kernel's sparse leaf (+ packed
  kept codes, scale, zero): laid back once, N:M runs along the last
  contracted axis (which continues the view's K axis)."""
  w_hat = view.from_matrix(q).astype(dtype)
  keep = view.from_matrix(keep)
  take = (lambda x: nm_from_keep(x, keep, n, m, view.contract[-1])) if nm \
      else (lambda x: sparse_from_mask(x, keep, (1,) * len(view.shape),
                                       "unstructured", kept=kept))
  leaf = take(w_hat)
  if fmt is None:
    return leaf, None, None, None
  vals = take(view.from_matrix(fmt.encode(codes))).values
  # the QArray's (K, N) matrix: kept values along the input axis by outputs
  vals = pack_codes(vals.reshape(vals.shape[0], -1), fmt.bits)
  if nm:  # per output channel or group of the kept values
    s = s.reshape(s.shape[0], -1)
  else:  # one scale for the flat list of kept values
    s = s.reshape(1, 1)
  z = z.reshape(s.shape).astype(jnp.uint8)
  return leaf, vals, s.astype(jnp.float32), z


def _resolve_view(path, view: MatrixLayout, cfg):
  """`_resolve` for a kernel contracted over `view.contract`: the algorithm
  runs on the 2-D view (K, N), N:M runs along the last contracted axis."""
  if view.contract == (0,):
    return _resolve(path, view.shape, cfg)
  out = _resolve(path, (view.k, view.n), cfg)
  last = view.shape[view.contract[-1]]
  if cfg.get("pattern") == "nm" and last % cfg["m"]:
    raise CompressionError(
        f"N:M runs go along the last contracted axis ({view.contract[-1]}, "
        f"size {last}), which M={cfg['m']} does not divide", path)
  if cfg.get("bits") is not None or cfg.get("format") is not None:
    raise CompressionError(
        f"joint quantization of a kernel contracted over axes "
        f"{view.contract} is not supported; prune first, then quantize "
        "(chain(sparsegpt(...), quantize(...)))", path)
  return out


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
                    contract: tuple[int, ...] = (0,), path: str = "<array>"):
  """SparseGPT of a Flax kernel w (K_in, ...) given H (K_in x K_in); or of
  any kernel contracted over `contract` (the statistics' axes: an
  out-projection's (0, 1), a conv's spatial and input axes), on its 2-D view
  (K = their product), the leaf built in the kernel's layout.

  Returns a SparseArray (unstructured, 1x1 blocks) or an NMSparseArray (N of
  every M along the input axis); with `bits` or `format`, its values are a
  QArray holding the jointly quantized weights (see module doc).
  """
  w = jnp.asarray(w)
  cfg = SparseGptOptions(sparsity=sparsity, pattern=pattern, n=n, m=m,
                         block_size=block_size, damp=damp, bits=bits,
                         format=format, group_size=group_size,
                         symmetric=symmetric)
  view = MatrixLayout(tuple(w.shape), tuple(contract))
  fmt, span = _resolve_view(path, view, cfg)
  k = view.k
  if tuple(hessian.shape) != (k, k):
    raise CompressionError(f"Hessian {tuple(hessian.shape)} does not match "
                           f"in_features {k}", path)
  nm = pattern == "nm"
  unit = span if span else (m if nm else 1)
  bs = min(max(block_size // unit, 1) * unit, k)  # whole runs / groups
  w2 = view.to_matrix(jnp.asarray(w, jnp.float32))
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
      q, keep, codes, s, z, view=view, dtype=jnp.dtype(w.dtype).name, nm=nm,
      n=n, m=m, kept=kept, fmt=fmt)
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
    if path not in stats:
      raise CompressionError("no calibration statistics for this param; "
                             "capture with the same rules", path)
    _resolve_view(path, stats[path].view(w.shape), cfg)

  def leaf(path, w, cfg, state):
    st = stats[path]
    # any contraction (attention out-projections, im2col convs): the
    # algorithm on the 2-D view (contracted axes x the rest)
    return sparsegpt_prune(w, st.hessian, path=path,
                           contract=tuple(st.contract), **cfg)

  return transform_lib.leaf_transform("sparsegpt", options, leaf, check,
                                      rules, default)
