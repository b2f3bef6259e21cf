"""Dynamic sparse training as optax gradient transformations.

Each method wraps any inner optax optimizer, like `optax.masked`:

    tx = sparse.rigl(optax.adam(1e-3), sparsity=0.8, distribution="erk",
                     end_step=7500)
    opt_state = tx.init(params)
    loss = lambda p: mse(model.apply({"params": sparse.masked_params(
        p, opt_state)}, x), y)              # or just `p` (see below)
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
    compressed = sparse.export(params, opt_state)  # SparseArray, NMSparseArray

Methods (all share `SparseUpdater`: one `scores` hook, a schedule
`sparsity_at(step)`, top-k mask selection per layer with ties broken by
position, lowest flat index pruned first: the selector one-shot pruning uses,
`sparsity.select`):

* `gmp`: gradual magnitude pruning (Zhu & Gupta 2017, Eq. 1):
  s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3 at t = t0, t0 + Δt, ...,
  t_end = t0 + n Δt; the round(s_t * size) smallest |w| of a layer are pruned
  and never come back.
* `set_` (Mocanu et al. 2018) and `rigl` (Evci et al. 2020, Alg. 1): fixed
  per-layer sparsity from a random initial mask; every ΔT steps before T_end
  the k = round(f(t) * active) smallest-|w| active weights are dropped,
  f(t) = f0/2 (1 + cos(π t / T_end)) (RigL Eq. 1), and k inactive ones grow:
  random (SET) or largest |dense gradient| (RigL). Regrowth picks among the
  weights inactive before the update (so the dropped and grown sets are
  disjoint and the mask moves by exactly k each way; the paper's Alg. 1 also
  allows re-growing a just-dropped weight, which would only reset it to 0).
  Grown weights start at exactly 0 with reset optimizer moments.
* `nm_srste`: N:M sparsity with SR-STE (Zhou et al. 2021, Sec. 4): params stay
  dense; the forward uses the N largest-|w| of every M along the input axis
  (recomputed every step), gradients pass straight through to all weights,
  and λ_W (1 - m) ⊙ W is added to the gradient of the pruned ones.
* Layer densities (`layer_densities`): `uniform`, or Erdős–Rényi-Kernel
  (Evci et al. 2020, Sec. 3; Mocanu et al. 2018): density_l ∝ (Σ_d n_d) /
  (Π_d n_d), scaled so the selected params hit the target; layers above 1 are
  made dense and the rest rescaled, repeatedly, as in the RigL code.

State (`SparseState`): the inner state, `masks` (a tree mirroring params:
bool arrays for sparse params, None elsewhere), the step `count`, a raw PRNG
key and static per-param `specs`. The masks always describe the params AFTER
the returned updates are applied. Unstructured methods ("hard") keep pruned
weights at exactly 0: their update is -w, and gradients of inactive weights
are zeroed before the inner optimizer.

Forward pass: `masked_params(params, state)` applies the masks with a
straight-through estimator (value w * m, gradient to every dense entry, which
RigL's growth and SR-STE need). Hard methods hold exact zeros after the first
update, so a loss_fn without access to the optimizer state (e.g.
`train.loop`) may use params directly (mask once before training to make step
0 sparse too: `params = masked_params(params, tx.init(params))`; the masks
`init` draws do not depend on the zeroed values); for N:M use
`SRSTE(...).masked(params)`, which recomputes the masks from params alone.

Selection uses the rules machinery (`compressjax.core.rules`): `rules=[(regex,
dict(sparsity=...))]` (or n/m/axis for N:M), `(regex, None)` to skip, and
`default=default_filter` (kernels; no embeddings, biases or norms). A rule's
`sparsity` fixes that layer; the distribution spreads the target over the
others.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax.allocate.sparsity import erk_densities as _erk_densities
from compressjax.core.errors import CompressionError
from compressjax.core.rules import Predicate, RuleLike, default_filter, resolve
from compressjax.core.tree import (INPUT_AXIS, is_compressed, is_float_dtype,
                                   path_str)
from compressjax.sparsity.magnitude import (check_sparse_config,
                                            nm_sparsify, sparse_from_mask)
from compressjax.sparsity.select import keep_top_n_of_m, prune_lowest

DISTRIBUTIONS = ("uniform", "erk")


class LayerSpec(NamedTuple):
  """Static config of one sparse param: final sparsity, or N:M along axis."""
  sparsity: float
  n: int | None = None
  m: int | None = None
  axis: int | None = None

  @property
  def is_nm(self) -> bool:
    return self.n is not None


@flax.struct.dataclass
class SparseState:
  """Optimizer state of a sparse method (see module doc)."""
  inner_state: Any
  masks: Any
  count: jax.Array
  rng: jax.Array
  specs: tuple = flax.struct.field(pytree_node=False, default=())

  def spec_map(self) -> dict[str, LayerSpec]:
    return dict(self.specs)


# ----------------------------------------------------------------------------
# tree helpers: masks mirror params with None for dense leaves


def _flatten(params):
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def _map(fn: Callable, params, *trees):
  """fn(path, leaf, *others) over params; others mirror it (None allowed)."""
  paths, leaves, treedef = _flatten(params)
  others = [treedef.flatten_up_to(t) for t in trees]
  out = [fn(p, x, *o) for p, x, *o in zip(paths, leaves, *others)]
  return jax.tree.unflatten(treedef, out)


def _map2(fn: Callable, params, *trees):
  """Like _map but fn returns a pair; returns two trees."""
  paths, leaves, treedef = _flatten(params)
  others = [treedef.flatten_up_to(t) for t in trees]
  out = [fn(p, x, *o) for p, x, *o in zip(paths, leaves, *others)]
  return (jax.tree.unflatten(treedef, [a for a, _ in out]),
          jax.tree.unflatten(treedef, [b for _, b in out]))


def _ste(w, m):
  # value w*m exactly (w + (0 - w) = 0), gradient 1 to every dense entry
  return w + jax.lax.stop_gradient(jnp.where(m, w, jnp.zeros_like(w)) - w)


def _topk_mask(scores, k):
  """Boolean mask of the k largest scores (k may be traced); ties: the lower
  flat index is dropped first (the shared selector, `sparsity.select`)."""
  return prune_lowest(scores, scores.size - k)


def nm_mask(scores, n: int, m: int, axis: int = INPUT_AXIS):
  """Keeps the n highest scores of every m consecutive along `axis` (ties:
  the earlier position stays, as `nm_sparsify`)."""
  return keep_top_n_of_m(scores, n, m, axis)


def find_state(opt_state: Any) -> SparseState:
  """The one SparseState inside a (chained) optimizer state."""
  if isinstance(opt_state, SparseState):
    return opt_state
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SparseState))
           if isinstance(s, SparseState)]
  if len(found) != 1:
    raise CompressionError(
        f"expected exactly one SparseState in the optimizer state, found "
        f"{len(found)}; pass the state returned by a sparse method's init/"
        "update")
  return found[0]


def masked_params(params: Any, state: Any) -> Any:
  """Params with the masks applied (straight-through: the gradient reaches
  every dense entry). `state` is a SparseState or an optimizer state holding
  one."""
  st = find_state(state)
  return _map(lambda p, w, m: w if m is None else _ste(w, m), params,
              st.masks)


def export(params: Any, state: Any) -> Any:
  """The final tree: each sparse param as a `SparseArray` (unstructured) or
  `NMSparseArray`, built by `sparsify.magnitude`'s constructors from the
  state's masks, so running it equals the model on `masked_params`."""
  st = find_state(state)
  specs = st.spec_map()
  paths, leaves, treedef = _flatten(params)
  masks = treedef.flatten_up_to(st.masks)
  # kept counts fix the SparseArray sizes, so the packing can run jitted
  kept = tuple(None if m is None or specs[p].is_nm else int(np.sum(m))
               for p, m in zip(paths, masks))

  @jax.jit
  def build(leaves, masks):
    out = []
    for p, w, m, k in zip(paths, leaves, masks, kept):
      if m is None:
        out.append(w)
      elif specs[p].is_nm:
        # the mask as scores selects exactly its N of every M
        sp = specs[p]
        out.append(nm_sparsify(w, sp.n, sp.m, sp.axis,
                               scores=m.astype(jnp.float32)))
      else:
        out.append(sparse_from_mask(jnp.where(m, w, jnp.zeros_like(w)), m,
                                    (1,) * w.ndim, "unstructured", kept=k))
    return out

  out = build(leaves, masks)
  for leaf in out:
    if is_compressed(leaf):
      leaf.validate()
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# layer densities


