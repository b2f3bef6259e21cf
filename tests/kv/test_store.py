"""The compressed store in the decoders: exact when the budget covers the
context (every policy, quantized entries inside the full-precision window,
the Pallas paths), a jitted prefill + lax.scan decode through Llama, GPT-2
and the byte LM, true sizes, and errors that name the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import kv
from compressjax.core.errors import CompressionError
from compressjax.models import gpt2, hf, llama, transformer
from tests.models import hf_reference as ref

T, PRE, PAD = 10, 6, 2


def _batch(vocab=64):
  ids = np.random.default_rng(0).integers(1, vocab, (2, T))
  mask = np.ones((2, T), np.int32)
  mask[1, :PAD] = 0
  return ids, mask


def _decode_all(model, variables, ids, mask, store, capacity=T):
  """Prefill PRE tokens, then lax.scan one token at a time, all in one jit;
  logits (B, T, V)."""

  @jax.jit
  def run(variables, ids, mask):
    cache = model.init_cache(ids.shape[0], capacity, store=store)
    lg, cache = model.apply(variables, ids[:, :PRE], attention_mask=mask[
        :, :PRE], cache=cache)

    def step(cache, x):
      tok, m = x
      out, cache = model.apply(variables, tok[:, None],
                               attention_mask=m[:, None], cache=cache)
      return cache, out[:, 0]

    cache, rest = jax.lax.scan(step, cache, (ids[:, PRE:].T, mask[:, PRE:].T))
    return jnp.concatenate([lg, jnp.swapaxes(rest, 0, 1)], axis=1), cache

  return run(variables, ids, mask)


def _llama():
  c = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=2,
                        qkv_bias=True, sliding_window=4, window_layers=(1,),
                        model_type="qwen2")
  sd = ref.llama_state_dict(llama.config_to_hf(c))
  return llama.FAMILY.build(c), hf.from_hf(llama.FAMILY, c, sd.__getitem__,
                                           list(sd))


def _gpt2():
  c = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_inner=64)
  sd = ref.gpt2_state_dict(gpt2.config_to_hf(c))
  return gpt2.FAMILY.build(c), hf.from_hf(gpt2.FAMILY, c, sd.__getitem__,
                                          list(sd))


def _byte_lm():
  c = transformer.TransformerConfig(d_model=32, n_layers=2, n_heads=2,
                                    d_mlp=64, seq_len=16)
  m = transformer.TransformerLM(c)
  return m, jax.jit(m.init)(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))


INT4 = kv.KVQuant("int4", "token", 8)
SPECS = {
    # every token kept, float or inside the full-precision window: exact
    "llama/h2o+int4_window": (_llama, kv.KVSpec(
        policy="h2o", budget=T, keys=INT4, values=INT4, residual=T)),
    "gpt2/kivi2_window": (_gpt2, kv.KVSpec(None, None, *kv.kivi(2, 4),
                                           residual=T)),
    "byte/window_pallas": (_byte_lm, kv.KVSpec(policy="window", budget=T,
                                               attention="pallas")),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_budget_covering_context_is_exact(name):
  build, spec = SPECS[name]
  model, variables = build()
  ids, mask = _batch()
  if spec.attention == "pallas":  # index masks: positions 0..T-1 per row
    mask[:] = 1
  full = model.apply(variables, ids, attention_mask=mask)
  got, cache = _decode_all(model, variables, ids, mask, spec)
  valid = mask.astype(bool)
  err = np.abs(np.asarray(got) - np.asarray(full))[valid].max()
  print(f"{name}: max |decode - full| = {err:.2e}")
  assert err <= 2e-5
  want = np.where(valid, np.cumsum(mask, -1) - 1, -1)
  for layer in cache:  # every real token kept, at its position
    for b in range(2):
      for h in range(layer.kv_heads):
        kept = np.asarray(layer.positions[b, h])
        assert sorted(kept[kept >= 0]) == list(want[b][want[b] >= 0])


def test_nbytes_is_true_size():
  spec = kv.KVSpec(policy="h2o", budget=6, keys=kv.KVQuant("int4", "token",
                                                            8),
                   values=kv.KVQuant("fp8_e4m3", "token", 8, symmetric=True),
                   residual=2)
  s = spec.empty(3, 40, 2, 16, dtype=jnp.bfloat16)
  b, h, n, d = 3, 2, 6, 16
  want = (b * h * n * d // 2 + 2 * 2 * b * h * n * 2  # int4 codes, scale+zero
          + b * h * n * d + 2 * b * h * n * 2         # fp8 codes, scale
          + 2 * b * h * 2 * d * 2                     # bf16 windows (R = 2)
          + b * h * n * 4 * 2 + b * 4)                # positions, scores, next
  assert s.nbytes == want
  assert kv.memory((s, s))["bytes"] == 2 * want
  assert spec.bits_per_element(16) == (4 + 32 / 8, 8 + 16 / 8)


def test_errors_name_the_layer():
  model, variables = _llama()
  with pytest.raises(CompressionError, match="layer 0.*larger than the "
                     "context"):
    model.init_cache(1, 8, store=kv.KVSpec(policy="h2o", budget=9))
  with pytest.raises(CompressionError, match="layer 0.*keeps nothing"):
    model.init_cache(1, 8, store=kv.KVSpec(policy="h2o", budget=0))
  with pytest.raises(CompressionError, match="unknown KV eviction policy "
                     "'lru'.*h2o"):
    kv.KVSpec(policy="lru", budget=4)
  with pytest.raises(CompressionError, match="layer 0.*group_size 3"):
    model.init_cache(1, 8, store=kv.KVSpec(keys=kv.KVQuant("int4", "token",
                                                           3)))
  with pytest.raises(CompressionError, match="layer 2.*snapkv.*too small"):
    kv.KVSpec(policy="snapkv", budget=kv.Pyramid(40, beta=20)).empty(
        1, 64, 1, 8, layer=2, num_layers=3)
  with pytest.raises(CompressionError, match="needs a budget"):
    kv.KVSpec(policy="h2o")
  # a cache built for another model (4 kv heads, head_dim 4)
  other = llama.LlamaForCausalLM(llama.LlamaConfig(
      vocab_size=64, hidden_size=16, num_attention_heads=4))
  cache = other.init_cache(1, 8, store=kv.KVSpec(policy="h2o", budget=4))
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(CompressionError, match="layer 0.*another model"):
    model.apply(variables, ids, cache=cache)
  byte, bv = _byte_lm()
  with pytest.raises(CompressionError, match="seq_len"):
    byte.init_cache(1, 32)
  with pytest.raises(CompressionError, match="layer 0.*reposition=False"):
    byte.apply(bv, ids, cache=byte.init_cache(1, 8, store=kv.KVSpec(
        policy="sink", budget=6)))


def test_evict_keeps_the_highest_scores():
  s = kv.KVSpec(policy="h2o", budget=4).empty(1, 8, 2, 4)
  k = jnp.arange(24.0).reshape(1, 3, 2, 4)
  s = s.append(k, k, jnp.array([[0, 1, 2]]))
  scores = jnp.array([[[5.0, 1.0, 3.0, 9.0], [0.0, 2.0, 1.0, 7.0]]])
  out = s.evict(scores, 2)
  kept = [sorted(int(p) for p in np.asarray(out.positions[0, h]) if p >= 0)
          for h in range(2)]
  slot_pos = np.asarray(s.positions[0])
  want = [sorted(int(slot_pos[h, i]) for i in np.argsort(-np.where(
      slot_pos[h] >= 0, np.asarray(scores[0, h]), -np.inf))[:2])
          for h in range(2)]
  assert kept == want and all(len(x) == 2 for x in kept)
  with pytest.raises(CompressionError, match="layer 0.*keep=5"):
    s.evict(scores, 5)
