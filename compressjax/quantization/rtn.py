"""Round-to-nearest (RTN) quantization.

For each quantization group (per tensor, per output feature, or per group of
`group_size` consecutive elements along the flattened contraction axes) the
format's own rule gives the scale (and zero point), then the codes are the
nearest representable values (`compressjax.formats.scaled`):
  symmetric int:  s = max|w| / absmax_code,   q = clip(round(w / s), qmin, qmax)
  asymmetric int: s = (max(w,0) - min(w,0)) / (2^b - 1), z = round(-min(w,0) / s),
                  q = clip(round(w / s) + z, 0, 2^b - 1)
and w_hat = (q - z) * s, so |w - w_hat| <= s / 2 wherever w lies inside the
group's range (always, for these scales). See e.g. GPTQ (Frantar et al. 2022,
Sec. 2) for RTN as the baseline. Block-scale schemes (MX, NVFP4) and
codebooks bring their own definitions (`Format.quantize`).

Layout: groups run along the contraction axes (`axis`: an int or a tuple;
default `core.contraction.default_contract`, right for Flax Dense, Einsum /
DenseGeneral in- and out-projections and conv kernels) and scales are per
output feature, every other axis.
"""

from __future__ import annotations

import dataclasses
import numbers
import zlib
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from compressjax import formats
from compressjax.core import transform as transform_lib
from compressjax.core.base import Stage, compress_inside, inner_arrays
from compressjax.core.contraction import MatrixLayout, normalize_contract
from compressjax.core.errors import CompressionError
from compressjax.core.format import Format
from compressjax.core import rules as rules_lib
from compressjax.core.rules import option


def quantize_array(w, bits: int | None = None, *, format: Any = None,
                   group_size: int | None = None, symmetric: bool = True,
                   per_tensor: bool = False, axis: Any = None,
                   scale_dtype: Any = jnp.float32, key=None,
                   double_quant: bool = False, path: str = "<array>"):
  """Quantizes one float array into a QArray (a CodebookArray for codebooks).

  Args:
    bits: integer bits when `format` is None (default 8); with a format,
      optional and then it must match the format's bits.
    format: a name from `compressjax.formats.NAMES` (int3, int4_asym,
      ternary, nf4, fp8_e4m3, mxfp4, nvfp4, codebook3, ...) or a Format
      object; block-scale schemes bring their own blocks.
    group_size / per_tensor: scale granularity (default per output feature).
    axis: the contraction axis or axes (default: from the shape, see
      `core.contraction`); groups run along them, flattened.
    key: PRNG key for stochastic rounding (default: round to nearest even).
    double_quant: store the scales themselves as 8-bit asymmetric integers
      per output feature (QLoRA-style double quantization).
  """
  w = jnp.asarray(w)
  cfg = dict(bits=bits, format=format, group_size=group_size,
             symmetric=symmetric, per_tensor=per_tensor, axis=axis,
             scale_dtype=scale_dtype, key=key, double_quant=double_quant)
  fmt, contract = check_quant_config(path, w.shape, cfg)
  leaf = fmt.quantize(w, contract=contract, group_size=group_size,
                      per_tensor=per_tensor, scale_dtype=scale_dtype, key=key)
  if double_quant:
    leaf = dataclasses.replace(leaf, scale=quantize_array(
        leaf.scale, 8, symmetric=False, axis=0, path=path + "/scale"))
  return leaf


def resolve_format(cfg: Mapping[str, Any], path: str,
                   default_bits: int = 8) -> Format:
  """The Format object of a config's bits / format / symmetric."""
  return formats.resolve(cfg.get("format"), cfg.get("bits"),
                         cfg.get("symmetric", True),
                         default_bits=default_bits, path=path)


def _check_key(key, path: str) -> None:
  if key is None:
    return
  dt = getattr(key, "dtype", None)
  typed = dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)
  raw = dt is not None and jnp.dtype(dt) == jnp.uint32 and tuple(
      key.shape) == (2,)
  if not (typed and key.ndim == 0) and not raw:
    raise CompressionError(
        f"key must be one jax PRNG key (jax.random.key(seed)), got "
        f"{type(key).__name__}{tuple(getattr(key, 'shape', ()))}; or drop "
        "key for round-to-nearest", path)


