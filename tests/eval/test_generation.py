"""Generation: greedy tokens equal the argmax of a plain full forward re-run
on the growing sequence (Llama with a left-padded batch, GPT-2 on a 4-bit
tree, the byte LM with and without its cache); eos stops rows; top-k /
top-p / temperature against numpy references and the sampled frequencies;
compiled once per shape; errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.eval import Sampling, generate
from compressjax.eval.generation import choose, filter_logits
from tests.eval import fixtures


def check_greedy(module, dense_tree, prompts, res, width=64):
  """Row r's token i must be the argmax of the full forward of prompt_r +
  its tokens before i (all prefixes in one right-padded forward: a causal
  model's logits at a position ignore the tokens after it)."""
  rows, where, want = [], [], []
  for p, out, n in zip(prompts, res.tokens, res.lengths):
    for i in range(n):
      seq = list(p) + list(out[:i])
      rows.append(seq + [0] * (width - len(seq)))
      where.append(len(seq) - 1)
      want.append(out[i])
  logits = np.asarray(fixtures.forward(module, dense_tree,
                                       np.asarray(rows, np.int32)))
  last = logits[np.arange(len(rows)), where]
  best = last.max(-1)
  chosen = last[np.arange(len(rows)), want]
  # equal to the argmax, up to float ties
  assert np.all(best - chosen <= 1e-5 * np.maximum(1, np.abs(best))), (
      np.argmax(last, -1), want)
  assert np.mean(np.argmax(last, -1) == np.asarray(want)) > 0.95


def test_llama_greedy_batch_equals_full_forward():
  pre = fixtures.llama()
  texts = ["def main(argv):", "import", "the quick brown fox jumps"]
  prompts = pre.tokenizer.encode(texts)
  res = generate(pre, pre.variables, texts, max_new_tokens=10, eos_ids=())
  assert res.tokens.shape == (3, 10) and (res.lengths == 10).all()
  longest = max(map(len, prompts))
  assert res.prompt_bucket == max(8, 1 << (longest - 1).bit_length())
  assert res.decode_steps == 9
  check_greedy(pre.module, pre.variables, prompts, res)
  assert res.texts == [pre.tokenizer.decode(t) for t in res.tokens]
  assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0
  # the same shapes again: nothing compiles
  again = generate(pre, pre.variables, texts, max_new_tokens=10, eos_ids=())
  assert again.compile_seconds == 0.0
  np.testing.assert_array_equal(again.tokens, res.tokens)
  # eos ids are data: rows stop at their first one (pad after it), the
  # loop ends when every row has stopped, and nothing recompiles
  stop = {int(res.tokens[0, 2]), int(res.tokens[1, 4]), int(res.tokens[2, 1])}
  cut = generate(pre, pre.variables, texts, max_new_tokens=10,
                 eos_ids=sorted(stop))
  assert cut.compile_seconds == 0.0
  for r in range(3):
    n = np.flatnonzero(np.isin(res.tokens[r], list(stop)))[0] + 1
    assert cut.lengths[r] == n
    np.testing.assert_array_equal(cut.tokens[r, :n], res.tokens[r, :n])
    assert (cut.tokens[r, n:] == pre.tokenizer.pad_id).all()
  assert cut.lengths[0] <= 3 and cut.lengths[1] <= 5
  assert cut.decode_steps == cut.lengths.max() - 1 < 9


def test_gpt2_greedy_on_a_4bit_tree():
  pre = fixtures.gpt2()
  q = fixtures.quantize4(pre.variables)
  prompts = [[5, 17, 42, 99, 3]]
  res = generate(pre, q, prompts, max_new_tokens=12, eos_ids=(), bucket=4)
  assert res.prompt_bucket == 8
  check_greedy(pre.module, fixtures.materialize(q), prompts, res)


def test_byte_lm_with_and_without_cache():
  # the byte LM decodes through its KV cache (init_cache); the cache-less
  # path (a module without one) re-runs the right-padded buffer
  from compressjax.eval.lm import CausalLM
  model, v = fixtures.byte_lm()
  lm = cj.eval.causal_lm(model)
  assert lm.has_cache and not lm.takes_mask
  texts = ["import os\n", "def "]
  res = generate(model, v, texts, max_new_tokens=8, eos_ids=())
  check_greedy(model, v, lm.tokenizer.encode(texts), res)
  no_cache = generate(dataclasses.replace(lm, has_cache=False), v, texts,
                      max_new_tokens=8, eos_ids=())
  np.testing.assert_array_equal(no_cache.tokens, res.tokens)
  # bucket (32) + new tokens past seq_len: the bucket shrinks to fit
  long = generate(model, v, "x" * 20, max_new_tokens=40, eos_ids=())
  assert long.prompt_bucket == 64 - 40 and long.tokens.shape == (1, 40)
  with pytest.raises(CompressionError, match="at most 64"):
    generate(model, v, "x" * 60, max_new_tokens=8)


def _np_filter(logits, t, k, p):
  x = logits / t
  if k:
    x = np.where(x < np.sort(x)[-k], -np.inf, x)
  if p:
    order = np.argsort(-x)
    pr = np.exp(x[order] - x[order][0])
    pr /= pr.sum()
    keep = np.cumsum(pr) - pr < p
    x = np.where(np.isin(np.arange(x.size), order[keep]), x, -np.inf)
  return x


@pytest.mark.parametrize("t,k,p", [(1.0, 5, None), (0.7, None, 0.6),
                                   (1.3, 8, 0.9), (0.5, None, 0.05)])
def test_filter_logits_matches_numpy(t, k, p):
  logits = np.random.default_rng(1).standard_normal((3, 40)).astype(
      np.float32) * 2
  got = np.asarray(filter_logits(jnp.asarray(logits), Sampling(t, k, p)))
  for r in range(3):
    want = _np_filter(logits[r].astype(np.float64), t, k, p)
    np.testing.assert_array_equal(np.isfinite(got[r]), np.isfinite(want))
    np.testing.assert_allclose(got[r][np.isfinite(want)],
                               want[np.isfinite(want)], rtol=1e-6)
    if k:
      assert np.isfinite(got[r]).sum() <= k
  # p tiny: only the argmax survives
  if p == 0.05:
    assert (np.isfinite(got).sum(-1) == 1).all()


def test_sampled_frequencies():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
  s = Sampling(temperature=1.0, top_k=3)
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: choose(k, logits, s)))(keys))
  freq = np.bincount(draws.ravel(), minlength=5) / draws.size
  want = np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85
  assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / 4000)
                + 1e-9)
  greedy = choose(jax.random.key(0), logits, Sampling())
  assert int(greedy[0]) == 0


