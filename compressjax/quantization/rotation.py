"""Randomized Hadamard rotations before quantization (QuaRot, Ashkboos et al.
2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs").

For an orthogonal R, x @ W = (x R) @ (R^T W): the product is unchanged
(computational invariance) while R^T W has its large rows spread over all
input channels (incoherence), so a quantizer with one scale per group of
inputs wastes fewer levels on a few outliers. R here is a randomized Hadamard
matrix diag(s) H_b (s in {+-1}, H_b the orthonormal Sylvester Hadamard matrix,
block-diagonal with blocks of b = a power of two; `core/hadamard.py`).

Three ways to apply R:

1. `rotate(key)` (any model): each selected kernel W (K, N) becomes
   InputTransform(weight=R^T W, signs=s, block=b): the runtime rotates x
   online, y = rotate(x, s, b) @ (R^T W). b defaults to the largest power of
   two dividing K (K = 768 -> 256: blocks mix only within themselves).

2. `quarot(key, plan)` (folded rotations where the structure permits,
   QuaRot Sec. 4; the structure is a `RotationPlan`, e.g.
   `compressjax.models.transformer.rotation_plan(config)`):
   a. residual stream (QuaRot Sec. 4 / SliceGPT, Ashkboos et al. 2024,
      computational invariance): with RMSNorm(x) = gamma * x / rms(x) and
      rms(x Q) = rms(x), fold gamma into the readers (W <- diag(gamma) W,
      gamma <- 1), then embeddings E <- E Q, every residual writer W <- W Q
      (and its bias b <- b Q), every reader W <- Q^T W: the stream is x Q
      everywhere, the model output unchanged. Q = diag(s) H_d.
      LayerNorm subtracts the mean, which does not commute with Q. With
      `center_layernorm=True`, SliceGPT's fix (Sec. 3.2: LayerNorm is RMSNorm
      on mean-free inputs): every writer is centred, W <- W (I - 1 1^T / d),
      so the stream is mean-free and LayerNorm(x) = x / rms(x) (exact, same
      eps); the norm bias folds into the readers' biases, b <- b + beta W;
      and Q = H_d diag(s) H_d with s = +1 at every block start, so Q 1 = 1
      and the rotated stream x Q stays mean-free.
   b. value -> out, per head: attention output is sum_k a_qk v_k per head
      (softmax rows sum to 1, so the value bias passes through), so with
      R_v = diag(s) (I_heads (x) H_dh): W_v <- W_v R_v, b_v <- b_v R_v,
      W_out <- R_v^T W_out. Exact for any norm.
   c. online Hadamard on the input of the MLP down-projection (fc2, after the
      nonlinearity, nothing to fold into) and of the attention output
      projection (QuaRot's online Hadamard across heads; here a full-width
      randomized Hadamard on top of the folded per-head one), as in 1.

3. Rotation + GPTQ: rotate the float tree, capture statistics on it
   (calibration observes an InputTransform's *transformed* input, so the
   Hessians are those of the inputs the stored R^T W multiplies), then
   `gptq(stats)` quantizes InputTransform leaves' inner weights.
   `rotation_gptq(rotation, model, batches, ...)` is that sequence as one
   Transform (it composes with `chain`).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, ClassVar, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core import transform as transform_lib
from compressjax.core import hadamard
from compressjax.core.base import CompressedLeaf
from compressjax.core.errors import CompressionError
from compressjax.core.input_transform import InputTransform
from compressjax.core import rules as rules_lib
from compressjax.core.rules import (Predicate, RulesLike, default_filter,
                                    option)
from compressjax.core.tree import (is_float_array, leaves_with_paths,
                                   map_with_paths)


def _key_for(key, name: str):
  """One independent stream per param / role (stable across runs)."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()))


def _block_for(k: int, block: int | None, path: str) -> int:
  b = hadamard.largest_power_of_two_divisor(k) if block is None else block
  if not hadamard.is_power_of_two(b) or k % b:
    raise CompressionError(
        f"rotation block {b} must be a power of two dividing in_features {k};"
        f" use block={hadamard.largest_power_of_two_divisor(k)} or skip this "
        "param with a rule", path)
  if b < 2:
    raise CompressionError(
        f"in_features {k} has no power-of-two factor: a Hadamard rotation "
        "would only flip signs; skip this param with a rule", path)
  return b


