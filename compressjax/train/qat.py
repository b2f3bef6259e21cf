"""Quantization-aware training (QAT) of unmodified Flax models.

Weights. LSQ (Esser et al. 2019, "Learned Step Size Quantization", Sec. 2):
  v_bar = round(clip(v / s, -Q_N, Q_P))                             (eq. 1)
  v_hat = v_bar * s                                                  (eq. 2)
  d v_hat / d s = -v/s + round(v/s)   if -Q_N < v/s < Q_P
                  -Q_N                if v/s <= -Q_N                 (eq. 3)
                  Q_P                 if v/s >= Q_P
  d v_hat / d v = 1 inside [-Q_N s, Q_P s], 0 outside (straight-through
  estimator clipped to the range), the step gradient scaled by
  g = 1 / sqrt(N_w Q_P) (Sec. 2.2), initial step s = 2 mean|v| / sqrt(Q_P).
On the edges v/s = -Q_N, Q_P the weight keeps gradient 1 (so the absmax
weight of a PTQ step can still move) and the step gets eq. 3's -Q_N, Q_P.
Steps are per tensor, per output feature or per group of `group_size` along
the flattened contraction axes, exactly the grouping and (K, N) layout of
`quantize_array` (`core/contraction.py`); N_w is the number of weights
sharing one step. Every element format of `compressjax.formats` is
supported with the same estimator: round(.) is the format's own rounding
(int: to the integer grid; fp8/fp6/fp4: saturate then nearest-even; nf4,
ternary, binary: nearest level) and [-Q_N, Q_P] is its code range
(`Format.code_range`: int symmetric [-2^(b-1), 2^(b-1)-1] on the default
full-range grid, LSQ's signed Q_N, Q_P; [-(2^(b-1)-1), 2^(b-1)-1] on the
narrow one; asymmetric [-z, 2^b-1-z] with the
zero point z of RTN, kept fixed, Q_P = 2^b - 1 in g; others [-max, max],
Q_P = max). So non-integer formats train a learned scale with the STE; their
step (and that of asymmetric int) starts from the format's PTQ scale rule,
not LSQ's init, which assumes a uniform grid. weight="ste" keeps the PTQ step
fixed. Formats qualify by `Format.capabilities.qat` (a plain float step per
group); block-scale schemes and codebooks do not.

Step init and step learning rate (the default LM, int4 g128, 200 steps of
the experiment's Adam recipe from the float model, val ppl; first baseline:
float 5.348, RTN 5.394, one batch seed; second: float 5.322, mean of five
batch seeds, and the default minus each, paired by seed, +- its standard
error; bench/training.py --quality-parts qat_compare --qat-seeds 5):
                                         first  second  default - it
  LSQ init 2 mean|v| / sqrt(Q_P), step
    at the weights' lr                   5.223  5.1936  -0.0195 +- 0.0041
  LSQ, PTQ (absmax) init                 5.207       -
  STE, fixed PTQ step                    5.202  5.1730  +0.0011 +- 0.0016
  qwix QAT (absmax step recomputed
    every step, identity STE)            5.196  5.1741  +0.0001 +- 0.0033
  LSQ, PTQ init, steps updated in log
    space (relative_steps; the default)  5.191  5.1741
The seeds' own spread (0.015-0.018 s.d.) is far larger than the recipes'
differences; paired by seed, the default is clearly better than LSQ as
published and within noise of the fixed-step STE and of qwix's recipe
(neither better by as much as one standard error).
Two causes. (1) LSQ's init, derived for per-layer steps of ResNet weights,
is far from the error-minimizing step for groups of 128: the PTQ scale starts
closer, so `step_init="ptq"` is the default (`"lsq"` keeps the paper's).
(2) LSQ's gradient scale g balances step and weight updates under SGD; Adam
divides every parameter's gradient by its own RMS, so g has no effect and a
step moves by ~lr per update in absolute terms, while a step is ~10-50x
smaller than the weights of its group: its relative updates are far larger
than theirs, and a step change moves all weights of its group at once.
`relative_steps()` (chain it after the optimizer) applies each step's update
multiplicatively, s <- s exp(u): Adam on log s, scale-free (the same
relative rate for every layer whatever its step size) and s stays positive.
A fixed lr multiplier of 0.03 for the steps did about as well on this model
(5.193) but is a constant tied to the step sizes.

Activations. PACT (Choi et al. 2018, "PACT: Parameterized Clipping
Activation", Sec. 2): y = clip(x, 0, alpha), quantized to k bits with the
static scale alpha / (2^k - 1); d y_q / d alpha = 1 where x >= alpha (STE
through the rounding, eq. 3), with an L2 penalty on alpha (`pact_penalty`).
The inputs of a matmul are signed in general, so `act="pact"` defaults to the
symmetric variant clip(x, -alpha, alpha), scale alpha / (2^(k-1) - 1),
d/d alpha = sign(x) where |x| >= alpha (`act_signed=False`: PACT as
published, for inputs that follow a ReLU). `act="int8"` (or fp8) is dynamic
per-token fake quantization with an identity STE, as a W8A8 (SmoothQuant)
deployment computes it. Either runs on plain matmuls x @ W of 2-D kernels,
exactly where InputTransform quantizes its input; other uses of the kernel
see the fake-quantized weight only.

Plumbing. `qat(...)` is a Transform (same rules as `transforms.quantize`) that
turns each selected kernel into a `FakeQuant` leaf whose float children (the
float32 latent weight, the step, PACT's alpha) are what `jax.grad` of a loss of
`compressjax.run(model, tree, x)` differentiates; its dot rule fake-quantizes
the matmul input, its `materialize()` is the fake-quantized weight (also
differentiable, wherever the interpreter densifies the leaf). The asymmetric
zero point is an integer child: take gradients w.r.t.
`cj.partition_float(tree)[0]` there. `from_ptq` starts from a PTQ result
(e.g. GPTQ) and reproduces it exactly at step 0; `export` turns every
FakeQuant into the leaf PTQ would produce: a QArray (weight only), an
InputTransform(act="int8") around it (W8A8), or for PACT a
`core.pact_input.PactInput` around it, since no PTQ leaf clips activations
with a learned static range.
Their outputs equal the fake-quant forward up to float summation order; the
QArray codes/scale/zero are bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import optax

from compressjax.core import transform as transform_lib
from compressjax.core.base import (CompressedLeaf, Stage, compressed_leaf,
                                   is_concrete)
from compressjax.core.contraction import (MatrixLayout, apply_groups,
                                          group_reduce, group_sum_to,
                                          normalize_contract)
from compressjax.core.errors import CompressionError
from compressjax.core.input_transform import InputTransform
from compressjax.core.pact_input import PactInput, pact_forward
from compressjax.core.qarray import QArray, pack_codes
from compressjax.core import rules as rules_lib
from compressjax.core.format import Format
from compressjax.core.rules import option
from compressjax.core.tree import leaves_with_paths, map_with_paths
from compressjax.formats import activations
from compressjax.quantization.rtn import (check_quant_config, quantize_array,
                                          resolve_format)
from compressjax.runtime import dispatch

WEIGHT_MODES = ("lsq", "ste")
ACTS = (None, "int8", "fp8_e4m3", "fp8_e5m2", "pact")
STEP_INITS = ("ptq", "lsq")
# Initial clip: wide, so training starts near the float model; the alpha
# gradient (x >= alpha) and the L2 penalty then pull it in.
PACT_ALPHA_INIT = 10.0
_QUANT_KEYS = ("bits", "format", "group_size", "symmetric", "per_tensor",
               "axis")
DEFAULT_BITS = 4


# -- the estimators ----------------------------------------------------------

def code_range(fmt) -> tuple[float, float]:
  """[lo, hi] of the format's code domain (before a zero point)."""
  lo, hi = fmt.code_range
  return float(lo), float(hi)


