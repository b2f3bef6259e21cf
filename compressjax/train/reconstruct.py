"""Learned post-training quantization: what RTN/GPTQ leave fixed (the rounding
direction, the clipping range) is optimized to reconstruct each layer's or
block's float output on calibration data. Results are the same QArrays RTN and
GPTQ produce.

AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization", eq. 21-24): with the scale s fixed,
  W~ = s * clip(floor(W / s) + h(V), q_min, q_max),
  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),  zeta = 1.1,
  gamma = -0.1 (the rectified sigmoid), V initialized so that h(V) =
  W / s - floor(W / s) (W~ = W inside the range), and
  min_V  ||W X - W~ X||_F^2 + lambda sum_ij (1 - |2 h(V_ij) - 1|^beta),
  beta annealed from 20 to 2 after a warm-up without the regularizer (20% of
  the iterations), Adam; at the end h is rounded: W / s rounded up where
  V >= 0, down elsewhere. From a start other than RTN (`init=`, e.g.
  GPTQ) the pair floor / floor + 1 is moved next to the start's code where
  that is neither, and h(V) is mirrored to 1 - frac where the start rounded
  away from the nearest, so that rounding h at step 0 gives the start's
  codes exactly (RTN: the paper's init). Here the error is divided by the
  start's and the regularizer is a mean over the weights, so one lambda
  (10) fits every layer; with ~2k rather than the paper's 10-20k
  iterations, Adam's lr is 1e-2 (on a random layer lambda 10-30 binarizes
  h fully by the end and halves-to-thirds the error gap lambda 0.1-1
  leaves).
OmniQuant learnable weight clipping (Shao et al. 2023, eq. 2, symmetric
form): s = sigmoid(g) * s0 per scale group, s0 the starting scale (RTN's
absmax / q_max, or GPTQ's), g initialized to 4 (sigmoid ~ 0.982),
W~ = s * clip(round(W / s), q_min, q_max) with a straight-through round;
AdamW (lr 5e-3, no decay). "lwc+adaround" learns the clipping first, then
the rounding with that scale fixed.

Objectives:
* per layer (`reconstruct(stats, ...)`, a Transform like `gptq(stats, ...)`):
  ||X (W - W~)||_F^2 / N from the captured Gram matrix X^T X (exact, no
  activations stored), as AdaRound's layer-wise objective; run it one-shot or
  block by block with `compressjax.calibrate.sequential` (each block fitted
  to the inputs the quantized blocks before it produce).
* per block (`reconstruct_blocks(model, params, batches, ...)`, BRECQ-style,
  Li et al. 2021, Sec. 3.2): all kernels of a block (an indexed module,
  `calibrate.sequential.block_prefix`) are learned together to minimize the
  squared error of the block's output against the float model's, summed over
  features and averaged over tokens, on inputs from the already-quantized
  blocks before it (plain MSE: BRECQ's diagonal-Fisher weighting is not
  applied). A block's output is what it sows under `sown` (linen
  `self.sow("intermediates", sown, x)`); a stage that sows nothing (e.g. the
  head) is fitted to the model's output.
Start from RTN (default) or any PTQ tree (`init=`, e.g. GPTQ's QArrays):
its scales are the starting (AdaRound: fixed) scales, its codes AdaRound's
starting rounding. Symmetric integer formats (int2..int8).

On the default LM, int3 g128 (configs/reconstruct.py has the figures):
per layer, LWC + AdaRound from RTN is below GPTQ on every calibration draw
tried; AdaRound alone is level with GPTQ; AdaRound from GPTQ's codes ends
above GPTQ (the relaxed h leaves the start before the regularizer
binarizes it again), and the block objective at 300 steps above both.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax.calibrate.capture import LayerStats
from compressjax.calibrate.sequential import (block_prefix, execution_order,
                                              stages_of)
from compressjax.core import rules as rules_lib
from compressjax.core import transform as transform_lib
from compressjax.core.base import CompressedLeaf
from compressjax.core.errors import CompressionError
from compressjax.core.qarray import QArray, apply_groups, pack_codes
from compressjax.core.rules import default_filter, option, resolve
from compressjax.core.tree import leaves_with_paths, materialize_tree
from compressjax.formats.integer import IntFormat
from compressjax.quantization.rtn import check_quant_config, quantize_array

METHODS = ("adaround", "lwc", "lwc+adaround")
ZETA, GAMMA = 1.1, -0.1
LWC_INIT = 4.0
_HP = jax.lax.Precision.HIGHEST


# -- one kernel ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Kernel:
  """A float kernel and the QArray it starts from (its format, scales and
  codes). `w` is the kernel's (K, N) matrix over the start's contraction
  axes (`QArray.layout`), the layout its codes and (G, N) scales use."""
  w: jax.Array      # float32 (K, N)
  start: QArray     # RTN, the init tree's QArray, or an earlier phase's

  @property
  def s0(self):
    return self.start.scale_values()

  @property
  def c0(self):
    """The start's codes, float (K, N)."""
    return self.start.code_values()