def online(path: str, leaf: Any, key, block: int | None = None
           ) -> InputTransform:
  """W (K, N) -> InputTransform(weight=R^T W, signs, block), R = diag(s) H_b.

  An InputTransform that has a scale but no rotation (AWQ / SmoothQuant's
  explicit x / s) gets the rotation after its scale: rotate(x * scale)."""
  inner, scale = leaf, None
  if isinstance(leaf, InputTransform):
    if leaf.signs is not None:
      raise CompressionError("param already has an online rotation; skip it "
                             "with a rule", path)
    if leaf.act is not None:
      raise CompressionError("rotate before adding activation quantization",
                             path)
    inner, scale = leaf.weight, leaf.scale
  if isinstance(inner, CompressedLeaf) or not is_float_array(inner):
    raise CompressionError(
        f"rotation needs a float kernel, got {type(inner).__name__}; rotate "
        "the float model before quantizing or pruning it", path)
  if inner.ndim != 2:
    raise CompressionError(f"rotation needs a 2-D (in, out) kernel, got shape"
                           f" {tuple(inner.shape)}; skip it with a rule", path)
  k = inner.shape[0]
  b = _block_for(k, block, path)
  signs = hadamard.random_signs(_key_for(key, path), k)
  # R^T W = H diag(s) W (H symmetric): sign the rows, then transform them.
  w = hadamard.fwht(inner.astype(jnp.float32) * signs[:, None], axis=0,
            block=b).astype(inner.dtype)
  return InputTransform(weight=w, scale=scale, signs=signs, block=b, act=None,
                        shape=tuple(inner.shape),
                        dtype=jnp.dtype(inner.dtype).name)


@rules_lib.options
class RotateOptions(rules_lib.Options):
  """Online randomized Hadamard rotation (see `rotate`)."""

  transform: ClassVar[str] = "rotate"
  block: int | None = option(
      None, "Hadamard block, a power of two dividing K (None: the largest)",
      check=lambda b: b >= 2, must="be >= 2 (or None)")


@transform_lib.builder(RotateOptions)
def rotate(key, *, options, rules, default) -> transform_lib.Transform:
  """Online randomized Hadamard rotation of every selected 2-D kernel.

  Each kernel W (K, N) becomes InputTransform(weight=R^T W, signs, block)
  with R = diag(signs) H_block; x @ W = rotate(x) @ (R^T W) exactly, so the
  float model is unchanged. `block` (per param via rules, e.g.
  `rules=[(".*fc2.*", dict(block=256))]`) defaults to the largest power of two
  dividing K. Signs come from `key` folded with the param path. Apply to the
  float model, before quantization (quantize / gptq then reach the inner
  weight)."""

  def leaf(path, w, cfg, state):
    return online(path, w, key, cfg["block"])

  def check(path, w, cfg):
    k = w.shape[0] if len(w.shape) else 0
    _block_for(k, cfg["block"], path)

  return transform_lib.leaf_transform("rotate", options, leaf, check, rules,
                                      default)


# ---------------------------------------------------------------------------
# Folded rotations (QuaRot Sec. 4)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reader:
  """Linears that read the residual stream through one norm.

  norm_scale / norm_bias: the norm's params (bias None for RMSNorm); kernels
  (d, N_i) and their biases (None where a kernel has none)."""

  norm_scale: str
  norm_bias: str | None
  kernels: tuple[str, ...]
  biases: tuple[str | None, ...]

  def __post_init__(self):
    object.__setattr__(self, "kernels", tuple(self.kernels))
    object.__setattr__(self, "biases", tuple(self.biases))
    if len(self.kernels) != len(self.biases):
      raise CompressionError("a Reader needs one bias entry (or None) per "
                             "kernel", self.norm_scale)