def _resolve(params, base: Mapping[str, Any], rules, default, name, allowed):
  plan = resolve(params, base, rules, default, transform=name)
  leaves = dict(zip(*_flatten(params)[:2]))
  for path, cfg in plan.configs.items():
    extra = set(cfg) - set(base) - allowed
    if extra:
      raise CompressionError(
          f"unknown rule keys {sorted(extra)} for {name}; use "
          f"{sorted(allowed)}", path)
    leaf = leaves[path]
    if not (hasattr(leaf, "dtype") and is_float_dtype(leaf.dtype)):
      raise CompressionError(f"{name} needs floating-point params, got "
                             f"{getattr(leaf, 'dtype', type(leaf))}", path)
  if not plan.configs:
    raise CompressionError(
        f"{name}: no parameter selected for sparsity; check `rules` and "
        "`default` (the default picks float kernels of rank >= 2 that are not "
        "embeddings, norms or biases)")
  return plan, leaves


def _layer_sparsities(params, sparsity, distribution, rules, default,
                      name="sparse") -> dict[str, float]:
  if distribution not in DISTRIBUTIONS:
    raise CompressionError(f"unknown distribution {distribution!r}; use one "
                           f"of {DISTRIBUTIONS}")
  # sparsity None in the base marks layers no rule fixed
  plan, leaves = _resolve(params, {"sparsity": None}, rules, default, name,
                          {"sparsity"})
  fixed, free = {}, {}
  for path, cfg in plan.configs.items():
    s = sparsity if cfg["sparsity"] is None else cfg["sparsity"]
    check_sparse_config(path, leaves[path].shape,
                        {"pattern": "unstructured", "sparsity": s})
    if cfg["sparsity"] is None:
      free[path] = tuple(leaves[path].shape)
    else:
      fixed[path] = float(s)
  out = dict(fixed)
  if free:
    if distribution == "uniform":
      out.update({p: float(sparsity) for p in free})
    else:
      out.update({p: 1.0 - d
                  for p, d in _erk_densities(free, float(sparsity)).items()})
  return {p: out[p] for p in plan.configs}  # tree order


