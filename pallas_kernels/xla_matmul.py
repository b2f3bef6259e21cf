"""Fast XLA formulations of the quantized matmuls (the CPU path, and the
fallback wherever no Pallas kernel applies).

Same definitions as `reference.py`; what differs is the schedule. Dequantizing
the whole weight and then calling dot writes a K x N float32 array to fresh
memory every call: at batch 1 on CPU that costs 6-12x a float32 matvec, far
more than the arithmetic. Here the K axis is walked by a `lax.scan` over
blocks of rows; each step dequantizes a (block, N) tile into a loop-carried
buffer that stays in cache and accumulates `x_blk @ tile` in float32. The
weight is read once in its stored (packed) form. Measured in
`bench/kernels.py --cpu`.

Blocks never straddle scale groups: a block is a whole number of groups, or a
divisor of the group. Packed 4-bit codes are split into even rows (low
nibbles) and odd rows (high nibbles) instead of interleaved, so x is split the
same way and no unpacking shuffle is needed.

`int8_matmul` (W8A8) at small batch stays exact: int8 x int8 products are at most 2**14 in
magnitude, so a float32 dot over <= 1024 rows sums integers below 2**24
exactly whatever the order; the block partials are then summed in int32,
which equals int32 accumulation bit for bit (XLA:CPU has no fast int8 GEMM).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import layout, reference

TARGET_ROWS = 128  # measured best of 128/512/1024 at batch 1 and 16 (4096^2)


def _rows_per_byte_unit(bits: int) -> int:
  """Smallest number of rows that fills whole bytes."""
  return 8 // math.gcd(bits, 8)


def _divisors(n: int):
  small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def choose_block(k: int, group: int, unit: int, target: int = TARGET_ROWS,
                 cap: int | None = None) -> tuple[int, int] | None:
  """(block rows, padded K): block divides padded K, is a multiple of `unit`
  and is a whole number of groups or divides the group. Only a single group
  (per-channel) may be padded, since padding moves group boundaries. None
  when no block fits (groups that do not fill whole bytes)."""
  cap = cap or max(target * 8, unit)
  ok = lambda b: b % unit == 0 and b <= cap  # noqa: E731
  if group < k:  # several groups: blocks are unions or parts of groups
    cands = [d * group for d in _divisors(k // group)]
    cands += [d for d in _divisors(group)]
    cands = [b for b in cands if ok(b)]
    if not cands:  # e.g. odd groups of packed codes: caller falls back
      return None
    return min(cands, key=lambda b: (abs(math.log(b / target)), -b)), k
  cands = [b for b in _divisors(k) if ok(b) and b >= target // 4]
  if cands:
    return min(cands, key=lambda b: (abs(math.log(b / target)), -b)), k
  block = -(-target // unit) * unit
  return block, -(-k // block) * block


def _pad_rows(a, rows: int):
  return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _per_block(a, nblocks: int, block: int, group: int):
  """Scale / zero (G, N) -> (nblocks, rows_per_block_or_1, N)."""
  if a.shape[0] == 1:
    return jnp.broadcast_to(a[None], (nblocks,) + a.shape)
  if block >= group:
    return a.reshape(nblocks, block // group, a.shape[-1])
  return a[(jnp.arange(nblocks) * block) // group][:, None]


def _expand(s, rows: int):
  """(r, N) per-group values -> (rows, N) per row (r divides rows)."""
  return jnp.repeat(s, rows // s.shape[0], axis=0) if s.shape[0] > 1 else s


def _values(stored, offset: int, lut, float8=None):
  if float8 is not None:  # the bytes are float8 bit patterns: a cast, no gather
    return jax.lax.bitcast_convert_type(
        stored.astype(jnp.uint8), jnp.dtype(float8)).astype(jnp.float32)
  if lut is not None:
    return lut[stored.astype(jnp.int32)]
  return stored.astype(jnp.float32) + offset


# A float weight this small is dequantized whole, in cache, and one dot
# reads x untouched: the scan's per-block copies of x cost more than the
# dequantization at such sizes (default LM, batch 16: 128x512 int4 went from
# slower than float to about float's time; bench/kernels.py --lm).
DENSE_TILE_BYTES = 1 << 20


def _whole_tile(x, codes, scale, zero, *, bits, k, offset, lut, float8,
                out_dtype):
  """One (K, N) dequantized tile, then one dot (reference.py's definition)."""
  w = _values(layout.unpack(codes, bits, k, 0), offset, lut, float8)
  if zero is not None:
    w = w - _expand(zero.astype(jnp.float32), k)
  w = w * _expand(scale.astype(jnp.float32), k)
  y = jnp.dot(x.reshape(-1, k).astype(jnp.float32), w)
  return y.reshape(x.shape[:-1] + (w.shape[-1],)).astype(out_dtype)


def quantized_matmul(x, codes, scale, zero=None, *, bits: int, k: int,
                     offset: int = 0, lut=None, out_dtype=None,
                     block: int | None = None, float8: str | None = None):
  """y = sum_g (x_g @ (value(codes_g) - zero_g)) * scale_g, scanned over
  blocks of K: reference.py's definition, where value(c) = c + offset, or
  lut[c] when a lookup table of 2**bits float values is given (fp6/fp4 bit
  patterns, NF4 and other level sets), or the float8 value of the byte's bit
  pattern when `float8` names an XLA float8 dtype (8-bit codes only)."""
  if float8 is not None:
    if bits != 8:
      raise ValueError(f"float8 codes are bytes, got bits={bits}")
    lut = None
  out_dtype = out_dtype or x.dtype
  n = codes.shape[-1]
  g = scale.shape[0]
  group = k // g
  if k % g:
    raise ValueError(f"{g} scale groups do not divide K={k}")
  if lut is not None:
    lut = jnp.asarray(lut, jnp.float32)
  if block is None and k * n * 4 <= DENSE_TILE_BYTES:
    return _whole_tile(x, codes, scale, zero, bits=bits, k=k, offset=offset,
                       lut=lut, float8=float8, out_dtype=out_dtype)
  unit = _rows_per_byte_unit(bits)
  # odd groups: a nibble pair (one byte) would straddle two groups
  nibbles = bits == 4 and group % 2 == 0
  if block is None:
    chosen = choose_block(k, group, unit)
    if chosen is None:
      if float8 is not None:
        lut = _values(jnp.arange(256), 0, None, float8)
      return reference.quantized_matmul(x, codes, scale, zero, bits=bits, k=k,
                                        offset=offset, lut=lut,
                                        out_dtype=out_dtype)
    block, kp = chosen
  else:
    kp = -(-k // block) * block
  nb = kp // block
  lead = x.shape[:-1]
  xf = x.reshape(-1, k).astype(jnp.float32)
  m = xf.shape[0]
  xf = jnp.pad(xf, ((0, 0), (0, kp - k)))
  packed_rows = layout.packed_length(kp, bits)
  c = _pad_rows(codes, packed_rows)
  sb = _per_block(scale.astype(jnp.float32), nb, block, group)
  zb = None if zero is None else _per_block(
      zero.astype(jnp.float32), nb, block, group)

  if nibbles:
    xe = xf[:, 0::2].reshape(m, nb, block // 2).transpose(1, 0, 2)
    xo = xf[:, 1::2].reshape(m, nb, block // 2).transpose(1, 0, 2)
    cb = c.reshape(nb, block // 2, n)

    def tile(cblk, rows_lo):
      # rows_lo: low nibble -> even rows, else odd rows
      q = (cblk & 15) if rows_lo else (cblk >> 4)
      return _values(q, offset, lut, float8)

    def body(acc, a):
      cblk, s, z, e, o = a
      # per-row values of the even rows (= of the odd rows: groups are even)
      s = _expand(s, block)[0::2]
      if z is not None:
        z = _expand(z, block)[0::2]
      lo, hi = tile(cblk, True), tile(cblk, False)
      if z is not None:
        lo, hi = lo - z, hi - z
      acc = acc + jnp.dot(e, lo * s) + jnp.dot(o, hi * s)
      return acc, None

    xs = (cb, sb, zb, xe, xo)
  else:
    xb = xf.reshape(m, nb, block).transpose(1, 0, 2)
    brows = block * bits // 8
    cb = c.reshape(nb, brows, n)

    def body(acc, a):
      cblk, s, z, xblk = a
      q = _values(layout.unpack(cblk, bits, block, 0), offset, lut, float8)
      if z is not None:
        q = q - _expand(z, block)
      acc = acc + jnp.dot(xblk, q * _expand(s, block))
      return acc, None

    xs = (cb, sb, zb, xb)
  acc, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32), xs)
  return acc.reshape(lead + (n,)).astype(out_dtype)


EXACT_ROWS = 1024  # 1024 * 128 * 128 = 2**24: float32 sums stay exact


# Below this many rows the blocked float32 form wins; from batch 16 on
# XLA:CPU's own int8 x int8 -> int32 dot is faster (bench/kernels.py, 4096^2
# and 8192^2: blocked 0.69x/0.89x of float32 at batch 1, int32 dot 8.9x/12x;
# at batch 16 int32 dot 0.51x/0.71x vs blocked 0.87x/1.18x). 2..15 unmeasured.
INT32_DOT_MIN_ROWS = 8


def int8_matmul(xq, x_scale, wq, w_scale, *, out_dtype=jnp.float32):
  """W8A8 with int32-exact accumulation (see module docstring)."""
  k, n = wq.shape
  if math.prod(xq.shape[:-1]) >= INT32_DOT_MIN_ROWS:
    return reference.int8_matmul(xq, x_scale, wq, w_scale,
                                 out_dtype=out_dtype)
  block, kp = choose_block(k, k, 1, target=512, cap=EXACT_ROWS)
  nb = kp // block
  lead = xq.shape[:-1]
  xb = jnp.pad(xq.reshape(-1, k), ((0, 0), (0, kp - k)))
  m = xb.shape[0]
  xb = xb.reshape(m, nb, block).transpose(1, 0, 2)
  wb = _pad_rows(wq, kp).reshape(nb, block, n)

  def body(acc, a):
    xblk, wblk = a
    part = jnp.dot(xblk.astype(jnp.float32), wblk.astype(jnp.float32))
    return acc + part.astype(jnp.int32), None

  acc, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.int32), (xb, wb))
  y = acc.astype(jnp.float32) * x_scale.reshape(-1, 1).astype(
      jnp.float32) * jnp.reshape(w_scale, (-1,)).astype(jnp.float32)
  return y.reshape(lead + (n,)).astype(out_dtype)
