"""Bit packing: round trips bit-exactly and matches the documented layout."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from pallas_kernels import layout


@given(bits=st.integers(1, 8), n=st.integers(1, 40), cols=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip_bit_exact(bits, n, cols, seed):
  rng = np.random.default_rng(seed)
  u = rng.integers(0, 2**bits, size=(n, cols), dtype=np.uint8)
  p = layout.pack(u, bits, axis=0)
  assert p.dtype == jnp.uint8
  assert p.shape == (layout.packed_length(n, bits), cols)
  np.testing.assert_array_equal(np.asarray(layout.unpack(p, bits, n, 0)), u)


@given(bits=st.integers(1, 7), n=st.integers(1, 33),
       seed=st.integers(0, 2**31 - 1))
def test_pack_matches_bitstream_definition(bits, n, seed):
  u = np.random.default_rng(seed).integers(0, 2**bits, size=n, dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(layout.pack(u, bits, 0)),
                                layout.pack_reference(u, bits))


def test_int4_nibble_order_documented():
  # code 2i in the low nibble, code 2i+1 in the high nibble
  p = np.asarray(layout.pack(np.array([0x1, 0xA, 0x3, 0xF], np.uint8), 4, 0))
  np.testing.assert_array_equal(p, [0xA1, 0xF3])


@given(bits=st.sampled_from([2, 3, 4]), axis=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_pack_along_any_axis(bits, axis, seed):
  u = np.random.default_rng(seed).integers(0, 2**bits, size=(5, 6, 7),
                                           dtype=np.uint8)
  p = layout.pack(u, bits, axis)
  ref = np.moveaxis(layout.pack(np.moveaxis(u, axis, 0), bits, 0), 0, axis)
  np.testing.assert_array_equal(np.asarray(p), np.asarray(ref))
  np.testing.assert_array_equal(
      np.asarray(layout.unpack(p, bits, u.shape[axis], axis)), u)
