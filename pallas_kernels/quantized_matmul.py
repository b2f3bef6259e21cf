"""Pallas matmul with compressed weights: int8/int4/int2 codes, fp8, W8A8.

Public API (drop-in replacements of the plain-jnp references, same signatures
plus block/backend keywords):

  quantized_matmul(x, codes, scale, zero=None, *, bits, k, offset=0,
                   out_dtype=None, block_m=None, block_n=None, block_k=None,
                   backend=None, interpret=None)
      == reference.quantized_matmul
  fp8_matmul(x, values, scale, *, out_dtype=None, ...) == fp8_matmul_reference
  int8_matmul(xq, x_scale, wq, w_scale, *, out_dtype=float32, ...)
      == reference.int8_matmul, bit-exactly in float32

Layout (see `layout.py`, the documented contract): `codes` (K', N) holds the
integer codes of a (K, N) weight, packed along K as an LSB-first bit stream
when bits < 8 (K' = ceil(K*bits/8); for 4 bits code 2i is the LOW nibble of
byte i, code 2i+1 the high nibble), or unpacked (K, N) int8/uint8 when
bits == 8. `scale` (G, N) or (G, 1): G groups of K/G consecutive rows (G == 1
is per-channel). `zero` None or (G, N)/(G, 1) zero points. Code value =
stored code + `offset`, and

  y = sum_g (x_g @ (codes_g + offset) - rowsum(x_g) * zero_g) * scale_g

accumulated in float32 (exactly the reference's formulation). bits in
{1, 2, 4, 8} (every width that divides a byte).

Where things happen:
  * wrapper (plain jnp, XLA): flattens x to (M, K); pads M, N and K with
    zeros (K by whole bytes and, for grouped scales, whole zero-scaled groups);
    broadcasts scale/zero to (G, 1, N) float32; and, for bits < 8, permutes
    the columns of x inside every K sub-block so that the rows held by bit
    field f of a byte are contiguous (x[:, f::per] for per = 8 // bits codes
    per byte). This one pass over x (M x K, small next to the weight for
    decode) is what lets the kernel avoid interleaving unpacked rows.
  * kernel, per K block: loads each packed uint8 tile once; for each bit field
    f: q_f = ((tile >> f*bits) & mask) + offset (in int32), cast to the dot
    dtype and multiplied with the matching x columns (jnp.dot,
    preferred_element_type=float32); per group: subtract rowsum(x_g) * zero_g,
    multiply by scale_g, accumulate in float32. Codes (offset included, while
    |code| <= 256) and fp8 values are exact in bfloat16/float16, so with
    16-bit activations the dot runs natively in x.dtype with no rounding of
    the weight; with float32 activations it runs in float32 at
    Precision.HIGHEST.
  * fp8: the same kernel, the tile is cast float8 -> dot dtype (exact).
  * W8A8: int8 x int8 -> int32 dot (jax.lax.dot_general with
    preferred_element_type=int32) accumulated in int32; the last K step
    applies (acc * x_scale) * w_scale in float32, the reference's order.

Grid and blocks. On TPU and CPU (interpret) the grid is (M/bm, N/bn, K/bk),
K innermost and sequential ("arbitrary"): a float32 VMEM scratch is zeroed at
k == 0 and written out at k == last. Triton runs grid programs in parallel,
so on GPU the grid is (M/bm, N/bn) and each program loops over K blocks with
lax.fori_loop, keeping the accumulator in registers (x, codes and scales of
the program's column are addressed with pl.ds; this is the layout of the
Pallas GPU attention kernels). A K block never straddles groups: block_k is
a request, adjusted to a multiple of the group size K/G (then one block holds
several whole groups, each a sub-block with its own scale) or to a divisor of
it (then several blocks share one group's scale). Block sizes come from
`TUNING` by M bucket (capped to the padded problem); explicit block_* are
validated against the backend's rules: GPU/Triton needs powers of two >= 16
(and >= 16 columns per bit field, tl.dot's minimum K); TPU/Mosaic needs
multiples of (8, 128).

Differentiability: `quantized_matmul` and `fp8_matmul` carry a
jax.custom_vjp. dx = g @ W^T and d scale / d zero are computed in plain jnp
(XLA) from the dequantized weight W materialized in float32 (K x N): a
training/fine-tuning path, not a kernel. Codes get no cotangent (integers);
an integer `zero` gets none either. `int8_matmul` has integer inputs and is
not differentiable.

Verified here: every path in Pallas interpret mode on CPU only (the tests in
tests/pallas_kernels/test_quantized_matmul.py, including the GPU fori_loop
variant and the TPU block choices run with interpret=True). NOT verified:
Triton and Mosaic lowering and performance on real GPUs/TPUs (no accelerator
on this machine). The kernel bodies use only ops both lowerings document
(ref loads with static/pl.ds slices, shifts, &, astype, jnp.dot with
preferred_element_type, sums, fori_loop), but e.g. uint8 handling, fp8
casts and sub-128-lane x slices (bit fields of small groups) on Mosaic, or
non-power-of-two full-K refs on Triton, may still need work there. On CPU
the interpreted kernel is a correctness vehicle; dispatch should keep the
XLA reference there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import layout

__all__ = ["TUNING", "quantized_matmul", "fp8_matmul", "fp8_matmul_reference",
           "int8_matmul", "select_blocks"]

SUPPORTED_BITS = (1, 2, 4, 8)
_FLOAT_X = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
            jnp.dtype(jnp.float16))
_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
_INT8 = (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))

# Block sizes by (backend, bits): buckets (max M or None, blocks), the first
# bucket with M <= max M applies (M = batch * tokens: decode 1, small batch 16,
# prefill 256, larger). fp8 and W8A8 use the bits=8 rows. The GPU and TPU rows
# are starting points from the usual shapes of Triton/Mosaic matmuls, NOT
# measured here (no GPU/TPU on this machine); the CPU rows only keep
# interpret-mode grids short. Blocks are capped to the padded problem size.
_GPU8 = ((16, dict(block_m=16, block_n=64, block_k=128)),
         (256, dict(block_m=64, block_n=128, block_k=64)),
         (None, dict(block_m=128, block_n=128, block_k=64)))
_GPU4 = ((16, dict(block_m=16, block_n=64, block_k=256)),
         (256, dict(block_m=64, block_n=128, block_k=128)),
         (None, dict(block_m=128, block_n=128, block_k=64)))
_GPU2 = ((16, dict(block_m=16, block_n=64, block_k=256)),  # >= 16 cols/field
         (256, dict(block_m=64, block_n=128, block_k=128)),
         (None, dict(block_m=128, block_n=128, block_k=128)))
_TPU8 = ((1, dict(block_m=8, block_n=512, block_k=512)),
         (16, dict(block_m=16, block_n=512, block_k=512)),
         (256, dict(block_m=128, block_n=256, block_k=512)),
         (None, dict(block_m=256, block_n=256, block_k=512)))
_TPU4 = ((1, dict(block_m=8, block_n=512, block_k=1024)),
         (16, dict(block_m=16, block_n=512, block_k=1024)),
         (256, dict(block_m=128, block_n=256, block_k=1024)),
         (None, dict(block_m=256, block_n=256, block_k=512)))
_CPU = ((None, dict(block_m=64, block_n=128, block_k=256)),)
TUNING = {
    ("gpu", 8): _GPU8, ("gpu", 4): _GPU4, ("gpu", 2): _GPU2, ("gpu", 1): _GPU2,
    ("tpu", 8): _TPU8, ("tpu", 4): _TPU4, ("tpu", 2): _TPU4, ("tpu", 1): _TPU4,
    ("cpu", 8): _CPU, ("cpu", 4): _CPU, ("cpu", 2): _CPU, ("cpu", 1): _CPU,
}


def select_blocks(backend: str, bits: int, m: int) -> dict:
  """The TUNING entry for `backend`, `bits` and M rows (before capping)."""
  for max_m, blocks in TUNING[(backend, bits)]:
    if max_m is None or m <= max_m:
      return dict(blocks)
  raise AssertionError("TUNING rows must end with a None bucket")


# ---------------------------------------------------------------- helpers


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _backend(backend):
  b = (backend or jax.default_backend()).lower()
  b = {"cuda": "gpu", "rocm": "gpu"}.get(b, b)
  if b not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"backend must be 'cpu', 'gpu' or 'tpu', got {backend!r}")
  return b


def _pad2(a, rows: int, cols: int):
  pr, pc = rows - a.shape[0], cols - a.shape[1]
  return jnp.pad(a, ((0, pr), (0, pc))) if pr or pc else a


def _fit_mn(name: str, req: int, n: int, backend: str) -> int:
  """Validates an M/N block request and caps it to the padded extent."""
  if req <= 0:
    raise ValueError(f"{name} must be positive, got {req}")
  if backend == "gpu":
    if not (_is_pow2(req) and req >= 16):
      raise ValueError(f"{name}={req}: Triton (gpu) blocks must be powers of "
                       "two >= 16")
    return min(req, max(16, _next_pow2(n)))
  if backend == "tpu":
    align = 8 if name == "block_m" else 128
    if req % align:
      raise ValueError(f"{name}={req}: Mosaic (tpu) blocks must be multiples "
                       f"of {align}")
    return min(req, _round_up(n, align))
  return min(req, _round_up(n, 8))


def _k_aligned(v: int, per: int, backend: str) -> bool:
  if v <= 0 or v % per:
    return False
  if backend == "gpu":  # tl.dot needs K >= 16 per bit field
    return _is_pow2(v) and v // per >= 16
  if backend == "tpu":
    return v % 128 == 0
  return True


def _k_rule(per: int, backend: str) -> str:
  if backend == "gpu":
    return f"a power of two >= {16 * per}"
  if backend == "tpu":
    return "a multiple of 128"
  return f"a multiple of {per}"


def _fit_k(req: int, k: int, group: int | None, per: int,
           backend: str) -> int:
  """block_k for K rows in groups of `group` (None: one per-channel group).

  The result is aligned for the backend and is either a multiple of the group
  size or a divisor of it; the request is adjusted down where possible.
  """
  if not _k_aligned(req, per, backend):
    raise ValueError(f"block_k={req} must be {_k_rule(per, backend)} on "
                     f"{backend} (codes per byte: {per})")
  if group is None:  # per-channel: any block; cap to an aligned cover of K
    if backend == "gpu":
      return min(req, max(16 * per, _next_pow2(k)))
    return min(req, _round_up(k, 128 if backend == "tpu" else per))
  if group % per:
    raise ValueError(
        f"group size K/G={group} must be a multiple of {per} (codes per byte "
        f"at this width) so that groups start on whole bytes; use "
        f"reference.quantized_matmul or another G")
  limit = max(req, group)
  step = {"gpu": 1, "tpu": 128}.get(backend, per)
  cands = [v for v in range(step, min(limit, k) + 1, step)
           if _k_aligned(v, per, backend) and (v % group == 0 or
                                               group % v == 0)]
  if not cands:
    raise ValueError(
        f"no block_k on {backend} is both {_k_rule(per, backend)} and a "
        f"multiple or divisor of the group size K/G={group}; choose another "
        "G or use reference.quantized_matmul")
  below = [v for v in cands if v <= req]
  return max(below) if below else min(cands)


@dataclasses.dataclass(frozen=True)
class _Geo:
  """Static kernel geometry."""
  bm: int
  bn: int
  bk: int
  sb: int     # sub-block: the K rows sharing one scale inside a K block
  per: int    # codes per byte (1 when unpacked)
  bits: int
  group: int  # effective group size (Kp for per-channel)
  gpb: int    # groups per K block (1 when bk <= group)
  nk: int     # number of K blocks
  kind: str   # "int" | "fp8" | "w8a8"
  offset: int
  dot_dtype: Any
  has_zero: bool

  def group_block(self, kk):
    """Index (in units of gpb groups) of K block kk's first group."""
    return kk if self.bk >= self.group else kk // (self.group // self.bk)


