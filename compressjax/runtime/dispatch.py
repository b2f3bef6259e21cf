"""The one dispatch point where compressed operands meet matmul-like ops.

`dot_general` and `conv_general_dilated` receive a compressed leaf (with the
dtype the model asked for) as one operand. A rule registered for the leaf's
type may compute the op directly from the compressed storage (this is where
Pallas kernels plug in); a rule returns None to decline, and then the leaf is
materialized exactly and the plain op runs.

Quantized weights (`_qarray_dot`) take the direct path when the op contracts
exactly the leaf's declared contraction axes (in any order; x's contracted
axes are permuted to match) with no batch dimensions: y = x_mat @ W_mat on the
stored (K, N) matrix. Which implementation runs is asked of the format
(`Format.kernel_decode`) and of `use_kernels` / the backend:

  format (decode)                          gpu / tpu ("pallas")   cpu ("xla")
  int2/4/8 (+asym, narrow), mxint8 (offset)  Pallas quantized_matmul blocked XLA
  int3/5/6/7 (offset, bits not 1/2/4/8)    blocked XLA            blocked XLA
  fp8_e4m3/e5m2, mxfp8_* (float8 bytes)    Pallas fp8_matmul      blocked XLA
  fp6/fp4, mxfp6/4, nvfp4, nf4, ternary,   blocked XLA (table)    blocked XLA
    binary (2**bits value table)
  codebooks, unknown formats               materialized           materialized

"Blocked XLA" (`pallas_kernels.xla_matmul`) scans K in blocks that it
dequantizes in cache: the float weight is never written out. A weight whose
float form fits in 1 MiB (`DENSE_TILE_BYTES`) is dequantized as one tile
instead, which at such sizes is cheaper than the scan's copies of x. Scales that are
themselves compressed (MX E8M0, NVFP4 e4m3, double-quantized) are
materialized first; they are (G, N), small. Anything else (other dimension
numbers, the leaf as lhs, convolutions) materializes the leaf exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from compressjax.core.base import materialize
from compressjax.core.contraction import matrix_operand  # noqa: F401 (API)
from compressjax.core.input_transform import InputTransform
from compressjax.core.lowrank import LowRank
from compressjax.core.pact_input import PactInput
from compressjax.core.qarray import QArray
from compressjax.formats import activations
from pallas_kernels import quantized_matmul as pallas_qmm
from pallas_kernels import reference, xla_matmul

DotRule = Callable[..., Any]
_DOT_RULES: dict[type, list[DotRule]] = {}


def register_dot_rule(leaf_type: type, rule: DotRule, first: bool = True):
  """rule(x, leaf, dimension_numbers, out_dtype) -> array or None."""
  rules = _DOT_RULES.setdefault(leaf_type, [])
  rules.insert(0, rule) if first else rules.append(rule)


def _result_dtype(lhs_dtype, rhs_dtype, preferred):
  return preferred or jnp.result_type(lhs_dtype, rhs_dtype)


def dot_general(lhs, rhs, dimension_numbers, *, lhs_leaf: bool, dtype,
                precision=None, preferred_element_type=None, **params):
  """lhs or rhs (per `lhs_leaf`) is a compressed leaf used with `dtype`."""
  leaf, other = (lhs, rhs) if lhs_leaf else (rhs, lhs)
  out_dtype = _result_dtype(other.dtype, dtype, preferred_element_type)
  if not lhs_leaf:
    for rule in _DOT_RULES.get(type(leaf), ()):
      y = rule(other, leaf, dimension_numbers, out_dtype)
      if y is not None:
        return y
  dense = materialize(leaf).astype(dtype)
  ops = (dense, other) if lhs_leaf else (other, dense)
  return jax.lax.dot_general(*ops, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type,
                             **params)


def conv_general_dilated(lhs, rhs_leaf, *, dtype, **params):
  """Convolutions materialize their compressed kernel (exact)."""
  return jax.lax.conv_general_dilated_p.bind(
      lhs, materialize(rhs_leaf).astype(dtype), **params)


def _is_matmul(x, leaf, dims) -> bool:
  """x (..., K) contracted with axis 0 of a 2-D leaf, no batch dims."""
  (lc, rc), (lb, rb) = dims
  return (leaf.ndim == 2 and tuple(lc) == (x.ndim - 1,) and tuple(rc) == (0,)
          and not lb and not rb)


_KERNELS = ["auto"]
KERNEL_CHOICES = ("auto", "pallas", "xla", "reference")


@contextlib.contextmanager
def use_kernels(choice: str):
  """Selects the matmul implementation while tracing inside the block:
  "auto" (Pallas on GPU/TPU, blocked XLA on CPU), "pallas" (also on CPU, in
  interpret mode: slow, for tests), "xla" (blocked XLA) or "reference"
  (plain grouped einsum). Jitted functions keep what they were traced with."""
  if choice not in KERNEL_CHOICES:
    raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got "
                     f"{choice!r}")
  _KERNELS.append(choice)
  try:
    yield
  finally:
    _KERNELS.pop()


def _kernel_choice() -> str:
  choice = _KERNELS[-1]
  if choice == "auto":
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  return choice


def kernel_for(fmt, choice: str | None = None) -> str | None:
  """Which implementation multiplies by a QArray of format `fmt`:
  "pallas_int", "pallas_fp8", "xla", "reference", or None (materialized)."""
  dec = fmt.kernel_decode()
  if dec is None or fmt.bits > 8:
    return None
  choice = choice or _kernel_choice()
  if choice == "pallas":
    if dec.offset is not None and fmt.bits in pallas_qmm.SUPPORTED_BITS:
      return "pallas_int"
    if dec.float8 is not None:
      return "pallas_fp8"
    return "xla"  # lookup tables and odd widths: blocked, never dense
  return choice


def _qarray_dot(x, leaf: QArray, dims, out_dtype):
  """Weight-only quantized matmul straight from the stored codes, never
  materializing the float weight (module doc)."""
  impl = kernel_for(leaf.fmt)
  op = None if impl is None else matrix_operand(x, leaf.contract, dims)
  if op is None:
    return None
  xm, lead = op
  lay = leaf.layout
  scale = leaf.scale_values()
  dec = leaf.fmt.kernel_decode()
  if impl == "pallas_fp8":
    vals = jax.lax.bitcast_convert_type(leaf.codes, jnp.dtype(dec.float8))
    y = pallas_qmm.fp8_matmul(xm, vals, scale, out_dtype=out_dtype)
  else:
    args = (xm, leaf.codes, scale, leaf.zero)
    lut, offset = None, dec.offset
    # float8 on the XLA path: the bytes are cast to their values, no table
    float8 = dec.float8 if impl == "xla" else None
    if offset is None:  # a value per code
      if float8 is None:
        lut = (jnp.asarray(dec.table, jnp.float32) if dec.table is not None
               else leaf.fmt.decode(jnp.arange(2**leaf.fmt.bits)))
      offset = 0
    kw = dict(bits=leaf.fmt.bits, k=lay.k, offset=offset, out_dtype=out_dtype)
    if impl == "pallas_int":
      y = pallas_qmm.quantized_matmul(*args, **kw)
    elif impl == "reference":
      y = reference.quantized_matmul(*args, lut=lut, **kw)
    else:
      y = xla_matmul.quantized_matmul(*args, lut=lut, float8=float8, **kw)
  return y.reshape(lead + lay.out_shape)


def _lowrank_dot(x, leaf: LowRank, dims, out_dtype):
  """(x_mat @ A) @ B on the leaf's (K, N) view when the op contracts exactly
  its contraction axes (any kernel rank); the residual through dispatch."""
  op = matrix_operand(x, leaf.contract, dims)
  if op is None:
    return None
  xm, lead = op
  hp = jax.lax.Precision.HIGHEST
  y = jnp.matmul(jnp.matmul(xm.astype(jnp.float32),
                            materialize(leaf.a).astype(jnp.float32),
                            precision=hp),
                 materialize(leaf.b).astype(jnp.float32), precision=hp)
  y = y.reshape(lead + leaf.layout.out_shape)
  if leaf.residual is not None:
    y = y + dot_general(x.astype(jnp.float32), leaf.residual, dims,
                        lhs_leaf=False, dtype=jnp.float32)
  return y.astype(out_dtype)


def _is_w8(leaf) -> bool:
  """int8 symmetric QArray (any contraction: its stored (K, N) matrix) with
  one float scale per output channel."""
  if not (isinstance(leaf, QArray) and leaf.zero is None and
          leaf.scale is not None and not isinstance(leaf.scale, QArray) and
          leaf.scale.shape[0] == 1):
    return False
  dec = leaf.fmt.kernel_decode()
  return (dec is not None and dec.offset == 0 and
          jnp.dtype(leaf.fmt.storage_dtype) == jnp.int8)


def _input_transform_dot(x, leaf: InputTransform, dims, out_dtype):
  """Transforms x's contracted channels (scale, rotation, per-token
  quantization), then multiplies by the inner weight through this same
  dispatch (so a QArray weight keeps its fast path); int8 x int8 with int32
  accumulation when both are int8. Any op contracting exactly the leaf's
  contraction axes (`InputTransform.operand`)."""
  op = leaf.operand(x, dims)
  if op is None:
    return None  # materialized: exact weight, no activation quantizer
  xt, tdims = op
  lay = leaf.layout
  lead = xt.shape[:xt.ndim - len(lay.contract)]
  if leaf.act is not None:
    xm = xt.reshape(lead + (lay.k,))
    codes, s = activations.per_token(xm, leaf.act)
    if leaf.act == "int8" and _is_w8(leaf.weight):
      impl = {"pallas": pallas_qmm.int8_matmul,
              "xla": xla_matmul.int8_matmul,
              "reference": reference.int8_matmul}[_kernel_choice()]
      y = impl(codes, s, leaf.weight.codes, leaf.weight.scale,
               out_dtype=out_dtype)
      return y.reshape(lead + lay.out_shape)
    xt = (activations.ACTIVATION_FORMATS[leaf.act].decode(codes) * s
          ).reshape(xt.shape)
  y = dot_general(xt, leaf.weight, tdims, lhs_leaf=False, dtype=jnp.float32,
                  preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def _pact_input_dot(x, leaf: PactInput, dims, out_dtype):
  """PACT-quantized input, then the inner weight through this dispatch."""
  if not _is_matmul(x, leaf, dims):
    return None
  y = dot_general(leaf.quantize_input(x), leaf.weight, dims, lhs_leaf=False,
                  dtype=jnp.float32, preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


register_dot_rule(QArray, _qarray_dot)
register_dot_rule(InputTransform, _input_transform_dot)
register_dot_rule(LowRank, _lowrank_dot)
register_dot_rule(PactInput, _pact_input_dot)
