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
The sweep itself (dead columns, damping, U, the lazy block updates) is the
OBS column sweep SparseGPT shares (`core.linalg.obs_sweep`); GPTQ supplies the
column rounding (`GroupRounding`, also SparseGPT's joint quantization).
Group scales are computed when a group starts, from the updated weights of
that group (or up front from the original weights with `static_groups`, which
act-order with groups implies, so groups stay contiguous in the stored QArray).
Any element format with an absmax scale works (int, fp8/fp6/fp4, NF4): the
column rounding is the format's own. The result is the same QArray as
round-to-nearest produces.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from compressjax.core import rules as rules_lib
from compressjax.core import transform as transform_lib
from compressjax.core.base import Stage, compress_inside, inner_arrays
from compressjax.core.errors import CompressionError
from compressjax.core.format import Format
from compressjax.core.contraction import MatrixLayout
from compressjax.core.linalg import ObsRule, obs_prepare, obs_sweep
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


def slab_size(block: int, unit: int = 1, span: int | None = None) -> int:
  """Largest slab <= _SLAB (a multiple of `unit`, e.g. N:M's M) dividing the
  block and a quantization group's `span` (so groups start on slabs)."""
  best = unit
  for d in range(unit, max(_SLAB, unit) + 1, unit):
    if block % d == 0 and (span is None or span % d == 0):
      best = d
  return best


class GroupRounding:
  """GPTQ's column rounding with per-group scales (Alg. 1's quant(w_j)), for
  the OBS sweep: `span` inputs per group; static scales (given up front) or
  computed when a group starts from its updated weights (`scale_input` maps
  the group's rows and diag(U) there to the weights the scales must fit,
  e.g. SparseGPT's predicted kept values). Also SparseGPT's joint mode.

  State: (scales, zeros), each (groups, N)."""

  def __init__(self, fmt, span: int, groups: int, n: int, *,
               static=None, group_of=None, scale_input=None,
               scale_dtype: str = "float32"):
    self.fmt, self.span, self.groups, self.n = fmt, span, groups, n
    self.scale_dtype = scale_dtype
    self.static = static
    self.group_of = group_of or (lambda c: c // span)
    self.scale_input = scale_input or (lambda rows, d: rows)

  @staticmethod
  def fit(rows, fmt, scale_dtype: str = "float32"):
    """Scales (and zeros) fitting each row of `rows` (R, g): (R,) each,
    rounded to what `scale_dtype` stores."""
    return _scale_zero(rows, fmt, scale_dtype)

  def init(self):
    if self.static is not None:
      return self.static
    return jnp.ones((self.groups, self.n)), jnp.zeros((self.groups, self.n))

  def slab(self, state, w1, d1, s0, i1):
    if self.static is not None:
      return state
    s_all, z_all = state
    span = min(self.span, w1.shape[0])
    rows = jax.lax.dynamic_slice_in_dim(w1, s0, span, 0)
    dg = jax.lax.dynamic_slice_in_dim(d1, s0, span)
    s_new, z_new = self.fit(self.scale_input(rows, dg).T, self.fmt,
                            self.scale_dtype)
    g = (i1 + s0) // self.span
    start = (i1 + s0) % self.span == 0  # a group starts at this slab
    return (jnp.where(start, s_all.at[g].set(s_new), s_all),
            jnp.where(start, z_all.at[g].set(z_new), z_all))

  def round(self, state, wj, c):
    """(code, dequantized value) of column c."""
    s_all, z_all = state
    g = self.group_of(c)
    sc, zc = s_all[g], z_all[g]
    code = self.fmt.round(wj / sc + zc)
    return code, (code - zc) * sc


class _Gptq(ObsRule):
  def __init__(self, rounding: GroupRounding):
    self.q = rounding

  def init(self, w, u):
    return self.q.init()

  def slab(self, state, w1, d1, s0, i1):
    return self.q.slab(state, w1, d1, s0, i1)

  def column(self, state, wj, j, c):
    code, q = self.q.round(state, wj, c)
    return state, q, code


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
  perm = jnp.argsort(-(jnp.diag(h) + dead), stable=True) if act_order else None
  w_orig = jnp.where(dead[:, None], 0.0, w)
  w, u = obs_prepare(w, h, damp, perm)
  g = k // group_size
  static = None
  if static_groups:
    static = jax.vmap(lambda c: _scale_zero(c.T, fmt, scale_dtype))(
        w_orig.reshape(g, group_size, n))
  group_of = ((lambda c: perm[jnp.minimum(c, k - 1)] // group_size)
              if act_order else None)
  rule = _Gptq(GroupRounding(fmt, group_size, g, n, static=static,
                             group_of=group_of, scale_dtype=scale_dtype))
  (s_all, z_all), q = obs_sweep(
      w, u, rule, block=block_size,
      slab=slab_size(block_size, 1, None if static_groups else group_size))
  if act_order:
    q = q[jnp.argsort(perm)]
  return q, s_all, z_all


def gptq_quantize(w, hessian, *, bits: int | None = None, format=None,
                  group_size: int | None = None,
                  symmetric: bool = True, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, scale_dtype: Any = jnp.float32,
                  contract: tuple[int, ...] = (0,),
                  path: str = "<array>") -> QArray:
  """GPTQ of a Flax kernel w (K_in, ...) given H (K_in x K_in): axis 0 is
  contracted (calibration captures that Hessian), every other axis is an
  output feature (e.g. an Einsum in-projection (d, heads, head_dim)); or
  the `contract`ed axes (those of the statistics: an out-projection's
  (0, 1), a conv's spatial and input axes), K their product. Scales
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
  lay = MatrixLayout(tuple(w.shape), tuple(contract))
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

  def check_inner(path, w):
    """GPTQ quantizes the float kernel inside `w`: the leaf itself, or a
    wrapper's weight (InputTransform, PactInput, ...; the leaf type says
    which, `CompressedLeaf.targets`). Calibration observed the input that
    kernel multiplies, so the statistics' Hessian is its own; an inner array
    with other axes (sparse values, ...) has none."""
    for p, x, keeps_layout in inner_arrays(w, Stage.QUANTIZE, path):
      if not keeps_layout or tuple(x.shape) != tuple(w.shape):
        raise CompressionError(
            f"GPTQ needs a float kernel of shape {tuple(w.shape)} inside the "
            f"{type(w).__name__}, got {p} of shape {tuple(x.shape)}; apply "
            "GPTQ first (chain(gptq(...), ...)) or quantize with RTN", path)

  def leaf(path, w, cfg, state):
    if path not in stats:
      raise CompressionError("no calibration statistics for this param; "
                             "capture with the same rules", path)
    st = stats[path]
    # the contraction the statistics were captured over (any axes)
    return compress_inside(
        w, Stage.QUANTIZE, lambda p, x, _: gptq_quantize(
            x, st.hessian, path=p, contract=tuple(st.contract), **cfg), path)

  def check(path, w, cfg):
    check_inner(path, w)
    k = stats[path].view(w.shape).k if path in stats else w.shape[0]
    if cfg.get("group_size") and k % cfg["group_size"]:
      raise CompressionError(
          f"group_size {cfg['group_size']} does not divide the {k} "
          f"contracted inputs", path)

  return transform_lib.leaf_transform("gptq", options, leaf, check, rules,
                                      default)
