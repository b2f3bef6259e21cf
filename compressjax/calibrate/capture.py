"""Calibration capture: per-layer input statistics from an unmodified model.

`capture(model, params, batches)` runs the model (linen, NNX or a function)
through `compressjax.runtime` with an observer on every matmul (dot_general:
Dense, DenseGeneral, Einsum, Linear) and convolution whose weight is a
selected param, and accumulates, batch by batch and in float32, over the rows
X (tokens x K) of that param's input in its 2-D view:
  gram     X^T X        (K x K)      GPTQ / SparseGPT Hessians, SVD-LLM whitening
  abs_sum  sum |x_j|    (K,)         AWQ / ASVD activation scales
  sq_sum   sum x_j^2    (K,)         Wanda's ||X_j||_2
  abs_max  max |x_j|    (K,)         SmoothQuant
  count    number of tokens (rows of X)
Memory is bounded by the statistics, not the activations; each batch's step is
one jit-compiled call. A param used by several matmuls accumulates them all.

The 2-D view (`LayerStats.contract`): the kernel axes the op contracts, in
increasing order, flattened row-major, are K; the other axes are outputs. A
matmul's contraction comes from its dimension numbers (a DenseGeneral out-
projection (heads, head_dim, d) contracts (0, 1)); a convolution contracts the
kernel's input-feature and spatial axes, and its rows are the input's patches
(im2col, `jax.lax.conv_general_dilated_patches`), one per output position.

Batches: an array, or a tuple of the model's positional args; a
`data.text.TokenBatch` (ids and attention mask: the mask goes to the model as
`attention_mask=` when its signature takes one, and weights the statistics);
a `Batch(args, kwargs, weights)`; or a whole `data.text.Calibration`. Token
weights (a mask: 1 real, 0 padding; or any non-negative weights) have the
shape of the tokens, the leading axes of every observed input (B, T): a row
of X with weight w counts w times in gram, abs_sum, sq_sum and count, and
enters abs_max when w > 0, so padding never enters the statistics. Inputs
whose leading axes are the batch only (a pooled (B, d) head) take all rows.

The returned `Stats` is the {path: LayerStats} dict plus `description`: what
the calibration data was (the `Calibration`'s description, or the batches'
shapes; tokens counted and padding left out), logged, for results to record.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from compressjax.core.contraction import MatrixLayout
from compressjax.core.errors import CompressionError
from compressjax.core.rules import (Predicate, RulesLike, default_filter,
                                    resolve)
from compressjax.core.tree import leaves_with_paths
from compressjax.runtime.dispatch import matrix_operand
from compressjax.runtime.interpret import apply, as_function


@struct.dataclass
class LayerStats:
  gram: jax.Array
  abs_sum: jax.Array
  sq_sum: jax.Array
  abs_max: jax.Array
  count: jax.Array
  # kernel axes the op contracts (increasing): the rows of the 2-D view
  contract: tuple[int, ...] = struct.field(pytree_node=False, default=(0,))

  def __add__(self, o: "LayerStats") -> "LayerStats":
    return LayerStats(self.gram + o.gram, self.abs_sum + o.abs_sum,
                      self.sq_sum + o.sq_sum,
                      jnp.maximum(self.abs_max, o.abs_max),
                      self.count + o.count, self.contract)

  def view(self, shape) -> MatrixLayout:
    """The 2-D view (K, N) of a kernel of `shape` these statistics are of."""
    return MatrixLayout(tuple(shape), tuple(self.contract))

  @property
  def hessian(self):
    """GPTQ's H = (2 / N) X^T X."""
    return 2.0 * self.gram / jnp.maximum(self.count, 1)

  @property
  def mean_abs(self):
    return self.abs_sum / jnp.maximum(self.count, 1)

  @property
  def norm(self):
    """Per-input-feature L2 norm over all tokens (Wanda)."""
    return jnp.sqrt(self.sq_sum)


