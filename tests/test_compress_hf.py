"""experiments.compress_hf end to end on tiny random Hugging Face
directories (tests/models/hf_fixtures, via tests/eval/fixtures): a Llama
(perplexity + zero-shot, GPTQ export) and a BERT (embedding cosine,
padded calibration)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.tree import leaves_with_paths
from compressjax.data import text as text_lib
from configs import compress_hf as hf_config
from experiments import compress_hf
from tests.eval import fixtures
from tests.models import hf_fixtures as fx
from tests.models import hf_reference_encoders as enc_ref
from tests.models.test_gptq_export import read_gptq

CALIBRATED = {"gptq_int4_g16", "awq_int4_g16", "wanda_50"}


def _config(model_dir, tmp_path, methods):
  c = hf_config.get_config()
  c.model_dir = str(model_dir)
  path = tmp_path / "text.txt"
  path.write_text(fixtures.TEXT)
  c.data.eval_text = c.data.calib_text = str(path)
  # 8 windows of 33 tokens and the 96 requests of 24 zero-shot items padded
  # to 32, all in batches of 96: one compiled scoring program per tree
  c.eval.seqlen = 33
  c.eval.batch_size = 96
  c.eval.max_windows = 8
  c.eval.zeroshot_items = 24
  c.eval.zeroshot_batch = 96
  c.eval.zeroshot_pad = 32
  c.eval.samples = 12
  c.calib.batches, c.calib.batch_size, c.calib.seqlen = 2, 6, 32
  c.methods = methods
  c.export.gptq = "gptq_int4_g16" if "gptq_int4_g16" in methods else ""
  return c


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  # compilation is nearly all the time at this size: most XLA optimizations
  # off (as tests/test_experiment.py)
  prev = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", prev)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("hf_llama")
  # one row per kind of tree and of what the task provides (stats, scale
  # groups, the export); every row kind runs in tests/test_experiment.py
  c = _config(fixtures.llama_dir(), tmp, "float32,int8,gptq_int4_g16,"
              "awq_int4_g16,wanda_50,lowrank")
  logs = []
  res, task = compress_hf.run(c, str(tmp), log=logs.append)
  return tmp, c, {r["method"]: r for r in res}, task, logs


def _numpy_ppl(pre, ids: np.ndarray, seqlen: int, n: int) -> float:
  """Independent perplexity: plain module.apply on each window, float64
  log-softmax in numpy over tokens 1..seqlen-1."""
  w = ids[:(ids.size // seqlen) * seqlen].reshape(-1, seqlen)[:n]
  logits = np.asarray(fixtures.forward(pre.module, pre.variables,
                                       w[:, :-1]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, w[:, 1:, None], -1).mean()
  return float(np.exp(nll))


def test_decoder_rows_metrics_and_calibration(llama_run):
  tmp, c, res, task, _ = llama_run
  assert list(res) == c.methods.split(",")
  pre = fixtures.llama()
  ids = text_lib.tokenize(fixtures.TEXT, pre.tokenizer).ids
  ref = _numpy_ppl(pre, ids, 33, 8)
  assert res["float32"]["value"] == pytest.approx(ref, rel=1e-4)
  assert res["float32"]["eval_tokens"] == 8 * 32
  f = res["float32"]["value"]
  assert abs(res["int8"]["value"] / f - 1) < 0.01
  for name in ("gptq_int4_g16", "awq_int4_g16", "wanda_50", "lowrank"):
    assert res[name]["value"] != f, name
  for r in res.values():
    assert 0 <= r["zeroshot_acc"] <= 1 and r["metric"] == "ppl"
  # sizes: the float head (lm_head 32 x 320) counts at 32 bits/w
  head = 32 * 320
  ks = 2 * (3 * 32 * 64 + 32 * 32 * 2 + 32 * 16 * 2)  # mlp, q/o, k/v (GQA)
  # GPTQ's scales float16 (config.quant.gptq_scale_dtype): 16 bits / 16
  q4 = (ks * (4 + 16 / 16) + head * 32) / (ks + head)
  assert res["gptq_int4_g16"]["bits_per_weight"] == pytest.approx(q4)
  assert res["awq_int4_g16"]["bits_per_weight"] >= q4
  # the calibration source is in every calibrated row, and only there
  for name, r in res.items():
    assert ("calibration" in r) == (name in CALIBRATED), name
  cal = res["gptq_int4_g16"]["calibration"]
  assert cal["kind"] == "segments" and cal["tokens"] == 12 * 32
  assert cal["padding_fraction"] == 0 and cal["source"] == "text.txt"
  md = (tmp / "results.md").read_text()
  assert "zeroshot acc" in md and "text.txt" in md
  assert (tmp / "results.png").stat().st_size > 0
  assert json.loads((tmp / "calibration.json").read_text()) == cal


def test_decoder_gptq_export_matches_checkpoint(llama_run):
  tmp, _, res, _, _ = llama_run
  exp = res["gptq_int4_g16"]["gptq_export"]
  assert exp["layers"] == 14 and exp["bits"] == 4 and exp["group_size"] == 16
  tree = cj.restore(str(tmp / "checkpoints" / "gptq_int4_g16"))
  leaves = dict(leaves_with_paths(tree))
  # the LM head stays float (config.quant.head_bits 32)
  assert not cj.is_compressed(leaves["params/lm_head/kernel"])
  dense = dict(leaves_with_paths(jax.jit(cj.materialize_tree)(tree)))
  path = "params/model/layers_0/self_attn/q_proj/kernel"
  assert cj.is_compressed(leaves[path])
  w, _, cfg = read_gptq(pathlib.Path(exp["path"]),
                        "model.layers.0.self_attn.q_proj", "gptq")
  # GPTQ ran with float16 scales (config.quant.gptq_scale_dtype): exact
  assert exp["scales_exact"] and exp["max_rel_error"] == 0
  np.testing.assert_array_equal(w, np.asarray(dense[path]))
  assert cfg["bits"] == 4


BERT = dict(model_type="bert", architectures=["BertModel"], vocab_size=320,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_act="gelu",
            max_position_embeddings=64, type_vocab_size=2,
            layer_norm_eps=1e-12, pad_token_id=0)


def test_bert_embedding_cosine(tmp_path):
  d = tmp_path / "bert"
  fx.write_hf_dir(d, enc_ref.random_bert_state_dict(
      BERT, np.random.default_rng(2)), BERT)
  fx.write_tokenizer(d, fixtures.LINES, vocab_size=300)
  c = _config(d, tmp_path, "float32,int8,gptq_int4_g16")
  res, task = compress_hf.run(c, str(tmp_path / "run"), log=lambda s: None,
                              save=False)
  res = {r["method"]: r for r in res}
  assert task.metric == "embed_cos" and task.capture_method == "pooled"
  assert res["float32"]["value"] == pytest.approx(1.0, abs=1e-6)
  assert res["int8"]["min_cos"] > 0.999
  assert 0.8 < res["gptq_int4_g16"]["value"] < res["int8"]["value"]
  cal = res["gptq_int4_g16"]["calibration"]
  assert cal["kind"] == "texts" and cal["padding_fraction"] > 0
  assert cal["padding_in_statistics"] is False
  assert res["gptq_int4_g16"]["gptq_export"]["layers"] >= 12
  print({k: (r["value"], r["min_cos"]) for k, r in res.items()})


def test_bad_inputs_are_refused(tmp_path):
  c = _config("", tmp_path, "float32")
  with pytest.raises(cj.CompressionError, match="--model_dir"):
    compress_hf.run(c, str(tmp_path))
  c.methods = "float32,int4_g16"
  c.export.gptq = "gptq_int4_g16"
  with pytest.raises(cj.CompressionError, match="not a row"):
    compress_hf.run(c, str(tmp_path))