@dataclasses.dataclass(frozen=True)
class ValueOut:
  """A value projection (its output columns split into heads of head_dim)
  and the output projection that reads the attention output."""

  value_kernel: str
  value_bias: str | None
  out_kernel: str
  head_dim: int


@dataclasses.dataclass(frozen=True)
class RotationPlan:
  """Where rotations fold in a transformer.

  norm: "rms" or "layer" (the residual stream's norms).
  writers: params whose last axis is added to the residual stream
    (embedding tables, residual-branch output kernels and their biases).
  readers: the norm -> linears groups that read the stream (incl. the head).
  value_out: per-attention value / out pairs.
  down: kernels whose input has no linear producer to fold into (the MLP
    down-projection after its nonlinearity): rotated online.
  """

  norm: str
  writers: tuple[str, ...]
  readers: tuple[Reader, ...]
  value_out: tuple[ValueOut, ...] = ()
  down: tuple[str, ...] = ()

  def __post_init__(self):
    for f in ("writers", "readers", "value_out", "down"):
      object.__setattr__(self, f, tuple(getattr(self, f)))
    if self.norm not in ("rms", "layer"):
      raise CompressionError(f"RotationPlan norm must be 'rms' or 'layer', "
                             f"got {self.norm!r}")


def _q_right(w, signs, block, sandwich):
  """w @ Q along the last axis; Q = diag(s) H, or H diag(s) H (sandwich)."""
  if sandwich:
    w = hadamard.fwht(w, axis=-1, block=block)
  return hadamard.fwht(w * signs, axis=-1, block=block)


def _q_left_t(w, signs, block, sandwich):
  """Q^T @ w along the first axis (Q^T = H diag(s), or H diag(s) H)."""
  if sandwich:
    w = hadamard.fwht(w, axis=0, block=block)
  return hadamard.fwht(w * signs[:, None], axis=0, block=block)


def _check_plan(params, plan: RotationPlan, residual: bool,
                center_layernorm: bool, value_out: bool, online_out: bool,
                online_down: bool) -> dict[str, Any]:
  leaves = dict(leaves_with_paths(params))
  if not isinstance(plan, RotationPlan):
    raise CompressionError(f"quarot needs a RotationPlan (e.g. "
                           f"transformer.rotation_plan(config)), got "
                           f"{type(plan).__name__}")

  def get(path, what, ndim=None):
    if path not in leaves:
      raise CompressionError(f"rotation plan {what} not found in the tree; "
                             "check the path prefix (e.g. 'params/')", path)
    x = leaves[path]
    if isinstance(x, CompressedLeaf) or not is_float_array(x):
      raise CompressionError(
          f"folded rotations need float params, got {type(x).__name__}; "
          "apply quarot to the float model, before quantizing", path)
    if ndim is not None and x.ndim != ndim:
      raise CompressionError(f"rotation plan {what} must be {ndim}-D, got "
                             f"shape {tuple(x.shape)}", path)
    return x

  if residual:
    if plan.norm != "rms" and not center_layernorm:
      p = plan.readers[0].norm_scale if plan.readers else None
      raise CompressionError(
          "residual rotation needs RMSNorm: LayerNorm subtracts the mean, "
          "which does not commute with the rotation (build the model with "
          "norm='rms', pass residual=False, or center_layernorm=True)", p)
    if not plan.writers or not plan.readers:
      raise CompressionError("residual rotation needs the plan's writers and "
                             "readers")
    d = get(plan.writers[0], "writer").shape[-1]
    for p in plan.writers:
      if get(p, "writer").shape[-1] != d:
        raise CompressionError(f"residual writers must end in the stream "
                               f"width {d}, got shape "
                               f"{tuple(leaves[p].shape)}", p)
    for r in plan.readers:
      for p in (r.norm_scale, r.norm_bias):
        if p is not None and get(p, "norm param", 1).shape != (d,):
          raise CompressionError(f"norm param must have shape ({d},), got "
                                 f"{tuple(leaves[p].shape)}", p)
      if r.norm_bias is not None and None in r.biases:
        raise CompressionError(
            "cannot fold the norm bias into a reader without a bias",
            r.kernels[r.biases.index(None)])
      for kp, bp in zip(r.kernels, r.biases):
        w = get(kp, "reader kernel", 2)
        if w.shape[0] != d:
          raise CompressionError(f"reader kernel must have in_features {d} "
                                 f"(the stream width), got {w.shape[0]}", kp)
        if bp is not None and get(bp, "reader bias", 1).shape != w.shape[1:]:
          raise CompressionError(f"bias shape {tuple(leaves[bp].shape)} does "
                                 f"not match the kernel's {w.shape[1]} "
                                 "outputs", bp)
    hadamard_block = _block_for(d, None, plan.writers[0])
  else:
    hadamard_block = None
  if value_out:
    for vo in plan.value_out:
      wv = get(vo.value_kernel, "value kernel", 2)
      wo = get(vo.out_kernel, "out kernel", 2)
      n = wv.shape[1]
      if vo.head_dim <= 0 or n % vo.head_dim or wo.shape[0] != n:
        raise CompressionError(
            f"value outputs {n} must be whole heads of {vo.head_dim} and "
            f"equal out's in_features {wo.shape[0]}", vo.out_kernel)
      if vo.value_bias is not None and get(vo.value_bias, "value bias",
                                           1).shape != (n,):
        raise CompressionError(f"value bias must have shape ({n},)",
                               vo.value_bias)
      _block_for(vo.head_dim, None, vo.value_kernel)
  for p in ((plan.down if online_down else ()) +
            tuple(vo.out_kernel for vo in plan.value_out if online_out)):
    _block_for(get(p, "online kernel", 2).shape[0], None, p)
  return dict(block=hadamard_block)