def check_quant_config(path: str, shape, cfg: Mapping[str, Any],
                       default_bits: int = 8
                       ) -> tuple[Format, tuple[int, ...]]:
  """Checks a quantization config against a param's shape; returns the
  Format and the contraction axes. Errors name `path` and the fix."""
  fmt = resolve_format(cfg, path, default_bits)
  contract = normalize_contract(cfg.get("axis"), shape, path)
  k = MatrixLayout(tuple(shape), contract).k
  g = cfg.get("group_size")
  per_tensor = cfg.get("per_tensor", False)
  if not isinstance(per_tensor, bool):
    raise CompressionError(f"per_tensor must be True or False, got "
                           f"{per_tensor!r}", path)
  if g is not None:
    if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g <= 0:
      raise CompressionError(
          f"group_size must be a positive int or None, got {g!r}", path)
    if per_tensor:
      raise CompressionError("give group_size or per_tensor=True, not both",
                             path)
  fmt.check_layout(k, g, per_tensor, path)
  if g is not None and k % g:
    raise CompressionError(
        f"group_size {g} does not divide in_features {k} (the contraction "
        f"axes {contract} of shape {tuple(shape)}); pick a divisor of {k} or "
        "add a rule with another group_size (or axis) for this param", path)
  sd = cfg.get("scale_dtype", jnp.float32)
  try:
    sd_ok = sd is None or jnp.issubdtype(jnp.dtype(sd), jnp.floating)
  except TypeError:
    sd_ok = False
  if not sd_ok:
    raise CompressionError(
        f"scale_dtype must be a float dtype (float32, bfloat16, float16), "
        f"got {sd!r}", path)
  _check_key(cfg.get("key"), path)
  dq = cfg.get("double_quant", False)
  if not isinstance(dq, bool):
    raise CompressionError(f"double_quant must be True or False, got "
                           f"{dq!r}", path)
  if dq and not fmt.capabilities.float_scale:
    raise CompressionError(
        f"double_quant quantizes plain float scales; {fmt.name} has none "
        "(its scales are part of the format); drop double_quant", path)
  return fmt, contract


def _inner_cfg(cfg, keeps_layout: bool):
  # layout options name the axes of the param they were written for
  return cfg if keeps_layout else dict(cfg, axis=None)


def _quantize_leaf(path, leaf, cfg, state=None):
  """Quantizes a dense leaf, or the float parts of a compressed one."""
  def one(p, x, keeps_layout):
    c = _inner_cfg(cfg, keeps_layout)
    if c.get("key") is not None:  # one independent stream per param
      c = dict(c, key=jax.random.fold_in(c["key"], zlib.crc32(p.encode())))
    return quantize_array(x, path=p, **c)
  return compress_inside(leaf, Stage.QUANTIZE, one, path)


def _is_float_dtype(d) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(d), jnp.floating)
  except TypeError:
    return False


def _check(path, leaf, cfg):
  for p, x, keeps_layout in inner_arrays(leaf, Stage.QUANTIZE, path):
    check_quant_config(p, x.shape, _inner_cfg(cfg, keeps_layout))


@rules_lib.options
class QuantizeOptions(rules_lib.Options):
  """Round-to-nearest quantization (`quantize_array`)."""

  transform: ClassVar[str] = "quantize"
  bits: int | None = option(
      None, "integer bits when format is None (None: 8); with a format, "
      "optional and then equal to the format's bits")
  format: str | Format | None = option(
      None, "a format name from compressjax.formats.NAMES (int3, int4_asym, "
      "ternary, nf4, fp8_e4m3, mxfp4, nvfp4, codebook3, ...) or a Format")
  group_size: int | None = option(
      None, "elements per scale along the contraction axes (None: per "
      "output feature)", check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(True, "False: integer codes with a zero point")
  per_tensor: bool = option(False, "one scale for the whole tensor")
  axis: int | tuple[int, ...] | None = option(
      None, "contraction axis or axes (None: from the shape, see "
      "core.contraction)")
  scale_dtype: Any = option(jnp.float32, "dtype the scales are stored in",
                            check=_is_float_dtype, must="be a float dtype")
  key: Any = option(None, "PRNG key for stochastic rounding (None: nearest)")
  double_quant: bool = option(False, "store the scales as 8-bit integers")


@transform_lib.builder(QuantizeOptions, positional=("bits",))
def quantize(*, options, rules, default) -> transform_lib.Transform:
  """Quantization transform (see `quantize_array`). Per-path overrides via
  rules, e.g. `rules=[(r".*(embed|head).*", dict(bits=8, format=None))]` or
  `[(r".*experts.*", dict(axis=1))]` (contraction axes of MoE kernels)."""
  return transform_lib.leaf_transform("quantize", options, _quantize_leaf,
                                      _check, rules, default)
