"""experiments/kv_lm.py: rows, needle data, teacher-forced streaming through
a cache (equal to the full forward at full budget), quality bars and
outputs. (Greedy generation through eval.generate with a compressed cache
runs in the experiment itself: its compile is too slow for this suite.)"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import kv
from compressjax.models import llama, transformer
from configs import kv as kv_config
from experiments import kv_lm


def _config():
  c = kv_config.get_config()
  c.kv.group_size = 8
  c.kv.residual = 8
  c.kv.snapkv_window = 4
  return c


def _tiny():
  m = llama.LlamaForCausalLM(llama.LlamaConfig(
      vocab_size=256, hidden_size=32, intermediate_size=64,
      num_attention_heads=4, num_key_value_heads=2))
  return m, jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def test_rows_parse_to_specs():
  c = _config()
  spec = kv_lm.make_row("h2o_pyramid_25+int4", c).spec(64, True)
  assert spec.policy.name == "h2o" and isinstance(spec.budget, kv.Pyramid)
  assert spec.budget.budget == 16 and spec.keys.bits == 4
  spec = kv_lm.make_row("kivi2_r16_rot", c).spec(64, True)
  assert (spec.keys.axis, spec.values.axis, spec.residual) == (
      "channel", "token", 16) and spec.keys.rotate
  assert kv_lm.make_row("sink_50", c).spec(64, False).policy.reposition is \
      False
  assert kv_lm.make_row("sink_50", c).spec(64, True).budget.budget == 32
  with pytest.raises(ValueError, match="unknown row 'lru_25'"):
    kv_lm.parse_rows("float,lru_25", c)
  with pytest.raises(ValueError, match="duplicate"):
    kv_lm.parse_rows("float,float", c)


def test_needle_data():
  rng = np.random.default_rng(0)
  data = np.frombuffer(b"x = 1\n" * 400, np.uint8)
  p, a = kv_lm.needle_prompt(data, rng, 100, 0.5)
  text = bytes(p.astype(np.uint8))
  assert len(p) == 100 and p[0] == kv_lm.BOS and len(a) == 5
  line = text[text.index(b"\n@@"):].split(b"\n")[1]
  assert text.endswith(b"\n" + line[:-5]) and line.endswith(bytes(
      a.astype(np.uint8)))
  w = kv_lm.training_window(data, rng, 256, 1.0)
  assert len(w) == 257 and w[0] == kv_lm.BOS
  lines = [x for x in bytes(w.astype(np.uint8)).split(b"\n")
           if x.startswith(b"@@")]
  assert len(lines) >= 2 and len(set(lines)) * 2 == len(lines)


def _induction_logits(seq: np.ndarray) -> np.ndarray:
  """An oracle (B, T, 256): at each position, one-hot on the byte that
  followed the latest earlier occurrence of the current byte (induction)."""
  out = np.zeros(seq.shape + (256,), np.float32)
  for b, row in enumerate(seq):
    last: dict[int, int] = {}
    for t, x in enumerate(row):
      if x in last:
        out[b, t, row[last[x] + 1]] = 1.0
      last[int(x)] = t
  return out


def test_needle_prompts_are_solved_by_retrieval():
  # An induction oracle scores 1.0 teacher-forced on the eval prompts (the
  # answer is exactly what follows the key's earlier occurrence), and 0 if
  # the scoring were one position off; in training windows it predicts
  # every repeated value.
  c = _config()
  c.needle.trials = 2
  data = np.frombuffer(b"def f(x):\n  return x + 1\n" * 100, np.uint8)
  for ctx in (64, 128):
    prompts, answers, depths = kv_lm.needle_prompts(c, data, ctx)
    assert prompts.shape == (10, ctx) and (prompts[:, 0] == kv_lm.BOS).all()
    seq = np.concatenate([prompts, answers], 1)
    logits = _induction_logits(seq)
    assert kv_lm.needle_teacher_forced(logits, answers).all()
    assert not kv_lm.needle_teacher_forced(logits[:, 1:], answers[:, :-1]
                                           ).any()
  rng = np.random.default_rng(3)
  w = kv_lm.training_window(data, rng, 256, 1.0)
  pred = _induction_logits(w[None, :-1])[0].argmax(-1)
  sym = np.flatnonzero(w[1:] >= kv_lm.NEEDLE_ALPHABET[0])
  second = sym[len(sym) // 2:]  # the repeated lines' symbols
  vals = second.reshape(-1, 10)[:, 5:].ravel()
  assert (pred[vals] == w[1:][vals]).all()


def test_copy_windows_repeat_a_string_of_distinct_symbols():
  # Every copy window repeats its string at least twice (period <= half
  # the window), so the induction oracle predicts every byte of the
  # repeats after their first; periods vary (a fixed one is solved
  # positionally).
  rng = np.random.default_rng(0)
  periods = set()
  for length in (64, 256):
    for _ in range(20):
      w = kv_lm.copy_window(rng, length)
      assert len(w) == length + 1 and w[0] == kv_lm.BOS
      body = w[1:]
      h = next(i for i in range(1, length) if body[i] == body[0])
      assert 4 <= h <= length // 2 and len(set(body[:h])) == h
      assert set(body) <= set(kv_lm.NEEDLE_ALPHABET)
      assert (body[h:] == body[:-h]).all()
      pred = _induction_logits(w[None, :-1])[0].argmax(-1)
      assert (pred[h + 1:] == w[h + 2:]).all()  # after the first repeat
      periods.add(h)
  assert len(periods) > 10


def test_stream_nll_is_the_forward_until_the_budget_binds():
  m, v = _tiny()
  toks = np.random.default_rng(1).integers(1, 256, (2, 12)).astype(np.int32)
  logits = m.apply(v, jnp.asarray(toks[:, :-1]))
  want = np.asarray(transformer.next_token_loss(logits, toks[:, 1:]))
  got = kv_lm.stream_nll(m, v, toks, kv.KVSpec(policy="window", budget=3),
                         11)
  # the first 3 tokens see everything; later ones only the last 3
  np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=1e-5, atol=1e-5)
  assert np.abs(got - want)[:, 3:].min() > 1e-6


def test_quality_bars_and_outputs(tmp_path):
  c = _config()
  base = dict(stream_ppl=3.0, needle_acc=0.5, cache_bits_per_element=32.0,
              cache_ratio=1.0, description="d", policy="dense")
  rows = [dict(base, method="float", val_ppl=2.0, byte_val_ppl=3.0),
          dict(base, method="int8", val_ppl=2.005, byte_val_ppl=3.03),
          dict(base, method="kivi2_r32", val_ppl=2.3, stream_ppl_past=1),
          dict(base, method="kivi2_r0", val_ppl=2.6),
          dict(base, method="window_25", needle_acc=0.1, policy="window",
               cache_ratio=4.0, val_ppl=3.0, stream_ppl_past=9.0),
          dict(base, method="h2o_25", needle_acc=0.4, policy="h2o",
               cache_ratio=4.0, val_ppl=2.5, stream_ppl_past=8.0),
          dict(base, method="sink_25", needle_acc=0.0, policy="sink",
               cache_ratio=4.0, val_ppl=2.6, stream_ppl_past=5.0)]
  for r in rows:
    r.setdefault("stream_ppl_past", 4.0)
  bars = kv_lm.quality_bars(rows, c)
  text = "\n".join(bars)
  assert "int8 within 0.5% of float (Llama): 2.0050 vs 2.0000 (+0.25%) -> " \
         "PASS" in text
  assert "int8 within 0.5% of float (byte LM): 3.0300 vs 3.0000 (+1.00%) " \
         "-> FAIL" in text
  assert "better than without (Llama): 2.300 vs 2.600 -> PASS" in text
  assert "h2o beats the window on needle retrieval at 25%: 0.400 vs 0.100 " \
         "-> PASS" in text
  assert "stream ppl 5.000 vs 9.000 -> PASS" in text
  kv_lm.write_markdown(str(tmp_path / "r.md"), rows, {"model": "m"}, bars)
  kv_lm.write_plot(str(tmp_path / "r.png"), rows)
  md = (tmp_path / "r.md").read_text()
  assert "| h2o_25 |" in md and "## Quality bars" in md
  assert os.path.getsize(tmp_path / "r.png") > 1000
  json.dumps(rows)
