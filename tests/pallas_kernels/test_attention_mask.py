"""Mask algebra and its compilation to block metadata (pallas_kernels.attention.mask)."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.attention import mask as M

SETTINGS = settings(max_examples=10, deadline=None)


def _loops(shape, pred):
  """Dense mask from a per-element python predicate (independent definition)."""
  out = np.zeros(shape, bool)
  for i, j in itertools.product(range(shape[0]), range(shape[1])):
    out[i, j] = pred(i, j)
  return out


@st.composite
def masks(draw, shape=None, allow_numpy=True):
  """A random mask and its definition as an element predicate."""
  if shape is None:
    shape = (draw(st.integers(1, 70)), draw(st.integers(1, 70)))
  kinds = ["full", "causal", "local", "chunked", "sinks"]
  kinds += ["numpy"] if allow_numpy else []
  kind = draw(st.sampled_from(kinds))
  if kind == "full":
    return M.FullMask(shape), lambda i, j: True
  if kind == "causal":
    off = draw(st.integers(-10, 20))
    return M.CausalMask(shape, off), lambda i, j: j <= i + off
  if kind == "local":
    wl = draw(st.one_of(st.none(), st.integers(0, 20)))
    wr = draw(st.one_of(st.none(), st.integers(0, 20)))
    return M.LocalMask(shape, wl, wr), lambda i, j: (
        (wl is None or j >= i - wl) and (wr is None or j <= i + wr))
  if kind == "chunked":
    c = draw(st.integers(1, 25))
    return M.ChunkedMask(shape, c), lambda i, j: i // c == j // c and j <= i
  if kind == "sinks":
    s, w = draw(st.integers(0, 5)), draw(st.integers(1, 20))
    return M.SinkWindowMask(shape, s, w), lambda i, j: j <= i and (
        j < s or i - j < w)
  seed = draw(st.integers(0, 2**31 - 1))
  arr = np.random.default_rng(seed).random(shape) < 0.5
  return M.NumpyMask(arr), lambda i, j: bool(arr[i, j])


@SETTINGS
@given(masks(), st.integers(1, 40), st.integers(1, 40))
def test_dense_matches_definition_and_tile(mk, q_off, kv_off):
  mask, pred = mk
  dense = mask.to_dense()
  np.testing.assert_array_equal(dense, _loops(mask.shape, pred))
  # The jnp iota tile (kernel-side formula) agrees, with out-of-range False.
  if not isinstance(mask, M.NumpyMask):
    bq, bk = 16, 8
    tile = np.asarray(mask.tile(jnp.int32(q_off), jnp.int32(kv_off), bq, bk))
    padded = np.zeros((q_off + bq + 80, kv_off + bk + 80), bool)
    padded[:dense.shape[0], :dense.shape[1]] = dense
    np.testing.assert_array_equal(
        tile, padded[q_off:q_off + bq, kv_off:kv_off + bk])


@SETTINGS
@given(st.data())
def test_and_or(data):
  shape = (data.draw(st.integers(1, 50)), data.draw(st.integers(1, 50)))
  (a, pa), (b, pb) = data.draw(masks(shape)), data.draw(masks(shape))
  both, either = a & b, a | b
  assert isinstance(both, M.And) and isinstance(either, M.Or)
  assert both.shape == either.shape == shape
  np.testing.assert_array_equal(both.to_dense(),
                                _loops(shape, lambda i, j: pa(i, j) and pb(i, j)))
  np.testing.assert_array_equal(either.to_dense(),
                                _loops(shape, lambda i, j: pa(i, j) or pb(i, j)))
  # mask_fn of a composite agrees with its dense form.
  qi, ki = np.arange(shape[0])[:, None], np.arange(shape[1])[None]
  np.testing.assert_array_equal(
      np.broadcast_to(either.mask_fn(qi, ki), shape), either.to_dense())


def test_hash_and_equality():
  arr = np.eye(5, dtype=bool)
  a, b = M.NumpyMask(arr), M.NumpyMask(arr.copy())
  assert a == b and hash(a) == hash(b)
  assert M.NumpyMask(~arr) != a
  c = M.CausalMask((5, 5)) & M.LocalMask((5, 5), 2, 0)
  assert c == M.CausalMask((5, 5)) & M.LocalMask((5, 5), 2, 0)
  assert len({a, b, c, M.FullMask((5, 5)), M.FullMask((5, 5))}) == 3
  arr[0, 1] = True  # the mask holds its own copy
  assert not a.array[0, 1]


def test_shape_errors():
  with pytest.raises(ValueError):
    M.CausalMask((4, 4)) & M.CausalMask((4, 5))
  with pytest.raises(ValueError):
    M.MultiHeadMask((M.FullMask((4, 4)), M.FullMask((4, 5))))
  with pytest.raises(ValueError):
    M.FullMask((0, 3))


@st.composite
def compiled(draw):
  shape = (draw(st.integers(1, 130)), draw(st.integers(1, 130)))
  bq, bk = draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([8, 16, 32]))
  kind = draw(st.sampled_from(["single", "heads", "blocks"]))
  if kind == "single":
    mask = draw(masks(shape))[0]
  elif kind == "heads":
    ms = [draw(masks(shape))[0] for _ in range(draw(st.integers(1, 3)))]
    mask = M.MultiHeadMask(tuple(ms + ms[:1]))  # a duplicate head
  else:  # random per-head block masks with random partial blocks
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    heads = []
    for _ in range(3):
      nb = (-(-shape[0] // bq), -(-shape[1] // bk))
      blocks = rng.choice(3, size=nb, p=[0.4, 0.3, 0.3])
      el = np.repeat(np.repeat(blocks, bq, 0), bk, 1)[:shape[0], :shape[1]]
      el = np.where(el == 2, rng.random(el.shape) < 0.5, el == 1)
      heads.append(M.NumpyMask(el))
    mask = M.MultiHeadMask(tuple(heads))
  return mask, bq, bk


@SETTINGS
@given(compiled())
def test_compile_mask_metadata(case):
  mask, bq, bk = case
  info = M.compile_mask(mask, bq, bk)
  dense = M.dense_mask(mask)
  h_count, (lq, lk) = dense.shape[0], mask.shape
  nq, nk = -(-lq // bq), -(-lk // bk)
  assert info.head_map.shape == (h_count,)
  assert info.kv_indices.shape[:2] == (info.block_mask.shape[0], nq)
  # Identical heads share their metadata.
  if isinstance(mask, M.MultiHeadMask):
    assert info.block_mask.shape[0] == len(set(mask.masks))
  # Partial-mask table holds distinct tiles.
  table = info.partial_masks.reshape(info.partial_masks.shape[0], -1)
  assert len(np.unique(table, axis=0)) == table.shape[0]

  padded = np.zeros((h_count, nq * bq, nk * bk), bool)
  padded[:, :lq, :lk] = dense
  for h in range(h_count):
    u = info.head_map[h]
    listed = set()
    for i in range(nq):
      tiles = [padded[h, i * bq:(i + 1) * bq, k * bk:(k + 1) * bk]
               for k in range(nk)]
      nonempty = [k for k in range(nk) if tiles[k].any()]
      c = info.kv_counts[u, i]
      # Every non-empty block listed exactly once, in order; empty absent.
      assert list(info.kv_indices[u, i, :c]) == nonempty
      # Padding repeats the last listed index.
      assert np.all(info.kv_indices[u, i, c:] == (nonempty[-1] if c else 0))
      for j, k in enumerate(nonempty):
        is_full = tiles[k].all()
        assert info.kv_full[u, i, j] == int(is_full)
        assert info.block_mask[u, i, k] == (2 if is_full else 1)
        if not is_full:
          np.testing.assert_array_equal(
              info.partial_masks[info.kv_mask_ids[u, i, j]], tiles[k])
        listed.add((i, k))
      for k in set(range(nk)) - set(nonempty):
        assert info.block_mask[u, i, k] == 0
    # Transposed lists: same set of blocks, same flags and mask ids.
    listed_t = set()
    for k in range(nk):
      c = info.q_counts[u, k]
      qs = list(info.q_indices[u, k, :c])
      assert qs == sorted(qs)
      for j, i in enumerate(qs):
        listed_t.add((i, k))
        jf = list(info.kv_indices[u, i, :info.kv_counts[u, i]]).index(k)
        assert info.q_full[u, k, j] == info.kv_full[u, i, jf]
        if not info.q_full[u, k, j]:
          assert info.q_mask_ids[u, k, j] == info.kv_mask_ids[u, i, jf]
    assert listed == listed_t
  assert info.kv_counts.sum() == info.q_counts.sum() == (
      info.block_mask > 0).sum()
  np.testing.assert_allclose(
      M.density(info),
      np.mean([(padded[h].reshape(nq, bq, nk, bk).any((1, 3))).mean()
               for h in range(h_count)]))


@pytest.mark.parametrize("n,b", [(1, 16), (4, 16), (8, 8), (5, 32)])
def test_causal_density(n, b):
  info = M.compile_mask(M.CausalMask((n * b, n * b)), b, b)
  assert M.density(info) == pytest.approx(0.5 + 1 / (2 * n))
  # One distinct partial tile (the diagonal), shared by every q block.
  assert info.partial_masks.shape[0] == 1
  assert info.kv_full.sum() == n * (n - 1) // 2


def test_padding_masks_out_of_range():
  info = M.compile_mask(M.FullMask((20, 20)), 16, 16)
  # Block (1, 1) covers rows/cols 16..31 of which only 16..19 exist.
  assert info.block_mask[0].tolist() == [[2, 1], [1, 1]]
  tile = info.partial_masks[info.kv_mask_ids[0, 1, 1]]
  assert tile[:4, :4].all() and not tile[4:].any() and not tile[:, 4:].any()