class Stats(dict):
  """{param path: LayerStats}, with `description`: the calibration data's
  (a JSON-able dict; see the module doc)."""

  def __init__(self, layers: Mapping[str, LayerStats], description: dict):
    super().__init__(layers)
    self.description = dict(description)


jax.tree_util.register_pytree_with_keys(
    Stats,
    lambda s: ([(jax.tree_util.DictKey(k), s[k]) for k in sorted(s)],
               (tuple(sorted(s)), json.dumps(s.description, sort_keys=True,
                                             default=str))),
    lambda aux, xs: Stats(dict(zip(aux[0], xs)), json.loads(aux[1])))


class Batch(NamedTuple):
  """One calibration batch: the model's positional `args`, keyword `kwargs`,
  and optional token `weights` (the shape of the tokens, e.g. (B, T); see the
  module doc)."""

  args: tuple
  kwargs: Mapping[str, Any] = {}
  weights: Any = None


class _ObserverError(CompressionError):
  """Raised by the observer itself: passes through with its own message."""


def _contraction(x, dims, path):
  """x rearranged to (*tokens, K) by a dot_general's dimension numbers whose
  right operand is the param; and the param's contraction axes."""
  (lc, rc), (lb, rb) = dims
  if lb or rb:
    raise _ObserverError(
        f"calibration: this param is an operand of a batched matmul "
        f"(dimension numbers {dims}), so its inputs have no single 2-D "
        "view; skip it with a rule", path)
  contract = tuple(sorted(rc))
  return matrix_operand(x, contract, dims)[0], contract


def _patches(x, p, kernel_shape, path):
  """A convolution's input as rows of patches (*batch, *out spatial, K),
  K ordered as the kernel's contracted axes (increasing); and those axes."""
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise _ObserverError(
        "calibration: grouped or depthwise convolution (feature_group_count "
        f"{p['feature_group_count']}, batch_group_count "
        f"{p['batch_group_count']}): each output sees other inputs, so there "
        "is no single 2-D view; skip it with a rule", path)
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  ks = tuple(kernel_shape[a] for a in rhs_spec[2:])
  pt = jax.lax.conv_general_dilated_patches(
      x, ks, p["window_strides"], p["padding"], p["lhs_dilation"],
      p["rhs_dilation"], dn, precision=jax.lax.Precision.HIGHEST)
  # patch features are (in feature, *spatial) row-major, the kernel's axes
  # rhs_spec[1], rhs_spec[2:]: reorder to increasing kernel axis
  c = x.shape[lhs_spec[1]]
  axes = (rhs_spec[1],) + tuple(rhs_spec[2:])
  lead = [a for a in out_spec if a != out_spec[1]]
  pt = jnp.transpose(pt, lead + [out_spec[1]])
  pt = pt.reshape(pt.shape[:-1] + (c,) + ks)
  n = len(lead)
  order = sorted(range(len(axes)), key=lambda i: axes[i])
  pt = jnp.transpose(pt, tuple(range(n)) + tuple(n + i for i in order))
  return pt.reshape(pt.shape[:n] + (-1,)), tuple(sorted(axes))


def _row_weights(lead: tuple, weights, path):
  """Per-row weights (N,) for an input whose leading (token) axes are
  `lead`, from token weights of shape W."""
  if weights is None:
    return None
  ws = tuple(weights.shape)
  n = int(np.prod(lead))
  if tuple(lead[:len(ws)]) == ws:  # tokens first, maybe more axes after
    w = weights.reshape(ws + (1,) * (len(lead) - len(ws)))
    return jnp.broadcast_to(w, lead).reshape(-1)
  if n == int(np.prod(ws)):  # the tokens, flattened
    return weights.reshape(-1)
  if tuple(lead) == ws[:1]:  # one row per sequence (pooled): all count
    return None
  raise _ObserverError(
      f"calibration: token weights (an attention mask) of shape {ws} do not "
      f"align with this param's input rows (leading axes {tuple(lead)}); "
      "pass weights of that shape (calibrate.Batch), drop the mask, or skip "
      "the param with a rule", path)


