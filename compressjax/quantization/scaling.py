"""Per-input-channel scale groups and their folding (AWQ, SmoothQuant).

AWQ (Lin et al. 2023, Sec. 3.2) and SmoothQuant (Xiao et al. 2022, Sec. 4)
both rewrite a linear layer as an equivalent pair

    y = x @ W = (x / s) @ (diag(s) W)                    s > 0, shape (K,)

and then quantize diag(s) W (and, for SmoothQuant, x / s). The division x / s
costs nothing when the op that produces x is linear per channel, so 1/s can be
folded into it:
  "norm"    LayerNorm / RMSNorm: y = gamma * xhat + beta, so gamma /= s and
            beta /= s;
  "linear"  a Dense whose output columns feed the consumers (in attention,
            the value projection feeding the output projection: attention
            mixes tokens, not channels, so it commutes with diag(1/s)):
            kernel[:, j] /= s_j and bias[j] /= s_j.
Both are "divide the producer params along their last axis by s". All the
consumers of one input must share s, hence a `ScaleGroup` lists them together.
With no producer (e.g. fc2 after gelu) the division stays explicit: the
consumer becomes `InputTransform(weight=diag(s) W, scale=1/s)`.

Multi-axis kernels (linen DenseGeneral, nnx.Einsum: an in-projection
(d, heads, head_dim) contracting (0,), an out-projection (heads, head_dim, d)
contracting (0, 1)): x @ W is then x's contracted axes against the kernel's,
K = their product. The scale is per element of the contracted shape, s (K,)
flattened in the kernel's contraction order, and everything above happens on
the kernel's (K, N) view (`LayerStats.view`, the view GPTQ and Wanda use; the
contraction comes from the calibration statistics, else
`core.contraction.default_contract`). The producer's trailing axes must be
that contracted shape (a value projection (d, heads, head_dim) and its bias
(heads, head_dim) feeding an out-projection (heads, head_dim, d)), or one
axis of K channels that the model reshapes row-major into it; s is divided
out reshaped to them. (A model that permutes the channels between producer
and consumer needs producer=None.) The explicit InputTransform keeps the
kernel's contraction.

`apply_scales` does this on a float tree; it is exact up to float rounding.
`scale_transform` is the skeleton of both algorithms (plan, per-group scale,
fold, quantize the consumers); each supplies its scale and its quantizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core.base import CompressedLeaf, is_concrete
from compressjax.core.contraction import MatrixLayout, default_contract
from compressjax.core.errors import CompressionError
from compressjax.core.input_transform import InputTransform
from compressjax.core.tree import (is_float_array, leaves_with_paths,
                                   map_with_paths)

PRODUCERS = ("norm", "linear", None)


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
  """Consumer kernels (K, N_i) that share one input, and what produces it.

  Attributes:
    consumers: param paths of the kernels that multiply the shared input.
    producer: "norm", "linear" or None (not foldable: explicit input scale).
    producer_params: paths of the producer's params whose trailing axes are
      the consumers' contracted input channels (norm scale and bias; linear
      kernel and bias), see the module doc.
  """

  consumers: tuple[str, ...]
  producer: str | None = None
  producer_params: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "consumers", tuple(self.consumers))
    object.__setattr__(self, "producer_params", tuple(self.producer_params))
    if not self.consumers:
      raise CompressionError("a ScaleGroup needs at least one consumer")
    if self.producer not in PRODUCERS:
      raise CompressionError(f"ScaleGroup producer {self.producer!r} is not "
                             f"one of {PRODUCERS}", self.consumers[0])
    if (self.producer is None) != (not self.producer_params):
      raise CompressionError(
          "a ScaleGroup with a producer needs its producer_params (and one "
          "without a producer must not list any)", self.consumers[0])

  @property
  def foldable(self) -> bool:
    return self.producer is not None


def _float_kernel(path: str, leaf: Any, transform: str):
  if isinstance(leaf, CompressedLeaf) or not is_float_array(leaf):
    raise CompressionError(
        f"{transform} needs a float kernel, got "
        f"{type(leaf).__name__}; apply it to the float model first (before "
        "other compression), or skip this param with a rule", path)
  if leaf.ndim < 2:
    raise CompressionError(f"{transform} needs a kernel of rank >= 2 (in, "
                           f"out...), got shape {tuple(leaf.shape)}; skip it "
                           "with a rule", path)


Contracts = Mapping[str, Sequence[int]]


def consumer_layout(path: str, leaf: Any,
                    contracts: Contracts | None = None) -> MatrixLayout:
  """The (K, N) view of a consumer kernel: over its statistics' contraction
  (`contracts[path]`, e.g. {p: stats[p].contract}), else the default."""
  c = (contracts or {}).get(path)
  shape = tuple(leaf.shape)
  return MatrixLayout(shape, tuple(c) if c is not None
                      else default_contract(shape))


def producer_channels(shape, lay: MatrixLayout) -> tuple[int, ...] | None:
  """The trailing axes of a producer param of `shape` that hold the
  consumers' K input channels: the contracted shape itself, or one axis of
  K (reshaped row-major into it); None when neither."""
  shape, cin = tuple(shape), lay.in_shape
  if len(shape) >= len(cin) and shape[len(shape) - len(cin):] == cin:
    return cin
  if shape and shape[-1] == lay.k:
    return (lay.k,)
  return None


def plan_groups(params: Any, groups: Sequence[ScaleGroup] | None,
                selected: Collection[str], *,
                transform: str = "scaling",
                contracts: Contracts | None = None) -> tuple[ScaleGroup, ...]:
  """Checks `groups` against the tree and completes them.

  Groups with no selected consumer are dropped; an explicit (producer None)
  group keeps only its selected consumers; every selected path outside all
  groups becomes its own explicit group (works on any model). `contracts`
  ({path: contraction axes}, from the statistics) give the consumers' (K, N)
  views (`consumer_layout`).
  """
  leaves = dict(leaves_with_paths(params))
  in_group: dict[str, int] = {}
  produced: dict[str, int] = {}
  out = []
  for i, g in enumerate(groups or ()):
    if not isinstance(g, ScaleGroup):
      raise CompressionError(f"{transform}: groups must be ScaleGroup "
                             f"objects, got {type(g).__name__}")
    for p in g.consumers + g.producer_params:
      if p not in leaves:
        raise CompressionError(f"{transform}: scale group param not found in "
                               "the tree; check the path prefix (e.g. "
                               "'params/')", p)
    for c in g.consumers:
      if c in in_group:
        raise CompressionError(f"{transform}: param is a consumer in two "
                               "scale groups", c)
      in_group[c] = i
    for p in g.producer_params:
      if p in produced:  # its consumers would see x / (s1 s2)
        raise CompressionError(f"{transform}: param is the producer of two "
                               "scale groups", p)
      produced[p] = i
    sel = tuple(c for c in g.consumers if c in selected)
    if not sel:
      continue
    if not g.foldable:
      g = dataclasses.replace(g, consumers=sel)
    for c in g.consumers:
      _float_kernel(c, leaves[c], transform)
    c0 = g.consumers[0]
    lay = consumer_layout(c0, leaves[c0], contracts)
    for c in g.consumers:
      lc = consumer_layout(c, leaves[c], contracts)
      if lc.in_shape != lay.in_shape:
        raise CompressionError(
            f"{transform}: consumers of one scale group multiply one input, "
            f"so their contracted shapes must agree: {lay.in_shape} (axes "
            f"{lay.contract} of {c0}), got {lc.in_shape} (axes "
            f"{lc.contract} of shape {lc.shape}); put kernels that multiply "
            "different inputs in different groups", c)
    for p in g.producer_params:
      leaf = leaves[p]
      ok = not isinstance(leaf, CompressedLeaf) and is_float_array(leaf)
      ch = producer_channels(leaf.shape, lay) if ok else None
      if ch is None or (g.producer == "norm" and leaf.ndim != len(ch)):
        raise CompressionError(
            f"{transform}: the {g.producer} producer param's output must "
            f"match the contracted shape {lay.in_shape} (K = {lay.k}) of "
            f"{c0} (shape {lay.shape}, contracted axes {lay.contract}): "
            f"a float array whose trailing axes are {lay.in_shape} or one "
            f"axis of {lay.k}"
            f"{' and nothing else' if g.producer == 'norm' else ''}, got "
            f"{type(leaf).__name__} of shape {getattr(leaf, 'shape', None)}; "
            "name the params of the op whose output these kernels contract, "
            "or give producer=None (an explicit input scale)", p)
    out.append(g)
  for path, leaf in leaves_with_paths(params):
    if path in selected and path not in in_group:
      _float_kernel(path, leaf, transform)
      out.append(ScaleGroup((path,)))
  return tuple(out)


def apply_scales(params: Any, groups: Sequence[ScaleGroup],
                 scales: Sequence[Any], *, fold: bool = True,
                 contracts: Contracts | None = None) -> Any:
  """Rewrites x @ W as (x / s) @ (diag(s) W) for every group (float, exact).

  `scales[i]` (shape (K,), positive; None leaves the group alone) belongs to
  `groups[i]`. Foldable groups (with fold=True) divide the producer params by
  s along their trailing channel axes (`producer_channels`) and scale the
  rows of the consumers' (K, N) views (`consumer_layout`, with `contracts`
  as in `plan_groups`); the others turn each consumer into
  InputTransform(weight=diag(s) W, scale=1/s) with its contraction.
  """
  leaves = dict(leaves_with_paths(params))
  div: dict[str, Any] = {}
  mul: dict[str, tuple[Any, bool]] = {}
  for g, s in zip(groups, scales):
    if s is None:
      continue
    s = jnp.asarray(s, jnp.float32)
    # checked on the host: no per-op compilation for a tree's worth of groups
    if s.ndim != 1 or (is_concrete(s) and not np.all(
        np.isfinite(sh := np.asarray(s)) & (sh > 0))):
      raise CompressionError(f"scales must be finite, positive and 1-D, got "
                             f"shape {s.shape}", g.consumers[0])
    explicit = not (fold and g.foldable)
    c0 = g.consumers[0]
    lay = consumer_layout(c0, leaves[c0], contracts)
    if not explicit:
      for p in g.producer_params:
        ch = producer_channels(leaves[p].shape, lay)
        if ch is None or math.prod(ch) != s.shape[0]:
          raise CompressionError(
              f"producer param of shape {tuple(leaves[p].shape)} does not end "
              f"in the {c0}'s contracted shape {lay.in_shape} (or one axis "
              f"of {lay.k}) that a scale of {s.shape[0]} channels divides; "
              "check the ScaleGroup (plan_groups checks it)", p)
        div[p] = s.reshape(ch)
    for c in g.consumers:
      mul[c] = (s, explicit)

  def one(path, x):
    if path in div:
      x = _div_trailing(x, div[path])
    if path in mul:
      s, explicit = mul[path]
      lay = consumer_layout(path, x, contracts)
      if lay.k != s.shape[0]:
        raise CompressionError(
            f"scale of {s.shape[0]} channels does not match the {lay.k} "
            f"contracted inputs (axes {lay.contract} of shape "
            f"{tuple(x.shape)})", path)
      w = _mul_rows(x, s, lay=lay)
      if explicit:
        t = InputTransform(weight=w, scale=_inv(s), signs=None, block=0,
                           act=None, shape=tuple(x.shape),
                           dtype=jnp.dtype(x.dtype).name,
                           contract=lay.contract)
        t.validate()
        return t
      return w
    return x

  return map_with_paths(one, params)


# Jitted so a tree's worth of them compiles once per shape, not per op.
@jax.jit
def _div_trailing(x, s):
  return (x.astype(jnp.float32) / s).astype(x.dtype)  # s: x's trailing axes


@functools.partial(jax.jit, static_argnames="lay")
def _mul_rows(x, s, *, lay: MatrixLayout):
  """diag(s) on the rows of x's (K, N) view."""
  w = lay.to_matrix(x.astype(jnp.float32)) * s[:, None]
  return lay.from_matrix(w).astype(x.dtype)


