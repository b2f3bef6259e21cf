"""Compressed leaf types: pytrees, invariants, nesting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.quantization import quantize_array
from compressjax.sparsity import nm_sparsify


def test_leaves_are_frozen_registered_pytrees():
  q = quantize_array(jnp.ones((8, 4)), 4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    q.axis = 1
  leaves, tdef = jax.tree.flatten(q)
  assert len(leaves) == 2  # codes, scale (zero is None)
  q2 = jax.tree.unflatten(tdef, leaves)
  np.testing.assert_array_equal(q2.materialize(), q.materialize())
  # jit over a compressed leaf: metadata is static
  f = jax.jit(lambda q: q.materialize())
  np.testing.assert_array_equal(f(q), q.materialize())


def test_validate_catches_broken_invariants():
  q = quantize_array(jax.random.normal(jax.random.key(0), (16, 4)), 4,
                     group_size=8)
  with pytest.raises(cj.CompressionError, match="codes has shape"):
    dataclasses.replace(q, codes=q.codes[:4]).validate()
  with pytest.raises(cj.CompressionError, match="scale has shape"):
    dataclasses.replace(q, scale=jnp.ones((3, 4))).validate()
  with pytest.raises(cj.CompressionError, match="codes dtype"):
    dataclasses.replace(q, codes=q.codes.astype(jnp.int32)).validate()
  s = nm_sparsify(jnp.ones((8, 2)), 2, 4)
  with pytest.raises(cj.CompressionError, match="N:M needs"):
    dataclasses.replace(s, n=4).validate()
  lr = cj.low_rank({"k": jnp.ones((8, 4))}, 2, default=lambda p, x: True)["k"]
  with pytest.raises(cj.CompressionError, match="rank 6 exceeds"):
    dataclasses.replace(lr, a=jnp.ones((8, 6)), b=jnp.ones((6, 4))).validate()


def test_nesting_without_special_cases():
  w = jax.random.normal(jax.random.key(1), (64, 32))
  sq = cj.chain(cj.transforms.sparsify(0.5),
                cj.transforms.quantize(4, group_size=32)).apply({"k": w})["k"]
  assert isinstance(sq, cj.SparseArray) and isinstance(sq.values, cj.QArray)
  # nbytes counts nested storage: 1024 int4 codes, 32 scales, 2048 mask bits
  assert sq.nbytes == 512 + 32 * 4 + 256
  d = sq.materialize()
  kept = np.asarray(d) != 0
  np.testing.assert_allclose(d[kept], np.asarray(w)[kept],
                             atol=float(jnp.max(sq.values.scale)) / 2 + 1e-6)


def test_scale_may_itself_be_compressed():
  w = jax.random.normal(jax.random.key(2), (64, 16))
  q = quantize_array(w, 4, group_size=8)
  qs = dataclasses.replace(q, scale=quantize_array(q.scale, 8, axis=0))
  qs.validate()
  assert qs.nbytes == q.codes.nbytes + 8 * 16 + 16 * 4
  s_hat = qs.scale.materialize()
  np.testing.assert_allclose(
      qs.materialize(), (q.code_values().reshape(8, 8, 16) * s_hat[:, None])
      .reshape(64, 16), rtol=1e-6)
  y = cj.apply(lambda t, x: x @ t, qs, jnp.ones((2, 64)))
  np.testing.assert_allclose(y, jnp.ones((2, 64)) @ qs.materialize(),
                             rtol=1e-5)
