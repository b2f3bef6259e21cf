"""Low-rank adapters on compressed (or float) bases: LoRA, QLoRA, LoftQ, PiSSA.

LoRA (Hu et al. 2021, eq. 3): h = W0 x + (alpha / r) B A x with A random
(Gaussian) and B = 0, so training starts at the base model; only A and B are
trained. In flax's (in, out) kernel layout that is y = x @ W0 + (alpha / r)
(x @ a) @ b with a = A^T of shape (in, r) and b = B^T of shape (r, out).
QLoRA (Dettmers et al. 2023, Sec. 3): the frozen W0 is NF4 in blocks of 64
with double-quantized absmax scales; here W0 may be any compressed leaf
(QArray of any format, NF4 with double quantization, SparseArray, LowRank,
...) or a float array.
LoftQ (Li et al. 2023, Alg. 1): alternate Q_t = q(W - A_{t-1} B_{t-1}) and
A_t B_t = SVD_r(W - Q_t) for T steps, so that Q + (alpha / r) a b
approximates W (a = U_r sqrt(S_r), b = sqrt(S_r) V_r^T, each divided by
sqrt(alpha / r)).
PiSSA (Meng et al. 2024, Sec. 3): a b from the top-r singular triplets of W,
the frozen base is the residual W - (alpha / r) a b (quantized when a
format is given: QPiSSA).

`lora(rank, ...)` is a Transform: each selected kernel becomes a `LoRA` leaf
around its (possibly compressed) base. `cj.run` multiplies it as
x @ W0 + s (x @ a) @ b: the base through the usual dispatch (the quantized
kernel, never materialized in the forward pass), with a custom derivative
that gives the base no gradient and x's gradient g @ W0^T from the base
dequantized in the backward pass only (one layer at a time, freed after).
`partition(tree)` splits off the adapter factors (the only trainable part);
`cj.combine` joins them back. `merge` folds adapters into float kernels (and
re-quantizes them if asked); `save` / `restore` checkpoint the adapters alone.

    tree = adapters.lora(8, format="nf4", group_size=64,
                         double_quant=True).apply(float_params)     # QLoRA
    ad, rest = adapters.partition(tree)
    loss = lambda p, b, rng: ce(cj.run(model, cj.combine(p, rest), b), b)
    out = loop.train(loss, ad, optax.adam(1e-3), batch_fn, steps=...)
    adapters.save("ckpt/adapters", cj.combine(out.params, rest))
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.core import rules as rules_lib
from compressjax.core import transform as transform_lib
from compressjax.core.base import (CompressedLeaf, compressed_leaf,
                                   is_concrete, materialize)
from compressjax.core.checkpoint import restore as _restore
from compressjax.core.checkpoint import save as _save
from compressjax.core.errors import CompressionError
from compressjax.core.rules import option
from compressjax.core.tree import leaves_with_paths, map_with_paths
from compressjax.quantization.rtn import check_quant_config, quantize_array
from compressjax.runtime import dispatch

INITS = ("standard", "loftq", "pissa")
_QUANT_KEYS = ("bits", "format", "group_size", "symmetric", "double_quant")
_HP = jax.lax.Precision.HIGHEST


@compressed_leaf
class LoRA(CompressedLeaf):
  """w = base + (alpha / rank) * reshape(a @ b), in float32, cast to dtype.

  Children: `base` (float array or any compressed leaf of `shape`), `a`
  (shape[0], r) and `b` (r, prod(shape[1:])), float32: the kernel viewed as
  (in, out) with the contraction axis first, as flax Dense/DenseGeneral use
  it. Static: shape, dtype, alpha."""

  data_fields = ("base", "a", "b")
  meta_fields = ("shape", "dtype", "alpha")

  base: Any
  a: Any
  b: Any
  shape: tuple[int, ...]
  dtype: str
  alpha: float

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def delta(self) -> jax.Array:
    """float32 (alpha / r) a @ b in the kernel's shape."""
    ab = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                    precision=_HP)
    return (ab * self.scale).reshape(self.shape)

  def materialize(self) -> jax.Array:
    w = materialize(self.base).astype(jnp.float32) + self.delta()
    return w.astype(self.dtype)

  def validate(self) -> None:
    if len(self.shape) < 2:
      self._fail(f"needs a kernel of rank >= 2 (a matmul weight), got shape "
                 f"{tuple(self.shape)}")
    m, n = self.shape[0], math.prod(self.shape[1:])
    r = self.a.shape[-1] if self.a is not None else -1
    self._expect("a", self.a, (m, r), kind="f")
    self._expect("b", self.b, (r, n), kind="f")
    if not 1 <= r <= min(m, n):
      self._fail(f"rank {r} is not in [1, min(m, n) = {min(m, n)}]")
    self._expect("base", self.base, tuple(self.shape))
    if isinstance(self.base, LoRA):
      self._fail("the base is itself a LoRA leaf; merge it first")
    if not self.alpha > 0:
      self._fail(f"alpha must be positive, got {self.alpha}")
    super().validate()


