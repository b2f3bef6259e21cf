"""orbax checkpoints: exact round trips, real sizes on disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.checkpoint import disk_bytes

T = cj.transforms


def _params():
  return {"params": {
      "a": {"kernel": jax.random.normal(jax.random.key(0), (256, 128)),
            "bias": jnp.zeros(128, jnp.bfloat16)},
      "b": [jax.random.normal(jax.random.key(1), (128, 64)), None],
      "n": 3}}


@pytest.mark.parametrize("t", [
    T.quantize(4, group_size=64, scale_dtype=jnp.bfloat16),
    T.quantize(3, symmetric=False),
    cj.chain(T.sparsify(pattern="nm", n=2, m=4), T.quantize(4)),
    cj.chain(T.sparsify(0.7), T.quantize(8)),
    T.sparsify(0.5, pattern="block", block=(16, 16)),
    cj.chain(T.low_rank(rank=8, residual=True), T.quantize(2)),
], ids=["int4", "int3asym", "nm_int4", "unstr_int8", "block", "lr_q2"])
def test_roundtrip_exact(tmp_path, t):
  c = t.apply(_params())
  cj.save(tmp_path / "ck", c)
  r = cj.restore(tmp_path / "ck")
  is_leaf = cj.is_compressed
  assert jax.tree.structure(r, is_leaf=is_leaf) == jax.tree.structure(
      c, is_leaf=is_leaf)
  for x, y in zip(jax.tree.leaves(r, is_leaf=is_leaf),
                  jax.tree.leaves(c, is_leaf=is_leaf)):
    assert type(x) is type(y)
    if cj.is_compressed(x):
      assert all(getattr(x, f) == getattr(y, f) for f in x.meta_fields)
  for x, y in zip(jax.tree.leaves(r), jax.tree.leaves(c)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert r["params"]["n"] == 3 and r["params"]["b"][1] is None


def test_disk_size_matches_memory(tmp_path):
  p = _params()
  c = cj.quantize(p, 4, group_size=128)
  cj.save(tmp_path / "q", c)
  cj.save(tmp_path / "f", p)
  q_disk, f_disk = disk_bytes(tmp_path / "q"), disk_bytes(tmp_path / "f")
  # no float copy: at most the in-memory bytes plus container overhead
  assert q_disk <= cj.tree_nbytes(c) + 64 * 1024
  assert f_disk >= 4 * q_disk
  assert cj.tree_nbytes(p) / cj.tree_nbytes(c) > 6.5