def layer_densities(params: Any, sparsity: float,
                    distribution: str = "uniform",
                    rules: Sequence[RuleLike] | None = None,
                    default: Predicate | None = default_filter
                    ) -> dict[str, float]:
  """Per-param density (1 - sparsity) of the selected params, keyed by path.

  'uniform': every layer at `sparsity`; 'erk': Erdős–Rényi-Kernel (module
  doc). Layers whose rule sets `sparsity` keep it; the rest share the target.
  """
  return {p: 1.0 - s for p, s in _layer_sparsities(
      params, sparsity, distribution, rules, default).items()}


# ----------------------------------------------------------------------------
# inner-state reset


def reset_inner_state(inner_state: Any, regrown: Any, params: Any) -> Any:
  """Zeros the inner optimizer's state at regrown positions.

  Rule: every subtree of the inner state with the same tree structure as
  params (Adam's mu/nu, momentum's trace, ...) has each leaf whose shape equals
  its param's set to 0 where `regrown` is True; everything else (counts,
  scalars, masked or differently shaped states) is left alone.
  """
  ptree = jax.tree.structure(params)

  def like(x):
    return jax.tree.structure(x) == ptree

  def reset(sub):
    if not like(sub):
      return sub

    def leaf(p, x, r):
      if r is None or getattr(x, "shape", None) != r.shape:
        return x
      return jnp.where(r, jnp.zeros_like(x), x)

    return _map(leaf, sub, regrown)

  return jax.tree.map(reset, inner_state, is_leaf=like)


