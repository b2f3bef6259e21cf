"""Contraction axes: the shape default, validation, the (K, N) matrix view."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import compressjax as cj
from compressjax.core.contraction import (MatrixLayout, default_contract,
                                          normalize_contract)


@pytest.mark.parametrize("shape,want", [
    ((64,), (0,)),
    ((128, 256), (0,)),                 # Dense (in, out)
    ((512, 8, 64), (0,)),               # Einsum / DenseGeneral in-projection
    ((512, 2, 64), (0,)),               # grouped-query k/v projection
    ((8, 64, 512), (0, 1)),             # out-projection (heads, head_dim, d)
    ((3, 64, 128), (0, 1)),             # 1-D conv (width, in, out)
    ((3, 3, 64, 128), (0, 1, 2)),       # 2-D conv HWIO
    ((3, 3, 3, 16, 32), (0, 1, 2, 3)),  # 3-D conv
])
def test_default_contraction_follows_flax_conventions(shape, want):
  assert default_contract(shape) == want


@pytest.mark.parametrize("axes,shape,match", [
    (2, (4, 8), r"axis 2 out of range for shape \(4, 8\)"),
    (-3, (4, 8), r"axis -3 out of range"),
    ((0, 0), (4, 8, 2), "repeats"),
    (0.0, (4, 8), "int or a tuple of ints"),
    (True, (4, 8), "int or a tuple of ints"),
    (None, (), "0-D"),
])
def test_bad_axes_are_errors_not_wraps(axes, shape, match):
  with pytest.raises(cj.CompressionError, match=match) as e:
    normalize_contract(axes, shape, "p/kernel")
  assert e.value.path == "p/kernel"


def test_negative_axes_normalize():
  assert normalize_contract((-4, -3), (3, 3, 8, 16)) == (0, 1)
  assert normalize_contract(-1, (4, 8)) == (1,)


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       data=st.data())
def test_matrix_view_is_numpy_transpose_reshape_and_inverts(shape, data):
  nd = len(shape)
  contract = tuple(data.draw(st.permutations(range(nd)))[
      :data.draw(st.integers(1, nd))])
  lay = MatrixLayout(tuple(shape), contract)
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # numpy in
  rest = [d for d in range(nd) if d not in contract]
  want = x.transpose(list(contract) + rest).reshape(
      int(np.prod([shape[d] for d in contract])), -1)
  m = np.asarray(lay.to_matrix(x))
  np.testing.assert_array_equal(m, want)
  assert (lay.k, lay.n) == want.shape
  np.testing.assert_array_equal(np.asarray(lay.from_matrix(m)), x)


@pytest.mark.parametrize("kw,match", [
    (dict(pattern="channel", channel_axis=2), r"channel_axis=2 is not an axis"),
    (dict(pattern="nm", n=2, m=4, axis=-3), r"axis=-3 is not an axis"),
])
def test_sparsify_axes_out_of_range_are_errors(kw, match):
  import jax.numpy as jnp
  with pytest.raises(cj.CompressionError, match=match) as e:
    cj.sparsify({"blk": {"kernel": jnp.ones((8, 8))}}, 0.5, **kw)
  assert e.value.path == "blk/kernel"
