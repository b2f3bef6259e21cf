"""Perplexity by the GPTQ / WikiText protocol (Frantar et al. 2022, the
`eval` of their repository; REFERENCES.md "Evaluation conventions").

The text is tokenized once as a whole, cut into `numel // seqlen`
non-overlapping windows of `seqlen` tokens (the last partial window is
dropped), and each window is one forward pass from an empty context: its
first token is not predicted, tokens 2..seqlen are. Then

    ppl = exp( sum_w sum_{t=1}^{seqlen-1} -log p(x_{w,t} | x_{w,<t})
               / (windows * (seqlen - 1)) ),

the mean NLL over every predicted token of every window. (GPTQ's script
averages per-window means, which is the same number: every window predicts
seqlen - 1 tokens.)

    res = perplexity(pre, compressed_variables, text, seqlen=2048)
    res.ppl, res.nll, res.tokens, res.as_dict()

Windows run in batches of `batch_size` through `cj.run` (any compressed
tree) under one `jax.jit` per (model, batch shape), the scoring program
zero-shot uses too (`eval.lm.scorer`): a window's first seqlen - 1 tokens go
in, its last seqlen - 1 are the targets. The last batch is filled with dummy
windows of weight 0, so every batch has the same shape.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
from absl import logging

from compressjax.core.errors import CompressionError
from compressjax.data.text import token_ids
from compressjax.eval.lm import causal_lm, scorer
from compressjax.eval.progress import progress as progress_bar

def windows(ids: np.ndarray, seqlen: int) -> np.ndarray:
  """(numel // seqlen, seqlen) non-overlapping windows; the tail dropped."""
  if seqlen < 2:
    raise CompressionError(f"seqlen must be >= 2 (a window predicts seqlen - "
                           f"1 tokens), got {seqlen}")
  n = ids.size // seqlen
  if n == 0:
    raise CompressionError(
        f"the text has {ids.size} tokens, fewer than one window of seqlen "
        f"{seqlen}; use a longer text or a shorter seqlen")
  return np.asarray(ids[:n * seqlen], np.int32).reshape(n, seqlen)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """ppl = exp(nll); nll: mean nats per predicted token; tokens: predicted
  tokens (windows * (seqlen - 1)); text: the data's description."""

  ppl: float
  nll: float
  tokens: int
  windows: int
  seqlen: int
  seconds: float
  text: dict

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def perplexity(model: Any, tree: Any, data: Any, *, seqlen: int,
               batch_size: int = 8, max_windows: int | None = None,
               tokenizer: Any = None, add_special_tokens: bool = True,
               progress: bool = True) -> PerplexityResult:
  """Perplexity of a causal LM on `tree` (float or compressed) over `data`.

  Args:
    model: a Pretrained, zoo decoder module, TransformerLM or CausalLM.
    tree: its variables ({'params': ...}), possibly compressed.
    data: text (str; tokenized once with the model's tokenizer, its special
      tokens, e.g. one leading BOS, included as GPTQ's), a
      `data.text.TokenizedText`, or 1-D token ids.
    seqlen: window length in tokens (2048 in the GPTQ / LLaMA papers).
    batch_size: windows per forward pass.
    max_windows: evaluate only the first this many windows (None: all).
    progress: show a progress bar on stderr.
  """
  lm = causal_lm(model, tokenizer)
  tok = lm.require_tokenizer() if isinstance(data, str) else lm.tokenizer
  ids, desc = token_ids(data, tok, add_special_tokens)
  lm.check_length(seqlen, f"perplexity with seqlen {seqlen}")
  if batch_size < 1:
    raise CompressionError(f"batch_size must be >= 1, got {batch_size}")
  w = windows(ids, seqlen)
  if max_windows is not None:
    w = w[:max_windows]
  n = w.shape[0]
  step = scorer(lm)
  total = 0.0
  start = time.perf_counter()
  batches = range(0, n, batch_size)
  ones = np.ones((batch_size, seqlen - 1), np.int32)
  for i in progress_bar(batches, len(batches), "perplexity", progress):
    chunk = w[i:i + batch_size]
    weights = np.zeros((batch_size, seqlen - 1), np.float32)
    weights[:chunk.shape[0]] = 1.0
    if chunk.shape[0] < batch_size:  # same shape: dummy windows, weight 0
      chunk = np.concatenate([chunk, np.zeros(
          (batch_size - chunk.shape[0], seqlen), np.int32)])
    # tokens 1..seqlen-1 predicted from their prefixes: the last token is
    # only a target (a causal model's earlier logits ignore it)
    ll, _ = step(tree, chunk[:, :-1], ones, chunk[:, 1:], weights)
    total -= float(np.asarray(ll, np.float64).sum())
  seconds = time.perf_counter() - start
  count = n * (seqlen - 1)
  nll = total / count
  if not math.isfinite(nll):
    raise CompressionError(
        f"perplexity is not finite (mean NLL {nll}): the model produced NaN "
        "or Inf logits on this tree; check the compressed params (e.g. "
        "cj.summary) or evaluate the float tree")
  res = PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=n,
                         seqlen=seqlen, seconds=round(seconds, 3), text=desc)
  logging.info("perplexity %.4f (nll %.4f) over %d windows x %d tokens of %s"
               " in %.1fs", res.ppl, nll, n, seqlen, desc.get("source"),
               seconds)
  return res
