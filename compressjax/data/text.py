"""Tokenized text for evaluation and calibration.

    corpus = text.tokenize(text.read_text("wiki.test.raw"), pre.tokenizer)
    calib = text.random_segments(corpus, n=128, seqlen=2048, seed=0)   # GPTQ
    calib = text.text_batches(["short text", ...], pre.tokenizer,
                              batch_size=16, max_length=512)           # padded
    for batch in calib.batches:
      ids, mask = batch          # (B, T) int32 each; mask 1 token, 0 padding
    row["calibration"] = calib.description

Sources:
  `tokenize(text, tokenizer)` -> `TokenizedText`: the whole text tokenized
    once (the perplexity protocol and GPTQ's calibration both cut windows out
    of one token stream).
  `random_segments(corpus, n, seqlen, seed)`: GPTQ's calibration (Frantar et
    al. 2022, Sec. 5 "128 random 2048 token segments"; their `get_wikitext2`
    / `get_c4` draw a start uniformly and take `seqlen` tokens): `n` windows,
    seeded, no padding (mask all ones).
  `text_batches(texts, tokenizer, batch_size, max_length)`: short texts
    (sentences, documents), sorted by length and batched with their
    neighbours (length bucketing keeps padding small), right-padded to a
    multiple of `pad_multiple` tokens (few distinct shapes: few
    compilations), with an attention mask so padding can be left out of the
    statistics.

Batches are `TokenBatch(ids, attention_mask)`: unpack it (`ids, mask = b`)
or call `b.args()` for the (ids, mask) tuple. Decoders take the mask as a
keyword (`model.apply(v, ids, attention_mask=mask)`; their second positional
argument is `positions`), encoders (BERT) positionally; so calibrate a
decoder on padded batches through a function, e.g.
`capture(lambda v, i, m: module.apply(v, i, attention_mask=m), variables,
[b.args() for b in calib.batches])`, or pass `b.ids` where there is no
padding (random segments).

Every source carries a `description` (a JSON-able dict: what text, which
tokenizer, how many tokens, padding fraction, seed) and logs it, so an
experiment can record it beside each calibrated result.

`ByteTokenizer` is the tokenizer interface over UTF-8 bytes, for the byte
language model (compressjax.models.transformer, trained on
compressjax.data.stdlib_text, whose documents are separated by NUL: its
`eos_id`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from compressjax.core.errors import CompressionError


# -- tokenizers ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as token ids (vocab 256), with the interface of
  `compressjax.models.tokenizer.Tokenizer` (encode / decode / special ids).

  `eos_id` 0: NUL, the document separator of `stdlib_text`. No BOS, no pad
  token (padding uses eos; masks say what is padding)."""

  eos_id: int | None = 0
  bos_id: int | None = None
  pad_id: int | None = None

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return () if self.eos_id is None else (self.eos_id,)

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str | Sequence[str], add_special_tokens: bool = True
             ) -> list[int] | list[list[int]]:
    del add_special_tokens  # no special tokens are added
    if isinstance(text, str):
      return list(text.encode("utf-8"))
    return [list(t.encode("utf-8")) for t in text]

  def decode(self, ids, skip_special_tokens: bool = True):
    a = np.asarray(ids)
    if a.ndim == 2:
      return [self.decode(r, skip_special_tokens) for r in a]
    b = bytes(int(i) for i in a.tolist()
              if not (skip_special_tokens and i == self.eos_id))
    return b.decode("utf-8", errors="replace")


def tokenizer_name(tokenizer: Any) -> str:
  """A short, stable description of a tokenizer for result records."""
  if isinstance(tokenizer, ByteTokenizer):
    return "bytes (utf-8, vocab 256)"
  src = getattr(tokenizer, "source", None)
  vocab = getattr(tokenizer, "vocab_size", "?")
  return (f"{type(tokenizer).__name__} (vocab {vocab}"
          + (f", from {src}" if src is not None else "") + ")")


def _check_tokenizer(tokenizer: Any) -> None:
  if tokenizer is None or not hasattr(tokenizer, "encode"):
    raise CompressionError(
        f"a tokenizer is needed to turn text into ids, got "
        f"{type(tokenizer).__name__}: pass the Pretrained's tokenizer (the "
        "checkpoint directory needs tokenizer.json) or ByteTokenizer() for a "
        "byte-level model")


# -- whole texts ---------------------------------------------------------------


