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
import zlib
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from pallas_kernels import layout
from compressjax.core.codebook import CodebookArray
from compressjax.core.errors import CompressionError
from compressjax.core.tree import INPUT_AXIS
from compressjax.core.input_transform import InputTransform
from compressjax.core.lowrank import LowRank
from compressjax.core.qarray import QArray, apply_groups
from compressjax.core import rules as rules_lib
from compressjax.core.format import Format
from compressjax.core.rules import option
from compressjax.core.sparse import NMSparseArray, SparseArray
from compressjax import formats
from compressjax.formats.integer import IntFormat
from compressjax.core import transform as transform_lib


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


def quantize_array(w, bits: int = 8, *, format: str | None = None,
                   group_size: int | None = None, symmetric: bool = True,
                   per_tensor: bool = False, axis: int | None = None,
                   scale_dtype: Any = jnp.float32, key=None,
                   double_quant: bool = False,
                   path: str = "<array>") -> QArray | CodebookArray:
  """Quantizes one float array into a QArray.

  Args:
    bits: integer bits when `format` is None.
    format: a name from `compressjax.formats.NAMES` (int3, ternary, nf4,
      fp8_e4m3, mxfp4, nvfp4, ...); block-scale schemes bring their own blocks.
    group_size / per_tensor: scale granularity (default per output channel).
    key: PRNG key for stochastic rounding (default: round to nearest even).
    double_quant: store the scales themselves as 8-bit asymmetric integers
      per output channel (QLoRA-style double quantization).
  """
  w = jnp.asarray(w)
  axis = INPUT_AXIS if axis is None else axis % max(w.ndim, 1)
  cfg = dict(bits=bits, format=format, group_size=group_size,
             symmetric=symmetric, axis=axis)
  check_quant_config(path, w.shape, cfg)
  fmt = resolve_format(cfg, path)
  if isinstance(fmt, str):  # MX / NVFP4: blocks and scales by definition
    if fmt in formats.CODEBOOKS:
      return formats.quantize_codebook(w, int(fmt[-1]), group_size=group_size,
                                       axis=axis)
    if fmt == "nvfp4":
      return formats.quantize_nvfp4(w, axis=axis, key=key)
    return formats.quantize_mx(w, fmt, axis=axis, key=key)
  groups = 1 if group_size is None else w.shape[axis] // group_size
  x = w.astype(jnp.float32)
  reduce = lambda v, fn: _scale_reduce(v, fn, axis, groups, per_tensor)
  zero = None
  if isinstance(fmt, IntFormat) and not fmt.symmetric:
    hi = jnp.maximum(reduce(x, jnp.max), 0.)
    lo = jnp.minimum(reduce(x, jnp.min), 0.)
    s = (hi - lo) / (fmt.qmax - fmt.qmin)
  else:
    rule = getattr(fmt, "scale_rule", "absmax")
    if rule == "absmax":
      s = reduce(jnp.abs(x), jnp.max) / fmt.max_value
    else:
      s = reduce(jnp.abs(x), jnp.mean) * (1.4 if rule == "twn" else 1.0)
  s = jnp.where(s > 0, s, 1.0)  # all-zero group: any scale is exact
  s = _store_scale(s, scale_dtype)
  sf = s.astype(jnp.float32)
  y = apply_groups(x, sf, axis, lambda a, b: a / b)
  if isinstance(fmt, IntFormat) and not fmt.symmetric:
    zero = jnp.clip(jnp.round(-lo / sf), fmt.qmin, fmt.qmax)
    y = apply_groups(y, zero, axis, lambda a, b: a + b)
  stored = fmt.encode(fmt.round(y, key))
  codes = layout.pack(stored, fmt.bits, axis) if fmt.bits < 8 else stored
  scale = s
  if double_quant:
    scale = quantize_array(s, 8, symmetric=False, axis=axis, path=path)
  return QArray(codes=codes, scale=scale,
                zero=None if zero is None else zero.astype(jnp.uint8),
                shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, fmt=fmt,
                axis=axis)


