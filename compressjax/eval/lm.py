"""The causal language models the evaluations run, behind one small adapter.

`causal_lm(model)` takes a `models.hub.Pretrained` (a zoo decoder: Llama /
Mistral / Qwen2, GPT-2), a zoo decoder module, or the byte-level
`models.transformer.TransformerLM`, and returns a `CausalLM` that knows:
  - how to compute logits on a (possibly compressed) tree through `cj.run`,
    with a right-padding mask where the model takes one (the byte LM is
    causal with learned positions from 0: right padding cannot change the
    real tokens' logits, so scoring passes it no mask and it keeps its
    fused causal attention);
  - its tokenizer (the checkpoint's, or `data.text.ByteTokenizer` for the
    byte LM);
  - its longest input (`max_length`) and whether it has a KV cache
    (`init_cache`, the decoders' calling convention in models.llama; the
    byte LM has one too).
Encoders (BERT, ViT) are refused: they are not causal LMs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.core.errors import CompressionError
from compressjax.data.text import ByteTokenizer
from compressjax.models import hub, transformer
from compressjax.runtime.interpret import run

# Config field holding each causal family's longest input.
_MAX_LENGTH_FIELDS = ("seq_len", "n_positions", "max_position_embeddings")


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM:
  """A causal LM to evaluate (see the module doc). Build with `causal_lm`.

  Attributes:
    module: the flax module.
    tokenizer: encode / decode / bos_id / eos_id / eos_ids / pad_id.
    max_length: longest input in tokens (None: unbounded).
    takes_mask: the module accepts `attention_mask=`.
    has_cache: the module has `init_cache` and takes `cache=`.
  """

  module: Any
  tokenizer: Any
  max_length: int | None
  takes_mask: bool
  has_cache: bool

  def logits(self, tree: Any, ids, mask=None):
    """(B, T, vocab) logits of right-padded `ids` (B, T) on `tree` (dense or
    compressed), through `cj.run`; traceable (call it under jit)."""
    if self.takes_mask and mask is not None:
      return run(self.module, tree, ids, attention_mask=mask)
    return run(self.module, tree, ids)

  def check_length(self, t: int, what: str) -> None:
    if self.max_length is not None and t > self.max_length:
      raise CompressionError(
          f"{what} needs {t} tokens but the model takes at most "
          f"{self.max_length}; use a shorter seqlen / prompt")

  def require_tokenizer(self) -> Any:
    if self.tokenizer is None:
      raise CompressionError(
          "the model has no tokenizer (its directory has no tokenizer.json): "
          "pass tokenizer=, or token ids instead of text")
    return self.tokenizer


def causal_lm(model: Any, tokenizer: Any = None) -> CausalLM:
  """The adapter of a Pretrained, a zoo decoder module, a TransformerLM, or
  an existing CausalLM (returned as is unless `tokenizer` replaces its)."""
  if isinstance(model, CausalLM):
    return model if tokenizer is None else dataclasses.replace(
        model, tokenizer=tokenizer)
  if isinstance(model, hub.Pretrained):
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    model = model.module
  if isinstance(model, transformer.TransformerLM):
    return CausalLM(model, tokenizer if tokenizer is not None else
                    ByteTokenizer(), model.config.seq_len, False, True)
  if callable(getattr(model, "init_cache", None)):
    cfg = getattr(model, "config", None)
    limit = next((getattr(cfg, f) for f in _MAX_LENGTH_FIELDS
                  if getattr(cfg, f, None) is not None), None)
    return CausalLM(model, tokenizer, limit, True, True)
  raise CompressionError(
      f"{type(model).__name__} is not a causal language model this "
      "evaluation runs: pass a Pretrained decoder (Llama, Mistral, Qwen2, "
      "GPT-2), its module, or models.transformer.TransformerLM (encoders "
      "such as BERT and ViT have no next-token logits)")


_SCORERS: dict = {}


def scorer(lm: CausalLM):
  """The one jitted scoring program of a model (cached per module and mask
  convention; perplexity and zero-shot share it, so equal shapes compile
  once):

    fn(tree, ids, mask, targets, weights) -> (sum_t weights * log p(targets
        | ids) per row (B,) float32, greedy (B,) bool: every weighted target
        is the argmax)

  ids, mask, targets (B, T) int32 (right padding, mask 0), weights (B, T)
  float32 (0 where not scored)."""
  key = (lm.module, lm.takes_mask)
  if key not in _SCORERS:
    def fn(tree, ids, mask, targets, weights):
      logits = lm.logits(tree, ids, mask)
      lp = token_logprobs(logits, targets)
      hit = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
      return (lp * weights).sum(axis=1), hit.all(axis=1)
    _SCORERS[key] = jax.jit(fn)
  return _SCORERS[key]


def token_logprobs(logits, targets):
  """log p(targets) (B, T) float32 from logits (B, T, V) (log-softmax in
  float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]