def test_seeded_sampling_and_errors():
  pre = fixtures.llama()
  kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, eos_ids=())
  a = generate(pre, pre.variables, ["import os"], seed=1, **kw)
  b = generate(pre, pre.variables, ["import os"], seed=1, **kw)
  c = generate(pre, pre.variables, ["import os"], seed=2, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
              dict(top_p=1.5)):
    with pytest.raises(CompressionError):
      Sampling(**bad)
  with pytest.raises(CompressionError, match="empty"):
    generate(pre, pre.variables, [[]])
  with pytest.raises(CompressionError, match="max_new_tokens"):
    generate(pre, pre.variables, "x", max_new_tokens=0)
  with pytest.raises(CompressionError, match="at most 256"):
    generate(fixtures.gpt2(), fixtures.gpt2().variables, [[1] * 200],
             max_new_tokens=60)


def test_kv_store_full_budget_equals_dense_and_small_budget_differs():
  """`kv_store`: the cache generate builds. H2O with a budget covering the
  context keeps every token, so greedy tokens equal the dense cache's; a
  KIVI int2 cache changes the cache (a real store was used)."""
  from compressjax import kv
  pre = fixtures.llama()
  texts = ["def main(argv):", "the quick brown fox jumps"]
  dense = generate(pre, pre.variables, texts, max_new_tokens=8, eos_ids=())
  full = generate(pre, pre.variables, texts, max_new_tokens=8, eos_ids=(),
                  kv_store=kv.KVSpec(policy="h2o", budget=1.0))
  np.testing.assert_array_equal(full.tokens, dense.tokens)
  assert full.compile_seconds > 0  # its own programs, not the dense ones


def test_kv_store_needs_a_cache():
  from compressjax import kv
  from compressjax.eval.lm import CausalLM
  pre = fixtures.llama()
  lm = CausalLM(pre.module, pre.tokenizer, max_length=None, takes_mask=True,
                has_cache=False)  # e.g. a decoder without init_cache
  with pytest.raises(CompressionError, match="has no KV cache"):
    generate(lm, pre.variables, ["import"], max_new_tokens=2,
             kv_store=kv.KVSpec(policy="h2o", budget=1.0))