def read_text(paths: str | pathlib.Path | Sequence[str | pathlib.Path],
              separator: str = "\n\n", encoding: str = "utf-8") -> str:
  """The text of one file, or of several joined with `separator` (GPTQ joins
  WikiText's lines with "\\n\\n")."""
  if isinstance(paths, (str, pathlib.Path)):
    paths = [paths]
  parts = []
  for p in paths:
    p = pathlib.Path(p)
    if not p.is_file():
      raise CompressionError(f"text file {p} does not exist; pass the path of "
                             "a UTF-8 text file")
    try:
      parts.append(p.read_text(encoding=encoding))
    except UnicodeDecodeError as e:
      raise CompressionError(f"{p} is not {encoding} text ({e}); pass "
                             "encoding= or convert the file") from None
  return separator.join(parts)


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TokenizedText:
  """A text tokenized once: `ids` (N,) int32 and its description."""

  ids: np.ndarray
  description: dict

  def __len__(self) -> int:
    return int(self.ids.shape[0])


def tokenize(text: str, tokenizer: Any, *, name: str | None = None,
             add_special_tokens: bool = True) -> TokenizedText:
  """Tokenizes `text` in one call (the tokenizer's special tokens, e.g. a
  leading BOS, added once for the whole text, as GPTQ's
  `tokenizer("\\n\\n".join(texts))`).

  Args:
    name: what the text is, for the description (default: "text").
  """
  _check_tokenizer(tokenizer)
  if not isinstance(text, str):
    raise CompressionError(f"tokenize takes a str, got {type(text).__name__};"
                           " read files with read_text")
  ids = np.asarray(tokenizer.encode(
      text, add_special_tokens=add_special_tokens), np.int32).reshape(-1)
  desc = dict(source=name or "text", chars=len(text), sha256=_digest(text),
              tokenizer=tokenizer_name(tokenizer), tokens=int(ids.size))
  logging.info("tokenized %s: %d chars -> %d tokens", desc["source"],
               len(text), ids.size)
  return TokenizedText(ids, desc)


def token_ids(data: Any, tokenizer: Any = None, add_special_tokens: bool = True
              ) -> tuple[np.ndarray, dict]:
  """(ids (N,) int32, description) of a TokenizedText, a str (tokenized with
  `tokenizer`) or a 1-D array of ids (e.g. stdlib_text's bytes)."""
  if isinstance(data, TokenizedText):
    return data.ids, dict(data.description)
  if isinstance(data, str):
    t = tokenize(data, tokenizer, add_special_tokens=add_special_tokens)
    return t.ids, dict(t.description)
  a = np.asarray(data)
  if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
    raise CompressionError(
        f"expected text (str), a TokenizedText or a 1-D integer array of "
        f"token ids, got {type(data).__name__} of shape {a.shape} dtype "
        f"{a.dtype}")
  return a.astype(np.int32), dict(source="token ids", tokens=int(a.size))


# -- batches -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenBatch:
  """Model input: `ids` (B, T) int32 and `attention_mask` (B, T) int32 (1 a
  token, 0 right padding). Unpacks as `ids, mask = batch`."""

  ids: np.ndarray
  attention_mask: np.ndarray

  def __post_init__(self):
    if self.ids.shape != self.attention_mask.shape or self.ids.ndim != 2:
      raise CompressionError(
          f"TokenBatch ids {self.ids.shape} and attention_mask "
          f"{self.attention_mask.shape} must be equal (B, T) arrays")

  def __iter__(self) -> Iterator[np.ndarray]:
    return iter((self.ids, self.attention_mask))

  def args(self) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask)."""
    return self.ids, self.attention_mask

  @property
  def tokens(self) -> int:
    """Real (unpadded) tokens."""
    return int(self.attention_mask.sum())


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Calibration batches and their description (record it with results).

  description keys: kind ('segments' or 'texts'), source, tokenizer,
  samples, tokens (real), padded_tokens, padding_fraction, batch shapes, and
  the source's own (seqlen and seed; or max_length)."""

  batches: tuple[TokenBatch, ...]
  description: dict

  def __iter__(self) -> Iterator[TokenBatch]:
    return iter(self.batches)

  def __len__(self) -> int:
    return len(self.batches)


