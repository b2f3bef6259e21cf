"""The one dispatch point where compressed operands meet matmul-like ops.

`dot_general` and `conv_general_dilated` receive a compressed leaf (with the
dtype the model asked for) as one operand. A rule registered for the leaf's
type may compute the op directly from the compressed storage (this is where
Pallas kernels plug in); a rule returns None to decline, and then the leaf is
materialized exactly and the plain op runs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from compressjax.core.base import materialize
from compressjax.core.input_transform import InputTransform
from compressjax.core.lowrank import LowRank
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


def _is_matmul(x, leaf, dims, any_rank: bool = False) -> bool:
  """x (..., K) contracted with axis 0 of a 2-D leaf (of any rank >= 2 with
  `any_rank`: an Einsum kernel (K, h, d) is a (K, h*d) matrix), no batch
  dims."""
  (lc, rc), (lb, rb) = dims
  rank_ok = leaf.ndim >= 2 if any_rank else leaf.ndim == 2
  return (rank_ok and tuple(lc) == (x.ndim - 1,) and tuple(rc) == (0,)
          and not lb and not rb)


def _as_matrix(a, rest: tuple):
  """Per-group (G, *r) values, r broadcastable to rest -> (G, prod(rest)),
  or (G, 1) when they are shared by all outputs."""
  if a is None:
    return None
  if all(d == 1 for d in a.shape[1:]):
    return a.reshape(a.shape[0], 1)
  return jnp.broadcast_to(a, a.shape[:1] + rest).reshape(a.shape[0], -1)


def _code_table(fmt):
  """Integer formats map codes by an offset; any other elementwise format of
  <= 8 bits (fp8/fp6/fp4, NF4, ternary, ...) by its 2**bits decode table."""
  if getattr(fmt, "kind", None) == "int":
    return fmt.offset, None
  return 0, fmt.decode(jnp.arange(2**fmt.bits, dtype=jnp.int32))


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


def _qarray_dot(x, leaf: QArray, dims, out_dtype):
  """Weight-only quantized matmul straight from the stored codes, never
  materializing the float weight: the Pallas kernel for integer codes of
  1/2/4/8 bits (GPU/TPU), blocked XLA (CPU, and any <= 8-bit elementwise
  format through its decode table), or the plain grouped einsum."""
  if not (_is_matmul(x, leaf, dims, any_rank=True) and leaf.axis == 0
          and getattr(leaf.fmt, "kind", None) in ("int", "float", "levels")
          and leaf.fmt.bits <= 8):
    return None
  scale = leaf.scale_values()
  rest = tuple(leaf.shape[1:])
  offset, lut = _code_table(leaf.fmt)
  codes = leaf.codes.reshape(leaf.codes.shape[0], -1)
  args = (x, codes, _as_matrix(scale, rest), _as_matrix(leaf.zero, rest))
  kw = dict(bits=leaf.fmt.bits, k=leaf.shape[0], offset=offset,
            out_dtype=out_dtype)
  choice = _kernel_choice()
  if (choice == "pallas" and lut is None
      and leaf.fmt.bits in pallas_qmm.SUPPORTED_BITS):
    y = pallas_qmm.quantized_matmul(*args, **kw)
  elif choice == "reference" or (choice == "pallas" and
                                 jax.default_backend() != "cpu"):
    y = reference.quantized_matmul(*args, lut=lut, **kw)
  else:
    y = xla_matmul.quantized_matmul(*args, lut=lut, **kw)
  return y.reshape(x.shape[:-1] + rest)


def _lowrank_dot(x, leaf: LowRank, dims, out_dtype):
  if not _is_matmul(x, leaf, dims):
    return None
  xf = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.matmul(jnp.matmul(xf, materialize(leaf.a).astype(jnp.float32),
                            precision=hp),
                 materialize(leaf.b).astype(jnp.float32), precision=hp)
  if leaf.residual is not None:
    y = y + dot_general(xf, leaf.residual, dims, lhs_leaf=False,
                        dtype=jnp.float32)
  return y.astype(out_dtype)


def _is_w8(leaf) -> bool:
  """int8 symmetric QArray with one scale per output channel."""
  return (isinstance(leaf, QArray) and leaf.axis == 0 and leaf.ndim == 2
          and getattr(leaf.fmt, "kind", None) == "int"
          and leaf.fmt.bits == 8 and leaf.fmt.offset == 0
          and leaf.zero is None and not isinstance(leaf.scale, QArray)
          and leaf.scale is not None and leaf.scale.shape[0] == 1)


def _input_transform_dot(x, leaf: InputTransform, dims, out_dtype):
  """Transforms x (scale, rotation, per-token quantization), then multiplies
  by the inner weight through this same dispatch (so a QArray weight keeps its
  fast path); int8 x int8 with int32 accumulation when both are int8."""
  if not _is_matmul(x, leaf, dims):
    return None  # materialized: exact weight, no activation quantizer
  xt = leaf.transform_input(x)
  if leaf.act is not None:
    xq = activations.quantize_per_token(xt, leaf.act)
    if leaf.act == "int8" and _is_w8(leaf.weight):
      impl = {"pallas": pallas_qmm.int8_matmul,
              "xla": xla_matmul.int8_matmul,
              "reference": reference.int8_matmul}[_kernel_choice()]
      return impl(xq.codes, xq.scale, leaf.weight.codes,
                                   leaf.weight.scale, out_dtype=out_dtype)
    xt = xq.materialize()
  y = dot_general(xt, leaf.weight, dims, lhs_leaf=False, dtype=jnp.float32,
                  preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


register_dot_rule(QArray, _qarray_dot)
register_dot_rule(InputTransform, _input_transform_dot)
register_dot_rule(LowRank, _lowrank_dot)
