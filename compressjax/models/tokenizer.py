"""Hugging Face `tokenizer.json` through the `tokenizers` package.

A small wrapper: encode a text or a batch to ids (with the tokenizer's own
post-processor adding BOS/EOS where tokenizer.json says so), pad a batch to
arrays, decode, and the bos/eos/pad ids. The special ids come from, in order:
tokenizer_config.json / special_tokens_map.json (token strings such as
"bos_token": "<s>" or {"content": "<s>", ...}), generation_config.json, then
config.json (`bos_token_id`, `eos_token_id` (an int or a list), `pad_token_id`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from compressjax.core.errors import CompressionError

TOKENIZER_FILE = "tokenizer.json"
# Files that belong to a HF tokenizer; copied verbatim on save.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")


def read_json(path: pathlib.Path) -> dict | None:
  """A JSON object file, None when absent; CompressionError naming the file
  when it is not a valid JSON object."""
  if not path.is_file():
    return None
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CompressionError(f"{path} is not valid JSON ({e}); restore the file "
                           "from the original checkpoint") from None
  if not isinstance(d, dict):
    raise CompressionError(f"{path} holds a {type(d).__name__}, not a JSON "
                           "object; restore the file from the checkpoint")
  return d


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A `tokenizers.Tokenizer` with its special ids.

  Attributes:
    backend: the `tokenizers.Tokenizer`.
    bos_id / eos_id / pad_id: special ids, None when the checkpoint names none.
    eos_ids: every end-of-sequence id (config.json may list several).
    source: the directory it was loaded from (its files are copied on save).
  """

  backend: Any
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  source: pathlib.Path | None = None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str | Sequence[str], add_special_tokens: bool = True
             ) -> list[int] | list[list[int]]:
    """Ids of one text, or a list of id lists for a batch of texts."""
    if isinstance(text, str):
      return self.backend.encode(text, add_special_tokens=add_special_tokens
                                 ).ids
    return [e.ids for e in self.backend.encode_batch(
        list(text), add_special_tokens=add_special_tokens)]

  def encode_padded(self, texts: Sequence[str], length: int | None = None,
                    add_special_tokens: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), int32 arrays (B, length), right-padded with pad_id (eos
    when there is no pad token); texts longer than `length` are truncated."""
    seqs = self.encode(list(texts), add_special_tokens)
    length = max(map(len, seqs), default=0) if length is None else length
    fill = self.pad_id if self.pad_id is not None else self.eos_id
    if fill is None and any(len(s) < length for s in seqs):
      raise CompressionError("the tokenizer has no pad or eos token to pad "
                             "with; pass texts of equal length")
    ids = np.full((len(seqs), length), fill or 0, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
      s = s[:length]
      ids[i, :len(s)] = s
      mask[i, :len(s)] = 1
    return ids, mask

  def decode(self, ids, skip_special_tokens: bool = True):
    """Text of a 1-D id sequence; a list of texts for a 2-D one."""
    a = np.asarray(ids)
    if a.ndim == 2:
      return self.backend.decode_batch(
          a.tolist(), skip_special_tokens=skip_special_tokens)
    return self.backend.decode(a.tolist(),
                               skip_special_tokens=skip_special_tokens)

  def save(self, path) -> None:
    """Writes the tokenizer files into directory `path`: the source's files
    verbatim when it was loaded from disk, else tokenizer.json and a
    tokenizer_config.json naming the special tokens."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if self.source is not None:
      for name in TOKENIZER_FILES:
        src = self.source / name
        if src.is_file() and src.resolve() != (path / name).resolve():
          shutil.copyfile(src, path / name)
      return
    self.backend.save(str(path / TOKENIZER_FILE))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                   ("pad_token", self.pad_id)):
      if i is not None:
        cfg[key] = self.backend.id_to_token(i)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _token_id(backend, value) -> int | None:
  if isinstance(value, Mapping):  # AddedToken dict form
    value = value.get("content")
  if not isinstance(value, str):
    return None
  return backend.token_to_id(value)


def _ids(value) -> tuple[int, ...]:
  if isinstance(value, bool):
    return ()
  if isinstance(value, int):
    return (value,)
  if isinstance(value, (list, tuple)):
    return tuple(v for v in value if isinstance(v, int)
                 and not isinstance(v, bool))
  return ()


def load_tokenizer(path, hf_config: Mapping[str, Any] | None = None
                   ) -> Tokenizer | None:
  """The tokenizer of a HF directory, or None (logged) without tokenizer.json.

  Raises CompressionError when tokenizer.json exists but cannot be read."""
  path = pathlib.Path(path)
  file = path / TOKENIZER_FILE
  if not file.is_file():
    logging.info("no %s in %s: loading the model without a tokenizer",
                 TOKENIZER_FILE, path)
    return None
  import tokenizers
  try:
    backend = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises a bare Exception
    raise CompressionError(
        f"{file} could not be read by the tokenizers package ({e}); restore "
        "it from the original checkpoint or delete it to load without a "
        "tokenizer") from None
  sources = [
      {k: _token_id(backend, (d or {}).get(k + "_token"))
       for k in ("bos", "eos", "pad")}
      for d in (read_json(path / "tokenizer_config.json"),
                read_json(path / "special_tokens_map.json"))]
  eos_ids: tuple[int, ...] = ()
  for d in (read_json(path / "generation_config.json"), hf_config or {}):
    d = d or {}
    sources.append({k: (_ids(d.get(k + "_token_id")) or (None,))[0]
                    for k in ("bos", "eos", "pad")})
    eos_ids = eos_ids or _ids(d.get("eos_token_id"))
  found = {k: next((s[k] for s in sources if s[k] is not None), None)
           for k in ("bos", "eos", "pad")}
  if found["eos"] is not None and found["eos"] not in eos_ids:
    eos_ids = (found["eos"],) + eos_ids
  return Tokenizer(backend, found["bos"], found["eos"], found["pad"],
                   eos_ids, path)
