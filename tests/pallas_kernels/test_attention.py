"""Block-sparse flash attention kernel vs the plain-jnp reference (interpret
mode on CPU): forward, VJP, determinism, skipped empty blocks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.attention import mask as M
from pallas_kernels.attention.kernel import block_sparse_attention
from pallas_kernels.attention.reference import attention_reference
from tests.pallas_kernels import harness

MASK_KINDS = ["full", "causal", "local", "chunked", "sinks", "blocks", "andor"]


def _make_mask(kind, shape, hq, seed, bq, bk):
  if kind == "full":
    return M.FullMask(shape)
  if kind == "causal":
    return M.CausalMask(shape, offset=shape[1] - shape[0])
  if kind == "local":
    return M.LocalMask(shape, 24, 7)
  if kind == "chunked":
    return M.ChunkedMask(shape, 37)
  if kind == "sinks":
    return M.SinkWindowMask(shape, 4, 29)
  if kind == "andor":
    return (M.CausalMask(shape) & M.LocalMask(shape, 40, 0)) | M.SinkWindowMask(
        shape, 2, 5)
  # Random per-head block masks: empty / full / random-partial blocks.
  rng = np.random.default_rng(seed)
  heads = []
  nb = (-(-shape[0] // bq), -(-shape[1] // bk))
  for _ in range(hq):
    blocks = rng.choice(3, size=nb, p=[0.4, 0.3, 0.3])
    el = np.repeat(np.repeat(blocks, bq, 0), bk, 1)[:shape[0], :shape[1]]
    el = np.where(el == 2, rng.random(el.shape) < 0.7, el == 1)
    heads.append(M.NumpyMask(el))
  return M.MultiHeadMask(tuple(heads))


def _inputs(seed, b, hq, hkv, lq, lk, d, dtype):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, hq, lq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, hkv, lk, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, hkv, lk, d), jnp.float32).astype(dtype)
  return q, k, v


@st.composite
def cases(draw):
  lq, lk = draw(st.integers(40, 300)), draw(st.integers(40, 300))
  hq, hkv = draw(st.sampled_from([(4, 2), (4, 1), (2, 2)]))
  bq, bk = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))
  kind = draw(st.sampled_from(MASK_KINDS))
  seed = draw(st.integers(0, 2**16))
  return dict(
      shape=(1, hq, hkv, lq, lk, 16), block_q=bq, block_kv=bk,
      mask=_make_mask(kind, (lq, lk), hq, seed, bq, bk), seed=seed,
      soft_cap=draw(st.sampled_from([None, 4.0])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])))


def _kernel(c, backend=None):
  return functools.partial(block_sparse_attention, block_q=c["block_q"],
                           block_kv=c["block_kv"], backend=backend)


@settings(max_examples=6, deadline=None)
@given(cases())
def test_forward(c):
  q, k, v = _inputs(c["seed"], *c["shape"], c["dtype"])
  harness.check_forward(_kernel(c), attention_reference, q, k, v,
                        mask=c["mask"], soft_cap=c["soft_cap"])


@settings(max_examples=4, deadline=None)
@given(cases())
def test_vjp(c):
  q, k, v = _inputs(c["seed"], *c["shape"], c["dtype"])
  harness.check_vjp(_kernel(c), attention_reference, q, k, v,
                    argnums=(0, 1, 2), mask=c["mask"], soft_cap=c["soft_cap"])


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_gpu_driver_interpret(soft_cap):
  """The fori_loop (Triton-style) driver, in interpret mode."""
  shape = (1, 4, 2, 70, 90, 16)
  c = dict(block_q=16, block_kv=32)
  q, k, v = _inputs(1, *shape, jnp.float32)
  mask = (M.LocalMask((70, 90), 10, 5) | M.SinkWindowMask((70, 90), 3, 8))
  kern = _kernel(c, backend="gpu")
  harness.check_forward(kern, attention_reference, q, k, v, mask=mask,
                        soft_cap=soft_cap)
  harness.check_vjp(kern, attention_reference, q, k, v, argnums=(0, 1, 2),
                    mask=mask, soft_cap=soft_cap)


def test_deterministic():
  q, k, v = _inputs(2, 1, 4, 2, 50, 70, 16, jnp.bfloat16)
  kern = _kernel(dict(block_q=32, block_kv=32))
  harness.check_deterministic(kern, q, k, v, mask=M.CausalMask((50, 70), 20))
  harness.check_deterministic(
      jax.grad(lambda q, k, v, mask: jnp.sum(
          kern(q, k, v, mask).astype(jnp.float32)), argnums=(0, 1, 2)),
      q, k, v, mask=M.CausalMask((50, 70), 20))


def test_empty_blocks_are_skipped():
  """K/V in blocks no query attends are NaN: a visited block would poison the
  output (0 * NaN) or its gradients; results stay finite and correct."""
  lq, lk, bk = 64, 256, 32
  mask = M.CausalMask((lq, lk))            # keys >= 64 are never attended
  info = M.compile_mask(mask, 16, bk)
  # q blocks 0, 1 see kv block 0; q blocks 2, 3 see kv blocks 0, 1.
  assert info.kv_counts.tolist() == [[1, 1, 2, 2]]
  assert M.density(info) == pytest.approx(6 / 32)
  q, k, v = _inputs(3, 1, 2, 1, lq, lk, 16, jnp.float32)
  poison = jnp.arange(lk)[None, None, :, None] >= lq
  kp, vp = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  kern = _kernel(dict(block_q=16, block_kv=bk))
  out = jax.jit(lambda q, k, v: kern(q, k, v, mask))(q, kp, vp)
  ref = attention_reference(q, k, v, mask)
  harness.assert_close(out, ref, jnp.float32)
  g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kern(q, k, v, mask) ** 2),
                       argnums=(0, 1, 2)))(q, kp, vp)
  gr = jax.grad(lambda q, k, v: jnp.sum(attention_reference(q, k, v, mask)**2),
                argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, gr):
    harness.assert_close(a, b, jnp.float32)


def test_fully_masked_rows_are_zero():
  arr = np.ones((40, 50), bool)
  arr[5:20] = False                       # rows with nothing to attend
  mask = M.NumpyMask(arr)
  q, k, v = _inputs(4, 1, 2, 2, 40, 50, 16, jnp.float32)
  kern = _kernel(dict(block_q=16, block_kv=16))
  out = harness.check_forward(kern, attention_reference, q, k, v, mask=mask)
  assert np.all(np.asarray(out)[:, :, 5:20] == 0)
  dq = harness.check_vjp(kern, attention_reference, q, k, v, argnums=(0,),
                         mask=mask)[0]
  assert np.all(np.asarray(dq)[:, :, 5:20] == 0)