@jax.jit
def _inv(s):
  return 1.0 / s


def consumer_weight(leaf: Any):
  """The (scaled) float kernel of a consumer after `apply_scales`."""
  return leaf.weight if isinstance(leaf, InputTransform) else leaf


def with_weight(leaf: Any, weight: Any, *, act: str | None = None):
  """Replaces a consumer's kernel by `weight` (keeping an explicit scale);
  wraps it in an InputTransform when run-time activation quantization `act`
  is asked for."""
  if isinstance(leaf, InputTransform):
    return dataclasses.replace(leaf, weight=weight, act=act)
  if act is None:
    return weight
  return InputTransform(weight=weight, scale=None, signs=None, block=0,
                        act=act, shape=tuple(leaf.shape),
                        dtype=jnp.dtype(leaf.dtype).name,
                        contract=getattr(weight, "contract", None))


def gram_of_scaled(gram, s):
  """Gram of x / s: diag(1/s) G diag(1/s)."""
  inv = 1.0 / jnp.asarray(s, jnp.float32)
  return jnp.asarray(gram, jnp.float32) * inv[:, None] * inv[None, :]


def check_stats(path: str, stats: Any, k: int):
  if stats is None or path not in stats:
    raise CompressionError("no calibration statistics for this param; "
                           "capture with the same rules (or skip it)", path)
  st = stats[path]
  if np.shape(st.abs_sum) != (k,):
    raise CompressionError(
        f"statistics have {np.shape(st.abs_sum)} input features but the "
        f"kernel has {k}; calibrate this param's own matmul", path)
  return st