def _stats(x, weights, contract) -> LayerStats:
  xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  ax = jnp.abs(xf)
  if weights is None:
    return LayerStats(gram=jnp.matmul(xf.T, xf, precision=hp),
                      abs_sum=ax.sum(0), sq_sum=(xf * xf).sum(0),
                      abs_max=ax.max(0),
                      count=jnp.asarray(xf.shape[0], jnp.float32),
                      contract=contract)
  w = weights.astype(jnp.float32)
  return LayerStats(gram=jnp.matmul((xf * w[:, None]).T, xf, precision=hp),
                    abs_sum=w @ ax, sq_sum=w @ (xf * xf),
                    abs_max=jnp.max(jnp.where(w[:, None] > 0, ax, 0.), 0),
                    count=jnp.sum(w), contract=contract)


def observer(weights, shapes: Mapping[str, tuple]) -> tuple[dict, Callable]:
  """(found, observe): `observe` (for `runtime.apply`) adds each observed
  input's statistics, weighted by the token `weights` (or None), to
  `found` {path: LayerStats}; `shapes`: the observed params' shapes."""
  found: dict[str, LayerStats] = {}

  def observe(path, x, dims):
    if isinstance(dims, Mapping):  # a convolution's params
      rows, contract = _patches(x, dims, shapes[path], path)
    else:
      rows, contract = _contraction(x, dims, path)
    s = _stats(rows, _row_weights(rows.shape[:-1], weights, path), contract)
    if path in found:
      if found[path].contract != contract:
        raise _ObserverError(
            f"calibration: this param is contracted over axes "
            f"{found[path].contract} by one op and {contract} by another; "
            "its statistics have no single 2-D view: skip it with a rule",
            path)
      s = found[path] + s
    found[path] = s

  return found, observe


def _finite(s: LayerStats) -> jax.Array:
  return (jnp.all(jnp.isfinite(s.gram)) & jnp.all(jnp.isfinite(s.abs_sum))
          & jnp.all(jnp.isfinite(s.abs_max)))


@jax.jit
def _merge(total, s, first_bad, i):
  """total + s; first_bad[j] = the first batch whose stats of layer j (in
  sorted path order) are not finite (-1: none yet). One dispatch a batch."""
  ok = jnp.stack([_finite(s[p]) for p in sorted(s)])
  first_bad = jnp.where((first_bad < 0) & ~ok, i, first_bad)
  total = jax.tree.map(lambda a, b: a + b, total, s,
                       is_leaf=lambda x: isinstance(x, LayerStats))
  return total, first_bad


class Accumulator:
  """Sums per-batch {path: LayerStats} (one jitted merge a batch) and, at the
  end, names the first batch and layer with non-finite statistics."""

  def __init__(self):
    self.total: dict[str, LayerStats] | None = None
    self.first_bad = None

  def add(self, i: int, s: Mapping[str, LayerStats]) -> None:
    s = dict(s)
    if self.total is None:
      self.total = jax.tree.map(jnp.zeros_like, s)
      self.first_bad = jnp.full((len(s),), -1, jnp.int32)
    self.total, self.first_bad = _merge(self.total, s, self.first_bad, i)

  def result(self, order: Iterable[str] = ()) -> dict[str, LayerStats]:
    """The sums; `order`: the selected paths, to name the first bad one."""
    if self.total is None:
      raise CompressionError("capture got no batches")
    bad = np.asarray(self.first_bad)
    if (bad >= 0).any():
      names = sorted(self.total)
      b = int(bad[bad >= 0].min())
      hit = [p for p in list(order) + names
             if p in self.total and bad[names.index(p)] == b]
      raise CompressionError(
          f"calibration batch {b} (0-based) gives non-finite statistics (NaN "
          f"or Inf inputs, or X^T X overflowing float32) for "
          f"{len(set(hit))} layer(s), first {hit[0]!r}; fix or drop that "
          "batch (check the data and the float model's activations on it)",
          hit[0])
    return self.total


