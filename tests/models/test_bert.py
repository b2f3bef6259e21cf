"""BERT / RoBERTa: random HF-named checkpoints through models.hf give the
numpy float64 reference's outputs; the HF export is exact; compressed trees
run; scale groups fold exactly; bad configs are refused by key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.rules import default_filter
from compressjax.core.tree import iter_compressed, leaves_with_paths
from compressjax.models import bert, hf
from compressjax.quantization.scaling import apply_scales, plan_groups
from tests.models import hf_reference_encoders as ref

TOL = 1e-4


def hf_config(model_type="bert", **kw):
  c = dict(model_type=model_type, architectures=["BertModel"], vocab_size=40,
           hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=24, hidden_act="gelu", max_position_embeddings=12,
           type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
           position_embedding_type="absolute", hidden_dropout_prob=0.1,
           attention_probs_dropout_prob=0.1, initializer_range=0.02)
  if model_type == "roberta":
    c.update(architectures=["RobertaModel"], pad_token_id=1,
             type_vocab_size=1)
  c.update(kw)
  return c


def inputs(cfg, rng, b=3, t=7):
  """ids with padding at the end of rows 1 and 2 (pad id there)."""
  pad = cfg["pad_token_id"]
  ids = rng.integers(pad + 1, cfg["vocab_size"], (b, t))
  mask = np.ones((b, t), np.int32)
  mask[1, 5:] = 0
  mask[2, 2:] = 0
  ids = np.where(mask > 0, ids, pad)
  tt = rng.integers(0, cfg["type_vocab_size"], (b, t))
  return ids.astype(np.int32), mask, tt.astype(np.int32)


def load(cfg_dict, sd):
  family = hf.family_for(cfg_dict["model_type"])
  config = family.config_from_hf(cfg_dict)
  variables = {"params": hf.from_hf(family, config, sd.__getitem__,
                                    list(sd))["params"]}
  return family, config, variables


# BertModel (bare names, pooler) and RobertaForSequenceClassification
# ('roberta.' names, classifier.dense/out_proj, no pooler). BERT's classifier
# and 'bert.' names: setup_small's tests; gelu_new: ViT's test.
@pytest.mark.parametrize("model_type,act", [("bert", "gelu"),
                                            ("roberta", "relu")])
def test_matches_reference(model_type, act):
  rng = np.random.default_rng(0)
  roberta = model_type == "roberta"
  cfg = hf_config(model_type, hidden_act=act)
  if roberta:
    cfg.update(architectures=["RobertaForSequenceClassification"],
               id2label={"0": "neg", "1": "neu", "2": "pos"})
  prefix = "roberta." if roberta else ""
  sd = ref.random_bert_state_dict(cfg, rng, prefix, pooler=not roberta,
                                  num_labels=3 if roberta else 0)
  _, config, variables = load(cfg, sd)
  assert (config.pooler, config.num_labels) == ((False, 3) if roberta
                                                else (True, 0))
  ids, mask, tt = inputs(cfg, rng)
  want = ref.bert_forward(sd, cfg, ids, mask, tt, prefix)
  model = bert.BertModel(config)
  head = "logits" if roberta else "pooled"

  @jax.jit
  def outs(v):
    hidden = model.apply(v, ids, mask, tt)
    return {
        "hidden": hidden,
        head: model.apply(v, ids, mask, tt, method=head),
        "emb": model.apply(v, ids, mask, tt, method="sentence_embedding"),
        "emb_n": bert.mean_pool(hidden, mask, normalize=True)}

  got = outs(variables)
  diffs = {
      "hidden": np.abs(got["hidden"] - want["hidden"]).max(),
      head: np.abs(got[head] - want[head]).max(),
      "emb": np.abs(got["emb"] - ref.mean_pool(want["hidden"], mask)).max(),
      "emb_n": np.abs(got["emb_n"] - ref.mean_pool(want["hidden"], mask,
                                                   True)).max()}
  print(model_type, act, {k: f"{v:.2e}" for k, v in diffs.items()})
  assert all(v <= TOL for v in diffs.values()), diffs
  # padding changes nothing for the real tokens of a row (row 2: 2 tokens)
  short = model.apply(variables, ids[2:, :2], mask[2:, :2], tt[2:, :2])
  np.testing.assert_allclose(short[0], got["hidden"][2, :2], atol=TOL)


def test_round_trip_and_prefixes():
  rng = np.random.default_rng(1)
  cfg = hf_config()
  sd = ref.random_bert_state_dict(cfg, rng, "bert.")
  family, config, variables = load(cfg, sd)
  # the same tensors without the prefix load to the same tree
  bare = {k[len("bert."):]: v for k, v in sd.items()}
  _, _, v2 = load(cfg, bare)
  jax.tree.map(np.testing.assert_array_equal, variables, v2)
  out = hf.to_hf(family, config, variables)
  assert set(out) == set(bare) - {"embeddings.position_ids"}
  for k, a in out.items():
    assert a.dtype == bare[k].dtype and a.shape == bare[k].shape, k
    np.testing.assert_array_equal(a, bare[k], err_msg=k)
  for c in (hf_config(), hf_config("roberta"),
            hf_config(architectures=["BertForMaskedLM"]),
            hf_config(architectures=["BertForSequenceClassification"]),
            hf_config("roberta", architectures=[
                "RobertaForSequenceClassification"], num_labels=4)):
    f = hf.family_for(c["model_type"])
    config = f.config_from_hf(c)
    assert f.config_from_hf(f.config_to_hf(config)) == config
  assert not family.config_from_hf(hf_config(
      architectures=["BertForMaskedLM"])).pooler
  assert family.config_from_hf(hf_config(
      architectures=["BertForSequenceClassification"])).num_labels == 2
  # a round trip of a config unlike its HF class: the pooler flag is kept
  odd = bert.BertConfig(**{**bert.config_from_hf(hf_config()).__dict__,
                           "pooler": False})
  assert family.config_from_hf(family.config_to_hf(odd)) == odd


def test_checkpoint_mismatch_is_named():
  rng = np.random.default_rng(2)
  cfg = hf_config()
  sd = ref.random_bert_state_dict(cfg, rng, "bert.")
  family = hf.family_for("bert")
  config = family.config_from_hf(cfg)
  heads = dict(sd, **{"cls.predictions.bias": np.zeros(40, np.float32)})
  with pytest.raises(cj.CompressionError, match=r"unexpected tensors "
                     r"cls\.predictions\.bias"):
    hf.from_hf(family, config, heads.__getitem__, list(heads))
  partial = {k: v for k, v in sd.items() if "pooler" not in k}
  with pytest.raises(cj.CompressionError, match=r"missing tensors "
                     r"pooler\.dense\.bias, pooler\.dense\.weight"):
    hf.from_hf(family, config, partial.__getitem__, list(partial))
  bad = dict(sd)
  bad["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros(
      (16, 24), np.float32)  # transposed
  with pytest.raises(cj.CompressionError, match=r"encoder\.layer\.1\."
                     r"intermediate\.dense\.weight.*\(16, 24\).*\(24, 16\)"):
    hf.from_hf(family, config, bad.__getitem__, list(bad))
  # a token classifier's 'classifier.*' is not the sequence head: refused
  tok = hf_config(architectures=["BertForTokenClassification"])
  sd = ref.random_bert_state_dict(tok, rng, "bert.", pooler=False)
  sd.update({"classifier.weight": np.zeros((5, 16), np.float32),
             "classifier.bias": np.zeros(5, np.float32)})
  with pytest.raises(cj.CompressionError, match=r"unexpected tensors "
                     r"classifier\.bias, classifier\.weight"):
    hf.from_hf(family, family.config_from_hf(tok), sd.__getitem__, list(sd))


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "swishy"), ("position_embedding_type", "relative_key"),
    ("is_decoder", True), ("add_cross_attention", True),
    ("num_attention_heads", 5), ("layer_norm_eps", 0.0),
    ("hidden_size", 0), ("pad_token_id", 99), ("model_type", "albert")])
def test_bad_config_names_key(key, value):
  with pytest.raises(cj.CompressionError, match=repr(key)):
    bert.config_from_hf(hf_config(**{key: value}))


def test_bad_head_config_names_key():
  with pytest.raises(cj.CompressionError, match="'num_labels'"):
    bert.config_from_hf(hf_config(
        architectures=["BertForSequenceClassification"], num_labels=0))
  with pytest.raises(cj.CompressionError, match="'max_position_embeddings'"):
    bert.config_from_hf(hf_config("roberta", max_position_embeddings=2),
                        "roberta")
  with pytest.raises(cj.CompressionError, match="'add_pooling_layer'"):
    bert.config_from_hf(hf_config(
        architectures=["BertForSequenceClassification"],
        add_pooling_layer=False))


def test_too_long_input():
  cfg = bert.config_from_hf(hf_config("roberta"), "roberta")
  model = bert.BertModel(cfg)
  # RoBERTa positions start at pad_token_id + 1: 12 - 2 = 10 tokens fit
  assert bert.max_length(cfg) == 10
  with pytest.raises(ValueError, match="exceeds"):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, 11), jnp.int32)))


def setup_small(seed, layers=2):
  """BertForSequenceClassification ('bert.' names, pooler, classifier)."""
  rng = np.random.default_rng(seed)
  cfg = hf_config(num_hidden_layers=layers,
                  architectures=["BertForSequenceClassification"],
                  id2label={"0": "a", "1": "b"})
  sd = ref.random_bert_state_dict(cfg, rng, "bert.", num_labels=2)
  _, config, variables = load(cfg, sd)
  ids, mask, tt = inputs(cfg, rng)
  return cfg, config, variables, (ids, mask, tt), ref.bert_forward(
      sd, cfg, ids, mask, tt, "bert.")


def test_quantized_run_and_default_filter():
  cfg, config, variables, args, want = setup_small(3, layers=1)
  model = bert.BertModel(config)
  # default_filter: every Dense kernel; no embedding, LayerNorm or bias
  selected = {p for p, x in leaves_with_paths(variables)
              if default_filter(p, x)}
  kernels = {s.path for s in bert.tensors(config) if s.layout == "linear"}
  assert selected == kernels and len(kernels) == 6 + 2
  assert "params/classifier/kernel" in kernels

  q = cj.quantize(variables, 8)
  assert {p for p, _ in iter_compressed(q)} == kernels
  run = jax.jit(lambda t: cj.run(model, t, *args, method="logits"))(q)
  # the materialized tree's output, by the reference on its HF export
  sd = hf.to_hf(hf.family_for("bert"), config, cj.materialize_tree(q))
  dense = ref.bert_forward(sd, cfg, *args, prefix="bert.")["logits"]
  np.testing.assert_allclose(run, dense, atol=1e-5)
  err = np.abs(run - want["logits"]).max()
  assert 1e-4 < err < 0.1, err  # int8 moved it, a little


def test_scale_groups_fold_exactly():
  """Random positive scales applied with apply_scales (folded where a group
  has a producer, explicit InputTransforms elsewhere) leave the hidden states
  and the pooled output unchanged."""
  _, config, variables, args, want = setup_small(4)
  model = bert.BertModel(config)
  kernels = {s.path for s in bert.tensors(config) if s.layout == "linear"}
  groups = plan_groups(variables, bert.scale_groups(config), kernels)
  assert {c for g in groups for c in g.consumers} == kernels
  assert sum(g.foldable for g in groups) == 2  # value -> output dense only
  assert len(groups) == 2 * 4 + 2  # + pooler, classifier
  leaves = dict(leaves_with_paths(variables))
  srng = np.random.default_rng(5)
  scales = [srng.uniform(0.5, 2.0, leaves[g.consumers[0]].shape[0])
            for g in groups]
  scaled = apply_scales(variables, groups, scales)
  hidden, pooled, logits = jax.jit(lambda v: (
      cj.run(model, v, *args), cj.run(model, v, *args, method="pooled"),
      cj.run(model, v, *args, method="logits")))(scaled)
  np.testing.assert_allclose(hidden, want["hidden"], atol=TOL)
  np.testing.assert_allclose(pooled, want["pooled"], atol=TOL)
  np.testing.assert_allclose(logits, want["logits"], atol=TOL)