def scale_transform(name: str, stats: Any, groups: Sequence[ScaleGroup] | None,
                    *, options: Any, rules: Any, default: Any, agree: str,
                    check_cfg: Callable[[str, tuple, tuple, Mapping], None],
                    group_scale: Callable[..., Any],
                    finish: Callable[..., Any]):
  """The transform AWQ and SmoothQuant both are: for each scale group one
  per-input-channel scale s (Lin et al. 2023, eq. 4-5; Xiao et al. 2022,
  eq. 4), folded into the group's producer or explicit (`apply_scales`),
  then each selected consumer's scaled kernel quantized. Consumers are seen
  through their statistics' contraction (`LayerStats.view`: (K, N)).

    group_scale(group, selected, mats, configs, stats, agreed) -> s (K,)
        `mats`: the (K, N) views of the group's consumers, by path;
        `selected`: the group's consumers the rules select; `agreed`: the
        option `agree` names (e.g. n_grid, alpha), which they must share
    finish(path, leaf, cfg, stats, s) -> the consumer's new leaf, from its
        leaf after `apply_scales` (a kernel, or an InputTransform), of its
        statistics' contraction `stats.contract`

  `check_cfg(path, shape, contract, cfg)` checks each selected consumer's
  options when the transform is initialized (with its statistics).
  """
  from compressjax.core import transform as transform_lib  # no import cycle
  from compressjax.core.rules import resolve

  def contracts(params):
    return {p: tuple(stats[p].contract) for p, _ in leaves_with_paths(params)
            if stats is not None and p in stats}

  def k_of(path, leaf, cs):
    return consumer_layout(path, leaf, cs).k

  def init(params):
    plan = resolve(params, options, rules, default, transform=name)
    cs = contracts(params)
    gs = plan_groups(params, groups, plan.configs, transform=name,
                     contracts=cs)
    leaves = dict(leaves_with_paths(params))
    for g in gs:
      for c in g.consumers:
        if c in plan:
          check_stats(c, stats, k_of(c, leaves[c], cs))
          check_cfg(c, leaves[c].shape, cs[c], plan.configs[c])
    return transform_lib.LeafState(plan, dict(groups=gs))

  def update(params, state):
    plan = state.plan
    cs = contracts(params)
    gs = plan_groups(params, state.extra["groups"], plan.configs,
                     transform=name, contracts=cs)
    leaves = dict(leaves_with_paths(params))
    scales = []
    for g in gs:
      sel = [c for c in g.consumers if c in plan]
      vals = {plan.configs[c][agree] for c in sel}
      if len(vals) > 1:
        raise CompressionError(f"{name}: consumers of one scale group need "
                               f"the same {agree}, got {sorted(vals)}", sel[0])
      st = check_stats(sel[0], stats, k_of(sel[0], leaves[sel[0]], cs))
      mats = {c: consumer_layout(c, leaves[c], cs).to_matrix(leaves[c])
              for c in g.consumers}
      scales.append(group_scale(g, sel, mats, plan.configs, st,
                                vals.pop()))
    out = apply_scales(params, gs, scales, contracts=cs)
    new = dict(leaves_with_paths(out))
    for g, s in zip(gs, scales):
      for c in g.consumers:
        if c in plan:
          st = check_stats(c, stats, k_of(c, leaves[c], cs))
          new[c] = finish(c, new[c], plan.configs[c], st, s)
          new[c].validate()
    return map_with_paths(lambda p, x: new.get(p, x), out), state

  return transform_lib.Transform(init, update)
