"""pallas_kernels.quantized_matmul vs the plain-jnp references (interpret mode).

Every kernel runs in Pallas interpret mode on CPU; the GPU (fori_loop over K)
and TPU (block tables) variants are exercised with interpret=True too, which
checks their indexing and block choices, not their lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from pallas_kernels import layout, reference
from pallas_kernels import quantized_matmul as qm
from tests.pallas_kernels import harness

BLOCK_M = (None, 8, 16, 32)
BLOCK_N = (None, 16, 32, 128)
BLOCK_K = (None, 16, 32, 64, 128)


@st.composite
def problems(draw, max_m=70, max_n=200):
  bits = draw(st.sampled_from([8, 4]))
  if draw(st.booleans()):  # per-channel, any K (odd K for int4 included)
    g, k = 1, draw(st.integers(1, 300))
  else:
    g = draw(st.sampled_from([2, 3, 4]))
    k = g * draw(st.sampled_from([8, 16, 32, 48]))
  storage = draw(st.sampled_from(
      [("int8", 0), ("uint8", -128), ("uint8", 0)] if bits == 8 else
      [("uint8", -8), ("uint8", 0)]))
  return dict(
      bits=bits, g=g, k=k, storage=storage,
      m=draw(st.integers(1, max_m)), n=draw(st.integers(1, max_n)),
      scale_cols=draw(st.sampled_from(["n", "1"])),
      zero=draw(st.sampled_from([None, "n", "1", "uint8"])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      blocks=dict(block_m=draw(st.sampled_from(BLOCK_M)),
                  block_n=draw(st.sampled_from(BLOCK_N)),
                  block_k=draw(st.sampled_from(BLOCK_K))),
      seed=draw(st.integers(0, 2**16)))


def make_inputs(p):
  """(x, codes, scale, zero) and the static kwargs for problem p."""
  rng = np.random.default_rng(p["seed"])
  bits, k, n, g = p["bits"], p["k"], p["n"], p["g"]
  x = jnp.asarray(rng.normal(size=(p["m"], k)), p["dtype"])
  kind, offset = p["storage"]
  if kind == "int8":
    codes = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
  else:
    codes = layout.pack(jnp.asarray(rng.integers(0, 2**bits, (k, n))), bits)
  cols = n if p["scale_cols"] == "n" else 1
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (g, cols)) / np.sqrt(k) /
                      2**bits, jnp.float32)
  zero = None
  if p["zero"] is not None:
    zcols = 1 if p["zero"] == "1" else n
    zdtype = jnp.uint8 if p["zero"] == "uint8" else jnp.float32
    zero = jnp.asarray(rng.integers(0, 2**bits, (g, zcols)), zdtype)
  return (x, codes, scale, zero), dict(bits=bits, k=k, offset=offset)


# Always run: odd K with per-channel int4 (layout zero-pads the last byte), and
# a block_k (32) that neither divides nor is a multiple of the group (48).
ODD_K_INT4 = dict(bits=4, g=1, k=75, storage=("uint8", -8), m=33, n=130,
                  scale_cols="n", zero="n", dtype=jnp.bfloat16, seed=0,
                  blocks=dict(block_m=16, block_n=32, block_k=16))
GROUPED_INT8 = dict(bits=8, g=4, k=192, storage=("int8", 0), m=70, n=200,
                    scale_cols="1", zero=None, dtype=jnp.float32, seed=1,
                    blocks=dict(block_m=32, block_n=128, block_k=32))


@settings(max_examples=10, deadline=None)
@given(problems())
@example(ODD_K_INT4)
@example(GROUPED_INT8)
def test_forward_matches_reference(p):
  args, kw = make_inputs(p)
  kernel = functools.partial(qm.quantized_matmul, **p["blocks"])
  harness.check_forward(kernel, reference.quantized_matmul, *args, **kw)


@settings(max_examples=5, deadline=None)
@given(problems(max_m=24, max_n=64))
def test_vjp_matches_reference(p):
  args, kw = make_inputs(p)
  zero = args[3]
  argnums = (0, 2) + ((3,) if zero is not None and zero.dtype == jnp.float32
                      else ())
  kernel = functools.partial(qm.quantized_matmul, **p["blocks"])
  harness.check_vjp(kernel, reference.quantized_matmul, *args,
                    argnums=argnums, **kw)


def test_bits2_batched_x_out_dtype_and_determinism():
  rng = np.random.default_rng(1)
  k, n = 96, 40
  x = jnp.asarray(rng.normal(size=(2, 3, k)), jnp.bfloat16)
  codes = layout.pack(jnp.asarray(rng.integers(0, 4, (k, n))), 2)
  scale = jnp.asarray(rng.uniform(0.1, 0.2, (3, n)), jnp.float32)
  zero = jnp.asarray(rng.integers(0, 4, (3, 1)), jnp.float32)
  kw = dict(bits=2, k=k, offset=-2, out_dtype=jnp.float32)
  kernel = functools.partial(qm.quantized_matmul, block_k=16, block_n=16)
  out = harness.check_forward(kernel, reference.quantized_matmul, x, codes,
                              scale, zero, dtype=jnp.bfloat16, **kw)
  assert out.shape == (2, 3, n) and out.dtype == jnp.float32
  harness.check_deterministic(kernel, x, codes, scale, zero, **kw)


@pytest.mark.parametrize("backend,g,k", [("gpu", 2, 128), ("gpu", 1, 75),
                                         ("tpu", 4, 512)])
def test_backend_variants_in_interpret_mode(backend, g, k):
  """The GPU fori_loop kernel and the TPU block table, run interpreted."""
  rng = np.random.default_rng(2)
  n = 150
  x = jnp.asarray(rng.normal(size=(9, k)), jnp.float32)
  codes = layout.pack(jnp.asarray(rng.integers(0, 16, (k, n))), 4)
  scale = jnp.asarray(rng.uniform(0.01, 0.02, (g, n)), jnp.float32)
  zero = jnp.asarray(rng.integers(0, 16, (g, n)), jnp.float32)
  kernel = functools.partial(qm.quantized_matmul, backend=backend,
                             interpret=True,
                             block_k={1: None, 2: 32, 4: 256}[g])
  harness.check_forward(kernel, reference.quantized_matmul, x, codes, scale,
                        zero, bits=4, k=k, offset=-8)


@pytest.mark.parametrize("vdtype,g,dtype", [
    (jnp.float8_e4m3fn, 1, jnp.float32), (jnp.float8_e5m2, 3, jnp.bfloat16),
    (jnp.float8_e4m3fn, 2, jnp.bfloat16)])
def test_fp8_forward(vdtype, g, dtype):
  rng = np.random.default_rng(3)
  m, k, n = 13, 96, 70
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  values = jnp.asarray(rng.normal(size=(k, n)), jnp.float32).astype(vdtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (g, n if g > 1 else 1)),
                      jnp.float32)
  kernel = functools.partial(qm.fp8_matmul, block_k=32, block_m=8)
  harness.check_forward(kernel, qm.fp8_matmul_reference, x, values, scale)


def test_fp8_reference_and_vjp():
  rng = np.random.default_rng(4)
  m, k, n, g = 5, 64, 24, 2
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(k, n)), jnp.float32).astype(
      jnp.float8_e4m3fn)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (g, n)), jnp.float32)
  dense = values.astype(jnp.float32) * jnp.repeat(scale, k // g, axis=0)
  harness.assert_close(qm.fp8_matmul_reference(x, values, scale),
                       np.asarray(x, np.float64) @ np.asarray(dense),
                       jnp.float32)
  harness.check_vjp(qm.fp8_matmul, qm.fp8_matmul_reference, x, values, scale,
                    argnums=(0, 2))


@pytest.mark.parametrize("lead,k,n,w_scale_1d,kw", [
    ((2, 5), 96, 33, False, {}),
    ((7,), 50, 130, True, dict(block_m=8, block_n=16, block_k=16)),
    ((3,), 64, 20, False, dict(backend="gpu", interpret=True)),
])
def test_int8_matmul_bit_exact(lead, k, n, w_scale_1d, kw):
  rng = np.random.default_rng(5)
  xq = jnp.asarray(rng.integers(-128, 128, lead + (k,)), jnp.int8)
  wq = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
  xs = jnp.asarray(rng.uniform(1e-3, 1e-2, lead + (1,)), jnp.float32)
  ws = jnp.asarray(rng.uniform(1e-3, 1e-2, (n,) if w_scale_1d else (1, n)),
                   jnp.float32)
  out = jax.jit(lambda *a: qm.int8_matmul(*a, **kw))(xq, xs, wq, ws)
  ref = jax.jit(reference.int8_matmul)(xq, xs, wq, ws)
  assert out.dtype == jnp.float32 and out.shape == lead + (n,)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def _q(k=96, n=8, g=3, bits=4, **kw):
  x = kw.pop("x", jnp.zeros((2, k), jnp.float32))
  codes = kw.pop("codes", jnp.zeros((layout.packed_length(k, bits), n),
                                    jnp.uint8))
  scale = kw.pop("scale", jnp.ones((g, n), jnp.float32))
  zero = kw.pop("zero", None)
  return lambda: qm.quantized_matmul(x, codes, scale, zero, bits=bits, k=k,
                                     **kw)


_I8 = jnp.zeros((2, 16), jnp.int8)
ERRORS = [
    (_q(scale=jnp.ones((5, 8))), "G=5 groups, which does not divide k=96"),
    (_q(codes=jnp.zeros((96, 8), jnp.uint8)), "codes has 96 rows"),
    (_q(codes=jnp.zeros((48, 8), jnp.int32)), "codes must be a 2-D"),
    (_q(x=jnp.zeros((2, 95))), "last axis must be k=96"),
    (_q(x=jnp.zeros((2, 96), jnp.int32)), "x must be float32"),
    (_q(scale=jnp.ones((3, 7))), r"scale has shape \(3, 7\)"),
    (_q(zero=jnp.ones((2, 8))), "zero has 2 groups but scale has 3"),
    (_q(bits=3, codes=jnp.zeros((36, 8), jnp.uint8)), "bits must be one of"),
    (_q(k=18, g=6, codes=jnp.zeros((9, 8), jnp.uint8)),
     "group size K/G=3 must be a multiple of 2"),
    (_q(backend="gpu", interpret=True, block_m=24), "powers of two >= 16"),
    (_q(k=80, g=2, codes=jnp.zeros((40, 8), jnp.uint8), backend="gpu",
        interpret=True), "multiple or divisor of the group size K/G=40"),
    (_q(backend="tpu", interpret=True, block_n=100), "multiples of 128"),
    (_q(block_k=15), "block_k=15 must be a multiple of 2"),
    (_q(backend="metal"), "backend must be"),
    (lambda: qm.fp8_matmul(jnp.zeros((2, 16)), jnp.zeros((16, 4)),
                           jnp.ones((1, 4))), "values must be a 2-D float8"),
    (lambda: qm.int8_matmul(jnp.zeros((2, 16)), jnp.ones((2, 1)),
                            jnp.zeros((16, 4), jnp.int8), jnp.ones((1, 4))),
     "xq and wq must be int8"),
    (lambda: qm.int8_matmul(_I8, jnp.ones((2, 1)), jnp.zeros((16, 4),
                                                             jnp.int8),
                            jnp.ones((1, 3))), r"w_scale has shape \(1, 3\)"),
    (lambda: qm.int8_matmul(_I8, jnp.ones((3, 1)), jnp.zeros((16, 4),
                                                             jnp.int8),
                            jnp.ones((1, 4))), r"x_scale has shape \(3, 1\)"),
]


@pytest.mark.parametrize("call,match", ERRORS,
                         ids=[m[:24] for _, m in ERRORS])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_tuning_table_is_valid_for_its_backend():
  for (backend, bits), rows in qm.TUNING.items():
    assert rows[-1][0] is None
    per = 8 // bits
    for _, blocks in rows:
      qm._fit_mn("block_m", blocks["block_m"], 10**6, backend)
      qm._fit_mn("block_n", blocks["block_n"], 10**6, backend)
      assert qm._k_aligned(blocks["block_k"], per, backend), (backend, bits)
  assert qm.select_blocks("tpu", 8, 1)["block_m"] == 8
  assert qm.select_blocks("tpu", 8, 16)["block_m"] == 16
  assert qm.select_blocks("tpu", 8, 4096)["block_m"] == 256
  assert qm.select_blocks("gpu", 4, 100) == dict(block_m=64, block_n=128,
                                                 block_k=128)
