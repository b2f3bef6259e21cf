"""End to end on tiny random Hugging Face directories, one per family:
write (tests/models/hf_fixtures) -> hub.load_pretrained -> compress (RTN int8
/ int4 and GPTQ from `capture` on data.text calibration batches) ->
evaluate (perplexity, zero-shot and generation for the decoders; sentence
embedding cosine for BERT; logits agreement for ViT) -> export
(hub.save_pretrained round trip of the float tree; hub.save_gptq of the int4
tree read back by an independent reader of the GPTQ layout, equal to
materialize())."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import compressjax as cj
from compressjax import eval as cj_eval
from compressjax.calibrate import capture
from compressjax.core.qarray import QArray
from compressjax.core.tree import leaves_with_paths
from compressjax.data import text
from compressjax.models import hf, hub
from compressjax.quantization.gptq import gptq
from tests.eval import fixtures
from tests.models import hf_fixtures as fx
from tests.models import hf_reference_encoders as enc_ref
from tests.models.test_gptq_export import read_gptq

GROUP = 16


@jax.jit
def _int8(v):
  return cj.quantize(v, 8)


@jax.jit
def _int4(v):  # float16 scales: exactly representable in a GPTQ checkpoint
  return cj.quantize(v, 4, group_size=GROUP, scale_dtype=jnp.float16)


def _gptq(variables, stats):
  # The blocks' kernels; output heads stay float (GPTQ's paper leaves the
  # LM head unquantized). Not under an outer jit: GPTQ's per-layer program
  # is compiled once per kernel shape, and the families share shapes.
  return gptq(stats, 4, group_size=GROUP, rules=[
      (r".*(lm_head|classifier|pooler).*", None)]).apply(variables)


_materialize = fixtures.materialize


def output_error(stats, variables, tree, paths) -> float:
  """sum over the layers at `paths` of ||X (W - Q)||_F^2
  = tr(dW^T X^T X dW) on the calibration inputs X (Gram from capture)."""
  dense = dict(leaves_with_paths(variables))
  comp = dict(leaves_with_paths(_materialize(tree)))
  total = 0.0
  for path in paths:
    d = np.asarray(dense[path], np.float64) - np.asarray(comp[path],
                                                         np.float64)
    g = np.asarray(stats[path].gram, np.float64)
    total += float(np.einsum("ij,ik,kj->", d, g, d))
  return total


def gptq_beats_rtn(stats, variables, rtn, calibrated):
  """GPTQ minimizes exactly the calibration output error layer by layer;
  RTN does not look at the data: compare on the layers GPTQ quantized."""
  paths = [p for p, x in leaves_with_paths(calibrated) if cj.is_compressed(x)]
  assert len(paths) >= 4
  e_rtn = output_error(stats, variables, rtn, paths)
  e_gptq = output_error(stats, variables, calibrated, paths)
  assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
  return e_rtn, e_gptq


def check_exports(tmp_path, pre, q4):
  """Float round trip (bit-exact) and the GPTQ checkpoint of `q4`."""
  hub.save_pretrained(tmp_path / "float", pre)
  back = hub.load_pretrained(tmp_path / "float")
  for (p, a), (_, b) in zip(leaves_with_paths(pre.variables),
                            leaves_with_paths(back.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
  assert back.tokenizer is not None or pre.tokenizer is None
  hub.save_gptq(tmp_path / "gptq", pre, q4, inexact_scales="error")
  dense = dict(leaves_with_paths(_materialize(q4)))
  n = 0
  for spec, leaf in hf.hf_leaves(pre.family, pre.config, q4):
    if isinstance(leaf, QArray):
      w, _, cfg = read_gptq(tmp_path / "gptq", spec.hf[:-len(".weight")],
                            "gptq")
      np.testing.assert_array_equal(w, np.asarray(dense[spec.path]),
                                    err_msg=spec.path)
      n += 1
  assert n >= 4 and cfg["bits"] == 4 and cfg["group_size"] == GROUP


def check_decoder(tmp_path, pre, calib_args, fn=None, compare_zs=True):
  """Compress, evaluate and export one decoder; returns its figures.
  `compare_zs`: zero-shot on the float and int8 trees (else on GPTQ's
  only: fewer compilations)."""
  v = pre.variables
  stats = capture(fn or pre.module, v, calib_args)
  q8, q4, qg = _int8(v), _int4(v), _gptq(v, stats)
  e_rtn, e_gptq = gptq_beats_rtn(stats, v, q4, qg)
  corpus = text.tokenize(fixtures.TEXT, pre.tokenizer, name="fixture text")
  # windows of 129 tokens in batches of 128: the (128, 128) shape of the
  # zero-shot batches below, so both share one compilation per tree
  ppl = {name: cj_eval.perplexity(pre, tree, corpus, seqlen=129,
                                  batch_size=128, progress=False).ppl
         for name, tree in (("float", v), ("int8", q8), ("gptq4", qg))}
  # int8 on the full-range grid (2^8 levels, the default): the extreme weight
  # of a column errs by half a step, so tiny layers (K = 32) lose a bit more
  # than on the narrow grid; random models with huge logits amplify it
  assert abs(ppl["int8"] / ppl["float"] - 1) < 0.02, ppl
  assert ppl["gptq4"] != ppl["float"]
  zs = {name: cj_eval.zeroshot(pre, tree, "python_syntax", batch_size=128,
                               pad_multiple=128, progress=False)
        for name, tree in ((("float", v), ("int8", q8)) if compare_zs
                           else (("gptq4", qg),))}
  for r in zs.values():
    assert r.chance == 0.25 and r.items == 118 and 0 <= r.acc <= 1
    assert np.isfinite(np.concatenate(r.loglik)).all()
  if compare_zs:
    ll_f, ll_8 = (np.concatenate(zs[k].loglik) for k in ("float", "int8"))
    np.testing.assert_allclose(ll_8, ll_f, rtol=0.02, atol=0.05)
    pick = lambda r: [np.argmax(x) for x in r.loglik]  # noqa: E731
    assert np.mean(np.equal(pick(zs["float"]), pick(zs["int8"]))) >= 0.9
  gen = cj_eval.generate(pre, qg, ["def main(", "import"], max_new_tokens=8)
  assert gen.tokens.shape == (2, 8) and (gen.lengths >= 1).all()
  assert gen.texts == [pre.tokenizer.decode(t[:n])
                       for t, n in zip(gen.tokens, gen.lengths)]
  check_exports(tmp_path, pre, q4)
  return dict(ppl=ppl, err=(e_rtn, e_gptq),
              acc={k: r.acc for k, r in zs.items()})


def test_llama(tmp_path):
  pre = hub.load_pretrained(fixtures.llama_dir())
  # GPTQ's protocol: random windows of the tokenized calibration text
  corpus = text.tokenize(fixtures.TEXT, pre.tokenizer)
  calib = text.random_segments(corpus, n=8, seqlen=32, seed=0)
  assert calib.description["padding_fraction"] == 0
  print(check_decoder(tmp_path, pre, [b.ids for b in calib]))


def test_gpt2(tmp_path):
  pre = hub.load_pretrained(fixtures.gpt2_dir())
  # short texts, padded: the decoder takes the mask as a keyword
  calib = text.text_batches(fixtures.LINES, pre.tokenizer, batch_size=6,
                            max_length=32)
  assert calib.description["padding_fraction"] > 0
  fn = lambda v, ids, mask: pre.module.apply(  # noqa: E731
      v, ids, attention_mask=mask)
  print(check_decoder(tmp_path, pre, [b.args() for b in calib], fn,
                      compare_zs=False))


BERT = dict(model_type="bert", architectures=["BertModel"], vocab_size=320,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_act="gelu",
            max_position_embeddings=64, type_vocab_size=2,
            layer_norm_eps=1e-12, pad_token_id=0)


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(
      b, axis=-1)


def test_bert(tmp_path):
  d = tmp_path / "bert"
  fx.write_hf_dir(d, enc_ref.random_bert_state_dict(
      BERT, np.random.default_rng(2)), BERT)
  fx.write_tokenizer(d, fixtures.LINES, vocab_size=300)
  pre = hub.load_pretrained(d)
  v = pre.variables
  calib = text.text_batches(fixtures.LINES, pre.tokenizer, batch_size=6,
                            max_length=32)
  # BERT's second positional argument is the attention mask; "pooled"
  # runs the pooler too (every kernel sees calibration inputs)
  stats = capture(pre.module, v, [b.args() for b in calib], method="pooled")
  q8, q4, qg = _int8(v), _int4(v), _gptq(v, stats)
  e_rtn, e_gptq = gptq_beats_rtn(stats, v, q4, qg)
  ids, mask = text.text_batches(
      ["the lazy dog", "for i in range(3): print(i)", "import os"],
      pre.tokenizer, batch_size=3, max_length=32).batches[0]
  emb = jax.jit(lambda t: cj.run(pre.module, t, ids, mask,
                                 method="sentence_embedding"))
  f = emb(v)
  cos = {k: float(_cos(emb(t), f).min()) for k, t in
         (("int8", q8), ("gptq4", qg))}
  assert cos["int8"] > 0.999 and 0.9 < cos["gptq4"] < cos["int8"], cos
  check_exports(tmp_path, pre, q4)
  print(dict(cos=cos, err=(e_rtn, e_gptq)))


VIT = dict(model_type="vit", architectures=["ViTForImageClassification"],
           hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-12,
           image_size=[8, 12], patch_size=4, num_channels=3, qkv_bias=True,
           id2label={str(i): f"c{i}" for i in range(8)},
           label2id={f"c{i}": i for i in range(8)})


def test_vit(tmp_path):
  rng = np.random.default_rng(3)
  d = tmp_path / "vit"
  fx.write_hf_dir(d, enc_ref.random_vit_state_dict(
      VIT, rng, prefix="vit.", pooler=False, num_labels=8), VIT)
  pre = hub.load_pretrained(d)
  assert pre.tokenizer is None
  v = pre.variables
  pixels = rng.normal(0, 1, (4, 16, 3, 8, 12)).astype(np.float32)
  stats = capture(pre.module, v, list(pixels[:3]))
  q8, q4, qg = _int8(v), _int4(v), _gptq(v, stats)
  e_rtn, e_gptq = gptq_beats_rtn(stats, v, q4, qg)
  logits = jax.jit(lambda t, x: cj.run(pre.module, t, x))
  held_out = pixels[3]
  f = np.asarray(logits(v, held_out))
  agree, rel = {}, {}
  for k, t in (("int8", q8), ("gptq4", qg)):
    y = np.asarray(logits(t, held_out))
    agree[k] = float(np.mean(y.argmax(-1) == f.argmax(-1)))
    rel[k] = float(np.linalg.norm(y - f) / np.linalg.norm(f))
  # full-range int8 grid: 0.0201 here (narrow grid: 0.0155), see check_decoder
  assert agree["int8"] >= 0.9 and rel["int8"] < 0.03, (agree, rel)
  assert rel["int8"] < rel["gptq4"] < 0.5, rel
  check_exports(tmp_path, pre, q4)
  print(dict(agree=agree, rel=rel, err=(e_rtn, e_gptq)))