# -- the matmul ----------------------------------------------------------------

def _contract_rest(g, w, k: int):
  """g (..., *rest) contracted with w (K, *rest) over rest -> (..., K)."""
  nr = w.ndim - 1
  return jax.lax.dot_general(
      g, w, ((tuple(range(g.ndim - nr, g.ndim)), tuple(range(1, w.ndim))),
             ((), ())), precision=_HP, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _frozen_dot(x, base, dims, dtype, x_dtype):
  del x_dtype
  return dispatch.dot_general(x, base, dims, lhs_leaf=False, dtype=dtype,
                              preferred_element_type=jnp.float32)


def _frozen_dot_fwd(x, base, dims, dtype, x_dtype):
  # the residual is the stored (compressed) base itself, no float copy
  return _frozen_dot(x, base, dims, dtype, x_dtype), base


def _frozen_dot_bwd(dims, dtype, x_dtype, base, g):
  w = materialize(base).astype(dtype).astype(jnp.float32)
  dx = _contract_rest(g.astype(jnp.float32), w, w.shape[0]).astype(x_dtype)
  zeros = jax.tree.map(
      lambda c: (jnp.zeros_like(c) if jnp.issubdtype(c.dtype, jnp.inexact)
                 else np.zeros(c.shape, jax.dtypes.float0)), base)
  return dx, zeros


_frozen_dot.defvjp(_frozen_dot_fwd, _frozen_dot_bwd)


def frozen_matmul(x, base, dtype=jnp.float32):
  """x (..., K) @ base (K, *rest) -> float32 (..., *rest) through the
  compressed dispatch, with no gradient to `base` (frozen) and dx from the
  base dequantized in the backward pass only."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return _frozen_dot(x, base, dims, jnp.dtype(dtype).name,
                     jnp.dtype(x.dtype).name)


def _lora_dot(x, leaf: LoRA, dims, out_dtype):
  (lc, rc), (lb, rb) = dims
  if not (tuple(lc) == (x.ndim - 1,) and tuple(rc) == (0,) and not lb
          and not rb):
    return None  # materialized: exact, gradients through a and b still
  y = frozen_matmul(x, leaf.base, jnp.dtype(leaf.dtype))
  xa = jnp.matmul(x.astype(jnp.float32), leaf.a.astype(jnp.float32),
                  precision=_HP)
  d = jnp.matmul(xa, leaf.b.astype(jnp.float32), precision=_HP) * leaf.scale
  y = y + d.reshape(x.shape[:-1] + tuple(leaf.shape[1:]))
  return y.astype(out_dtype)


dispatch.register_dot_rule(LoRA, _lora_dot)


# -- initializations -----------------------------------------------------------

def _svd_factors(w, rank: int, scale: float):
  """a, b with scale * a @ b = the best rank-r approximation of w (2-D)."""
  u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank] / scale)
  return u[:, :rank] * root, root[:, None] * vt[:rank]


def _quant_cfg(cfg) -> dict:
  return {k: cfg[k] for k in _QUANT_KEYS if cfg.get(k) not in (None, False)}


def _quantizer(path, cfg):
  q = _quant_cfg(cfg)
  if "bits" not in q and "format" not in q:
    return None
  return lambda w: quantize_array(w, path=path, **q)


def loftq(w, rank: int, quantize, *, alpha: float = 16.0, iters: int = 5):
  """LoftQ (Li et al. 2023, Alg. 1) for a 2-D float `w` (in, out):
  (base, a, b) with base = quantize(w - s a b) and s a b the rank-r SVD of
  w - base, alternated `iters` times from a = b = 0 (s = alpha / rank).
  `quantize` maps a float array to a compressed leaf."""
  w = jnp.asarray(w, jnp.float32)
  s = alpha / rank
  a = jnp.zeros((w.shape[0], rank), jnp.float32)
  b = jnp.zeros((rank, w.shape[1]), jnp.float32)
  q = None
  for _ in range(iters):
    q = quantize(w - s * jnp.matmul(a, b, precision=_HP))
    deq = materialize(q).astype(jnp.float32).reshape(w.shape)
    a, b = _svd_factors(w - deq, rank, s)
  return q, a, b


def pissa(w, rank: int, quantize=None, *, alpha: float = 16.0):
  """PiSSA (Meng et al. 2024): s a b = the top-r SVD of w, base the residual
  w - s a b (quantized by `quantize` when given)."""
  w = jnp.asarray(w, jnp.float32)
  s = alpha / rank
  a, b = _svd_factors(w, rank, s)
  res = w - s * jnp.matmul(a, b, precision=_HP)
  return (res if quantize is None else quantize(res)), a, b


def _standard(path: str, m: int, rank: int, n: int, seed: int):
  # A Gaussian (LoRA Sec. 4.1), variance 1/in so x @ a keeps x's scale;
  # one key per path: the same tree gives the same adapters
  key = jax.random.fold_in(jax.random.key(seed),
                           zlib.crc32(path.encode()) & 0x7FFFFFFF)
  a = jax.random.normal(key, (m, rank), jnp.float32) / math.sqrt(m)
  return a, jnp.zeros((rank, n), jnp.float32)


# -- the transform -------------------------------------------------------------

@rules_lib.options
class LoraOptions(rules_lib.Options):
  """Low-rank adapters (see module doc)."""

  transform: ClassVar[str] = "lora"
  rank: int = option(8, "adapter rank r", check=lambda r: r >= 1,
                     must="be >= 1")
  alpha: float = option(16.0, "the adapter is scaled by alpha / rank",
                        **rules_lib.interval(0, lo_open=True))
  init: Literal[INITS] = option(
      "standard", "standard: a Gaussian, b = 0 (the base as it is); loftq: "
      "alternating quantization and SVD; pissa: top-r SVD, residual base")
  iters: int = option(5, "LoftQ alternations T", check=lambda t: t >= 1,
                      must="be >= 1")
  seed: int = option(0, "seed of the standard init's Gaussian a")
  bits: int | None = option(
      None, "quantize the float base to this many integer bits (None: keep "
      "it as it is, or use `format`)")
  format: str | None = option(None, "quantize the float base to this format "
                              "(nf4, int3, ...)")
  group_size: int | None = option(
      None, "inputs per scale of the base quantizer (None: per channel)",
      check=lambda g: g >= 1, must="be >= 1 (or None)")
  symmetric: bool = option(True, "base quantizer: False for a zero point")
  double_quant: bool = option(False, "base quantizer: 8-bit scales "
                              "(QLoRA's double quantization)")


def _check(path: str, leaf: Any, cfg) -> None:
  shape = tuple(leaf.shape)
  if len(shape) < 2:
    raise CompressionError(
        f"an adapter needs a matmul kernel of rank >= 2, this leaf has shape "
        f"{shape}; exclude it with a rule (pattern, None)", path)
  if isinstance(leaf, LoRA):
    raise CompressionError("this kernel already has an adapter; merge it "
                           "(adapters.merge) before adding another", path)
  m, n = shape[0], math.prod(shape[1:])
  r = cfg["rank"]
  if r > min(m, n):
    raise CompressionError(
        f"rank {r} exceeds min(m, n) = {min(m, n)} of this {m} x {n} kernel; "
        f"use rank <= {min(m, n)} (a rule can set it per param)", path)
  quantizes = _quantizer(path, cfg) is not None
  if quantizes:
    check_quant_config(path, (m, n), _quant_cfg(cfg))
  compressed = isinstance(leaf, CompressedLeaf)
  if cfg["init"] == "loftq" and not quantizes:
    raise CompressionError(
        "init='loftq' alternates quantization and SVD: give the base "
        "quantizer (bits= or format=, group_size=, ...)", path)
  if cfg["init"] != "standard" and compressed:
    raise CompressionError(
        f"init={cfg['init']!r} needs the float weight, but this param is "
        f"already a {type(leaf).__name__}; apply lora to the float tree with "
        "the quantizer options (bits=/format=) instead", path)
  if compressed and quantizes:
    raise CompressionError(
        f"bits=/format= quantize a float base, but this param is already a "
        f"{type(leaf).__name__}; drop them to keep it as it is", path)


def _leaf(path: str, leaf: Any, cfg, state=None) -> LoRA:
  shape = tuple(leaf.shape)
  dtype = jnp.dtype(leaf.dtype).name
  m, n = shape[0], math.prod(shape[1:])
  r, alpha = cfg["rank"], float(cfg["alpha"])
  q = _quantizer(path, cfg)
  if cfg["init"] == "standard":
    base = leaf if q is None else q(leaf)
    a, b = _standard(path, m, r, n, cfg["seed"])
  else:
    w = jnp.asarray(leaf, jnp.float32).reshape(m, n)
    # the quantizer sees the kernel in its own shape (its groups, axis 0)
    q2 = None if q is None else (lambda x: q(x.reshape(shape)))
    if cfg["init"] == "loftq":
      base, a, b = loftq(w, r, q2, alpha=alpha, iters=cfg["iters"])
    else:
      base, a, b = pissa(w, r, q2, alpha=alpha)
    if not isinstance(base, CompressedLeaf):
      base = base.reshape(shape).astype(dtype)
  return LoRA(base=base, a=a, b=b, shape=shape, dtype=dtype, alpha=alpha)


@transform_lib.builder(LoraOptions, positional=("rank",))
def lora(*, options, rules, default) -> transform_lib.Transform:
  """Adapter transform: each selected kernel (float or compressed) becomes a
  LoRA leaf around it. With bits=/format= a float base is quantized first
  (QLoRA: format="nf4", group_size=64, double_quant=True); init="loftq" /
  "pissa" set the base and the factors from the float weight."""
  return transform_lib.leaf_transform("lora", options, _leaf, _check, rules,
                                      default)


# -- training, merging, checkpoints ---------------------------------------------

def _is_lora(x) -> bool:
  return isinstance(x, LoRA)


def partition(tree: Any) -> tuple[Any, Any]:
  """(adapters, rest): the a and b of every LoRA leaf, and everything else
  (bases, other params), each with None where the other holds a value;
  `cj.combine(adapters, rest)` rebuilds the tree. Train `adapters` alone."""
  none = lambda t: jax.tree.map(lambda _: None, t)

  def trainable(x):
    if _is_lora(x):
      return LoRA(base=none(x.base), a=x.a, b=x.b, shape=x.shape,
                  dtype=x.dtype, alpha=x.alpha)
    return none(x)

  def frozen(x):
    if _is_lora(x):
      return LoRA(base=x.base, a=None, b=None, shape=x.shape, dtype=x.dtype,
                  alpha=x.alpha)
    return x

  return (jax.tree.map(trainable, tree, is_leaf=_is_lora),
          jax.tree.map(frozen, tree, is_leaf=_is_lora))


def merge(tree: Any, **quant) -> Any:
  """Every LoRA leaf -> its merged weight base + (alpha / r) a b: float in
  the leaf's dtype, or re-quantized with `quant` (quantize_array options:
  bits, format, group_size, symmetric, double_quant, ...)."""
  def one(path, x):
    if not _is_lora(x):
      return x
    w = x.materialize()
    return quantize_array(w, path=path, **quant) if quant else w
  return map_with_paths(one, tree)


def adapter_params(tree: Any) -> dict[str, dict[str, Any]]:
  """{param path: {"a", "b", "alpha"}} of every LoRA leaf."""
  out = {p: {"a": x.a, "b": x.b, "alpha": np.float32(x.alpha)}
         for p, x in leaves_with_paths(tree) if _is_lora(x)}
  if not out:
    raise CompressionError("the tree has no LoRA leaf; build one with "
                           "adapters.lora(...)")
  return out


def with_adapter_params(tree: Any, params: dict[str, dict[str, Any]]) -> Any:
  """`tree` (with LoRA leaves) with a and b (and alpha) from `params`, as
  `adapter_params` returns them; every path and shape must match."""
  have = {p for p, x in leaves_with_paths(tree) if _is_lora(x)}
  for p in sorted(set(params) ^ have):
    where = "the adapters" if p in params else "the tree"
    raise CompressionError(f"adapter for this param is only in {where}; load "
                           "adapters into the tree they were trained on", p)

  def one(path, x):
    if not _is_lora(x):
      return x
    got = params[path]
    for k in ("a", "b"):
      if tuple(np.shape(got[k])) != tuple(getattr(x, k).shape):
        raise CompressionError(
            f"adapter {k} has shape {tuple(np.shape(got[k]))}, the tree's "
            f"{tuple(getattr(x, k).shape)} (another rank?)", path)
    return LoRA(base=x.base, a=jnp.asarray(got["a"], jnp.float32),
                b=jnp.asarray(got["b"], jnp.float32), shape=x.shape,
                dtype=x.dtype, alpha=float(got.get("alpha", x.alpha)))
  return map_with_paths(one, tree)


def save(path: str, tree: Any, force: bool = False) -> None:
  """Checkpoints the adapters of `tree` alone (not the base)."""
  _save(path, jax.tree.map(np.asarray, adapter_params(tree)), force=force)


def restore(path: str, tree: Any) -> Any:
  """`tree` with the adapters `save` wrote at `path`."""
  return with_adapter_params(tree, _restore(path))


__all__ = ["INITS", "LoRA", "LoraOptions", "adapter_params", "frozen_matmul",
           "lora", "loftq", "merge", "partition", "pissa", "restore", "save",
           "with_adapter_params"]
