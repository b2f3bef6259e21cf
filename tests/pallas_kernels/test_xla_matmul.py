"""The blocked XLA quantized matmuls equal the plain-jnp references."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tests.budget import COMPILING_EXAMPLES

from pallas_kernels import layout, reference, xla_matmul
from tests.pallas_kernels import harness


@st.composite
def problems(draw):
  bits = draw(st.sampled_from([2, 3, 4, 8]))
  groups = draw(st.sampled_from([1, 1, 2, 3, 8]))
  group = draw(st.sampled_from([16, 24, 32, 64, 15]))
  if groups == 1:
    k = draw(st.integers(1, 300))
  else:
    k = groups * group
  n = draw(st.integers(1, 40))
  m = draw(st.integers(1, 6))
  zero = draw(st.booleans())
  use_lut = draw(st.booleans())
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  u = rng.integers(0, 2**bits, (k, n)).astype(np.uint8)
  codes = layout.pack(jnp.asarray(u), bits, 0)
  ng = 1 if groups == 1 else groups
  scale = jnp.asarray(rng.uniform(0.5, 2.0, (ng, draw(st.sampled_from([1, n])))),
                      jnp.float32)
  z = (jnp.asarray(rng.integers(0, 2**bits, scale.shape), jnp.uint8)
       if zero else None)
  lut = (jnp.asarray(rng.normal(size=2**bits), jnp.float32) if use_lut
         else None)
  x = jnp.asarray(rng.normal(size=(m, k)), draw(
      st.sampled_from([jnp.float32, jnp.bfloat16])))
  return x, codes, scale, z, dict(bits=bits, k=k, offset=-(2**(bits - 1)),
                                  lut=lut)


@contextlib.contextmanager
def whole_tile_limit(nbytes):
  saved = xla_matmul.DENSE_TILE_BYTES
  xla_matmul.DENSE_TILE_BYTES = nbytes
  try:
    yield
  finally:
    xla_matmul.DENSE_TILE_BYTES = saved


# 0: every weight scanned in K blocks (large weights); 2**40: every weight
# dequantized as one tile (small weights)
@pytest.mark.parametrize("limit", [0, 2**40], ids=["scanned", "whole_tile"])
@settings(max_examples=COMPILING_EXAMPLES, deadline=None)
@given(p=problems())
def test_blocked_equals_reference(limit, p):
  x, codes, scale, zero, kw = p
  with whole_tile_limit(limit):
    harness.check_forward(xla_matmul.quantized_matmul,
                          reference.quantized_matmul, x, codes, scale, zero,
                          **kw)


@pytest.mark.parametrize("k,block", [(1000, None), (4096, None), (100, 64)])
def test_explicit_and_padded_blocks(k, block):
  rng = np.random.default_rng(k)
  codes = layout.pack(jnp.asarray(rng.integers(0, 16, (k, 24)), jnp.uint8), 4)
  scale = jnp.asarray(rng.uniform(0.5, 2, (1, 24)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(3, k)), jnp.float32)
  kw = dict(bits=4, k=k, offset=-8)
  with whole_tile_limit(0):  # these shapes are small enough for one tile
    y = xla_matmul.quantized_matmul(x, codes, scale, block=block, **kw)
  harness.assert_close(y, reference.quantized_matmul(x, codes, scale, **kw),
                       jnp.float32)


def test_block_choice_respects_groups_and_bytes():
  for k, group, unit in [(4096, 128, 2), (4096, 4096, 2), (1000, 1000, 2),
                         (1009, 1009, 2), (384, 32, 8), (300, 100, 1)]:
    block, kp = xla_matmul.choose_block(k, group, unit)
    assert kp % block == 0 and block % unit == 0 and kp >= k
    if group < k:
      assert kp == k and (block % group == 0 or group % block == 0)
  assert xla_matmul.choose_block(45, 15, 2) is None  # odd packed groups


@pytest.mark.parametrize("limit", [0, 2**40], ids=["scanned", "whole_tile"])
def test_gradients_match_reference(limit):
  rng = np.random.default_rng(0)
  codes = layout.pack(jnp.asarray(rng.integers(0, 16, (64, 8)), jnp.uint8), 4)
  scale = jnp.asarray(rng.uniform(0.5, 2, (4, 8)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
  f = lambda impl: lambda x, s: impl(x, codes, s, bits=4, k=64, offset=-8)  # noqa: E731
  with whole_tile_limit(limit):
    harness.check_vjp(f(xla_matmul.quantized_matmul),
                      f(reference.quantized_matmul), x, scale, argnums=(0, 1))


@pytest.mark.parametrize("k", [7, 1024, 2048, 3000])
def test_int8_matmul_is_int32_exact(k):
  # extremes: every product is (-128)(-128) = 2**14, the worst case for the
  # float32 partial sums
  xq = jnp.full((2, k), -128, jnp.int8)
  wq = jnp.full((k, 3), -128, jnp.int8)
  rng = np.random.default_rng(k)
  xq = xq.at[1].set(jnp.asarray(rng.integers(-128, 128, k), jnp.int8))
  xs = jnp.asarray(rng.uniform(size=(2, 1)), jnp.float32)
  ws = jnp.asarray(rng.uniform(size=(1, 3)), jnp.float32)
  np.testing.assert_array_equal(
      xla_matmul.int8_matmul(xq, xs, wq, ws),
      reference.int8_matmul(xq, xs, wq, ws))


@pytest.mark.parametrize("limit", [0, 2**40], ids=["scanned", "whole_tile"])
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_bytes_equal_their_value_table(limit, dtype):
  """`float8=`: the bytes cast to their float8 values equal the reference
  with the 256-entry table of those values (finite codes)."""
  rng = np.random.default_rng(1)
  vals = rng.normal(size=(64, 24)).astype(np.float32)
  codes = jax.lax.bitcast_convert_type(jnp.asarray(vals).astype(dtype),
                                       jnp.uint8)
  table = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8),
                                       jnp.dtype(dtype)).astype(jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2, (4, 24)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
  with whole_tile_limit(limit):
    y = xla_matmul.quantized_matmul(x, codes, scale, bits=8, k=64,
                                    float8=dtype)
  want = reference.quantized_matmul(x, codes, scale, bits=8, k=64, lut=table)
  harness.assert_close(y, want, jnp.float32)