def quarot(key, plan: RotationPlan, *, residual: bool = True,
           center_layernorm: bool = False, value_out: bool = True,
           online_fc2: bool = True, online_out: bool = True) -> transform_lib.Transform:
  """QuaRot's rotations of a float model, as far as `plan` permits.

  Args:
    key: PRNG key for the random signs.
    plan: a `RotationPlan` (e.g. `transformer.rotation_plan(config)`).
    residual: fold Q into the residual stream (embeddings, writers, readers;
      norm scales become 1). Needs plan.norm == 'rms', or a LayerNorm plan
      with `center_layernorm=True` (SliceGPT's centring; see the module doc).
    value_out: per-head rotation folded into value (columns) and out (rows).
    online_fc2: online Hadamard on the `plan.down` kernels' inputs.
    online_out: online Hadamard on the out projections' inputs.
  Every step is exact in float arithmetic; the result is a float tree (plus
  InputTransform leaves for the online rotations) to quantize next.
  The residual fold moves the norm scales gamma into the readers' weights,
  outliers included; for weight-only quantization of a model with uneven
  gamma, `rotate` (gamma stays a float norm param) can do better.
  """
  flags = dict(residual=residual, center_layernorm=center_layernorm,
               value_out=value_out, online_fc2=online_fc2,
               online_out=online_out)
  for k, v in flags.items():
    if not isinstance(v, (bool, np.bool_)):
      raise CompressionError(f"quarot: {k} must be a bool, got "
                             f"{type(v).__name__} {v!r}")
  if not isinstance(plan, RotationPlan):
    raise CompressionError(f"quarot needs a RotationPlan (e.g. "
                           f"transformer.rotation_plan(config)), got "
                           f"{type(plan).__name__}")

  def init(params):
    return _check_plan(params, plan, residual, center_layernorm, value_out,
                       online_out, online_fc2)

  def update(params, state):
    state = _check_plan(params, plan, residual, center_layernorm, value_out,
                        online_out, online_fc2)
    leaves = dict(leaves_with_paths(params))
    new: dict[str, Any] = {}
    f32 = lambda p: new.get(p, leaves[p].astype(jnp.float32))

    if residual:
      b = state["block"]
      d = leaves[plan.writers[0]].shape[-1]
      sandwich = plan.norm == "layer"
      signs = hadamard.random_signs(_key_for(key, "residual"), d).astype(
          jnp.float32)
      if sandwich:  # s = +1 at block starts, so that Q 1 = 1
        signs = signs.at[::b].set(1.0)
      for p in plan.writers:
        w = f32(p)
        if sandwich:  # mean-free writes: LayerNorm acts as RMSNorm
          w = w - jnp.mean(w, axis=-1, keepdims=True)
        new[p] = _q_right(w, signs, b, sandwich)
      for r in plan.readers:
        gamma = f32(r.norm_scale)
        beta = None if r.norm_bias is None else f32(r.norm_bias)
        for kp, bp in zip(r.kernels, r.biases):
          w = f32(kp)
          if beta is not None:  # (x_hat g + beta) W = x_hat (g W) + beta W
            new[bp] = f32(bp) + jnp.matmul(
                beta, w, precision=jax.lax.Precision.HIGHEST)
          new[kp] = _q_left_t(w * gamma[:, None], signs, b, sandwich)
        new[r.norm_scale] = jnp.ones_like(gamma)
        if beta is not None:
          new[r.norm_bias] = jnp.zeros_like(beta)

    if value_out:
      for vo in plan.value_out:
        hb = hadamard.largest_power_of_two_divisor(vo.head_dim)
        n = leaves[vo.value_kernel].shape[1]
        s = hadamard.random_signs(_key_for(key, vo.value_kernel), n).astype(
            jnp.float32)
        # R_v = diag(s) (I (x) H_hb): W_v R_v on columns, R_v^T W_out on rows
        new[vo.value_kernel] = hadamard.fwht(f32(vo.value_kernel) * s, axis=-1,
                                     block=hb)
        if vo.value_bias is not None:
          new[vo.value_bias] = hadamard.fwht(f32(vo.value_bias) * s, axis=-1,
                                     block=hb)
        new[vo.out_kernel] = hadamard.fwht(f32(vo.out_kernel) * s[:, None], axis=0,
                                   block=hb)

    wrap = set(plan.down if online_fc2 else ())
    wrap |= {vo.out_kernel for vo in plan.value_out} if online_out else set()

    def one(path, x):
      if path in new:
        x = new[path].astype(x.dtype)
      if path in wrap:
        x = online(path, x, key)
      return x

    return map_with_paths(one, params), state

  return transform_lib.Transform(init, update)