def _describe_args(args) -> str:
  return ", ".join(
      f"{type(x).__name__}{tuple(x.shape)} {x.dtype}" if hasattr(x, "shape")
      else repr(x) for x in jax.tree.leaves(args))


def takes_mask(model: Any, method: str | Callable | None = None) -> bool:
  """Whether the model's call (or `method`) has an `attention_mask`
  parameter (decoders and encoders of the zoo do; the byte LM does not)."""
  from flax import linen as nn
  from flax import nnx
  fn = model
  if isinstance(model, (nn.Module, nnx.Module)):
    fn = (getattr(model, method) if isinstance(method, str) else method
          if callable(method) else type(model).__call__)
  try:
    return "attention_mask" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _is_token_batch(b) -> bool:
  return hasattr(b, "ids") and hasattr(b, "attention_mask")


def batch_list(batches: Any, mask_kwarg: bool) -> tuple[list[Batch], dict]:
  """The batches as `Batch`es (TokenBatch masks as weights, and passed as
  `attention_mask=` when `mask_kwarg`), and the source's description."""
  desc = {}
  if hasattr(batches, "batches") and hasattr(batches, "description"):
    desc = dict(batches.description)  # a data.text.Calibration
    batches = batches.batches
  if hasattr(batches, "shape") or isinstance(batches, (str, bytes)):
    raise CompressionError(
        f"capture: batches must be an iterable of batches, got a "
        f"{type(batches).__name__}; pass [x] for a single batch")
  out = []
  for i, b in enumerate(batches):
    if _is_token_batch(b):
      mask = jnp.asarray(b.attention_mask)
      out.append(Batch((b.ids,), {"attention_mask": mask} if mask_kwarg
                       else {}, mask))
    elif isinstance(b, Batch):
      out.append(b)
    elif isinstance(b, list):
      raise CompressionError(
          f"calibration batch {i} is a list: pass each batch as an array or a "
          "tuple of model args (a list is ambiguous)")
    else:
      out.append(Batch(b if isinstance(b, tuple) else (b,)))
  return out, desc


