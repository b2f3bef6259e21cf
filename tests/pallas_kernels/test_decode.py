"""Flash-Decoding kernel over position-tagged slots vs its jnp reference
(interpret mode): random slot orders per head, empty slots, slot counts that
are not a multiple of the block, windows and sinks, GQA rows, bf16."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.attention.decode import decode_attention, decode_reference
from tests.pallas_kernels import harness


def _inputs(seed, b, hkv, m, s, d, dtype, empty):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32).astype(dtype)
             for sh in ((b, hkv, m, d), (b, hkv, s, d), (b, hkv, s, d)))
  kp = np.stack([np.stack([rng.permutation(s) for _ in range(hkv)])
                 for _ in range(b)]).astype(np.int32)
  kp[rng.random(kp.shape) < empty] = -1
  kp[..., 0] = 0  # every row sees position 0 (finite lse)
  qp = rng.integers(s // 2, s + 3, (b, m)).astype(np.int32)
  return q, k, v, jnp.asarray(qp), jnp.asarray(kp)


@settings(max_examples=3, deadline=None)
@given(st.sampled_from([(1, 1, 1), (2, 2, 3), (1, 2, 8)]),
       st.integers(5, 300), st.sampled_from([8, 16]),
       st.sampled_from([8, 32]), st.sampled_from([1, 3]),
       st.sampled_from([dict(), dict(window=17),
                        dict(policy_window=9, sinks=3),
                        dict(window=40, policy_window=20, sinks=1)]),
       st.sampled_from([jnp.float32, jnp.bfloat16]), st.integers(0, 2**16))
def test_forward(bhm, s, d, block, splits, masks, dtype, seed):
  b, hkv, m = bhm
  args = _inputs(seed, b, hkv, m, s, d, dtype, empty=0.2)
  kernel = functools.partial(decode_attention, block_kv=block, splits=splits,
                             **masks)
  ref = functools.partial(decode_reference, **masks)
  harness.check_forward(kernel, ref, *args, dtype=dtype)
  harness.check_deterministic(kernel, *args)


def test_rows_that_see_nothing():
  q, k, v, _, _ = _inputs(0, 1, 1, 2, 20, 8, jnp.float32, empty=0.0)
  kp = jnp.full((1, 1, 20), -1, jnp.int32).at[0, 0, 15].set(3)
  qp = jnp.array([[2, 3]])  # row 0 sees no slot, row 1 only slot 15
  o, lse = decode_attention(q, k, v, qp, kp, block_kv=8, splits=2)
  np.testing.assert_array_equal(np.asarray(o[0, 0, 0]), 0.0)
  assert np.isneginf(np.asarray(lse[0, 0, 0]))
  np.testing.assert_allclose(o[0, 0, 1], v[0, 0, 15], rtol=1e-6)
  want = float(q[0, 0, 1] @ k[0, 0, 15]) * 8 ** -0.5
  np.testing.assert_allclose(lse[0, 0, 1], want, rtol=1e-5)


def test_split_chunks_combine_exactly():
  """More splits only regroup the same online softmax: results agree."""
  args = _inputs(1, 1, 2, 4, 250, 16, jnp.float32, empty=0.1)
  outs = [jax.jit(functools.partial(decode_attention, block_kv=16,
                                    splits=n))(*args)[0] for n in (1, 16)]
  for o in outs[1:]:
    harness.assert_close(o, outs[0], jnp.float32)
