"""Quantized KV-cache entries: per-token and per-channel groups (KIVI),
asymmetric min-max or symmetric absmax integers, fp8, and Hadamard-rotated
keys.

A `KVQuant` says how keys or values are stored. Entries are `KVCodes` of
shape (B, H, S, D): `materialize` dequantizes them and `nbytes` counts
their codes, scales and zero points:

  axis="token"    groups of `group_size` channels of one token: scale (and
                  zero) (B, H, S, D / g), codes packed along D;
  axis="channel"  groups of `group_size` consecutive slots (tokens) of one
                  channel: scale (B, H, S / g, D), codes packed along S.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache", Sec. 3): keys per channel, values per token, both with the
asymmetric min-max quantizer Q(X) = round((X - min X) / s),
s = (max X - min X) / (2^b - 1), and a full-precision window of the most
recent tokens (kept by the store, `KVSpec.residual`). The zero point here is
the integer z = round(-min X / s) stored as int16 (as QArray's zero points are
integers): the grid (q - z) s then spans [min - s/2, max + s/2] at worst, so
|x - x_hat| <= s / 2 as with KIVI's float minimum, and a group of all-positive
keys keeps its own range (rtn's asymmetric scales include 0, which at 2 bits
wastes most of the grid on such channels). Symmetric integers use
s = max|X| / qmax; fp8 / fp4 elements s = max|X| / max_value.

Rotation (QuaRot, Ashkboos et al. 2024, Sec. 4, "KV cache"; KVQuant, Hooper
et al. 2024): keys are multiplied by a randomized Hadamard matrix
R = diag(signs) H along head_dim before quantizing, which spreads outlier
channels over all channels; reading applies R^T (H is its own inverse), so
attention sees keys in the model's basis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout
from compressjax import formats
from compressjax.core import hadamard
from compressjax.core.errors import CompressionError
from compressjax.formats.integer import IntFormat
from compressjax.formats.scaled import store_scale

AXES = ("token", "channel")
ZERO_DTYPE = jnp.int16
_ZERO_LIMIT = 16000.0  # |z| bound (int16), reached only for near-constant groups


@dataclasses.dataclass(frozen=True)
class KVQuant:
  """How keys or values are stored: `format` a name of `formats` (int2 ..
  int8, fp8_e4m3, fp8_e5m2, fp4_e2m1), `axis` "token" or "channel",
  `group_size` channels (axis="token"; None: the whole head_dim) or tokens
  (axis="channel", required), `symmetric` (integers only), `rotate` a
  randomized Hadamard rotation along head_dim (keys), `seed` its signs, and
  `scale_dtype` of scales."""

  format: str = "int8"
  axis: str = "token"
  group_size: int | None = None
  symmetric: bool = False
  rotate: bool = False
  seed: int = 0
  scale_dtype: Any = jnp.float16

  def __post_init__(self):
    if self.axis not in AXES:
      raise CompressionError(f"KV quantization axis must be one of {AXES}, "
                             f"got {self.axis!r}")
    try:
      fmt = formats.get(self.format)
    except (ValueError, CompressionError) as e:
      raise CompressionError(f"KV quantization: {e}") from None
    if fmt.block_size is not None or fmt.scale_format is not None:
      raise CompressionError(
          f"KV quantization format {self.format!r} is a block-scale scheme; "
          "use an element format (int2..int8, fp8_e4m3, fp8_e5m2, fp4_e2m1) "
          "with group_size")
    if not self.symmetric and not isinstance(fmt, IntFormat):
      raise CompressionError(f"asymmetric KV quantization needs an integer "
                             f"format, not {self.format}; set symmetric=True")
    if self.axis == "channel" and self.group_size is None:
      raise CompressionError("per-channel KV quantization groups tokens: give "
                             "group_size (KIVI: 32 or 128)")
    if self.group_size is not None and self.group_size < 1:
      raise CompressionError(f"group_size must be >= 1, got {self.group_size}")

  @property
  def fmt(self):
    return formats.get(self.format, self.symmetric)

  @property
  def bits(self) -> int:
    return self.fmt.bits

  def group(self, head_dim: int) -> int:
    """Elements per scale along the grouped axis."""
    return head_dim if self.group_size is None and self.axis == "token" \
        else self.group_size

  def check(self, head_dim: int, what: str, layer: int) -> None:
    """Raises (naming the layer) when the groups do not fit head_dim."""
    if self.axis == "token" and head_dim % self.group(head_dim):
      raise CompressionError(
          f"layer {layer}: {what}: group_size {self.group_size} does not "
          f"divide head_dim {head_dim}; pick a divisor of {head_dim}")
    if self.axis == "channel" and (self.group_size * self.bits) % 8:
      raise CompressionError(
          f"layer {layer}: {what}: a group of {self.group_size} tokens of "
          f"{self.bits}-bit codes is not a whole number of bytes; use a "
          f"group_size that is a multiple of {8 // np.gcd(8, self.bits)}")
    if self.rotate and hadamard.largest_power_of_two_divisor(head_dim) < 2:
      raise CompressionError(
          f"layer {layer}: {what}: a Hadamard rotation of odd head_dim "
          f"{head_dim} is the identity; drop rotate")

  def signs(self, head_dim: int) -> np.ndarray:
    """The rotation's +-1 signs (a constant of the spec, not stored)."""
    rng = np.random.default_rng(self.seed)
    return np.where(rng.random(head_dim) < 0.5, -1, 1).astype(np.int8)

  def rotate_in(self, x):
    """x R (before quantizing); identity without `rotate`."""
    if not self.rotate:
      return x
    d = x.shape[-1]
    return hadamard.rotate(x, jnp.asarray(self.signs(d)),
                           hadamard.largest_power_of_two_divisor(d))

  def rotate_out(self, x):
    """x R^T = H (x) diag(signs): undoes `rotate_in`."""
    if not self.rotate:
      return x
    d = x.shape[-1]
    y = hadamard.fwht(x, axis=-1, block=hadamard.largest_power_of_two_divisor(d))
    return y * jnp.asarray(self.signs(d)).astype(y.dtype)

  def quantize(self, x) -> KVCodes:
    """(B, H, S, D) float -> KVCodes along this spec's axis (already
    rotated: call `rotate_in` first)."""
    axis = 3 if self.axis == "token" else 2
    return quantize_groups(x, self.fmt, axis, self.group(x.shape[-1]),
                           self.scale_dtype)

  def dequantize(self, q: KVCodes, dtype):
    return self.rotate_out(q.materialize().astype(jnp.float32)).astype(dtype)

  def bits_per_element(self, head_dim: int) -> float:
    """Stored bits per cached element (codes + scale + zero), in theory."""
    g = self.group(head_dim)
    extra = np.dtype(self.scale_dtype).itemsize * 8
    if not self.symmetric:
      extra += np.dtype(ZERO_DTYPE).itemsize * 8
    return self.bits + extra / g


