"""Zero-shot multiple choice: the harness' request encoding (trailing
whitespace moves to the continuation, the continuation is the tail of the
joint encoding), summed log-likelihoods of padded batches against unpadded
float64 references, acc / acc_norm / stderr / chance, left truncation, the
built-in task file and bad task files."""

import json
import math

import numpy as np
import pytest

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.eval import encode_pair, load_task, zeroshot
from compressjax.eval.multiple_choice import BUILTIN_TASKS, mean_stderr
from tests.eval import fixtures

ITEMS = [
    {"context": "def main(argv):\n    ", "choices": ["return 0", "print(i)",
                                                   "x"], "label": 0},
    {"context": "for i in range(10)", "choices": [":", " {", ";"],
     "label": 0},
    {"context": "the quick brown fox ", "choices": ["jumps over", "dog",
                                                    "import os"], "label": 0},
    {"context": "import", "choices": [" os", " the lazy dog"], "label": 1},
    {"context": "", "choices": ["class Point(object):", "x"], "label": 0},
]


def reference_logliks(module, variables, pairs, max_length=None, width=64):
  """Summed log p(continuation) of each (ctx, cont), float64, each request
  alone in a row of one forward: a causal model's logits at a position do
  not depend on the (zero) tokens after it, so no mask is involved."""
  seqs = []
  for ctx, cont in pairs:
    s = list(ctx) + list(cont)
    seqs.append(s if max_length is None else s[-(max_length + 1):])
  x = np.zeros((len(seqs), width), np.int32)
  for r, s in enumerate(seqs):
    x[r, :len(s) - 1] = s[:-1]
  logits = np.asarray(fixtures.forward(module, variables, x), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  out = []
  for r, ((_, cont), s) in enumerate(zip(pairs, seqs)):
    t = np.arange(len(s) - 1 - len(cont), len(s) - 1)
    out.append(logp[r, t, np.asarray(s[1:])[-len(cont):]].sum())
  return out


def test_encode_pair_like_the_harness():
  tok = fixtures.llama().tokenizer
  ctx, cont = encode_pair(tok, "def main(argv):  ", "return 0")
  assert ctx == tok.encode("def main(argv):")          # spaces moved out
  assert ctx + cont == tok.encode("def main(argv):  return 0")
  assert tok.decode(cont) == "  return 0"
  assert ctx[0] == tok.bos_id                           # tokenizer's BOS
  ctx, cont = encode_pair(tok, "def main", "(argv):",
                          add_special_tokens=False)
  assert ctx == tok.encode("def main", add_special_tokens=False)
  ctx, cont = encode_pair(tok, "", "import os")
  assert ctx == [tok.bos_id]
  assert cont == tok.encode("import os", add_special_tokens=False)


def test_llama_scores_match_unpadded_reference():
  pre = fixtures.llama()
  res = zeroshot(pre, pre.variables, ITEMS, batch_size=4, pad_multiple=32,
                 progress=False)
  acc, acc_norm = [], []
  pairs = [encode_pair(pre.tokenizer, item["context"], c)
           for item in ITEMS for c in item["choices"]]
  ref = iter(reference_logliks(pre.module, pre.variables, pairs))
  for item, got in zip(ITEMS, res.loglik):
    want = [next(ref) for _ in item["choices"]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    lens = np.array([len(c) for c in item["choices"]], float)
    acc.append(np.argmax(want) == item["label"])
    acc_norm.append(np.argmax(np.array(want) / lens) == item["label"])
  assert res.acc == np.mean(acc) and res.acc_norm == np.mean(acc_norm)
  assert res.items == 5
  assert res.chance == pytest.approx(np.mean([1 / 3] * 3 + [1 / 2] * 2))
  p = np.mean(acc)
  assert res.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) / 4))
  json.dumps(res.as_dict())


def test_byte_lm_truncates_left_and_runs_compressed():
  model, v = fixtures.byte_lm()
  long_ctx = "".join(fixtures.LINES)[:100]  # > seq_len 64: cut on the left
  items = [{"context": long_ctx, "choices": ["abc", " de"], "label": 0},
           {"context": "import ", "choices": ["os", "sys"], "label": 1}]
  q = fixtures.quantize8(v)
  tok = cj.eval.causal_lm(model).tokenizer
  pairs = [encode_pair(tok, item["context"], c)
           for item in items for c in item["choices"]]
  for tree in (v, q):
    res = zeroshot(model, tree, items, batch_size=2, pad_multiple=64,
                   progress=False)
    want = reference_logliks(model, fixtures.materialize(tree), pairs, 64)
    np.testing.assert_allclose(np.concatenate(res.loglik), want, rtol=1e-4,
                               atol=1e-4)


def test_builtin_task_file():
  task = load_task("python_syntax")
  assert 50 <= len(task.items) <= 200
  assert all(len(i.choices) == 4 and len(set(i.choices)) == 4
             for i in task.items)
  assert task.chance == 0.25
  assert {i.label for i in task.items} == {0, 1, 2, 3}
  assert len({(i.context, i.choices) for i in task.items}) == len(task.items)
  lines = BUILTIN_TASKS["python_syntax"].read_text().splitlines()
  assert [json.loads(line)["label"] for line in lines] == [
      i.label for i in task.items]


@pytest.mark.parametrize("line,match", [
    ("{not json", "not valid JSON"),
    ('{"context": "a", "choices": ["b", "c"]}', "missing"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "label"),
    ('{"context": "a", "choices": ["b"], "label": 0}', "at least 2"),
    ('{"context": 1, "choices": ["b", "c"], "label": 0}', "context"),
])
def test_bad_task_file(tmp_path, line, match):
  f = tmp_path / "t.jsonl"
  f.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n'
               + line + "\n")
  with pytest.raises(CompressionError, match=match) as e:
    load_task(str(f))
  assert ":2" in str(e.value)  # names the line
  with pytest.raises(CompressionError, match="neither a built-in"):
    load_task(str(tmp_path / "missing.jsonl"))


def test_mean_stderr_is_the_harness_formula():
  x = np.array([1, 0, 1, 1, 0, 1, 1, 1], float)
  want = math.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1)) / math.sqrt(
      len(x))
  assert mean_stderr(x) == pytest.approx(want)
  assert math.isnan(mean_stderr(np.array([1.0])))


def test_merge_across_the_boundary_moves_the_split_back():
  tok = fixtures.llama().tokenizer
  whole = tok.encode("for i in range(10):")
  ctx_alone = tok.encode("for i in range(10)")
  assert whole[:len(ctx_alone)] != ctx_alone  # the BPE merged "):"
  ctx, cont = encode_pair(tok, "for i in range(10)", ":")
  assert ctx + cont == whole and cont
  assert ctx == ctx_alone[:len(ctx)]          # a shared token boundary
  assert tok.decode(cont).endswith(":")