# ----------------------------------------------------------------------------
# the shared updater


@dataclasses.dataclass(frozen=True)
class SparseUpdater:
  """Base of the sparse methods: selection, state, hooks, optax wrapping.

  Subclasses override `scores` (which weights matter), `sparsity_at` (the
  schedule), `is_update_step`, `init_masks` and `update_masks`.
  """

  sparsity: float = 0.5
  distribution: str = "uniform"
  rules: Sequence[RuleLike] | None = None
  default: Predicate | None = default_filter
  seed: int = 0

  name = "sparse"

  # -- static config --------------------------------------------------------
  def layer_specs(self, params) -> dict[str, LayerSpec]:
    """Path -> LayerSpec of the selected params (validates the config)."""
    return {p: LayerSpec(s) for p, s in _layer_sparsities(
        params, self.sparsity, self.distribution, self.rules, self.default,
        self.name).items()}

  # -- hooks ----------------------------------------------------------------
  def scores(self, params, grads, state):
    """Per-param importance (higher = keep); default |w|."""
    del grads, state
    return jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)), params)

  def sparsity_at(self, step, final: float | None = None):
    """Target sparsity at `step` for a layer whose final sparsity is
    `final` (default `self.sparsity`); constant here."""
    del step
    return self.sparsity if final is None else final

  def is_update_step(self, step):
    return jnp.zeros((), bool)

  def init_masks(self, params, specs, rng):
    return _map(lambda p, w: jnp.ones(w.shape, bool) if p in specs else None,
                params)

  def update_masks(self, params, grads, state):
    """(new masks, regrown) at a mask-update step."""
    raise NotImplementedError

  # -- optax ----------------------------------------------------------------
  def init(self, params, inner) -> SparseState:
    specs = self.layer_specs(params)
    rng = jax.random.PRNGKey(self.seed)
    masks = self.init_masks(params, specs, rng)
    return SparseState(inner_state=inner.init(params), masks=masks,
                       count=jnp.zeros((), jnp.int32), rng=rng,
                       specs=tuple(specs.items()))

  def update(self, grads, state: SparseState, params, inner, **extra):
    if params is None:
      raise CompressionError(
          f"{self.name} needs the params: tx.update(grads, state, params)")
    masks = state.masks
    # inactive weights get no gradient, so their moments stay out of it
    g_in = _map(lambda p, g, m: g if m is None else jnp.where(
        m, g, jnp.zeros_like(g)), grads, masks)
    u, inner_state = inner.update(g_in, state.inner_state, params, **extra)

    def keep():
      return masks, jax.tree.map(jnp.zeros_like, masks)  # None stays None

    new_masks, regrown = jax.lax.cond(
        self.is_update_step(state.count),
        lambda: self.update_masks(params, grads, state), keep)
    inner_state = reset_inner_state(inner_state, regrown, params)

    def final(p, uu, w, m, r):
      if m is None:
        return uu
      # pruned or just-grown: land exactly on 0 (w + (-w) == 0)
      return jnp.where(m & ~r, uu, -w.astype(uu.dtype))

    updates = _map(final, u, params, new_masks, regrown)
    return updates, state.replace(inner_state=inner_state, masks=new_masks,
                                  count=state.count + 1)

  def wrap_optax(self, inner: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
    """This method around `inner` as one optax transformation."""
    inner = optax.with_extra_args_support(inner)
    return optax.GradientTransformationExtraArgs(
        lambda params: self.init(params, inner),
        lambda grads, state, params=None, **extra: self.update(
            grads, state, params, inner, **extra))


def _check_steps(name, **steps):
  for k, v in steps.items():
    if v is None or v < 0 or int(v) != v:
      raise CompressionError(f"{name}: {k} must be a non-negative integer, "
                             f"got {v}")


@dataclasses.dataclass(frozen=True)
class GMP(SparseUpdater):
  """Gradual magnitude pruning (Zhu & Gupta 2017, Eq. 1).

  Every `update_every` steps from `begin_step` to `end_step` (and at
  `end_step`) each layer is pruned to round(s_t * size) by |w|; pruned
  weights stay 0. Per-layer s_f comes from `distribution`; s_i is
  min(initial_sparsity, s_f).
  """

  begin_step: int = 0
  end_step: int = 1000
  update_every: int = 100
  initial_sparsity: float = 0.0
  name = "gmp"

  def __post_init__(self):
    _check_steps(self.name, begin_step=self.begin_step,
                 end_step=self.end_step)
    if self.end_step <= self.begin_step or self.update_every < 1:
      raise CompressionError(
          f"gmp needs begin_step < end_step and update_every >= 1, got "
          f"{self.begin_step}, {self.end_step}, {self.update_every}")
    if not 0.0 <= self.initial_sparsity < 1.0:
      raise CompressionError("gmp: initial_sparsity must be in [0, 1), got "
                             f"{self.initial_sparsity}")

  def sparsity_at(self, step, final=None):
    sf = self.sparsity if final is None else final
    si = min(self.initial_sparsity, sf)
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((t - self.begin_step) / (self.end_step - self.begin_step),
                    0.0, 1.0)
    return sf + (si - sf) * (1.0 - frac) ** 3

  def is_update_step(self, step):
    t0, t1 = self.begin_step, self.end_step
    on_grid = ((step - t0) % self.update_every == 0) | (step == t1)
    return (step >= t0) & (step <= t1) & on_grid

  def update_masks(self, params, grads, state):
    specs = state.spec_map()
    scores = self.scores(params, grads, state)

    def one(path, w, m, sc):
      if m is None:
        return None, None
      s_t = self.sparsity_at(state.count, specs[path].sparsity)
      n_prune = jnp.round(s_t * w.size).astype(jnp.int32)
      # monotone: never un-prune (guards float rounding of s_t)
      n_prune = jnp.maximum(n_prune, w.size - jnp.sum(m, dtype=jnp.int32))
      sc = jnp.where(m, sc, -jnp.inf)  # pruned ones go first
      return _topk_mask(sc, w.size - n_prune), jnp.zeros_like(m)

    return _map2(one, params, state.masks, scores)


@dataclasses.dataclass(frozen=True)
class SET(SparseUpdater):
  """Sparse Evolutionary Training (Mocanu et al. 2018): fixed sparsity,
  periodic drop of the smallest |w| and random regrowth (module doc)."""

  end_step: int = 1000
  update_every: int = 100
  drop_fraction: float = 0.3
  # "random" (the papers: sparse training from scratch) or "magnitude" (the
  # largest |w| of a trained model: dense-to-sparse fine-tuning)
  mask_init: str = "random"
  name = "set"

  def __post_init__(self):
    _check_steps(self.name, end_step=self.end_step)
    if self.mask_init not in ("random", "magnitude"):
      raise CompressionError(f"{self.name} mask_init must be 'random' or "
                             f"'magnitude', got {self.mask_init!r}")
    if self.update_every < 1 or not 0.0 <= self.drop_fraction <= 1.0:
      raise CompressionError(
          f"{self.name} needs update_every >= 1 and drop_fraction in [0, 1], "
          f"got {self.update_every}, {self.drop_fraction}")

  def drop_fraction_at(self, step):
    """f(t) = f0/2 (1 + cos(π t / T_end)) (RigL Eq. 1)."""
    t = jnp.asarray(step, jnp.float32)
    return self.drop_fraction / 2 * (1 + jnp.cos(jnp.pi * t / self.end_step))

  def is_update_step(self, step):
    return (step > 0) & (step % self.update_every == 0) & (step < self.end_step)

  def init_masks(self, params, specs, rng):
    # initial connectivity at each layer's density: random or by |w|
    def one(i, path, w):
      if path not in specs:
        return None
      k = w.size - round(specs[path].sparsity * w.size)
      if self.mask_init == "magnitude":
        return _topk_mask(jnp.abs(w.astype(jnp.float32)), k)
      r = jax.random.uniform(jax.random.fold_in(rng, i), w.shape)
      return _topk_mask(r, k)
    paths, leaves, treedef = _flatten(params)
    return jax.tree.unflatten(
        treedef, [one(i, p, w) for i, (p, w) in enumerate(zip(paths, leaves))])

  def grow_scores(self, params, grads, state):
    """Regrowth priority of inactive weights: random for SET."""
    del grads
    key = jax.random.fold_in(state.rng, state.count)
    paths, leaves, treedef = _flatten(params)
    return jax.tree.unflatten(treedef, [
        jax.random.uniform(jax.random.fold_in(key, i), w.shape)
        for i, w in enumerate(leaves)])

  def update_masks(self, params, grads, state):
    drop = self.scores(params, grads, state)
    grow = self.grow_scores(params, grads, state)
    f = self.drop_fraction_at(state.count)

    def one(path, w, m, ds, gs):
      if m is None:
        return None, None
      n_active = jnp.sum(m, dtype=jnp.int32)
      n_inactive = w.size - n_active
      k = jnp.minimum(jnp.round(f * n_active).astype(jnp.int32), n_inactive)
      # drop the k smallest active: inactive ones score -inf, go first
      kept = _topk_mask(jnp.where(m, ds, -jnp.inf), n_active - k)
      # grow the k best among those inactive before this update
      grown = _topk_mask(jnp.where(m, -jnp.inf, gs.astype(jnp.float32)), k)
      return kept | grown, grown

    return _map2(one, params, state.masks, drop, grow)


@dataclasses.dataclass(frozen=True)
class RigL(SET):
  """RigL (Evci et al. 2020, Alg. 1): like SET, but regrows the inactive
  weights with the largest |dense gradient| (`grads` is dense: params are
  stored dense with zeros, and `masked_params` passes gradients through)."""

  name = "rigl"

  def grow_scores(self, params, grads, state):
    del params, state
    return jax.tree.map(lambda g: jnp.abs(g.astype(jnp.float32)), grads)


@dataclasses.dataclass(frozen=True)
class SRSTE(SparseUpdater):
  """N:M sparsity trained with SR-STE (Zhou et al. 2021, Sec. 4).

  Params stay dense. Masks (N largest |w| of every M along `axis`, default
  the kernel input axis 0, per output) are recomputed every step; the update
  descends g(W̃) + λ_W (1 - m) ⊙ W, where g(W̃) is the straight-through
  gradient of the masked forward (`masked_params` or `masked`).
  """

  n: int = 2
  m: int = 4
  axis: int | None = None
  decay: float = 2e-4
  sparsity: float = 0.0  # unused: N:M fixes it
  name = "nm_srste"

  def layer_specs(self, params):
    base = {"n": self.n, "m": self.m, "axis": self.axis}
    plan, leaves = _resolve(params, base, self.rules, self.default,
                            self.name, set())
    out = {}
    for path, cfg in plan.configs.items():
      shape = leaves[path].shape
      check_sparse_config(path, shape, {"pattern": "nm", **cfg})
      ax = INPUT_AXIS if cfg["axis"] is None else cfg["axis"] % len(shape)
      out[path] = LayerSpec(1.0 - cfg["n"] / cfg["m"], cfg["n"], cfg["m"], ax)
    return out

  def _masks(self, params, specs, scores):
    return _map(lambda p, w, sc: nm_mask(sc, specs[p].n, specs[p].m,
                                         specs[p].axis) if p in specs else None,
                params, scores)

  def init_masks(self, params, specs, rng):
    del rng
    return self._masks(params, specs, self.scores(params, None, None))

  def masked(self, params):
    """STE-masked params, masks recomputed from params alone (for a loss_fn
    that does not see the optimizer state); equals `masked_params`."""
    specs = self.layer_specs(params)
    masks = self._masks(params, specs, self.scores(params, None, None))
    return _map(lambda p, w, m: w if m is None else _ste(w, m), params, masks)

  def decay_term(self, params, masks):
    """λ_W (1 - m) ⊙ W (zero for dense params)."""
    return _map(lambda p, w, m: None if m is None else
                self.decay * jnp.where(m, jnp.zeros_like(w), w), params, masks)

  def update(self, grads, state, params, inner, **extra):
    if params is None:
      raise CompressionError(
          f"{self.name} needs the params: tx.update(grads, state, params)")
    specs = state.spec_map()
    masks = self._masks(params, specs, self.scores(params, grads, state))
    decay = self.decay_term(params, masks)
    g = _map(lambda p, gg, d: gg if d is None else gg + d.astype(gg.dtype),
             grads, decay)
    u, inner_state = inner.update(g, state.inner_state, params, **extra)
    new = optax.apply_updates(params, u)
    # masks of the params these updates produce (see SparseState)
    new_masks = self._masks(new, specs, self.scores(new, grads, state))
    return u, state.replace(inner_state=inner_state, masks=new_masks,
                            count=state.count + 1)


# ----------------------------------------------------------------------------
# constructors


def gmp(inner: optax.GradientTransformation, sparsity: float, *,
        end_step: int, begin_step: int = 0, update_every: int = 100,
        initial_sparsity: float = 0.0, distribution: str = "uniform",
        rules: Sequence[RuleLike] | None = None,
        default: Predicate | None = default_filter
        ) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning around `inner` (see GMP)."""
  return GMP(sparsity=sparsity, distribution=distribution, rules=rules,
             default=default, begin_step=begin_step, end_step=end_step,
             update_every=update_every,
             initial_sparsity=initial_sparsity).wrap_optax(inner)


def _drop_and_grow(cls):
  """The optax constructor of a fixed-sparsity drop/regrow method."""

  def make(inner: optax.GradientTransformation, sparsity: float, *,
           end_step: int, update_every: int = 100, drop_fraction: float = 0.3,
           distribution: str = "uniform",
           rules: Sequence[RuleLike] | None = None,
           default: Predicate | None = default_filter, seed: int = 0,
           mask_init: str = "random"
           ) -> optax.GradientTransformationExtraArgs:
    return cls(sparsity=sparsity, distribution=distribution, rules=rules,
               default=default, seed=seed, end_step=end_step,
               update_every=update_every, drop_fraction=drop_fraction,
               mask_init=mask_init).wrap_optax(inner)

  make.__name__ = make.__qualname__ = {"set": "set_"}.get(cls.name, cls.name)
  make.__doc__ = (f"{cls.__name__} around `inner` (see {cls.__name__}); "
                  "mask_init='magnitude' starts from the largest |w| "
                  "(dense-to-sparse fine-tuning).")
  return make


set_ = _drop_and_grow(SET)
rigl = _drop_and_grow(RigL)


def nm_srste(inner: optax.GradientTransformation, n: int = 2, m: int = 4, *,
             axis: int | None = None, decay: float = 2e-4,
             rules: Sequence[RuleLike] | None = None,
             default: Predicate | None = default_filter
             ) -> optax.GradientTransformationExtraArgs:
  """N:M SR-STE around `inner` (see SRSTE)."""
  return SRSTE(n=n, m=m, axis=axis, decay=decay, rules=rules,
               default=default).wrap_optax(inner)


__all__ = [
    "GMP", "LayerSpec", "RigL", "SET", "SRSTE", "SparseState",
    "SparseUpdater", "export", "find_state", "gmp", "layer_densities",
    "masked_params", "nm_mask", "nm_srste", "reset_inner_state", "rigl",
    "set_",
]