def resolve_format(cfg: Mapping[str, Any], path: str):
  name = cfg.get("format")
  if name is None:
    bits = cfg.get("bits", 8)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
      raise CompressionError(
          f"integer bits must be in [2, 8], got {bits}; choose bits between 2 "
          "and 8 (or format='binary' for 1 bit)", path)
    name = f"int{bits}"
  try:
    fmt = formats.get(name, bool(cfg.get("symmetric", True)))
  except ValueError as e:
    raise CompressionError(str(e), path) from None
  if not cfg.get("symmetric", True) and not isinstance(fmt, IntFormat):
    raise CompressionError(f"asymmetric quantization needs an integer "
                           f"format, not {name}", path)
  return fmt


def check_quant_config(path: str, shape, cfg: Mapping[str, Any]) -> None:
  fmt = resolve_format(cfg, path)
  nd = len(shape)
  axis = cfg.get("axis")
  axis = INPUT_AXIS if axis is None else axis
  if nd and not -nd <= axis < nd:
    raise CompressionError(f"axis {axis} out of range for shape {tuple(shape)}",
                           path)
  g = cfg.get("group_size")
  if isinstance(fmt, str) and fmt in formats.CODEBOOKS:
    fmt = None  # codebooks take group_size like integer formats
  if isinstance(fmt, str):  # block-scale scheme
    block = 16 if fmt == "nvfp4" else 32
    n = shape[axis % nd] if nd else 1
    if g is not None or cfg.get("per_tensor"):
      raise CompressionError(f"{fmt} has its own blocks of {block}; drop "
                             "group_size / per_tensor", path)
    if n % block:
      raise CompressionError(
          f"{fmt} blocks of {block} do not divide in_features {n} (axis "
          f"{axis % nd} of shape {tuple(shape)}); skip this param with a rule "
          "or use another format for it", path)
    return
  if g is not None:
    n = shape[axis % nd] if nd else 1
    if g <= 0 or n % g:
      raise CompressionError(
          f"group_size {g} does not divide in_features {n} (axis {axis % nd} "
          f"of shape {tuple(shape)}); pick a divisor of {n} or add a rule "
          "with another group_size for this param", path)


def _quantize_leaf(path, leaf, cfg, state=None):
  """Quantizes a dense leaf, or the float parts of a compressed one."""
  if isinstance(leaf, (QArray, CodebookArray)):
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
  if isinstance(leaf, InputTransform):  # quantize the (transformed) weight
    return dataclasses.replace(leaf, weight=_quantize_leaf(
        path + "/weight", leaf.weight, cfg))
  cfg = dict(cfg)
  if cfg.get("key") is not None:  # one independent stream per param
    cfg["key"] = jax.random.fold_in(cfg["key"], zlib.crc32(path.encode()))
  return quantize_array(leaf, path=path, **cfg)


def _is_float_dtype(d) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(d), jnp.floating)
  except TypeError:
    return False


def _check(path, leaf, cfg):
  if isinstance(leaf, (SparseArray, NMSparseArray, LowRank, QArray,
                       CodebookArray, InputTransform)):
    return  # checked on the float part it will quantize
  check_quant_config(path, leaf.shape, cfg)


@rules_lib.options
class QuantizeOptions(rules_lib.Options):
  """Round-to-nearest quantization (`quantize_array`)."""

  transform: ClassVar[str] = "quantize"
  bits: int = option(8, "integer bits when format is None")
  format: str | Format | None = option(
      None, "a format name from compressjax.formats.NAMES (int3, ternary, "
      "nf4, fp8_e4m3, mxfp4, nvfp4, ...) instead of bits")
  group_size: int | None = option(
      None, "elements per scale along `axis` (None: per output channel)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(True, "False: integer codes with a zero point")
  per_tensor: bool = option(False, "one scale for the whole tensor")
  axis: int | None = option(None, "contraction axis (None: the input axis)")
  scale_dtype: Any = option(jnp.float32, "dtype the scales are stored in",
                            check=_is_float_dtype, must="be a float dtype")
  key: Any = option(None, "PRNG key for stochastic rounding (None: nearest)")
  double_quant: bool = option(False, "store the scales as 8-bit integers")


@transform_lib.builder(QuantizeOptions, positional=("bits",))
def quantize(*, options, rules, default) -> transform_lib.Transform:
  """Quantization transform (see `quantize_array`). Per-path overrides via
  rules, e.g. `rules=[(r".*(embed|head).*", dict(bits=8, format=None))]`."""
  return transform_lib.leaf_transform("quantize", options, _quantize_leaf,
                                      _check, rules, default)
