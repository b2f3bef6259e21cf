"""Magnitude pruning patterns: exact counts, kept elements, compact storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tests.budget import COMPILING_EXAMPLES

import compressjax as cj
from compressjax.sparsity import nm_sparsify


@settings(max_examples=COMPILING_EXAMPLES)  # each example compiles
@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8),
                           (5, 16)]),
       rows=st.integers(1, 3), cols=st.integers(1, 5), axis=st.integers(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_nm_keeps_exactly_n_largest_of_every_m(nm, rows, cols, axis, seed):
  n, m = nm
  shape = [rows * m, cols] if axis == 0 else [cols, rows * m]
  w = jax.random.normal(jax.random.key(seed), shape)
  s = nm_sparsify(w, n, m, axis)
  s.validate()
  d = np.moveaxis(np.asarray(s.materialize()), axis, -1)
  wt = np.moveaxis(np.asarray(w), axis, -1)
  runs_d = d.reshape(d.shape[:-1] + (-1, m))
  runs_w = wt.reshape(wt.shape[:-1] + (-1, m))
  assert np.all((runs_d != 0).sum(-1) == n)
  # kept values are the original ones, and they are the n largest |w|
  np.testing.assert_array_equal(runs_d[runs_d != 0], runs_w[runs_d != 0])
  kept_min = np.where(runs_d != 0, np.abs(runs_w), np.inf).min(-1)
  dropped_max = np.where(runs_d == 0, np.abs(runs_w), -np.inf).max(-1)
  assert np.all(kept_min >= dropped_max)


def test_nm_storage_is_compact():
  w = jax.random.normal(jax.random.key(0), (128, 64))
  s = nm_sparsify(w, 2, 4)
  assert s.values.shape == (64, 64)
  assert s.indices.dtype == jnp.uint8 and s.indices.shape == (16, 64)  # 2 bits
  assert s.nbytes == 64 * 64 * 4 + 16 * 64
  assert s.bits_per_weight == pytest.approx(17.0)


@settings(max_examples=COMPILING_EXAMPLES)  # each example compiles
@given(sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**31 - 1))
def test_unstructured_per_layer_exact_count_keeps_largest(sparsity, seed):
  w = jax.random.normal(jax.random.key(seed), (24, 10))
  s = cj.sparsify({"k": w}, sparsity, default=lambda p, x: True)["k"]
  d = np.asarray(s.materialize())
  n_prune = round(sparsity * w.size)
  assert (d == 0).sum() == n_prune
  assert s.values.shape == (w.size - n_prune,)
  kept = d != 0
  np.testing.assert_array_equal(d[kept], np.asarray(w)[kept])
  if 0 < n_prune < w.size:
    assert np.abs(np.asarray(w))[kept].min() >= np.abs(np.asarray(w))[~kept].max()


def test_global_threshold_spans_layers():
  big = jax.random.normal(jax.random.key(1), (16, 16)) * 10
  small = jax.random.normal(jax.random.key(2), (16, 16)) * 0.1
  c = cj.sparsify({"a": big, "b": small}, 0.5, scope="global",
                  default=lambda p, x: True)
  sa, sb = c["a"].sparsity, c["b"].sparsity
  assert sb > 0.9 and sa < 0.1
  total = (np.asarray(c["a"].materialize()) == 0).sum() + (
      np.asarray(c["b"].materialize()) == 0).sum()
  assert total == 256


def test_block_pattern_removes_lowest_norm_blocks():
  w = jnp.ones((8, 8)).at[:4, :4].set(0.01).at[4:, 4:].set(0.02)
  s = cj.sparsify({"k": w}, 0.5, pattern="block", block=(4, 4),
                  default=lambda p, x: True)["k"]
  d = np.asarray(s.materialize())
  assert np.all(d[:4, :4] == 0) and np.all(d[4:, 4:] == 0)
  np.testing.assert_array_equal(d[:4, 4:], 1.0)
  assert s.values.shape == (32,) and s.mask.shape == (1,)


@pytest.mark.parametrize("channel_axis", [0, 1])
def test_channel_pattern_removes_whole_slices(channel_axis):
  w = jax.random.normal(jax.random.key(3), (16, 8))
  s = cj.sparsify({"k": w}, 0.25, pattern="channel", channel_axis=channel_axis,
                  default=lambda p, x: True)["k"]
  d = np.asarray(s.materialize())
  zero_slices = np.all(d == 0, axis=1 - channel_axis)
  assert zero_slices.sum() == round(0.25 * w.shape[channel_axis])
  norms = np.linalg.norm(np.asarray(w), axis=1 - channel_axis)
  assert norms[zero_slices].max() <= norms[~zero_slices].min()


def test_sparse_values_can_be_quantized():
  w = jax.random.normal(jax.random.key(4), (64, 16))
  c = cj.chain(cj.transforms.sparsify(pattern="nm", n=2, m=4),
               cj.transforms.quantize(4, group_size=16)).apply({"k": w})["k"]
  assert isinstance(c.values, cj.QArray)
  assert c.bits_per_weight == pytest.approx((2 * 4 + 2 * 2) / 4 + 2 * 32 / 64)
  d = np.asarray(c.materialize())
  assert np.all((d.reshape(16, 4, 16) != 0).sum(1) <= 2)
