"""Tokenized text sources: GPTQ random segments (seeded windows of one token
stream), padded length-bucketed batches of short texts, their descriptions,
the byte tokenizer, and the errors users meet."""

import json

import numpy as np
import pytest

from compressjax.core.errors import CompressionError
from compressjax.data import text
from tests.eval import fixtures


def test_byte_tokenizer_round_trip():
  tok = text.ByteTokenizer()
  s = "def f(x):\n    return 'é'\n"
  ids = tok.encode(s)
  assert ids == list(s.encode("utf-8")) and max(ids) < tok.vocab_size
  assert tok.decode(ids) == s
  assert tok.decode([100, 0, 101]) == "de"            # NUL is eos: skipped
  assert tok.decode([100, 0, 101], skip_special_tokens=False) == "d\x00e"
  assert tok.encode(["ab", "c"]) == [[97, 98], [99]]
  assert tok.eos_ids == (0,) and tok.bos_id is None


def test_tokenize_once_and_read_text(tmp_path):
  tok = fixtures.llama().tokenizer
  (tmp_path / "a.txt").write_text("first part")
  (tmp_path / "b.txt").write_text("second part")
  joined = text.read_text([tmp_path / "a.txt", tmp_path / "b.txt"])
  assert joined == "first part\n\nsecond part"
  t = text.tokenize(joined, tok, name="a+b")
  # one call: a single BOS at the start of the whole stream
  np.testing.assert_array_equal(t.ids, tok.encode(joined))
  assert t.ids[0] == tok.bos_id and (t.ids == tok.bos_id).sum() == 1
  assert t.description["tokens"] == len(t) == t.ids.size
  assert t.description["source"] == "a+b"
  assert t.description["chars"] == len(joined)
  json.dumps(t.description)
  with pytest.raises(CompressionError, match="does not exist"):
    text.read_text(tmp_path / "missing.txt")
  (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(CompressionError, match="not utf-8"):
    text.read_text(tmp_path / "bin.txt")
  with pytest.raises(CompressionError, match="tokenizer"):
    text.tokenize("abc", None)


def test_random_segments_are_seeded_windows_of_the_stream():
  ids = np.arange(1000, dtype=np.int32) * 7 % 251  # a known stream
  cal = text.random_segments(ids, n=10, seqlen=32, seed=3, batch_size=4)
  assert [b.ids.shape for b in cal] == [(4, 32), (4, 32), (2, 32)]
  rows = np.concatenate([b.ids for b in cal])
  # each row is ids[s:s + 32] for the seeded start (GPTQ's uniform draw)
  starts = np.random.default_rng(3).integers(0, 1000 - 32, size=10)
  for r, s in zip(rows, starts):
    np.testing.assert_array_equal(r, ids[s:s + 32])
  assert all(b.attention_mask.all() for b in cal)
  again = text.random_segments(ids, n=10, seqlen=32, seed=3, batch_size=4)
  assert all((a.ids == b.ids).all() for a, b in zip(cal, again))
  other = text.random_segments(ids, n=10, seqlen=32, seed=4)
  assert not (other.batches[0].ids == rows).all()
  d = cal.description
  assert d["kind"] == "segments" and d["samples"] == 10 and d["seed"] == 3
  assert d["tokens"] == 320 and d["padded_tokens"] == 0
  assert d["padding_fraction"] == 0.0 and d["seqlen"] == 32
  json.dumps(d)
  with pytest.raises(CompressionError, match="not more than seqlen"):
    text.random_segments(ids[:32], n=1, seqlen=32)


def test_text_batches_bucketed_padded_and_masked():
  tok = fixtures.llama().tokenizer
  texts = [fixtures.LINES[i % len(fixtures.LINES)] * (1 + i % 3)
           for i in range(11)] + [""]
  cal = text.text_batches(texts, tok, batch_size=4, max_length=24,
                          pad_multiple=8)
  enc = sorted((s[:24] for s in tok.encode(texts[:-1])), key=len)
  got, real, total = [], 0, 0
  for b in cal:
    ids, mask = b
    t = ids.shape[1]
    lens = mask.sum(1)
    assert t % 8 == 0 or t == 24
    assert t == min(24, -(-lens.max() // 8) * 8)        # its own bucket
    for r in range(ids.shape[0]):
      n = lens[r]
      assert mask[r, :n].all() and not mask[r, n:].any()  # right padding
      assert (ids[r, n:] == tok.pad_id).all()
      got.append(list(ids[r, :n]))
    real += int(lens.sum())
    total += ids.size
  assert got == enc                         # sorted by length, truncated
  d = cal.description
  assert d["samples"] == 11 and d["dropped_empty"] == 1
  assert d["tokens"] == real and d["padded_tokens"] == total - real
  assert d["padding_fraction"] == pytest.approx((total - real) / total,
                                                abs=1e-6)
  assert d["kind"] == "texts" and "sha256" in d
  json.dumps(d)
  with pytest.raises(CompressionError, match="non-empty list"):
    text.text_batches("one string", tok, batch_size=2, max_length=8)
  with pytest.raises(CompressionError, match="every text is empty"):
    text.text_batches(["", ""], tok, batch_size=2, max_length=8)


def test_token_ids_refuses_other_inputs():
  with pytest.raises(CompressionError, match="1-D integer array"):
    text.token_ids(np.zeros((2, 3), np.int32))
  with pytest.raises(CompressionError, match="1-D integer array"):
    text.token_ids(np.zeros(3, np.float32))
  with pytest.raises(CompressionError, match="must be equal"):
    text.TokenBatch(np.zeros((2, 3), np.int32), np.zeros((2, 4), np.int32))