def _describe(kind: str, source: dict, batches: Sequence[TokenBatch],
              **extra) -> dict:
  real = sum(b.tokens for b in batches)
  total = sum(b.ids.size for b in batches)
  d = dict(kind=kind, source=source.get("source"),
           tokenizer=source.get("tokenizer"),
           samples=sum(b.ids.shape[0] for b in batches), tokens=real,
           padded_tokens=total - real,
           padding_fraction=round((total - real) / max(total, 1), 6),
           shapes=sorted({tuple(b.ids.shape) for b in batches}), **extra)
  if "sha256" in source:
    d["sha256"] = source["sha256"]
  logging.info("calibration %s: %s, %d samples, %d tokens, padding %.1f%%",
               kind, d["source"], d["samples"], real,
               100 * d["padding_fraction"])
  return d


def random_segments(corpus: TokenizedText | Any, n: int, seqlen: int, *,
                    seed: int = 0, batch_size: int | None = None,
                    tokenizer: Any = None) -> Calibration:
  """GPTQ's calibration: `n` windows of `seqlen` consecutive tokens, each
  starting at a seeded uniform position of the tokenized corpus (windows may
  overlap, as GPTQ's). No padding.

  Args:
    corpus: a TokenizedText, a str (tokenized with `tokenizer`) or ids.
    batch_size: windows per batch (default: all `n` in one batch).
  """
  ids, src = token_ids(corpus, tokenizer)
  if n < 1 or seqlen < 1:
    raise CompressionError(f"random_segments needs n >= 1 and seqlen >= 1, "
                           f"got n={n}, seqlen={seqlen}")
  if ids.size <= seqlen:
    raise CompressionError(
        f"the calibration text has {ids.size} tokens, not more than seqlen "
        f"{seqlen}; use a longer text or a shorter seqlen")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, ids.size - seqlen, size=n)
  windows = ids[starts[:, None] + np.arange(seqlen)]
  bs = n if batch_size is None else batch_size
  if bs < 1:
    raise CompressionError(f"batch_size must be >= 1, got {bs}")
  batches = tuple(TokenBatch(w, np.ones_like(w))
                  for w in (windows[i:i + bs] for i in range(0, n, bs)))
  return Calibration(batches, _describe("segments", src, batches,
                                        seqlen=seqlen, seed=seed))


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def text_batches(texts: Sequence[str], tokenizer: Any, *, batch_size: int,
                 max_length: int, pad_multiple: int = 16,
                 add_special_tokens: bool = True, name: str | None = None
                 ) -> Calibration:
  """Short texts as padded, length-bucketed batches.

  Texts are tokenized one by one, truncated to `max_length` tokens, sorted
  by length (stable) and cut into batches of `batch_size` neighbours; each
  batch is right-padded (pad id, else eos, else 0) to its longest row
  rounded up to a multiple of `pad_multiple` (capped at `max_length`).
  Empty strings are dropped (logged).
  """
  _check_tokenizer(tokenizer)
  if isinstance(texts, str) or not len(texts):
    raise CompressionError("text_batches takes a non-empty list of texts "
                           "(for one long text use tokenize + "
                           "random_segments)")
  if batch_size < 1 or max_length < 1 or pad_multiple < 1:
    raise CompressionError(
        f"batch_size, max_length and pad_multiple must be >= 1, got "
        f"{batch_size}, {max_length}, {pad_multiple}")
  kept = [t for t in texts if t]
  empty = len(texts) - len(kept)
  if empty:
    logging.info("text_batches: dropping %d empty texts", empty)
  if not kept:
    raise CompressionError("every text is empty")
  seqs = [s[:max_length] for s in tokenizer.encode(
      kept, add_special_tokens=add_special_tokens)]
  seqs.sort(key=len)
  fill = next((i for i in (getattr(tokenizer, "pad_id", None),
                           getattr(tokenizer, "eos_id", None))
               if i is not None), 0)
  batches = []
  for i in range(0, len(seqs), batch_size):
    group = seqs[i:i + batch_size]
    t = min(max_length, _round_up(max(map(len, group)), pad_multiple))
    ids = np.full((len(group), t), fill, np.int32)
    mask = np.zeros((len(group), t), np.int32)
    for r, s in enumerate(group):
      ids[r, :len(s)] = s
      mask[r, :len(s)] = 1
    batches.append(TokenBatch(ids, mask))
  joined = "\x1e".join(texts)
  src = dict(source=name or f"{len(texts)} texts", sha256=_digest(joined),
             tokenizer=tokenizer_name(tokenizer))
  return Calibration(tuple(batches), _describe(
      "texts", src, batches, max_length=max_length, dropped_empty=empty))