def apply_groups(x, s, axis: int, fn):
  """fn(x, s) with s repeated over groups of x along `axis` (exact)."""
  n, g = x.shape[axis], s.shape[axis]
  if g in (1, n):
    return fn(x, s)
  xs = x.reshape(x.shape[:axis] + (g, n // g) + x.shape[axis + 1:])
  ss = s.reshape(s.shape[:axis] + (g, 1) + s.shape[axis + 1:])
  return fn(xs, ss).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class KVCodes:
  """Quantized cache entries of shape (B, H, S, D): codes packed along
  `axis` (3: per token, groups of channels; 2: per channel, groups of
  slots), scale and zero (B, H, S, D / g) or (B, H, S / g, D). Not a
  `core.QArray`: that type stores a weight's (K, N) matrix, while a cache
  scatters and gathers whole slots along axis 2 of every child."""

  codes: Any
  scale: Any
  zero: Any
  shape: tuple[int, ...]
  dtype: str
  fmt: Any
  axis: int

  @property
  def dense_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype)
               .itemsize for x in (self.codes, self.scale, self.zero)
               if x is not None)

  def validate(self) -> None:
    """Raises if the children's shapes or dtypes contradict the metadata."""
    shape, ax, bits = tuple(self.shape), self.axis, self.fmt.bits
    codes = list(shape)
    codes[ax] = layout.packed_length(shape[ax], bits)
    groups = shape[ax] // max(self.scale.shape[ax], 1)
    want = {"codes": tuple(codes), "scale": shape[:ax] + (
        shape[ax] // groups,) + shape[ax + 1:]}
    if self.zero is not None:
      want["zero"] = want["scale"]
    for name, w in want.items():
      got = tuple(getattr(self, name).shape)
      if got != w:
        raise CompressionError(f"KV entries: {name} has shape {got}, "
                               f"expected {w} for shape {shape}, axis {ax}")
    if np.dtype(self.codes.dtype) != np.dtype(self.fmt.storage_dtype):
      raise CompressionError(f"KV entries: codes are {self.codes.dtype}, "
                             f"{self.fmt} stores "
                             f"{np.dtype(self.fmt.storage_dtype)}")

  def materialize(self):
    """(decode(codes) - zero) * scale, per group along `axis`."""
    stored = self.codes
    if self.fmt.bits < 8:
      stored = layout.unpack(stored, self.fmt.bits, self.shape[self.axis],
                             self.axis)
    q = self.fmt.decode(stored).astype(jnp.float32)
    if self.zero is not None:
      q = apply_groups(q, self.zero.astype(jnp.float32), self.axis,
                       lambda a, b: a - b)
    return apply_groups(q, self.scale.astype(jnp.float32), self.axis,
                        lambda a, b: a * b).astype(self.dtype)


jax.tree_util.register_dataclass(
    KVCodes, data_fields=["codes", "scale", "zero"],
    meta_fields=["shape", "dtype", "fmt", "axis"])


def entry_nbytes(x: Any) -> int:
  """True bytes of a store child: KVCodes, an array or None."""
  if x is None:
    return 0
  if isinstance(x, KVCodes):
    return x.nbytes
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _reduce(x, fn, axis: int, g: int):
  """fn over groups of g along `axis`, keeping every other dim."""
  n = x.shape[axis]
  xg = x.reshape(x.shape[:axis] + (n // g, g) + x.shape[axis + 1:])
  return fn(xg, axis=axis + 1)


def quantize_groups(x, fmt, axis: int, group: int,
                    scale_dtype: Any = jnp.float16) -> KVCodes:
  """Round-to-nearest with one scale (and zero) per group of `group`
  elements along `axis`, every other dim kept (see the module docstring for
  the quantizers). Returns KVCodes of x's shape and dtype."""
  xf = x.astype(jnp.float32)
  asym = isinstance(fmt, IntFormat) and not fmt.symmetric
  zero = None
  if asym:
    lo, hi = _reduce(xf, jnp.min, axis, group), _reduce(xf, jnp.max, axis, group)
    s = (hi - lo) / (fmt.qmax - fmt.qmin)
    s = jnp.maximum(s, jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / _ZERO_LIMIT)
  else:
    s = _reduce(jnp.abs(xf), jnp.max, axis, group) / fmt.max_value
  s = jnp.where(s > 0, s, 1.0)  # constant-zero group: any scale is exact
  s = store_scale(s, scale_dtype)
  sf = s.astype(jnp.float32)
  y = apply_groups(xf, sf, axis, lambda a, b: a / b)
  if asym:
    zf = jnp.round(-lo / sf)
    y = apply_groups(y, zf, axis, lambda a, b: a + b)
    zero = zf.astype(ZERO_DTYPE)
  stored = fmt.encode(fmt.round(y))
  codes = layout.pack(stored, fmt.bits, axis) if fmt.bits < 8 else stored
  return KVCodes(codes=codes, scale=s, zero=zero, shape=tuple(x.shape),
                dtype=jnp.dtype(x.dtype).name, fmt=fmt, axis=axis)


def kivi(bits: int = 2, group_size: int = 32, rotate: bool = False
         ) -> tuple[KVQuant, KVQuant]:
  """(keys, values) specs of KIVI-`bits`: keys per channel in groups of
  `group_size` tokens, values per token in groups of `group_size` channels,
  both asymmetric (pair with `KVSpec(residual=...)`, KIVI's R)."""
  fmt = f"int{bits}"
  return (KVQuant(fmt, "channel", group_size, rotate=rotate),
          KVQuant(fmt, "token", group_size))
