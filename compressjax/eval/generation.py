"""Text generation: greedy or sampled, with the KV cache, compiled with static
shapes.

    res = generate(pre, compressed_variables, ["def main(", "import "],
                   max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)
    res.texts, res.tokens, res.lengths, res.decode_tokens_per_s

Two compiled programs per (model, batch, prompt bucket, max_new_tokens,
sampling) — compile time is measured apart and excluded from the rates:
  prefill: the prompts, left-padded to a bucket length (a power of two, or a
    multiple of `bucket`; at most the model's longest input less
    max_new_tokens), with an attention mask, run once into an empty KV
    cache (`model.init_cache`, capacity bucket + max_new_tokens); the first
    new token is chosen from the last position's logits;
  decode: a `lax.while_loop` feeding one token per row per step through the
    cache, until `max_new_tokens` tokens or every row has produced an eos
    token (rows that are done feed masked padding and emit `pad`).
Both run the model through `cj.run`, so the tree may be compressed.
Positions: each row counts its real tokens from 0 (the decoders' default),
as Hugging Face's generate does for left-padded batches.

A model without a KV cache (a `CausalLM` with has_cache=False: a module
without `init_cache`) keeps a right-padded buffer of prompt + max_new_tokens tokens and re-runs the
full forward each step (its positions start at 0 on every row and attention
is causal, so padding to the right of a row changes nothing before it).

Token choice (`Sampling`, the order of Hugging Face's logits warpers):
temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k
(keep the k largest), then top-p (nucleus, Holtzman et al. 2020: keep the
smallest set of most likely tokens whose probability reaches p; the most
likely token is always kept), then a categorical draw.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from compressjax.core.base import CompressedLeaf
from compressjax.core.errors import CompressionError
from compressjax.core.tree import is_compressed
from compressjax.eval.lm import CausalLM, causal_lm
from compressjax.runtime.interpret import run


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy. top_k None / top_p None: no truncation."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise CompressionError(f"temperature must be >= 0 (0: greedy), got "
                             f"{self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise CompressionError(f"top_k must be >= 1 or None, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise CompressionError(f"top_p must be in (0, 1] or None, got "
                             f"{self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits, sampling: Sampling):
  """Logits (B, V) / temperature with tokens outside top-k / top-p set to
  -inf (float32)."""
  x = logits.astype(jnp.float32) / sampling.temperature
  neg = jnp.float32(-jnp.inf)
  if sampling.top_k is not None and sampling.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
    x = jnp.where(x < kth, neg, x)
  if sampling.top_p is not None and sampling.top_p < 1:
    srt = jnp.sort(x, axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # mass of strictly likelier tokens
    keep = before < sampling.top_p       # the first token always (0 < p)
    cut = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cut, neg, x)
  return x


def choose(key, logits, sampling: Sampling):
  """(B,) int32 next tokens from (B, V) logits."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling),
                                axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """tokens (B, max_new_tokens) int32: each row's new tokens (its eos
  included), then `pad`; lengths (B,): new tokens per row; texts: decoded
  rows (eos and special tokens skipped) when there is a tokenizer.

  Rates exclude compilation: prefill_tokens_per_s counts real prompt tokens,
  decode_tokens_per_s counts batch * decode steps (each while-loop step
  makes one token per row, the first new token comes from the prefill)."""

  tokens: np.ndarray
  lengths: np.ndarray
  texts: list[str] | None
  prompt_tokens: int
  prompt_bucket: int
  decode_steps: int
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  prefill_tokens_per_s: float
  decode_tokens_per_s: float

  def timings(self) -> dict:
    return {k: getattr(self, k) for k in (
        "prompt_tokens", "prompt_bucket", "decode_steps", "prefill_seconds",
        "decode_seconds", "compile_seconds", "prefill_tokens_per_s",
        "decode_tokens_per_s")}


def _cache_dtype(tree: Any):
  """The float dtype of the params' activations (first float leaf)."""
  for x in jax.tree.leaves(tree, is_leaf=is_compressed):
    dt = x.dense_dtype if isinstance(x, CompressedLeaf) else getattr(
        x, "dtype", None)
    if dt is not None and jnp.issubdtype(dt, jnp.floating):
      return jnp.dtype(dt)
  return jnp.dtype(jnp.float32)