jax.tree_util.register_dataclass(_Kernel, data_fields=["w", "start"],
                                 meta_fields=[])


def _rect_sigmoid(v):
  """h(V) of AdaRound eq. 23."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _kernel(w, start: QArray) -> _Kernel:
  return _Kernel(start.layout.to_matrix(jnp.asarray(w, jnp.float32)), start)


def _base(k: _Kernel, u):
  """The lower of the two codes AdaRound chooses between: floor(W / s),
  moved next to the start's code where that is neither floor nor ceil (a
  GPTQ start: its error feedback moved some weights further), so the start's
  codes are always reachable (h = 0 or 1)."""
  c0 = k.c0
  return jnp.clip(jnp.floor(jax.lax.stop_gradient(u)), c0 - 1.0, c0)


def _init_v(k: _Kernel, s):
  """V at the start (AdaRound Sec. 5): h(V) = W / s - floor(W / s), so W~ =
  W inside the range, where the start's code is the nearest one (RTN: every
  weight); elsewhere (a GPTQ start) h(V) is mirrored to 1 - that, so that
  rounding h (V >= 0: up) gives the start's codes exactly. s: (G, N)."""
  u = apply_groups(k.w, s, lambda a, b: a / b)
  base = _base(k, u)
  up = k.c0 - base  # 1 where the start rounds up
  h = jnp.clip(u - base, 0.0, 1.0)
  h = jnp.where(up > 0, jnp.maximum(h, 1.0 - h), jnp.minimum(h, 1.0 - h))
  # keep h strictly on the start's side of 1/2 (V = 0 rounds up)
  h = jnp.where(up > 0, h, jnp.minimum(h, 0.5 - 1e-5))
  p = jnp.clip((h - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
  return jnp.log(p) - jnp.log1p(-p)


def _round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _scale(k: _Kernel, p: Mapping[str, Any]):
  s = k.s0
  if "g" in p:
    s = s * jax.nn.sigmoid(p["g"])
  return s


def _codes(k: _Kernel, p: Mapping[str, Any], s, hard: bool):
  """Float codes of the current state (soft h for AdaRound unless hard);
  the start's codes when nothing is learned (p empty)."""
  fmt = k.start.fmt
  if not p:
    return k.c0
  u = apply_groups(k.w, s, lambda a, b: a / b)
  if "v" in p:
    h = (p["v"] >= 0).astype(jnp.float32) if hard else _rect_sigmoid(p["v"])
    c = _base(k, u) + h
  else:
    c = jnp.round(u) if hard else _round_ste(u)
  return jnp.clip(c, fmt.qmin, fmt.qmax)


def soft_weight(k: _Kernel, p: Mapping[str, Any], hard: bool = False):
  """The (K, N) matrix of the current quantized weight."""
  s = _scale(k, p)
  c = _codes(k, p, s, hard)
  return apply_groups(c, s, lambda a, b: a * b)


def _round_reg(p, beta):
  """sum (1 - |2 h(V) - 1|^beta), AdaRound eq. 24."""
  if "v" not in p:
    return jnp.zeros((), jnp.float32)
  return jnp.sum(1.0 - jnp.abs(2.0 * _rect_sigmoid(p["v"]) - 1.0) ** beta)


def _beta(step, iters, warmup: float, hi=20.0, lo=2.0):
  """beta: hi until warm-up ends, then linear to lo (AdaRound Sec. 5)."""
  t0 = warmup * iters
  frac = jnp.clip((step - t0) / jnp.maximum(iters - t0, 1), 0.0, 1.0)
  return hi + (lo - hi) * frac


def export_kernel(k: _Kernel, p: Mapping[str, Any]) -> QArray:
  """The learned state as a QArray in the start's layout (hard rounding)."""
  fmt = k.start.fmt
  s = _scale(k, p).astype(jnp.float32)
  c = _codes(k, p, s, hard=True)
  stored = fmt.encode(c)
  codes = pack_codes(stored, fmt.bits)
  return dataclasses.replace(k.start, codes=codes, scale=s)


def _phases(method: str) -> list[str]:
  return {"adaround": ["adaround"], "lwc": ["lwc"],
          "lwc+adaround": ["lwc", "adaround"]}[method]


def _phase_params(kernels: Mapping[str, _Kernel], phase: str):
  """Trainable params of a phase (an earlier phase's result is folded into
  the kernels' start: `_fold`)."""
  out = {}
  for path, k in kernels.items():
    if phase == "lwc":
      out[path] = {"g": jnp.full(k.s0.shape, LWC_INIT, jnp.float32)}
    else:
      out[path] = {"v": _init_v(k, k.s0)}
  return out


def _fold(kernels, learned):
  """Kernels that start from the learned state of an earlier phase (LWC's
  scales and codes)."""
  return {p: _Kernel(k.w, export_kernel(k, learned.get(p, {}))) for p, k in
          kernels.items()}


@functools.partial(jax.jit, static_argnames=(
    "loss_fn", "iters", "lr", "reg", "warmup", "adaround", "n_batches"))
def _optimize(params, data, *, loss_fn: Callable, iters: int, lr: float,
              reg: float, warmup: float, adaround: bool, n_batches: int = 1):
  """Adam over `iters` steps in one jitted scan. `loss_fn(params, i, data)`
  is the reconstruction error on calibration batch i; AdaRound adds reg x
  the beta-annealed rounding regularizer after the warm-up. Returns
  (params, losses)."""
  opt = optax.adam(lr) if adaround else optax.adamw(lr, weight_decay=0.0)

  n_w = sum(x.size for x in jax.tree.leaves(params))
  # the error relative to the start's, so `reg` means the same for every
  # layer whatever its scale
  rec0 = jax.lax.stop_gradient(jnp.mean(jnp.stack([
      loss_fn({k: {} for k in params}, i, data)
      for i in range(n_batches)]))) if adaround else 1.0

  def total(p, step):
    rec = loss_fn(p, step % n_batches, data)
    if not adaround:
      return rec, rec
    b = _beta(step, iters, warmup)
    r = sum(_round_reg(q, b) for q in p.values()) / n_w
    on = (step >= warmup * iters).astype(jnp.float32)
    return rec / jnp.maximum(rec0, 1e-30) + on * reg * r, rec

  def body(carry, step):
    p, st = carry
    (_, rec), g = jax.value_and_grad(total, has_aux=True)(p, step)
    u, st = opt.update(g, st, p)
    return (optax.apply_updates(p, u), st), rec

  (p, _), losses = jax.lax.scan(body, (params, opt.init(params)),
                                jnp.arange(iters))
  return p, losses


# -- the per-layer transform -------------------------------------------------

@rules_lib.options
class ReconstructOptions(rules_lib.Options):
  """Learned rounding / clipping per layer (see module doc)."""

  transform: ClassVar[str] = "reconstruct"
  bits: int = option(4, "integer bits (symmetric)")
  group_size: int | None = option(
      None, "inputs per scale (None: per output channel)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  method: Literal[METHODS] = option(
      "lwc+adaround", "adaround: learned rounding; lwc: learned clipping "
      "(OmniQuant); lwc+adaround: clipping, then rounding")
  iters: int = option(2000, "optimizer steps per phase",
                      check=lambda n: n >= 1, must="be >= 1")
  lr: float = option(1e-2, "AdaRound learning rate (Adam)",
                     **rules_lib.interval(0, lo_open=True))
  lwc_lr: float = option(5e-3, "clipping learning rate",
                         **rules_lib.interval(0, lo_open=True))
  reg: float = option(10.0, "AdaRound regularizer weight lambda (on the "
                      "mean over weights, the error relative to the start's)",
                      **rules_lib.interval(0))
  warmup: float = option(0.2, "fraction of AdaRound steps without the "
                         "regularizer", **rules_lib.interval(0, 1,
                                                             hi_open=True))


def _start_qarray(path: str, w, cfg, init: Mapping[str, Any]) -> QArray:
  """The QArray to start from: the init tree's, else RTN of w."""
  qa = init.get(path)
  if qa is None:
    qa = quantize_array(w, cfg["bits"], group_size=cfg["group_size"],
                        path=path)
  if not isinstance(qa, QArray) or isinstance(qa.scale, CompressedLeaf):
    raise CompressionError(
        f"reconstruction starts from a QArray with plain scales, the init "
        f"tree has a {type(qa).__name__} here; start from RTN or GPTQ", path)
  if tuple(qa.shape) != tuple(np.shape(w)):
    raise CompressionError(f"init has shape {tuple(qa.shape)}, the param "
                           f"{tuple(np.shape(w))}", path)
  if not isinstance(qa.fmt, IntFormat) or qa.zero is not None:
    raise CompressionError(
        f"learned rounding / clipping works on symmetric integer grids, "
        f"this start is {getattr(qa.fmt, 'name', qa.fmt)}"
        f"{' with a zero point' if qa.zero is not None else ''}; start from "
        "a symmetric int QArray", path)
  return qa


def _check_cfg(path, leaf, cfg):
  if isinstance(leaf, CompressedLeaf):
    raise CompressionError(
        f"param is already a {type(leaf).__name__}; reconstruction starts "
        "from the float kernel (pass a PTQ result as init=)", path)
  check_quant_config(path, leaf.shape, dict(bits=cfg["bits"],
                                            group_size=cfg["group_size"]))
  if cfg["method"] not in METHODS:
    raise CompressionError(f"method {cfg['method']!r}: use one of {METHODS}",
                           path)


def reconstruct_layer(w, gram, count, start: QArray, *, method: str,
                      iters: int, lr: float, lwc_lr: float, reg: float,
                      warmup: float) -> tuple[QArray, dict]:
  """One kernel: learns its rounding / clipping to minimize
  ||X (W - W~)||^2 / N given X^T X (`gram`) over N (`count`) inputs."""
  k = _kernel(w, start)
  h = jnp.asarray(gram, jnp.float32)
  n = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
  facts = {"start_error": float(_layer_err({"k": {}}, 0, ({"k": k}, h, n)))}
  learned: dict = {}
  for phase in _phases(method):
    if learned:
      k = _fold({"k": k}, {"k": learned})["k"]
    out, losses = _optimize(
        _phase_params({"k": k}, phase), ({"k": k}, h, n),
        loss_fn=_layer_err, iters=iters,
        lr=lr if phase == "adaround" else lwc_lr, reg=reg, warmup=warmup,
        adaround=phase == "adaround")
    learned = out["k"]
  qa = export_kernel(k, learned)
  d = k.w - qa.matrix()
  facts["error"] = float(jnp.sum(d * jnp.matmul(h, d, precision=_HP)) / n)
  return qa, facts


def _layer_err(p, i, data):
  """||X (W - W~)||_F^2 / N from H = X^T X (K x K); kernels in `data[0]`."""
  del i
  ks, h, n = data
  total = 0.0
  for path, k in ks.items():
    d = k.w - soft_weight(k, p[path])
    total = total + jnp.sum(d * jnp.matmul(h, d, precision=_HP)) / n
  return total


@transform_lib.builder(ReconstructOptions, positional=("bits",))
def reconstruct(stats: Mapping[str, LayerStats], *, init: Any = None,
                options, rules, default) -> transform_lib.Transform:
  """Per-layer learned rounding / clipping from calibration statistics
  (`compressjax.calibrate.capture`): each selected kernel becomes the QArray
  that minimizes its output error on the captured inputs. `init`: a PTQ tree
  (e.g. GPTQ's) whose QArrays give the starting scales; RTN otherwise."""
  start = {} if init is None else dict(leaves_with_paths(init))

  def check(path, leaf, cfg):
    _check_cfg(path, leaf, cfg)
    if path not in stats:
      raise CompressionError(
          "no calibration statistics for this param (was it used by a "
          "matmul during capture?); skip it with a rule", path)

  def leaf_fn(path, leaf, cfg, state):
    st = stats[path]
    qa = _start_qarray(path, leaf, cfg, start)
    out, _ = reconstruct_layer(
        leaf, st.gram, st.count, qa, method=cfg["method"],
        iters=cfg["iters"], lr=cfg["lr"], lwc_lr=cfg["lwc_lr"],
        reg=cfg["reg"], warmup=cfg["warmup"])
    return dataclasses.replace(out, dtype=jnp.dtype(leaf.dtype).name)

  return transform_lib.leaf_transform("reconstruct", options, leaf_fn, check,
                                      rules, default)


# -- the per-block objective ---------------------------------------------------

def sown_outputs(model: Any, name: str = "hidden") -> Callable:
  """`outputs(tree, x) -> {module path: array}` for a linen model: what each
  module sows as intermediates `name`, plus the model output under ''."""

  def outputs(tree, x):
    y, state = model.apply(tree, x, mutable=["intermediates"])
    out = {"": y}

    def walk(node, prefix):
      for key, val in node.items():
        if key == name and isinstance(val, tuple):
          out[prefix] = val[-1]
        elif isinstance(val, Mapping):
          walk(val, f"{prefix}/{key}" if prefix else key)
    walk(state.get("intermediates", {}), "")
    return out

  return outputs


def _put(tree, path: str, value):
  """Copy of nested-dict `tree` with the leaf at `path` replaced."""
  parts = path.split("/")

  def rec(node, i):
    new = dict(node)
    new[parts[i]] = value if i == len(parts) - 1 else rec(node[parts[i]],
                                                          i + 1)
    return new
  return rec(tree, 0)


def reconstruct_blocks(model: Any, params: Any, batches: Iterable[Any], *,
                       bits: int = 4, group_size: int | None = None,
                       method: str = "lwc+adaround", iters: int = 300,
                       lr: float = 1e-2, lwc_lr: float = 5e-3,
                       reg: float = 10.0, warmup: float = 0.2,
                       init: Any = None, rules=None,
                       default=default_filter, sown: str = "hidden",
                       outputs: Callable | None = None,
                       progress: bool | Callable[[str], None] = True) -> Any:
  """BRECQ-style block reconstruction (see module doc): stage by stage in
  execution order, the stage's kernels learned together against the float
  model's stage output. `outputs(tree, x) -> {stage prefix or '': array}`
  defaults to `sown_outputs(model, sown)` (linen). Returns params with
  QArrays for the selected kernels (rules/default select them, options per
  rule: bits, group_size)."""
  log = (progress if callable(progress) else print if progress
         else (lambda s: None))
  if method not in METHODS:
    raise CompressionError(f"reconstruct_blocks: method {method!r}: use one "
                           f"of {METHODS}")
  batches = list(batches)
  if not batches:
    raise CompressionError("reconstruct_blocks got no calibration batches")
  outputs = outputs or sown_outputs(model, sown)
  plan = resolve(params, dict(bits=bits, group_size=group_size), rules,
                 default, transform="reconstruct_blocks")
  for path, leaf in leaves_with_paths(params):
    if path in plan:
      cfg = dict(plan.configs[path], method=method)
      _check_cfg(path, leaf, cfg)
  order = execution_order(model, params, batches[0], plan.configs)
  stages = stages_of(order)
  start = {} if init is None else dict(leaves_with_paths(init))
  float_out = jax.jit(outputs)
  targets = [float_out(params, x) for x in batches]
  xs = jnp.stack([jnp.asarray(x) for x in batches])
  tree = params  # float where not yet quantized, QArray where done
  for si, (prefix, paths) in enumerate(stages):
    t0 = time.time()
    key = prefix.split("/", 1)[1] if "/" in prefix else prefix
    if key not in targets[0]:
      key = ""  # no sown output: the model's output
    tgt = jnp.stack([t[key] for t in targets]).astype(jnp.float32)
    leaves = dict(leaves_with_paths(tree))
    kernels = {p: _kernel(leaves[p], _start_qarray(p, leaves[p],
                                                   plan.configs[p], start))
               for p in paths}
    dense = materialize_tree(tree)  # earlier stages: exact float values
    dtypes = {p: leaves[p].dtype for p in paths}

    def err(p, i, data, key=key, dtypes=dtypes):
      ks, t, xs, tgt = data
      for path, k in ks.items():
        t = _put(t, path, k.start.layout.from_matrix(
            soft_weight(k, p[path])).astype(dtypes[path]))
      y = outputs(t, xs[i])[key].astype(jnp.float32)
      d = y - tgt[i]
      return jnp.mean(jnp.sum(d.reshape(-1, d.shape[-1]) ** 2, -1))

    learned: dict = {}
    first = last = None
    for phase in _phases(method):
      if learned:
        kernels = _fold(kernels, learned)
      out, losses = _optimize(
          _phase_params(kernels, phase), (kernels, dense, xs, tgt),
          loss_fn=err, iters=iters,
          lr=lr if phase == "adaround" else lwc_lr, reg=reg, warmup=warmup,
          adaround=phase == "adaround", n_batches=len(batches))
      learned = out
      first = float(losses[0]) if first is None else first
      last = float(losses[-1])
    for p, k in kernels.items():
      qa = export_kernel(k, learned[p])
      tree = _put(tree, p, dataclasses.replace(
          qa, dtype=jnp.dtype(leaves[p].dtype).name))
    log(f"stage {si + 1}/{len(stages)} {prefix}: {len(paths)} kernels, "
        f"loss {first:.4g} -> {last:.4g} ({time.time() - t0:.1f}s)")
  return tree


__all__ = ["METHODS", "ReconstructOptions", "export_kernel", "reconstruct",
           "reconstruct_blocks", "reconstruct_layer", "soft_weight",
           "sown_outputs"]