# ---------------------------------------------------------------------------
# Rotation + GPTQ
# ---------------------------------------------------------------------------

def rotation_gptq(rotation: transform_lib.Transform, model: Any,
                  batches: Iterable[Any], bits: int = 4, *,
                  rules: RulesLike = None,
                  default: Predicate | None = default_filter, method=None,
                  **gptq_kw) -> transform_lib.Transform:
  """rotation (float) -> capture on the rotated tree -> GPTQ, as a Transform.

  `rotation` is e.g. `quarot(key, plan)` or `rotate(key)`; `batches` are the
  calibration inputs (re-iterated, so pass a list); `rules`/`default` select
  the GPTQ params and their overrides (capture uses the same selection);
  other keywords go to `gptq` (group_size, act_order, ...). The building
  blocks compose directly as well:

      rotated = rotation.apply(params)
      stats = capture(model, rotated, batches, rules=rules)
      q = gptq(stats, bits, rules=rules, ...).apply(rotated)
  """
  from compressjax.calibrate.capture import capture
  from compressjax.quantization.gptq import gptq

  if not isinstance(rotation, transform_lib.Transform):
    raise CompressionError(f"rotation_gptq: rotation must be a Transform "
                           f"(e.g. quarot(key, plan) or rotate(key)), got "
                           f"{type(rotation).__name__}")
  gptq(None, bits, rules=rules, default=default, **gptq_kw)  # checks now
  batches = list(batches)

  def init(params):
    return rotation.init(params)

  def update(params, state):
    rotated, state = rotation.update(params, state)
    stats = capture(model, rotated, batches, rules=rules, default=default,
                    method=method)
    out = gptq(stats, bits, rules=rules, default=default,
               **gptq_kw).apply(rotated)
    return out, state

  return transform_lib.Transform(init, update)
