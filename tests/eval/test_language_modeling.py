"""Perplexity: the GPTQ protocol (non-overlapping windows, tail dropped, mean
NLL over every predicted token) against a float64 numpy reference computed
window by window from plain `module.apply` logits; batching with a padded
last batch changes nothing; the byte LM; compressed trees; errors."""

import numpy as np
import pytest

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.eval import language_modeling as ppl_lib
from compressjax.eval import perplexity
from compressjax.models import bert
from tests.eval import fixtures


def reference_nll(module, variables, ids, seqlen):
  """Mean NLL (float64) over tokens 1..seqlen-1 of each full window."""
  n = len(ids) // seqlen
  total = 0.0
  for w in range(n):
    x = np.asarray(ids[w * seqlen:(w + 1) * seqlen])[None]
    logits = np.asarray(fixtures.forward(module, variables, x),
                        np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    total -= logp[np.arange(seqlen - 1), x[0, 1:]].sum()
  return total / (n * (seqlen - 1))


def test_llama_matches_reference_and_batching():
  pre = fixtures.llama()
  ids = np.asarray(pre.tokenizer.encode(fixtures.TEXT), np.int32)
  seqlen = 24
  want = reference_nll(pre.module, pre.variables, ids, seqlen)
  # 5 windows in batches of 2: the last batch holds one dummy window
  res = perplexity(pre, pre.variables, fixtures.TEXT, seqlen=seqlen,
                   batch_size=2, max_windows=5, progress=False)
  want5 = reference_nll(pre.module, pre.variables, ids[:5 * seqlen], seqlen)
  assert res.windows == 5 and res.tokens == 5 * (seqlen - 1)
  np.testing.assert_allclose(res.nll, want5, rtol=1e-5)
  np.testing.assert_allclose(res.ppl, np.exp(want5), rtol=1e-5)
  assert res.text["tokens"] == len(ids)  # the text was tokenized once
  full = perplexity(pre, pre.variables, ids, seqlen=seqlen, batch_size=4,
                    progress=True)
  assert full.windows == len(ids) // seqlen      # partial tail dropped
  np.testing.assert_allclose(full.nll, want, rtol=1e-5)


def test_byte_lm_and_compressed_tree():
  model, v = fixtures.byte_lm()
  data = np.frombuffer(fixtures.TEXT.encode(), np.uint8)[:64 * 4 + 10]
  res = perplexity(model, v, data, seqlen=64, batch_size=4, progress=False)
  assert res.windows == 4
  np.testing.assert_allclose(
      res.nll, reference_nll(model, v, data, 64), rtol=1e-5)
  # a 4-bit tree through cj.run: the reference on its materialized params
  q = fixtures.quantize4(v)
  rq = perplexity(model, q, data, seqlen=64, batch_size=4, progress=False)
  dense = fixtures.materialize(q)
  np.testing.assert_allclose(
      rq.nll, reference_nll(model, dense, data, 64), rtol=1e-4)
  assert rq.nll != res.nll
  # text goes through the byte tokenizer
  rt = perplexity(model, v, fixtures.TEXT[:64 * 4 + 10], seqlen=64,
                  batch_size=4, progress=False)
  np.testing.assert_allclose(rt.nll, res.nll, rtol=1e-6)


def test_windows_and_errors():
  w = ppl_lib.windows(np.arange(10), 3)
  np.testing.assert_array_equal(w, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
  model, v = fixtures.byte_lm()
  with pytest.raises(CompressionError, match="fewer than one window"):
    perplexity(model, v, np.arange(10), seqlen=16, progress=False)
  with pytest.raises(CompressionError, match="at most 64"):
    perplexity(model, v, np.arange(1000) % 256, seqlen=65, progress=False)
  with pytest.raises(CompressionError, match="seqlen must be >= 2"):
    ppl_lib.windows(np.arange(10), 1)
  with pytest.raises(CompressionError, match="not a causal language model"):
    perplexity(bert.BertModel(bert.BertConfig()), {}, np.arange(10),
               seqlen=4)
  pre = fixtures.llama()
  no_tok = cj.eval.causal_lm(pre.module)  # a module alone has no tokenizer
  with pytest.raises(CompressionError, match="no tokenizer"):
    perplexity(no_tok, pre.variables, "text", seqlen=4)
