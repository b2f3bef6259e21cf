"""KV cache: prefill + token-by-token decoding under jit equals the full
forward (GQA, left padding, sliding window shorter than the sequence, and
through cj.run on a quantized tree); the dense store; attention masks by
stored positions (slot order is free)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax import kv
from compressjax.core.errors import CompressionError
from compressjax.models import gpt2, hf, llama
from tests.models import hf_reference as ref

T, PREFILL, PAD = 12, 5, 3


def _batch():
  ids = np.random.default_rng(0).integers(0, 64, (2, T))
  mask = np.ones((2, T), np.int32)
  mask[1, :PAD] = 0  # left padding: row 1 starts at position 0 on token 3
  return ids, mask


def _models():
  # Qwen2-style: GQA (2 kv heads for 4), q/k/v biases, a window of 3 on the
  # second layer only, shorter than the 12 tokens.
  lc = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2,
                         qkv_bias=True, sliding_window=3, window_layers=(1,),
                         model_type="qwen2")
  gc = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_inner=64)
  return {"llama_gqa_window": (llama, lc), "gpt2_quantized": (gpt2, gc)}


def _load(name):
  """Model and random params (from an HF state dict: no slow eager init)."""
  module, zoo = _models()[name]
  cfg = module.config_to_hf(zoo)
  sd = (ref.llama_state_dict if module is llama else ref.gpt2_state_dict)(cfg)
  return (module.FAMILY.build(zoo),
          hf.from_hf(module.FAMILY, zoo, sd.__getitem__, list(sd)))


@pytest.mark.parametrize("name", ["llama_gqa_window", "gpt2_quantized"])
def test_decode_equals_full_forward(name):
  model, variables = _load(name)
  ids, mask = _batch()
  if name == "gpt2_quantized":  # the cache passes through the runtime
    tree = cj.quantize(variables, 4, group_size=16)
    fn = lambda t, *a, **k: cj.run(model, t, *a, **k)  # noqa: E731
  else:
    tree, fn = variables, model.apply
  full = jax.jit(lambda t: fn(t, ids, attention_mask=mask))(tree)
  step = jax.jit(lambda t, x, m, c: fn(t, x, attention_mask=m, cache=c))
  cache = model.init_cache(2, T)
  logits, cache = step(tree, ids[:, :PREFILL], mask[:, :PREFILL], cache)
  out = [logits]
  for i in range(PREFILL, T):
    logits, cache = step(tree, ids[:, i:i + 1], mask[:, i:i + 1], cache)
    out.append(logits)
  got = np.concatenate(out, axis=1)
  valid = mask.astype(bool)
  err = np.abs(got - np.asarray(full))[valid].max()
  print(f"{name}: max |decode - full| = {err:.2e}")
  assert err <= 1e-5
  # the cache holds every token at its position, padding marked empty
  want_pos = np.where(valid, np.cumsum(mask, -1) - 1, kv.NO_POSITION)
  for layer in cache:
    np.testing.assert_array_equal(layer.positions, want_pos)
    assert int(layer.length) == T and not layer.overflowed()


def test_dense_store():
  s = kv.DenseKV.empty(2, 4, kv_heads=1, head_dim=2)
  k = jnp.arange(8.0).reshape(2, 2, 1, 2)
  s = s.append(k, -k, jnp.array([[0, 1], [kv.NO_POSITION, 0]]))
  keys, values, pos = s.read()
  np.testing.assert_array_equal(keys[:, :2], k)
  np.testing.assert_array_equal(values[:, :2], -k)
  np.testing.assert_array_equal(keys[:, 2:], 0)
  np.testing.assert_array_equal(pos, [[0, 1, -1, -1], [-1, 0, -1, -1]])
  np.testing.assert_array_equal(s.next_position(), [2, 1])
  s = s.append(k[:, :1] + 10, k[:, :1], jnp.array([[2], [1]]))
  np.testing.assert_array_equal(s.read()[0][:, 2], k[:, 0] + 10)
  assert int(s.length) == 3
  with pytest.raises(CompressionError, match="capacity"):
    s.append(k, k, jnp.array([[3, 4], [2, 3]]))
  # under jit the overflowing token is dropped and flagged
  over = jax.jit(lambda s: s.append(k, k, jnp.array([[3, 4], [2, 3]])))(s)
  assert bool(over.overflowed())
  np.testing.assert_array_equal(over.positions, [[0, 1, 2, 3], [-1, 0, 1, 2]])
  with pytest.raises(CompressionError, match="match"):
    s.append(k[..., :1], k[..., :1], jnp.array([[3, 4], [2, 3]]))


def _numpy_attention(q, k, v, qp, kp, scale, window):
  b, t, h, d = q.shape
  g = h // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) * scale
  ok = (kp[:, None, None, :] >= 0) & (kp[:, None, None, :] <=
                                      qp[:, None, :, None])
  if window is not None:
    ok &= qp[:, None, :, None] - kp[:, None, None, :] < window
  s = np.where(ok, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def test_attend_masks_by_position_and_slot_order_is_free():
  """The mask is a function of stored positions (causal, window, empty
  slots), so per-head permuted slots with (B, H_kv, S) positions give the
  same result: the freedom eviction policies need."""
  rng = np.random.default_rng(0)
  b, t, s, h, hkv, d = 2, 3, 7, 4, 2, 8
  q = rng.standard_normal((b, t, h, d)).astype(np.float32)
  k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  kp = np.array([[0, 1, 2, 3, 4, 5, -1], [-1, -1, 0, 1, 2, 3, 4]])
  qp = np.array([[3, 4, 5], [2, 3, 4]])
  out, probs = kv.attend(q, k, v, qp, kp, scale=0.3, window=3)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, qp, kp, 0.3, 3),
                             rtol=1e-5, atol=1e-6)
  assert probs.shape == (b, hkv, h // hkv, t, s)
  perm = np.stack([rng.permutation(s) for _ in range(hkv)])  # per kv head
  gather = lambda a: np.stack([a[:, perm[j], j] for j in range(hkv)], 2)  # noqa
  kp_heads = np.stack([kp[:, perm[j]] for j in range(hkv)], 1)
  out2, _ = kv.attend(q, gather(k), gather(v), qp, kp_heads, scale=0.3,
                      window=3)
  np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2", "transformer"])
def test_bad_cache_argument(name):
  # every decoder checks its cache with kv.check_cache: the error names the
  # layer count or the bad layer, and the fix
  from compressjax.models import transformer
  model = {"llama": lambda: llama.LlamaForCausalLM(
               _models()["llama_gqa_window"][1]),
           "gpt2": lambda: gpt2.GPT2LMHeadModel(_models()["gpt2_quantized"][1]),
           "transformer": lambda: transformer.TransformerLM(
               transformer.TransformerConfig(vocab_size=64, d_model=32,
                                             n_layers=2, n_heads=2, d_mlp=64,
                                             seq_len=T))}[name]()
  ids, _ = _batch()
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))
  cache = model.init_cache(2, T)
  with pytest.raises(CompressionError, match="tuple of 2.*init_cache"):
    jax.eval_shape(lambda: model.apply(v, ids, cache=cache[:1]))
  with pytest.raises(CompressionError, match="layer 1: .*dict.*init_cache"):
    jax.eval_shape(lambda: model.apply(v, ids, cache=(cache[0], {})))