def _decode(p, f: int, geo: _Geo):
  """Bit field f of the stored tile -> code values in the dot dtype."""
  if geo.kind == "fp8":
    return p.astype(geo.dot_dtype)
  q = p.astype(jnp.int32)
  if geo.bits < 8:
    q = (q >> (f * geo.bits)) & ((1 << geo.bits) - 1)
  if geo.offset:
    q = q + geo.offset
  return q.astype(geo.dot_dtype)


def _block_contrib(x_ref, c_ref, s_ref, z_ref, x0, c0, g0, geo: _Geo):
  """float32 (bm, bn) contribution of one K block starting at x column x0,
  codes row c0 and scale row g0 of the refs (0 when refs are the block)."""
  prec = (jax.lax.Precision.HIGHEST
          if jnp.dtype(geo.dot_dtype) == jnp.float32 else None)
  w = geo.sb // geo.per
  acc = None
  for s in range(geo.bk // geo.sb):
    part = None
    tile = c_ref[pl.ds(c0 + s * w, w), :]  # (sb / per, bn) stored codes
    for f in range(geo.per):
      xs = x_ref[:, pl.ds(x0 + s * geo.sb + f * w, w)].astype(geo.dot_dtype)
      q = _decode(tile, f, geo)
      d = jnp.dot(xs, q, preferred_element_type=jnp.float32, precision=prec)
      part = d if part is None else part + d
    g = g0 + (s if geo.bk >= geo.group else 0)
    if z_ref is not None:
      xsum = jnp.sum(x_ref[:, pl.ds(x0 + s * geo.sb, geo.sb)].astype(
          jnp.float32), axis=1, keepdims=True)
      part = part - xsum * z_ref[g]
    part = part * s_ref[g]
    acc = part if acc is None else acc + part
  return acc


def _grid_kernel(*refs, geo: _Geo):
  """TPU / interpret: grid (i, j, k), K sequential, VMEM accumulator."""
  if geo.has_zero:
    x_ref, c_ref, s_ref, z_ref, o_ref, acc_ref = refs
  else:
    (x_ref, c_ref, s_ref, o_ref, acc_ref), z_ref = refs, None
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  acc_ref[...] += _block_contrib(x_ref, c_ref, s_ref, z_ref, 0, 0, 0, geo)

  @pl.when(kk == geo.nk - 1)
  def _write():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _loop_kernel(*refs, geo: _Geo):
  """GPU (Triton): grid (i, j), fori_loop over K blocks, accumulator in
  registers."""
  if geo.has_zero:
    x_ref, c_ref, s_ref, z_ref, o_ref = refs
  else:
    (x_ref, c_ref, s_ref, o_ref), z_ref = refs, None

  def body(kk, acc):
    return acc + _block_contrib(x_ref, c_ref, s_ref, z_ref, kk * geo.bk,
                                kk * (geo.bk // geo.per),
                                geo.group_block(kk) * geo.gpb, geo)

  acc = jax.lax.fori_loop(0, geo.nk, body,
                          jnp.zeros((geo.bm, geo.bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params(backend: str, interpret: bool, ndims: int):
  if interpret:
    return None
  if backend == "tpu":
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary")[:ndims])
  if backend == "gpu":
    return plgpu.CompilerParams(num_warps=4, num_stages=3)
  return None


# ------------------------------------------------------- static config + VJP


@dataclasses.dataclass(frozen=True)
class _Cfg:
  kind: str          # "int" | "fp8"
  bits: int
  k: int
  offset: int
  out_dtype: Any
  block_m: int | None
  block_n: int | None
  block_k: int | None
  backend: str
  interpret: bool


def _pallas_matmul(cfg: _Cfg, x2, codes, scale, zero):
  """x2 (M, K) float; runs the kernel; returns (M, N) out_dtype."""
  m, k = x2.shape
  n = codes.shape[1]
  per = 8 // cfg.bits
  g = scale.shape[0]
  group = None if g == 1 else k // g
  req = select_blocks(cfg.backend, cfg.bits, m)
  bm = _fit_mn("block_m", cfg.block_m or req["block_m"], m, cfg.backend)
  bn = _fit_mn("block_n", cfg.block_n or req["block_n"], n, cfg.backend)
  bk = _fit_k(cfg.block_k or req["block_k"], k, group, per, cfg.backend)
  mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
  grp = kp if group is None else group
  sb = min(bk, grp)
  gp = kp // grp  # groups after K padding (padded groups get scale 0)
  dot_dtype = x2.dtype if x2.dtype != jnp.float32 else jnp.dtype(jnp.float32)
  geo = _Geo(bm=bm, bn=bn, bk=bk, sb=sb, per=per, bits=cfg.bits, group=grp,
             gpb=max(1, bk // grp), nk=kp // bk, kind=cfg.kind,
             offset=cfg.offset, dot_dtype=dot_dtype, has_zero=zero is not None)

  xp = _pad2(x2, mp, kp)
  if per > 1:  # columns of bit field f of each sub-block made contiguous
    xp = xp.reshape(mp, kp // sb, sb // per, per).transpose(0, 1, 3, 2)
    xp = xp.reshape(mp, kp)
  cp = _pad2(codes, kp // per, np_)

  def per_group(a):  # (G, N|1) -> (gq, 1, Np) float32
    a = jnp.broadcast_to(a.astype(jnp.float32), (g, n))
    rows = gp if cfg.backend != "gpu" else _next_pow2(gp)
    return _pad2(a, rows, np_).reshape(rows, 1, np_)

  operands = [xp, cp, per_group(scale)]
  if zero is not None:
    operands.append(per_group(zero))
  out_shape = jax.ShapeDtypeStruct((mp, np_), cfg.out_dtype)
  if cfg.backend == "gpu":
    gq = operands[2].shape[0]
    in_specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((kp // per, bn), lambda i, j: (0, j))]
    in_specs += [pl.BlockSpec((gq, 1, bn), lambda i, j: (0, 0, j))] * (
        len(operands) - 2)
    call = pl.pallas_call(
        functools.partial(_loop_kernel, geo=geo), out_shape=out_shape,
        grid=(mp // bm, np_ // bn), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=cfg.interpret,
        compiler_params=_compiler_params("gpu", cfg.interpret, 2))
  else:
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bk // per, bn), lambda i, j, kk: (kk, j))]
    in_specs += [pl.BlockSpec((geo.gpb, 1, bn),
                              lambda i, j, kk: (geo.group_block(kk), 0, j))
                 ] * (len(operands) - 2)
    call = pl.pallas_call(
        functools.partial(_grid_kernel, geo=geo), out_shape=out_shape,
        grid=(mp // bm, np_ // bn, geo.nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg.backend, cfg.interpret, 3))
  return call(*operands)[:m, :n]


def _weight_parts(cfg: _Cfg, codes, scale, zero):
  """(unscaled dequantized weight (K, N) f32, per-row scale (K, N|1) f32)."""
  g = scale.shape[0]
  gs = cfg.k // g
  if cfg.kind == "fp8":
    q = codes.astype(jnp.float32)
  else:
    q = layout.unpack(codes, cfg.bits, cfg.k, 0).astype(jnp.float32)
    q = q + cfg.offset
    if zero is not None:
      q = q - jnp.repeat(zero.astype(jnp.float32), gs, axis=0)
  return q, jnp.repeat(scale.astype(jnp.float32), gs, axis=0)


def _matmul_fwd_impl(cfg: _Cfg, x, codes, scale, zero):
  lead = x.shape[:-1]
  if x.size == 0 or codes.shape[1] == 0:
    return jnp.zeros(lead + (codes.shape[1],), cfg.out_dtype)
  y = _pallas_matmul(cfg, x.reshape(-1, cfg.k), codes, scale, zero)
  return y.reshape(lead + (y.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(cfg: _Cfg, x, codes, scale, zero):
  return _matmul_fwd_impl(cfg, x, codes, scale, zero)


def _matmul_fwd(cfg, x, codes, scale, zero):
  return _matmul_fwd_impl(cfg, x, codes, scale, zero), (x, codes, scale, zero)


def _matmul_bwd(cfg, res, ct):
  """Plain jnp (XLA) with the weight dequantized in float32."""
  x, codes, scale, zero = res
  hp = jax.lax.Precision.HIGHEST
  g, n = scale.shape[0], codes.shape[1]
  q, srow = _weight_parts(cfg, codes, scale, zero)
  gf = ct.reshape(-1, n).astype(jnp.float32)
  xf = x.reshape(-1, cfg.k).astype(jnp.float32)
  dx = jnp.matmul(gf, (q * srow).T, precision=hp)
  xtg = jnp.matmul(xf.T, gf, precision=hp).reshape(g, cfg.k // g, n)

  def reduce_like(d, like):  # (G, N) -> like's shape/dtype
    if like.shape[1] == 1:
      d = jnp.sum(d, axis=1, keepdims=True)
    return d.astype(like.dtype)

  dscale = reduce_like(jnp.sum(q.reshape(xtg.shape) * xtg, axis=1), scale)
  dzero = None
  if zero is not None and jnp.issubdtype(zero.dtype, jnp.floating):
    dzero = reduce_like(-jnp.sum(xtg, axis=1) * scale.astype(jnp.float32),
                        zero)
  return dx.reshape(x.shape).astype(x.dtype), None, dscale, dzero


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ------------------------------------------------------------- public API


def _check_x(name: str, x, k: int):
  if jnp.dtype(x.dtype) not in _FLOAT_X:
    raise ValueError(f"{name} must be float32, bfloat16 or float16, got "
                     f"{x.dtype}")
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"{name} has shape {x.shape}; its last axis must be k="
                     f"{k} (the contracted, unpacked K)")


def _check_scale(name: str, a, k: int, n: int, g: int | None = None):
  if a.ndim != 2 or a.shape[1] not in (1, n):
    raise ValueError(f"{name} has shape {a.shape}; expected (G, {n}) or "
                     "(G, 1)")
  if g is not None and a.shape[0] != g:
    raise ValueError(f"{name} has {a.shape[0]} groups but scale has {g}; "
                     "give one zero point per scale group")
  if a.shape[0] < 1 or k % a.shape[0]:
    raise ValueError(f"{name} has G={a.shape[0]} groups, which does not "
                     f"divide k={k}: groups are K/G consecutive rows")


def _config(kind, bits, k, offset, out_dtype, x, block_m, block_n, block_k,
            backend, interpret) -> _Cfg:
  backend = _backend(backend)
  if interpret is None:
    interpret = backend == "cpu"
  return _Cfg(kind=kind, bits=bits, k=k, offset=int(offset),
              out_dtype=jnp.dtype(out_dtype or x.dtype), block_m=block_m,
              block_n=block_n, block_k=block_k, backend=backend,
              interpret=bool(interpret))


def quantized_matmul(x, codes, scale, zero=None, *, bits: int, k: int,
                     offset: int = 0, out_dtype=None, block_m=None,
                     block_n=None, block_k=None, backend=None, interpret=None):
  """y = sum_g (x_g @ (codes_g + offset - zero_g)) * scale_g (module doc).

  x (..., k) float32/bfloat16/float16; codes (ceil(k*bits/8), N) uint8/int8
  packed along K (LSB-first, `layout.py`); scale (G, N)/(G, 1); zero None or
  (G, N)/(G, 1). Returns (..., N) in out_dtype (default x.dtype).
  block_*: requests (see TUNING); backend None: jax.default_backend();
  interpret None: True on cpu. Differentiable w.r.t. x, scale and a float
  zero (custom_vjp, plain-jnp backward).
  """
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
  if k < 1:
    raise ValueError(f"k must be positive, got {k}")
  _check_x("x", x, k)
  if codes.ndim != 2 or jnp.dtype(codes.dtype) not in _INT8:
    raise ValueError(f"codes must be a 2-D uint8/int8 array, got "
                     f"{codes.dtype}{tuple(codes.shape)}")
  kc = layout.packed_length(k, bits)
  if codes.shape[0] != kc:
    raise ValueError(
        f"codes has {codes.shape[0]} rows but k={k} at bits={bits} packs into "
        f"ceil(k*bits/8)={kc} rows (codes are packed along K, axis 0)")
  n = codes.shape[1]
  _check_scale("scale", scale, k, n)
  if zero is not None:
    _check_scale("zero", zero, k, n, scale.shape[0])
  cfg = _config("int", bits, k, offset, out_dtype, x, block_m, block_n,
                block_k, backend, interpret)
  return _matmul(cfg, x, codes, scale, zero)


def fp8_matmul_reference(x, values, scale, *, out_dtype=None):
  """Plain jnp: y = sum_g x_g @ (values_g.astype(f32) * scale_g), float32."""
  out_dtype = out_dtype or x.dtype
  k, n = values.shape
  g = scale.shape[0]
  lead = x.shape[:-1]
  xf = x.astype(jnp.float32).reshape(-1, g, k // g)
  v = values.astype(jnp.float32).reshape(g, k // g, n)
  acc = jnp.einsum("bgk,gkn->bgn", xf, v, precision=jax.lax.Precision.HIGHEST)
  y = jnp.sum(acc * scale.astype(jnp.float32)[None], axis=1)
  return y.reshape(lead + (n,)).astype(out_dtype)


def fp8_matmul(x, values, scale, *, out_dtype=None, block_m=None, block_n=None,
               block_k=None, backend=None, interpret=None):
  """fp8 weights: values (K, N) float8_e4m3fn/float8_e5m2, scale (G, N) or
  (G, 1); same as fp8_matmul_reference. fp8 values are cast exactly to the
  dot dtype inside the kernel. Differentiable w.r.t. x and scale."""
  if values.ndim != 2 or jnp.dtype(values.dtype) not in _FP8:
    raise ValueError(f"values must be a 2-D float8_e4m3fn/float8_e5m2 array, "
                     f"got {values.dtype}{tuple(values.shape)}")
  k, n = values.shape
  _check_x("x", x, k)
  _check_scale("scale", scale, k, n)
  cfg = _config("fp8", 8, k, 0, out_dtype, x, block_m, block_n, block_k,
                backend, interpret)
  return _matmul(cfg, x, values, scale, None)


# ------------------------------------------------------------------ W8A8


def _w8a8_grid_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref, *, nk):
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.int32)

  acc_ref[...] += jax.lax.dot_general(
      x_ref[...], w_ref[...], (((1,), (0,)), ((), ())),
      preferred_element_type=jnp.int32)

  @pl.when(kk == nk - 1)
  def _write():
    y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def _w8a8_loop_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, nk, bk):
  def body(kk, acc):
    x = x_ref[:, pl.ds(kk * bk, bk)]
    w = w_ref[pl.ds(kk * bk, bk), :]
    return acc + jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.int32))
  y = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


def int8_matmul(xq, x_scale, wq, w_scale, *, out_dtype=jnp.float32,
                block_m=None, block_n=None, block_k=None, backend=None,
                interpret=None):
  """W8A8: (xq @ wq) in int32, then * x_scale * w_scale in float32.

  xq (..., K) int8 with per-token x_scale (..., 1) (or a scalar); wq (K, N)
  int8 with w_scale (1, N), (N,) or a single value. Equals
  reference.int8_matmul bit-exactly in float32. Not differentiable.
  """
  if jnp.dtype(xq.dtype) != jnp.int8 or jnp.dtype(wq.dtype) != jnp.int8:
    raise ValueError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
  if wq.ndim != 2 or xq.ndim < 1 or xq.shape[-1] != wq.shape[0]:
    raise ValueError(f"xq {xq.shape} and wq {wq.shape}: wq must be (K, N) "
                     "with K = xq.shape[-1]")
  k, n = wq.shape
  lead = xq.shape[:-1]
  m = int(np.prod(lead, dtype=np.int64))
  try:
    xs = jnp.broadcast_to(x_scale, lead + (1,)).reshape(m, 1)
  except ValueError:
    raise ValueError(f"x_scale has shape {x_scale.shape}; expected "
                     f"{lead + (1,)} (one scale per token)") from None
  ws = jnp.reshape(w_scale, (-1,))
  if ws.shape[0] not in (1, n):
    raise ValueError(f"w_scale has shape {w_scale.shape}; expected (1, {n}) "
                     f"or ({n},) (one scale per output channel)")
  backend = _backend(backend)
  if interpret is None:
    interpret = backend == "cpu"
  if m == 0 or n == 0:
    return jnp.zeros(lead + (n,), out_dtype)
  req = select_blocks(backend, 8, m)
  bm = _fit_mn("block_m", block_m or req["block_m"], m, backend)
  bn = _fit_mn("block_n", block_n or req["block_n"], n, backend)
  bk = _fit_k(block_k or req["block_k"], k, None, 1, backend)
  mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
  nk = kp // bk
  xp = _pad2(xq.reshape(m, k), mp, kp)
  wp = _pad2(wq, kp, np_)
  xsp = _pad2(xs.astype(jnp.float32), mp, 1)
  wsp = _pad2(jnp.broadcast_to(ws.astype(jnp.float32), (n,))[None], 1, np_)
  out_shape = jax.ShapeDtypeStruct((mp, np_), jnp.dtype(out_dtype))
  if backend == "gpu":
    call = pl.pallas_call(
        functools.partial(_w8a8_loop_kernel, nk=nk, bk=bk),
        out_shape=out_shape, grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
                  pl.BlockSpec((1, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_compiler_params("gpu", interpret, 2))
  else:
    call = pl.pallas_call(
        functools.partial(_w8a8_grid_kernel, nk=nk),
        out_shape=out_shape, grid=(mp // bm, np_ // bn, nk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                  pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                  pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
        interpret=interpret,
        compiler_params=_compiler_params(backend, interpret, 3))
  y = call(xp, wp, xsp, wsp)[:m, :n]
  return y.reshape(lead + (n,))