def _programs(lm: CausalLM, batch: int, bucket: int, new: int,
              sampling: Sampling, pad: int, dtype, kv_store=None):
  """(prefill, decode) functions for jax.jit (static settings closed over;
  the eos ids are an argument, -1 padded, so they never recompile)."""
  module = lm.module

  if lm.has_cache:
    def prefill(tree, ids, mask, key):
      cache = module.init_cache(batch, bucket + new, dtype,
                                **({} if kv_store is None else
                                   dict(store=kv_store)))
      logits, cache = run(module, tree, ids, attention_mask=mask, cache=cache)
      key, sub = jax.random.split(key)
      return choose(sub, logits[:, -1], sampling), cache, key

    def forward(tree, state, tok, active):
      logits, state = run(module, tree, tok[:, None],
                          attention_mask=active[:, None].astype(jnp.int32),
                          cache=state)
      return logits[:, -1], state
  else:
    rows = jnp.arange(batch)

    def prefill(tree, ids, lens, key):  # ids right-padded (B, bucket + new)
      logits = lm.logits(tree, ids)
      key, sub = jax.random.split(key)
      return choose(sub, logits[rows, lens - 1], sampling), (ids, lens), key

    def forward(tree, state, tok, active):
      buf, lens = state
      buf = buf.at[rows, lens].set(jnp.where(active, tok, buf[rows, lens]),
                                   mode="drop")
      lens = lens + active.astype(lens.dtype)
      logits = lm.logits(tree, buf)
      return logits[rows, lens - 1], (buf, lens)

  def decode(tree, state, tok, key, eos):
    is_eos = lambda t: jnp.isin(t, eos)  # noqa: E731  (-1 never matches)
    out = jnp.full((batch, new), pad, jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)

    def cond(s):
      return (s[0] < new) & ~jnp.all(s[4])

    def body(s):
      i, tok, state, out, done, key = s
      logits, state = forward(tree, state, tok, ~done)
      key, sub = jax.random.split(key)
      nxt = jnp.where(done, pad, choose(sub, logits, sampling))
      out = out.at[:, i].set(nxt)
      return i + 1, nxt, state, out, done | is_eos(nxt), key

    i, _, _, out, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tok, state, out, done, key))
    return out, i

  return prefill, decode


_COMPILED: dict = {}


def _compiled(name, fn, key, *args):
  """AOT-compiled `fn` for these args (cached); returns (exe, seconds)."""
  sig = (name, key, jax.tree.structure(args), tuple(
      (tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args)))
  if sig in _COMPILED:
    return _COMPILED[sig], 0.0
  start = time.perf_counter()
  exe = jax.jit(fn).lower(*args).compile()
  _COMPILED[sig] = exe
  return exe, time.perf_counter() - start


def _encode(lm: CausalLM, prompts, add_special_tokens) -> list[list[int]]:
  if isinstance(prompts, str):
    prompts = [prompts]
  if not len(prompts):
    raise CompressionError("generate needs at least one prompt")
  if all(isinstance(p, str) for p in prompts):
    seqs = lm.require_tokenizer().encode(list(prompts), add_special_tokens)
  else:
    seqs = [[int(t) for t in np.asarray(p).reshape(-1)] for p in prompts]
  for i, s in enumerate(seqs):
    if not s:
      raise CompressionError(f"prompt {i} is empty after tokenization; "
                             "generation needs at least one token to start "
                             "from")
  return seqs