def _check_batch(i: int, b: Batch, ref: Any) -> Any:
  """Array leaves only, and the structure and ranks of batch 0."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      (b.args, dict(b.kwargs)), is_leaf=lambda x: x is None)
  if not flat:
    raise CompressionError(f"calibration batch {i} holds no arrays")
  for p, x in flat:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      where = ("keyword " if p[0].idx else "") + jax.tree_util.keystr(p[1:])
      raise CompressionError(
          f"calibration batch {i}: argument {where} is a "
          f"{type(x).__name__} ({x!r:.40}), not an array; batches are "
          "arrays or tuples of arrays (the model's positional args)")
  if b.weights is not None and np.any(np.asarray(b.weights) < 0):
    raise CompressionError(f"calibration batch {i}: token weights must be "
                           ">= 0 (a mask: 1 token, 0 padding)")
  sig = (treedef, tuple(len(x.shape) for _, x in flat),
         b.weights is None)
  if ref is not None and sig != ref:
    raise CompressionError(
        f"calibration batch {i} ({_describe_args(b.args)}) differs in "
        f"structure or rank from batch 0; every batch must be the same kind "
        f"of model input")
  return sig


def describe(batches: Any, *, source: Mapping | None = None) -> dict:
  """What a list of `Batch`es is, for results: the source's description
  (a Calibration's) plus batches, shapes, tokens counted and padding left
  out (from the token weights; else the leading axes of int inputs)."""
  batches = list(batches)
  d = dict(source or {})
  shapes = sorted({tuple(np.shape(b.args[0])) for b in batches
                   if b.args and hasattr(b.args[0], "shape")})
  d.setdefault("kind", "batches")
  d["batches"] = len(batches)
  d.setdefault("shapes", shapes)
  ws = [b.weights for b in batches if b.weights is not None]
  if ws and len(ws) == len(batches):
    total = sum(int(np.size(w)) for w in ws)
    real = float(sum(np.sum(np.asarray(w, np.float64)) for w in ws))
    d["tokens"] = int(real) if real == int(real) else real
    d["padded_tokens"] = total - int((np.concatenate(
        [np.ravel(np.asarray(w)) for w in ws]) > 0).sum())
    d["padding_in_statistics"] = False
  elif "tokens" not in d:
    ints = [b.args[0] for b in batches if b.args and hasattr(
        b.args[0], "dtype") and np.issubdtype(b.args[0].dtype, np.integer)]
    if len(ints) == len(batches):
      d["tokens"] = int(sum(np.size(x) for x in ints))
  return d


def _model_error(i: int, b: Batch, e: Exception) -> CompressionError:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if isinstance(e, CompressionError) and e.path is not None:
    msg = msg.removesuffix(f" [param '{e.path}']")
  return CompressionError(
      f"calibration batch {i} ({_describe_args(b.args)}) fails in the model: "
      f"{type(e).__name__}: {msg[:300]}; check the batch's shape and dtype "
      "against the model's input", getattr(e, "path", None))


def capture(model: Any, params: Any, batches: Iterable[Any], *,
            rules: RulesLike = None,
            default: Predicate | None = default_filter,
            method: str | Callable | None = None,
            progress: Callable[[int], None] | None = None,
            attention_mask: bool | None = None) -> Stats:
  """Streams `batches` (see the module doc) through the model; returns the
  `Stats` ({param path: LayerStats}, with the data's `description`) of the
  selected params.

  `rules`/`default` select the params as for a transform (`default=None`:
  rules only); a rule's option overrides are for the transform that uses
  the stats and are not read here. `attention_mask`: whether TokenBatch
  masks go to the model as `attention_mask=` (None: when its signature has
  that parameter); they weight the statistics either way. Fails, naming the
  batch, on a batch that is not arrays, that differs in structure or rank
  from batch 0, that the model rejects, or that makes a layer's statistics
  non-finite (NaN / Inf inputs, or X^T X overflowing float32), naming that
  layer too.
  """
  if attention_mask is None:
    attention_mask = takes_mask(model, method)
  blist, source = batch_list(batches, attention_mask)
  plan = resolve(params, {}, rules, default, transform="capture")
  paths = frozenset(plan.configs)
  if not paths:
    raise CompressionError(
        "capture selected no param: check `rules` and `default` (None means "
        "rules only; default_filter picks float kernels of rank >= 2 that "
        "are not embeddings, norms or biases)")
  fn = as_function(model, params, method)

  shapes = {p: tuple(x.shape) for p, x in leaves_with_paths(params)
            if p in paths}

  def step(params, args, kwargs, weights):
    found, observe = observer(weights, shapes)
    apply(fn, params, *args, observe=observe, observe_paths=paths, **kwargs)
    return found

  jstep = jax.jit(step)
  acc = Accumulator()
  ref = None
  for i, b in enumerate(blist):
    sig = _check_batch(i, b, ref)
    ref = ref or sig
    try:
      s = jstep(params, b.args, dict(b.kwargs), None if b.weights is None
                else jnp.asarray(b.weights))
    except _ObserverError:
      raise
    except Exception as e:  # shape / dtype errors from inside the model
      raise _model_error(i, b, e) from e
    acc.add(i, s)
    if progress:
      progress(i + 1)
  if not blist:
    raise CompressionError("capture got no batches")
  total = acc.result(plan.configs)
  missing = sorted(paths - set(total))
  if missing:
    raise CompressionError(f"selected params never used by a matmul or "
                           f"convolution: {missing[:5]}; skip them with a "
                           "rule")
  desc = describe(blist, source=source)
  logging.info("calibration data: %s", json.dumps(desc, default=str))
  return Stats(total, desc)
