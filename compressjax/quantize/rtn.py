"""Round-to-nearest (RTN) quantization.

For each quantization group (per tensor, per output channel, or per group of
`group_size` consecutive elements along the contraction axis):
  symmetric:  s = max|w| / qmax,              q = clip(round(w / s), qmin, qmax)
  asymmetric: s = (max(w,0) - min(w,0)) / (2^b - 1), z = round(-min(w,0) / s),
              q = clip(round(w / s) + z, 0, 2^b - 1)
and w_hat = (q - z) * s, so |w - w_hat| <= s / 2 wherever w lies inside the
group's range (always, for these scales). See e.g. GPTQ (Frantar et al. 2022,
Sec. 2) for RTN as the baseline. The scale is stored in `scale_dtype`; a scale
rounded down by that cast is bumped to the next representable value so the
s/2 bound still holds with the stored scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import layout
from compressjax.core.errors import CompressionError
from compressjax.core.tree import INPUT_AXIS
from compressjax.core.lowrank import LowRank
from compressjax.core.qarray import QArray, apply_groups
from compressjax.core.rules import Predicate, RuleLike, default_filter
from compressjax.core.sparse import NMSparseArray, SparseArray
from compressjax.formats.integer import IntFormat
from compressjax import transform as T


def _scale_reduce(x, fn, axis: int, groups: int, per_tensor: bool):
  """Reduces x to its scale shape: keeps the last axis and the group axis."""
  nd = x.ndim
  if per_tensor:
    return fn(x, axis=tuple(range(nd)), keepdims=True)
  n = x.shape[axis]
  xg = x.reshape(x.shape[:axis] + (groups, n // groups) + x.shape[axis + 1:])
  red = [axis + 1]
  for d in range(nd):
    if d not in (axis, nd - 1):
      red.append(d if d < axis else d + 1)
  r = fn(xg, axis=tuple(red), keepdims=True)
  return r.reshape(r.shape[:axis + 1] + r.shape[axis + 2:])


def _store_scale(s, scale_dtype):
  """Casts the scale; rounds up where the cast rounded down."""
  sc = s.astype(scale_dtype)
  low = sc.astype(jnp.float32) < s
  return jnp.where(low, jnp.nextafter(sc, jnp.array(jnp.inf, sc.dtype)), sc)


def quantize_array(w, bits: int = 8, *, group_size: int | None = None,
                   symmetric: bool = True, per_tensor: bool = False,
                   axis: int | None = None, scale_dtype: Any = jnp.float32,
                   fmt: IntFormat | None = None, path: str = "<array>") -> QArray:
  """RTN-quantizes one float array into a QArray."""
  w = jnp.asarray(w)
  fmt = fmt or _int_format(bits, symmetric, path)
  axis = INPUT_AXIS if axis is None else axis % max(w.ndim, 1)
  check_quant_config(path, w.shape, dict(group_size=group_size, axis=axis))
  groups = 1 if group_size is None else w.shape[axis] // group_size
  x = w.astype(jnp.float32)
  if fmt.symmetric:
    amax = _scale_reduce(jnp.abs(x), jnp.max, axis, groups, per_tensor)
    s = amax / fmt.qmax
    zero = None
  else:
    hi = jnp.maximum(_scale_reduce(x, jnp.max, axis, groups, per_tensor), 0.)
    lo = jnp.minimum(_scale_reduce(x, jnp.min, axis, groups, per_tensor), 0.)
    s = (hi - lo) / (fmt.qmax - fmt.qmin)
  s = jnp.where(s > 0, s, 1.0)  # all-zero group: any scale is exact
  s = _store_scale(s, scale_dtype)
  sf = s.astype(jnp.float32)
  if not fmt.symmetric:
    zero = jnp.clip(jnp.round(-lo / sf), fmt.qmin, fmt.qmax)
  y = apply_groups(x, sf, axis, lambda a, b: a / b)
  if zero is not None:
    y = apply_groups(y, zero, axis, lambda a, b: a + b)
  q = fmt.round(y)
  stored = fmt.encode(q)
  codes = layout.pack(stored, fmt.bits, axis) if fmt.bits < 8 else stored
  return QArray(codes=codes, scale=s,
                zero=None if zero is None else zero.astype(jnp.uint8),
                shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, fmt=fmt,
                axis=axis)


def _int_format(bits, symmetric, path):
  try:
    return IntFormat(int(bits), bool(symmetric))
  except ValueError as e:
    raise CompressionError(f"{e}; choose bits between 2 and 8", path) from None


def check_quant_config(path: str, shape, cfg: Mapping[str, Any]) -> None:
  if "bits" in cfg:
    _int_format(cfg["bits"], cfg.get("symmetric", True), path)
  nd = len(shape)
  axis = cfg.get("axis")
  axis = INPUT_AXIS if axis is None else axis
  if nd and not -nd <= axis < nd:
    raise CompressionError(f"axis {axis} out of range for shape {tuple(shape)}",
                           path)
  g = cfg.get("group_size")
  if g is not None:
    n = shape[axis % nd] if nd else 1
    if g <= 0 or n % g:
      raise CompressionError(
          f"group_size {g} does not divide in_features {n} (axis {axis % nd} "
          f"of shape {tuple(shape)}); pick a divisor of {n} or add a rule "
          "with another group_size for this param", path)


def _quantize_leaf(path, leaf, cfg, state=None):
  """Quantizes a dense leaf, or the float parts of a compressed one."""
  if isinstance(leaf, QArray):
    raise CompressionError("param is already quantized; quantize once, or "
                           "skip it with a rule", path)
  if isinstance(leaf, (SparseArray, NMSparseArray)):
    sub = dict(cfg)
    if isinstance(leaf, SparseArray):
      sub["axis"] = 0  # values are a flat list of kept elements
    return dataclasses.replace(
        leaf, values=_quantize_leaf(path + "/values", leaf.values, sub))
  if isinstance(leaf, LowRank):
    if leaf.residual is not None:
        return dataclasses.replace(leaf, residual=_quantize_leaf(
          path + "/residual", leaf.residual, cfg))
    return dataclasses.replace(
        leaf, a=_quantize_leaf(path + "/a", leaf.a, cfg),
        b=_quantize_leaf(path + "/b", leaf.b, cfg))
  return quantize_array(leaf, path=path, **cfg)


def _check(path, leaf, cfg):
  if isinstance(leaf, (SparseArray, NMSparseArray, LowRank, QArray)):
    return  # checked on the float part it will quantize
  check_quant_config(path, leaf.shape, cfg)


def quantize(bits: int = 8, *, group_size: int | None = None,
             symmetric: bool = True, per_tensor: bool = False,
             axis: int | None = None, scale_dtype: Any = jnp.float32,
             rules: Sequence[RuleLike] | None = None,
             default: Predicate | None = default_filter) -> T.Transform:
  """RTN quantization transform (see module doc). Per-path overrides via rules,
  e.g. `rules=[(r".*(embed|head).*", dict(bits=8))]`."""
  base = dict(bits=bits, group_size=group_size, symmetric=symmetric,
              per_tensor=per_tensor, axis=axis, scale_dtype=scale_dtype)
  return T.leaf_transform("quantize", base, _quantize_leaf, _check, rules,
                          default)