def generate(model: Any, tree: Any, prompts: str | Sequence[Any], *,
             max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_ids: Sequence[int] | None = None,
             bucket: int | None = None, tokenizer: Any = None,
             add_special_tokens: bool = True, cache_dtype: Any = None,
             kv_store: Any = None) -> GenerationResult:
  """Generates up to `max_new_tokens` tokens after each prompt.

  Args:
    model: a Pretrained decoder, zoo decoder module, TransformerLM or
      CausalLM.
    tree: its variables, possibly compressed.
    prompts: a text, a list of texts (tokenized with the model's tokenizer,
      its special tokens included), or a list of token id sequences.
    temperature / top_k / top_p: see `Sampling` (temperature 0: greedy).
    seed: PRNG seed of the draws.
    eos_ids: ids that end a row (default: the tokenizer's eos ids; () never
      stops early).
    bucket: prompts are padded to a multiple of this (default: the next
      power of two >= 8), so nearby prompt lengths share a compilation.
    cache_dtype: KV cache dtype (default: the params' float dtype).
    kv_store: a `kv.KVSpec` (quantized entries, an eviction policy and
      budget): the cache the model builds for generation (default: its
      dense cache).
  """
  lm = causal_lm(model, tokenizer)
  if max_new_tokens < 1:
    raise CompressionError(f"max_new_tokens must be >= 1, got "
                           f"{max_new_tokens}")
  sampling = Sampling(temperature, top_k, top_p)
  if kv_store is not None and not lm.has_cache:
    raise CompressionError(
        f"kv_store given, but {type(lm.module).__name__} has no KV cache "
        "(init_cache / cache=); generate without kv_store")
  seqs = _encode(lm, prompts, add_special_tokens)
  tok = lm.tokenizer
  if eos_ids is None:
    eos_ids = tuple(getattr(tok, "eos_ids", ()) or ()) if tok else ()
  eos = tuple(int(i) for i in eos_ids)
  pad = next((i for i in (getattr(tok, "pad_id", None), eos[0] if eos
                          else None) if i is not None), 0)
  longest = max(map(len, seqs))
  lm.check_length(longest + max_new_tokens,
                  f"a prompt of {longest} tokens + {max_new_tokens} new")
  if bucket is None:
    p = max(8, 1 << (longest - 1).bit_length())
  elif bucket < 1:
    raise CompressionError(f"bucket must be >= 1, got {bucket}")
  else:
    p = -(-longest // bucket) * bucket
  b = len(seqs)
  dtype = jnp.dtype(cache_dtype) if cache_dtype is not None else \
      _cache_dtype(tree)
  lens = np.array([len(s) for s in seqs], np.int32)
  if lm.max_length is not None:  # the bucket + new tokens fit the model
    p = min(p, lm.max_length - max_new_tokens)
  if lm.has_cache:
    ids = np.full((b, p), pad, np.int32)
    mask = np.zeros((b, p), np.int32)
    for r, s in enumerate(seqs):  # left padding
      ids[r, p - len(s):], mask[r, p - len(s):] = s, 1
    first = (ids, mask)
  else:
    ids = np.full((b, p + max_new_tokens), pad, np.int32)
    for r, s in enumerate(seqs):  # right padding
      ids[r, :len(s)] = s
    first = (ids, lens)
  prefill, decode = _programs(lm, b, p, max_new_tokens, sampling, pad, dtype,
                              kv_store)
  settings = (lm.module, lm.has_cache, b, p, max_new_tokens, sampling, pad,
              str(dtype), kv_store)
  # eos ids: a runtime array padded with -1 to a power of two (>= 4)
  n_eos = max(4, 1 << max(len(eos) - 1, 0).bit_length())
  eos_arg = jnp.asarray(list(eos) + [-1] * (n_eos - len(eos)), jnp.int32)
  key = jax.random.key(seed)
  args = (tree, *map(jnp.asarray, first), key)
  pre_exe, c1 = _compiled("prefill", prefill, settings, *args)
  start = time.perf_counter()
  tok0, state, key = jax.block_until_ready(pre_exe(*args))
  t_prefill = time.perf_counter() - start
  dec_exe, c2 = _compiled("decode", decode, settings, tree, state, tok0, key,
                          eos_arg)
  start = time.perf_counter()
  out, steps = jax.block_until_ready(dec_exe(tree, state, tok0, key,
                                             eos_arg))
  t_decode = time.perf_counter() - start
  out = np.asarray(out)
  steps = int(steps)
  lengths = np.full((b,), steps, np.int32)
  if eos:
    hit = np.isin(out, eos)
    first_eos = np.where(hit.any(1), hit.argmax(1) + 1, max_new_tokens)
    lengths = np.minimum(first_eos, steps).astype(np.int32)
  texts = None
  if tok is not None:
    texts = [tok.decode(out[r, :lengths[r]]) for r in range(b)]
  res = GenerationResult(
      tokens=out, lengths=lengths, texts=texts, prompt_tokens=int(lens.sum()),
      prompt_bucket=p, decode_steps=steps - 1,
      prefill_seconds=t_prefill, decode_seconds=t_decode,
      compile_seconds=c1 + c2,
      prefill_tokens_per_s=float(lens.sum()) / max(t_prefill, 1e-9),
      decode_tokens_per_s=b * (steps - 1) / max(t_decode, 1e-9))
  logging.info("generate: batch %d, prompts %d tokens (bucket %d), %d decode "
               "steps; prefill %.0f tok/s, decode %.1f tok/s (compile %.1fs)",
               b, res.prompt_tokens, p, steps - 1, res.prefill_tokens_per_s,
               res.decode_tokens_per_s, res.compile_seconds)
  return res
