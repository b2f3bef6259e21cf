"""One harness for every Pallas kernel: forward, VJP and determinism against a
plain-jnp reference, with tolerances by dtype (after tokamax's test_base).

A kernel test builds its inputs (hypothesis draws shapes, dtypes, block
sizes, masks), then calls

    check_forward(kernel, reference, *args)
    check_vjp(kernel, reference, *args, argnums=(0, 1, 2))
    check_deterministic(kernel, *args)

`kernel` and `reference` take the same positional arguments. Kernels run in
interpret mode on CPU (the tests set JAX_PLATFORMS=cpu) and are wrapped in
`jax.jit` here, so an interpreted kernel is traced once per shape.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (atol, rtol) of the kernel vs the float32 reference, by the dtype the
# kernel computes in. Both sides accumulate in float32; the bound covers the
# rounding of inputs/outputs in the narrow dtype and a different summation
# order (blocked / online softmax).
TOLERANCES = {
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (2e-3, 2e-3),
}


def tolerance(dtype, scale: float = 1.0) -> dict:
  atol, rtol = TOLERANCES[jnp.dtype(dtype)]
  return dict(atol=atol * scale, rtol=rtol * scale)


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def assert_close(actual, expected, dtype, scale: float = 1.0, err_msg=""):
  """|actual - expected| <= atol*s + rtol*|expected| elementwise, where s is
  the largest |expected| (so atol is relative to the output's magnitude)."""
  a, e = _f32(actual), _f32(expected)
  assert a.shape == e.shape, (a.shape, e.shape)
  assert np.all(np.isfinite(a)), f"non-finite kernel output {err_msg}"
  tol = tolerance(dtype, scale)
  mag = max(float(np.max(np.abs(e), initial=0.0)), 1.0)
  np.testing.assert_allclose(a, e, atol=tol["atol"] * mag, rtol=tol["rtol"],
                             err_msg=err_msg)


def check_forward(kernel: Callable, reference: Callable, *args,
                  dtype=None, scale: float = 1.0, **kwargs):
  """kernel(*args) equals reference(*args) within the dtype's tolerance."""
  out = jax.jit(lambda *a: kernel(*a, **kwargs))(*args)
  ref = jax.jit(lambda *a: reference(*a, **kwargs))(*args)
  dtype = dtype or jnp.result_type(out)
  jax.tree.map(lambda o, r: assert_close(o, r, dtype, scale, "forward"),
               out, ref)
  return out


def check_vjp(kernel: Callable, reference: Callable, *args,
              argnums: Sequence[int], dtype=None, scale: float = 1.0,
              seed: int = 0, **kwargs):
  """Gradients w.r.t. `argnums` of <kernel(args), g> equal the reference's,
  for a random cotangent g (so every output element is exercised)."""
  out = jax.eval_shape(lambda *a: kernel(*a, **kwargs), *args)
  g = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32)

  def loss(f):
    return lambda *a: jnp.sum(f(*a, **kwargs).astype(jnp.float32) * g)

  gk = jax.jit(jax.grad(loss(kernel), argnums=tuple(argnums)))(*args)
  gr = jax.jit(jax.grad(loss(reference), argnums=tuple(argnums)))(*args)
  dtype = dtype or out.dtype
  for i, a, b in zip(argnums, gk, gr):
    assert_close(a, b, dtype, scale, f"gradient of argument {i}")
  return gk


def check_deterministic(kernel: Callable, *args, **kwargs):
  """Two runs give bit-identical outputs."""
  f = jax.jit(lambda *a: kernel(*a, **kwargs))
  a, b = f(*args), f(*args)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y)), a, b)