def q_p(fmt) -> float:
  """LSQ's Q_P, the positive code range, for the gradient scale g (with a
  zero point the whole range 2^b - 1 is positive)."""
  lo, hi = code_range(fmt)
  return hi - lo if fmt.capabilities.zero_point else hi


def grad_scale(fmt, shape, step_shape) -> float:
  """g = 1 / sqrt(N_w Q_P), N_w = weights per step (Esser et al., Sec. 2.2)."""
  n = math.prod(shape) // max(math.prod(step_shape), 1)
  return 1.0 / math.sqrt(max(n, 1) * q_p(fmt))


def _fq_parts(v, s, z, fmt):
  # The exact op sequence of quantize_array + QArray.materialize on the
  # (K, N) matrix, so the forward is PTQ's numbers bit for bit.
  u = apply_groups(v, s, lambda a, b: a / b)
  y = u if z is None else apply_groups(u, z, lambda a, b: a + b)
  c = fmt.round(y)
  q = c if z is None else apply_groups(c, z, lambda a, b: a - b)
  return u, y, c, q


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(v, s, z, fmt, g):
  _, _, _, q = _fq_parts(v, s, z, fmt)
  return apply_groups(q, s, lambda a, b: a * b)


def _fake_quant_fwd(v, s, z, fmt, g):
  u, y, _, q = _fq_parts(v, s, z, fmt)
  return apply_groups(q, s, lambda a, b: a * b), (u, y, q, s, z)


