"""A multi-axis attention-like model (linen DenseGeneral kernels (d, heads,
head_dim) and (heads, head_dim, d)) and its 2-D twin (Dense kernels, the
same values reshaped to (K, N)), for checking that scale-group and low-rank
algorithms on multi-axis kernels are the same algorithm on the (K, N) view."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.quantization.scaling import ScaleGroup

D, NH, HD = 12, 2, 8  # d_model != heads * head_dim: shapes cannot be mixed up
T = 6


class Attn(nn.Module):
  """LayerNorm -> q, v (d -> heads, head_dim); a fixed causal token mean of v
  (linear per channel, like attention) -> o (heads, head_dim -> d); and
  p (heads, head_dim -> d) after tanh(q) (no producer: explicit scale)."""

  flat: bool = False

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = nn.LayerNorm(name="ln")(x)

    def proj(name, y):
      if self.flat:
        return nn.Dense(NH * HD, name=name)(y).reshape(b, t, NH, HD)
      return nn.DenseGeneral((NH, HD), name=name)(y)

    def out(name, y):
      if self.flat:
        return nn.Dense(D, name=name)(y.reshape(b, t, NH * HD))
      return nn.DenseGeneral(D, axis=(-2, -1), name=name)(y)

    q, v = proj("q", h), proj("v", h)
    mix = jnp.tril(jnp.ones((t, t))) / jnp.arange(1, t + 1)[:, None]
    z = x + out("o", jnp.einsum("ts,bshd->bthd", mix, v))
    return z + out("p", jnp.tanh(q))


MULTI, FLAT = Attn(), Attn(flat=True)
GROUPS = (
    ScaleGroup(("params/q/kernel", "params/v/kernel"), "norm",
               ("params/ln/scale", "params/ln/bias")),
    ScaleGroup(("params/o/kernel",), "linear",
               ("params/v/kernel", "params/v/bias")),
)  # p: explicit
KERNELS = ("q", "v", "o", "p")


def _shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


def reshape_like(tree, like):
  """Each array of `tree` reshaped (row-major) to the shape in `like`: for
  these kernels that is exactly the (K, N) view over their contraction."""
  shapes = dict(cj.core.leaves_with_paths(like))
  return cj.core.tree.map_with_paths(
      lambda p, a: jnp.reshape(a, shapes[p].shape), tree)


def draw_params(rng: np.random.Generator, shapes):
  """Random params of these shapes, drawn with numpy (no compilation): norm
  scales near 1, small biases, kernels scaled by 1/sqrt(fan-in)."""

  def draw(path, a):
    z = rng.standard_normal(a.shape)
    if path.endswith("scale"):
      z = 1 + 0.3 * z
    elif path.endswith("bias"):
      z = 0.1 * z
    elif path.endswith("kernel"):
      z = z / np.sqrt(a.shape[0])
    return jnp.asarray(z, a.dtype)

  return cj.core.tree.map_with_paths(draw, shapes)


@functools.lru_cache(maxsize=2)  # shared by the test modules of one run
def setup(seed: int):
  """x, the multi-axis params, the same params in 2-D form, and each one's
  calibration statistics (one batch with outlier channels)."""
  rng = np.random.default_rng(seed)
  xs = [(rng.standard_normal((2, T, D)) * np.where(
      np.arange(D) % 5 == 0, 8.0, 1.0)).astype(np.float32)]
  flat = draw_params(rng, _shapes(FLAT, xs[0]))
  multi = reshape_like(flat, _shapes(MULTI, xs[0]))
  return (xs[0], multi, flat, capture(MULTI, multi, xs),
          capture(FLAT, flat, xs))


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) -
                             np.asarray(b, np.float64))))


def compare(out_multi, out_flat, x):
  """Max |difference| of the materialized weights (multi-axis reshaped to
  2-D) and of the two models' outputs through `cj.run`; and the output
  scale, for relative tolerances."""
  dense_m = cj.materialize_tree(out_multi)
  dense_f = cj.materialize_tree(out_flat)
  w = max(max_abs(a, b) for a, b in zip(
      jax.tree.leaves(reshape_like(dense_m, dense_f)),
      jax.tree.leaves(dense_f)))
  ym = cj.run(MULTI, out_multi, x)
  yf = cj.run(FLAT, out_flat, x)
  return w, max_abs(ym, yf), float(np.max(np.abs(np.asarray(yf))))
