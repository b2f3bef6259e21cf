"""Mask selection from scores: the one selector every pruner uses.

Pruners differ only in their scores (as jaxpruner's `calculate_scores`):
|w| (magnitude), |w| * ||x|| (Wanda, Sun et al. 2023, Eq. 1), w^2 / [H^-1]_jj
(SparseGPT, Frantar & Alistarh 2023, Sec. 3.3), |w| or gradients during
training (compressjax.train.sparse). They all pick their mask here:

  prune_lowest(scores, n_prune, axis)  removes the n_prune lowest scores over
      the whole array or in every slice along `axis`; ties: the lower index
      goes first. Radix select on the scores' bit patterns (32 counting passes,
      no sort): the exact n-th smallest key, then one cumulative count for
      ties at it. n_prune may be traced (one compiled program serves every
      sparsity) and may differ per slice.
  keep_top_n_of_m(scores, n, m, axis)  keeps the n highest of every m
      consecutive scores along `axis` (N:M; ties: the earlier position
      stays). Pairwise ranks for m <= 16, one sort of the runs beyond.

Scores must not be NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sort_keys(scores) -> jax.Array:
  """uint32 keys ordered as the float32 scores (-0 and +0 equal)."""
  x = jnp.asarray(scores, jnp.float32) + 0.0  # -0.0 -> +0.0
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  neg = (b >> 31) == 1
  return jnp.where(neg, ~b, b | jnp.uint32(0x80000000))


def _count(pred, axis):
  if axis is None:
    # per-column counts in float (exact below 2^24) vectorize better
    return jnp.sum(jnp.sum(pred.reshape(pred.shape[0], -1).astype(
        jnp.float32), axis=0).astype(jnp.int32))
  return jnp.sum(pred, axis=axis, dtype=jnp.int32, keepdims=True)


# jitted (one compiled program per shape, shared by every caller): eagerly,
# the radix loop would be traced and compiled again at each call
@functools.partial(jax.jit, static_argnames=("axis",))
def prune_lowest(scores, n_prune, axis: int | None = None) -> jax.Array:
  """Boolean keep mask without the n_prune lowest scores (see module doc).

  `n_prune`: an int or a traced int32 scalar; with `axis`, also an array
  broadcasting against the slices (shape of scores with `axis` of size 1).
  """
  key = sort_keys(scores)
  axis = None if axis is None else axis % key.ndim
  n = jnp.asarray(n_prune, jnp.int32)
  shape = () if axis is None else key.shape[:axis] + (1,) + key.shape[
      axis + 1:]

  # the n-th smallest key v, bit by bit from the top: with bit b of v zero
  # and all lower bits one, at least n keys are <= it iff bit b of v is 0
  def bit(i, v):
    b = jnp.uint32(31) - i.astype(jnp.uint32)
    cand = v | ((jnp.uint32(1) << b) - jnp.uint32(1))
    enough = _count(key <= cand, axis) >= n
    return jnp.where(enough, v, v | (jnp.uint32(1) << b))

  v = jax.lax.fori_loop(0, 32, bit, jnp.zeros(shape, jnp.uint32))
  below = key < v
  tie = key == v  # n <= 0: v = 0, which no key equals, and nothing goes
  need = n - _count(below, axis)
  if axis is None:
    rank = jnp.cumsum(tie.reshape(-1)).reshape(tie.shape)
  else:
    rank = jnp.cumsum(tie, axis=axis)
  return ~(below | (tie & (rank <= need)))


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def keep_top_n_of_m(scores, n: int, m: int, axis: int = 0) -> jax.Array:
  """Keep mask of the n highest of every m consecutive scores along `axis`
  (ties: the earlier position stays); that axis must divide by m."""
  s = jnp.moveaxis(jnp.asarray(scores), axis, -1)
  runs = s.reshape(s.shape[:-1] + (s.shape[-1] // m, m))
  if m <= 16:  # pairwise ranks: no sort
    a, b = runs[..., :, None], runs[..., None, :]
    pos = jnp.arange(m)
    ahead = (b > a) | ((b == a) & (pos[None, :] < pos[:, None]))
    keep = ahead.sum(-1) < n
  else:
    order = jnp.argsort(-runs, axis=-1, stable=True)
    keep = jnp.put_along_axis(jnp.zeros(runs.shape, bool), order[..., :n],
                              True, axis=-1, inplace=False)
  return jnp.moveaxis(keep.reshape(s.shape), -1, axis)