def _fake_quant_bwd(fmt, g, res, ct):
  u, y, q, s, z = res
  lo, hi = code_range(fmt)
  dv = jnp.where((y >= lo) & (y <= hi), ct, 0.0)  # clipped STE
  # eq. 3: q - u strictly inside; outside (and on the edge) q is -Q_N or Q_P
  ds = group_sum_to(ct * jnp.where((y > lo) & (y < hi), q - u, q),
                    s.shape) * g
  return dv, ds, None if z is None else jnp.zeros_like(z)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(v, step, fmt, *, zero=None, axis=None, g: float = 1.0):
  """LSQ fake quantization (eq. 1-2) of float32 `v` with `step` in the QArray
  scale layout ((G, N) or (G, 1) over the (K, N) matrix of `v` contracted
  over `axis`, an int or tuple, default from the shape); gradients per eq. 3
  (step gradient times g) and the clipped STE. `zero` (integer) shifts the
  code range of asymmetric ints."""
  v = jnp.asarray(v, jnp.float32)
  lay = MatrixLayout(tuple(v.shape), normalize_contract(axis, v.shape))
  z = None if zero is None else zero.astype(jnp.float32)
  return lay.from_matrix(_fake_quant(lay.to_matrix(v),
                                     jnp.asarray(step, jnp.float32), z, fmt,
                                     float(g)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _per_token(x, fmt: str, axis: int):
  return activations.fake_quant(x, fmt, axis)


def _per_token_fwd(x, fmt, axis):
  return activations.fake_quant(x, fmt, axis), None


def _per_token_bwd(fmt, axis, res, ct):
  return (ct,)  # per-token absmax never clips: identity STE


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def per_token_fake_quant(x, format: str = "int8", axis: int = -1):
  """Dynamic per-token quantize-dequantize (`formats.activations`) with an
  identity straight-through gradient."""
  return _per_token(x, format, axis % x.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pact(x, alpha, bits, signed):
  return pact_forward(x, alpha, bits, signed)  # what PactInput deploys


def _pact_fwd(x, alpha, bits, signed):
  return _pact(x, alpha, bits, signed), (x, alpha)


def _pact_bwd(bits, signed, res, ct):
  x, alpha = res
  lo = -alpha if signed else jnp.zeros_like(alpha)
  dx = jnp.where((x > lo) & (x < alpha), ct, 0.0)
  da = jnp.sum(jnp.where(x >= alpha, ct, 0.0))  # PACT eq. 3
  if signed:
    da = da - jnp.sum(jnp.where(x <= -alpha, ct, 0.0))
  return dx, da.reshape(alpha.shape)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact(x, alpha, bits: int = 8, signed: bool = False):
  """PACT activation quantizer (Choi et al. 2018, eq. 1-3): clip(x, 0, alpha)
  (signed: clip(x, -alpha, alpha)) on a k-bit grid of step
  alpha / (2^k - 1) (signed: alpha / (2^(k-1) - 1)); alpha must stay > 0."""
  out = _pact(jnp.asarray(x).astype(jnp.float32),
              jnp.asarray(alpha, jnp.float32), int(bits), bool(signed))
  return out.astype(jnp.asarray(x).dtype)


# -- the leaves --------------------------------------------------------------

def _plain_matmul(x, leaf, dims) -> bool:
  """x (..., K) contracted with axis 0 of a 2-D weight: the only case where
  InputTransform quantizes its input, so training matches deployment."""
  (lc, rc), (lb, rb) = dims
  return (leaf.ndim == 2 and tuple(lc) == (x.ndim - 1,) and tuple(rc) == (0,)
          and not lb and not rb)


@compressed_leaf
class FakeQuant(CompressedLeaf):
  """A kernel under QAT. Children: float32 latent `weight` (the kernel's
  shape), float32 `step` (QArray scale layout over the (K, N) matrix of the
  `contract` axes), integer `zero` (asymmetric int only) and PACT's scalar
  `alpha`; the rest is static config."""

  data_fields = ("weight", "step", "zero", "alpha")
  meta_fields = ("shape", "dtype", "fmt", "contract", "mode", "g", "act",
                 "act_bits", "act_signed")
  stage = Stage.QUANTIZE

  weight: Any
  step: Any
  zero: Any
  alpha: Any
  shape: tuple[int, ...]
  dtype: str
  fmt: Any
  contract: tuple[int, ...]
  mode: str  # "lsq": step learned; "ste": step fixed
  g: float  # LSQ step-gradient scale
  act: str | None
  act_bits: int
  act_signed: bool

  @property
  def layout(self) -> MatrixLayout:
    return MatrixLayout(tuple(self.shape), tuple(self.contract))

  def describe(self) -> str:
    return f"qat {self.fmt.name}"

  def fake_weight(self):
    """float32 fake-quantized weight (eq. 1-2), differentiable."""
    s = self.step if self.mode == "lsq" else jax.lax.stop_gradient(self.step)
    return fake_quant(self.weight, s, self.fmt, zero=self.zero,
                      axis=self.contract, g=self.g)

  def materialize(self) -> jax.Array:
    return self.fake_weight().astype(self.dtype)

  def quantize_input(self, x):
    """The activation fake-quant applied to this weight's matmul input."""
    if self.act is None:
      return x
    if self.act == "pact":
      return pact(x, self.alpha, self.act_bits, self.act_signed)
    return per_token_fake_quant(x, self.act)

  def validate(self) -> None:
    shape = tuple(self.shape)
    self._expect("weight", self.weight, shape, kind="f")
    self._expect("step", self.step, kind="f")
    nd = len(shape)
    if not self.contract or any(not 0 <= a < nd for a in self.contract):
      self._fail(f"contraction axes {self.contract} do not fit shape {shape}")
    k, n = self.layout.k, self.layout.n
    st = tuple(self.step.shape)
    if len(st) != 2 or st[1] not in (1, n) or st[0] < 1 or k % st[0]:
      self._fail(f"step has shape {st}; expected (G, {n}) or (G, 1) with G "
                 f"dividing the contraction K={k}")
    if self.zero is not None:
      self._expect("zero", self.zero, st, kind="iu")
    if self.mode not in WEIGHT_MODES:
      self._fail(f"mode {self.mode!r} is not one of {WEIGHT_MODES}")
    if self.act not in ACTS:
      self._fail(f"act {self.act!r} is not one of {ACTS}")
    if (self.act == "pact") != (self.alpha is not None):
      self._fail("alpha must be given exactly when act='pact'")
    if self.alpha is not None:
      self._expect("alpha", self.alpha, (), kind="f")
      if is_concrete(self.alpha) and not float(self.alpha) > 0:
        self._fail(f"PACT alpha must be positive, got {float(self.alpha)}")
    super().validate()


def _fake_quant_dot(x, leaf: FakeQuant, dims, out_dtype):
  if leaf.act is None or not _plain_matmul(x, leaf, dims):
    return None  # the dispatcher multiplies by materialize()
  y = jax.lax.dot_general(leaf.quantize_input(x.astype(jnp.float32)),
                          leaf.fake_weight(), dims,
                          preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


dispatch.register_dot_rule(FakeQuant, _fake_quant_dot)


# -- building, starting from PTQ, exporting ----------------------------------

def _check_train_cfg(path: str, shape, cfg) -> None:
  """Step mode and activation options (the weight format aside)."""
  mode = cfg.get("weight", "lsq")
  if mode not in WEIGHT_MODES:
    raise CompressionError(f"qat weight={mode!r}: use one of {WEIGHT_MODES}",
                           path)
  if cfg.get("step_init", "ptq") not in STEP_INITS:
    raise CompressionError(f"qat step_init={cfg.get('step_init')!r}: use one "
                           f"of {STEP_INITS}", path)
  act = cfg.get("act")
  if act not in ACTS:
    raise CompressionError(f"qat act={act!r}: use one of {ACTS}", path)
  if act is not None and len(shape) != 2:
    raise CompressionError(
        f"activation quantization needs a 2-D (in, out) kernel, got shape "
        f"{tuple(shape)}; add a rule with act=None for this param", path)
  if act == "pact":
    bits = cfg.get("act_bits", 8)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
      raise CompressionError(f"act_bits must be in [2, 8], got {bits}", path)
    if not float(cfg.get("act_alpha", PACT_ALPHA_INIT)) > 0:
      raise CompressionError(f"act_alpha must be positive, got "
                             f"{cfg.get('act_alpha')}", path)


def _check_cfg(path: str, shape, cfg) -> None:
  _check_train_cfg(path, shape, cfg)
  qcfg = {k: cfg[k] for k in _QUANT_KEYS if k in cfg}
  fmt = resolve_format(qcfg, path, default_bits=DEFAULT_BITS)
  if not fmt.capabilities.qat:
    raise CompressionError(
        f"qat supports formats with a plain float step per group (int2..int8,"
        f" fp8/fp6/fp4, nf4, ternary, binary), not {fmt.name}, a block-scale "
        "scheme or codebook whose scales are part of the format; quantize "
        "this param with PTQ or skip it with a rule", path)
  check_quant_config(path, shape, qcfg, default_bits=DEFAULT_BITS)


def _make(path, weight, step, zero, shape, dtype, fmt, contract, cfg):
  act = cfg.get("act")
  alpha = None
  if act == "pact":
    alpha = jnp.asarray(cfg.get("act_alpha", PACT_ALPHA_INIT), jnp.float32)
  return FakeQuant(
      weight=weight, step=step, zero=zero, alpha=alpha, shape=tuple(shape),
      dtype=jnp.dtype(dtype).name, fmt=fmt, contract=tuple(contract),
      mode=cfg.get("weight", "lsq"),
      g=grad_scale(fmt, tuple(shape), tuple(step.shape)), act=act,
      act_bits=int(cfg.get("act_bits", 8)),
      act_signed=bool(cfg.get("act_signed", True)))


def fake_quant_leaf(w, bits: int | None = None, *, path: str = "<array>",
                    **cfg) -> FakeQuant:
  """FakeQuant for float kernel `w` (config keys as `qat`). The step is the
  PTQ (`quantize_array`) scale (step_init="ptq", the default), or LSQ's
  2 mean|v| / sqrt(Q_P) per group for weight="lsq" with step_init="lsq" on
  symmetric integer formats."""
  cfg = dict(cfg, bits=bits)
  _check_cfg(path, w.shape, cfg)
  qcfg = {k: cfg[k] for k in _QUANT_KEYS if k in cfg}
  fmt, _ = check_quant_config(path, w.shape, qcfg, default_bits=DEFAULT_BITS)
  ptq = quantize_array(w, path=path, **dict(qcfg, bits=None, format=fmt))
  step, zero = ptq.scale.astype(jnp.float32), ptq.zero
  v = jnp.asarray(w, jnp.float32)
  caps = fmt.capabilities
  if (cfg.get("weight", "lsq") == "lsq" and cfg.get("step_init", "ptq") ==
      "lsq" and caps.uniform and not caps.zero_point):
    gs = cfg.get("group_size")
    vm = ptq.layout.to_matrix(jnp.abs(v))
    groups = 1 if gs is None else ptq.layout.k // gs
    m = group_reduce(vm, groups, jnp.mean, bool(cfg.get("per_tensor", False)))
    step = 2.0 * m / math.sqrt(q_p(fmt))
    step = jnp.where(step > 0, step, 1.0)  # all-zero group: any step is exact
  return _make(path, v, step, zero, w.shape, w.dtype, fmt, ptq.contract, cfg)


def _unwrap_ptq(path, leaf):
  """(QArray, act) of a PTQ leaf QAT can start from, else (None, None)."""
  act = None
  if isinstance(leaf, InputTransform):
    if leaf.scale is not None or leaf.signs is not None:
      raise CompressionError(
          "cannot start QAT from an InputTransform with an input scale or "
          "rotation (unfolded AWQ/SmoothQuant scale, online Hadamard): QAT "
          "has no input transform; fold it first or skip this param", path)
    leaf, act = leaf.weight, leaf.act
  if not isinstance(leaf, QArray):
    return None, None
  if leaf.scale is None or isinstance(leaf.scale, CompressedLeaf) or (
      not leaf.fmt.capabilities.qat):
    raise CompressionError(
        "cannot start QAT from a QArray whose scale is itself compressed "
        "(double quantization, microscaling): QAT learns plain float steps; "
        "re-quantize this param without double_quant / MX or skip it", path)
  return leaf, act


def _from_qarray(path, qa: QArray, act, cfg):
  cfg = dict(cfg)
  if cfg.get("act") is None:
    cfg["act"] = act
  _check_train_cfg(path, qa.shape, cfg)
  # The latent weight is the dequantized PTQ weight in float32 (not cast to
  # the param dtype), so rounding it with the same step gives back its codes.
  latent = qa.layout.from_matrix(qa.matrix())
  return _make(path, latent, qa.scale_values(), qa.zero, qa.shape, qa.dtype,
               qa.fmt, qa.contract, cfg)


def from_ptq(qtree: Any, *, weight: str = "lsq", act: str | None = None,
             act_bits: int = 8, act_signed: bool = True,
             act_alpha: float = PACT_ALPHA_INIT) -> Any:
  """FakeQuant leaves from a PTQ result (RTN, GPTQ, AWQ, SmoothQuant W8A8):
  latent = the dequantized weight, step = the PTQ scale (zero point kept), so
  QAT's step 0 is the PTQ model. InputTransform(act=...) leaves keep their
  activation quantizer unless `act` is given. Other leaves pass through."""
  cfg = dict(weight=weight, act=act, act_bits=act_bits, act_signed=act_signed,
             act_alpha=act_alpha)

  def one(path, leaf):
    qa, a = _unwrap_ptq(path, leaf)
    return leaf if qa is None else _from_qarray(path, qa, a, cfg)
  return map_with_paths(one, qtree)


@rules_lib.options
class QatOptions(rules_lib.Options):
  """Quantization-aware training (see module doc)."""

  transform: ClassVar[str] = "qat"
  bits: int | None = option(
      None, "integer bits when format is None (None: 4); with a format, "
      "optional and then equal to the format's bits")
  format: str | Format | None = option(
      None, "an element format (int2..int8, fp8/fp6/fp4, nf4, ternary, "
      "binary) instead of bits")
  group_size: int | None = option(
      None, "elements per step along the contraction axes (None: per "
      "output feature)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(True, "False: integer codes with a zero point")
  per_tensor: bool = option(False, "one step for the whole tensor")
  axis: int | tuple[int, ...] | None = option(
      None, "contraction axis or axes (None: from the shape, see "
      "core.contraction)")
  weight: Literal[WEIGHT_MODES] = option(
      "lsq", "lsq: learned step (eq. 3); ste: fixed PTQ step")
  step_init: Literal[STEP_INITS] = option(
      "ptq", "ptq: the PTQ scale; lsq: 2 mean|v| / sqrt(Q_P) (symmetric "
      "int, the paper's; worse for grouped steps, see module doc)")
  act: Literal[ACTS] = option(
      None, "activations: int8 / fp8 per token (STE) or pact (learned clip)")
  act_bits: int = option(8, "PACT bits", check=lambda b: 2 <= b <= 8,
                         must="be in [2, 8]")
  act_signed: bool = option(True, "PACT: clip to [-alpha, alpha]")
  act_alpha: float = option(PACT_ALPHA_INIT, "PACT: initial clip alpha",
                            **rules_lib.interval(0, lo_open=True))


@transform_lib.builder(QatOptions, positional=("bits",))
def qat(*, init: Any = None, options, rules,
        default) -> transform_lib.Transform:
  """QAT transform: selected kernels become FakeQuant leaves.

  `init`: a PTQ tree of the same params (e.g. GPTQ's); its QArrays give the
  latent weights, formats and steps of the paths they cover. Rules give
  per-path overrides, e.g. `[(r"params/head/kernel", dict(bits=8))]`.
  """
  base = options
  start = {} if init is None else dict(leaves_with_paths(init))

  def check(path, leaf, cfg):
    if isinstance(leaf, CompressedLeaf):
      raise CompressionError(
          f"param is already a {type(leaf).__name__}; QAT starts from float "
          "kernels (use from_ptq or qat(init=ptq_tree) for PTQ results)", path)
    _check_cfg(path, leaf.shape, cfg)

  def leaf_fn(path, leaf, cfg, state):
    qa, a = _unwrap_ptq(path, start.get(path))
    if qa is None:
      return fake_quant_leaf(leaf, path=path, **cfg)
    if tuple(qa.shape) != tuple(leaf.shape):
      raise CompressionError(f"init has shape {tuple(qa.shape)}, the param "
                             f"{tuple(leaf.shape)}; pass the PTQ result of "
                             "these params", path)
    return _from_qarray(path, qa, a, cfg)

  return transform_lib.leaf_transform("qat", base, leaf_fn, check, rules,
                                      default)


def export_leaf(leaf: FakeQuant, path: str = "<array>"):
  """The PTQ leaf a FakeQuant deploys as (see module docstring)."""
  v = leaf.layout.to_matrix(jnp.asarray(leaf.weight, jnp.float32))
  s = jnp.asarray(leaf.step, jnp.float32)
  z = None if leaf.zero is None else leaf.zero.astype(jnp.float32)
  _, _, c, _ = _fq_parts(v, s, z, leaf.fmt)
  qa = QArray(codes=pack_codes(leaf.fmt.encode(c), leaf.fmt.bits), scale=s,
              zero=leaf.zero, shape=tuple(leaf.shape), dtype=leaf.dtype,
              fmt=leaf.fmt, contract=tuple(leaf.contract))
  if leaf.act is None:
    return qa
  if len(leaf.shape) != 2:
    raise CompressionError(
        f"cannot export activation quantization {leaf.act!r} of a "
        f"{len(leaf.shape)}-D kernel (InputTransform is 2-D)", path)
  if leaf.act == "pact":
    return PactInput(weight=qa, alpha=jnp.asarray(leaf.alpha, jnp.float32),
                     bits=leaf.act_bits, signed=leaf.act_signed,
                     shape=tuple(leaf.shape), dtype=leaf.dtype)
  return InputTransform(weight=qa, scale=None, signs=None, block=0,
                        act=leaf.act, shape=tuple(leaf.shape),
                        dtype=leaf.dtype)


def export(tree: Any) -> Any:
  """Every FakeQuant -> its deployable leaf (QArray, InputTransform(act) or
  PactInput around the QArray); other leaves unchanged."""
  def one(path, leaf):
    if not isinstance(leaf, FakeQuant):
      return leaf
    out = export_leaf(leaf, path)
    if all(is_concrete(x) for x in jax.tree.leaves(out)):
      out.validate()
    return out
  return map_with_paths(one, tree)


def relative_steps() -> optax.GradientTransformation:
  """An optax transformation to chain after the optimizer: the update u of
  every FakeQuant step becomes s (exp(u) - 1), so s <- s exp(u) (the step
  learned in log space; see the module doc for why Adam needs it). Other
  updates pass unchanged. Needs `params` (optax.chain passes them on):

      opt = optax.chain(optax.adam(lr), qat.relative_steps())
  """
  is_fq = lambda x: isinstance(x, FakeQuant)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("relative_steps needs the params: call "
                       "opt.update(grads, state, params)")

    def one(u, p):
      if is_fq(u) and u.step is not None:
        return dataclasses.replace(u, step=p.step * jnp.expm1(u.step))
      return u
    return jax.tree.map(one, updates, params, is_leaf=is_fq), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def pact_penalty(tree: Any, coeff: float) -> jax.Array:
  """L2 regularizer coeff * sum(alpha^2) over PACT leaves (Choi et al., Sec. 2),
  to add to the loss."""
  alphas = [leaf.alpha for _, leaf in leaves_with_paths(tree)
            if isinstance(leaf, FakeQuant) and leaf.alpha is not None]
  if not alphas:
    return jnp.zeros((), jnp.float32)
  return coeff * sum(jnp.sum(jnp.square(a)) for a in alphas)


__all__ = ["ACTS", "FakeQuant", "PactInput", "export", "export_leaf",
           "fake_quant", "fake_quant_leaf", "from_ptq", "grad_scale",
           "pact", "pact_penalty", "per_token_fake_quant", "qat",
           "relative_steps"]
