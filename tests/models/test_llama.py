"""Llama / Mistral / Qwen2 zoo models against an independent float64 numpy
forward of HF's modeling code (tests/models/hf_reference.py), loaded from
random HF-named state dicts through models.hf; the HF round trips; bad
config.json values; quantized runs; scale groups."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.core.tree import leaves_with_paths
from compressjax.models import hf, llama
from compressjax.quantization.scaling import apply_scales, plan_groups
from tests.models import hf_reference as ref

BASE = dict(model_type="llama", vocab_size=64, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False)

CASES = {
    # Llama-2 style: MHA, untied, default RoPE; with attention_bias
    "llama": dict(attention_bias=True),
    # SmolLM / Llama-3.2 style: GQA, tied; with attention_bias, mlp_bias and
    # linear RoPE scaling
    "llama_gqa_bias_linear_tied": dict(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True,
        rope_scaling={"type": "linear", "factor": 2.0}),
    # head_dim override (4 x 16 != 32), multi-query, llama3 RoPE whose
    # wavelengths fall in all three bands (6.3 < 16 < 19.9, 63 < 64 < 199)
    "llama_head_dim_mqa_llama3": dict(
        head_dim=16, num_key_value_heads=1, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "mistral_window": dict(model_type="mistral", num_key_value_heads=2,
                           head_dim=8, sliding_window=4),
    # with transformers-5 style rope_parameters (theta inside)
    "qwen2_window_tied": dict(model_type="qwen2", num_key_value_heads=2,
                              use_sliding_window=True, sliding_window=3,
                              max_window_layers=1, tie_word_embeddings=True,
                              rope_theta=None, rope_parameters={
                                  "rope_type": "linear", "factor": 4.0,
                                  "rope_theta": 500.0}),
}


def hf_config(**kw):
  cfg = {**BASE, **kw}
  return {k: v for k, v in cfg.items() if v is not None}


def load(cfg, sd):
  zoo = llama.config_from_hf(cfg)
  return zoo, hf.from_hf(llama.FAMILY, zoo, sd.__getitem__, list(sd))


def batch():
  """Two rows, the second left-padded by 3; positions start at 0 on each
  row's first real token (offset by 40 to turn the rotations further)."""
  ids = np.random.default_rng(1).integers(0, 64, (2, 11))
  mask = np.ones((2, 11), np.int32)
  mask[1, :3] = 0
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0) + 40
  return ids, mask, pos


_apply = jax.jit(lambda m, v, ids, pos, mask: m.apply(
    v, ids, positions=pos, attention_mask=mask), static_argnums=0)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf_reference(name):
  cfg = hf_config(**CASES[name])
  sd = ref.llama_state_dict(cfg, seed=list(CASES).index(name))
  zoo, variables = load(cfg, sd)
  ids, mask, pos = batch()
  got = np.asarray(_apply(llama.LlamaForCausalLM(zoo), variables, ids, pos,
                          mask))
  want = ref.llama_forward(cfg, sd, ids, pos, mask)
  valid = mask.astype(bool)
  err = np.abs(got - want)[valid].max()
  print(f"{name}: max |logit diff| = {err:.2e}")
  assert err <= 1e-4
  assert np.abs(want).max() > 1.0  # logits are not trivially small
  # HF round trip: the same tensors, bit for bit, and the same config
  back = hf.to_hf(llama.FAMILY, zoo, variables)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert llama.config_from_hf(llama.config_to_hf(zoo)) == zoo


def test_options_change_logits():
  """The options the cases vary change the reference's logits (which the
  model matches above), so a model ignoring one would fail."""
  ids, mask, pos = batch()
  cfg = hf_config(**CASES["llama_head_dim_mqa_llama3"])
  sd = ref.llama_state_dict(cfg)
  plain = {k: v for k, v in cfg.items() if k != "rope_scaling"}
  a = ref.llama_forward(cfg, sd, ids, pos)
  assert np.abs(a - ref.llama_forward(plain, sd, ids, pos)).max() > 1e-2
  cfg = hf_config(**CASES["mistral_window"])
  sd = ref.llama_state_dict(cfg)
  a = ref.llama_forward(cfg, sd, ids)
  b = ref.llama_forward({**cfg, "sliding_window": None}, sd, ids)
  assert np.abs(a - b)[:, 4:].max() > 1e-2  # beyond the window
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-12)


def test_tied_checkpoint_with_lm_head_and_without_prefix_loads():
  cfg = hf_config(**CASES["llama_gqa_bias_linear_tied"])
  sd = ref.llama_state_dict(cfg, lm_head_when_tied=True)
  zoo, v = load(cfg, sd)
  assert "lm_head" not in v["params"]
  # a LlamaModel checkpoint (no 'model.' prefix) plus an inv_freq buffer
  bare = {k.removeprefix("model."): x for k, x in sd.items()
          if k != "lm_head.weight"}
  bare["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  _, v2 = load(cfg, bare)
  jax.tree.map(np.testing.assert_array_equal, v, v2)


def test_checkpoint_mismatch_names_tensors():
  cfg = hf_config()
  sd = ref.llama_state_dict(cfg)
  del sd["model.layers.1.mlp.up_proj.weight"]
  sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  with pytest.raises(CompressionError, match="up_proj.weight.*q_proj.bias"):
    load(cfg, sd)


@pytest.mark.parametrize("change, key", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     "rope_scaling.rope_type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}),
     "low_freq_factor"),
    (dict(rope_scaling={"type": "linear"}), "factor"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
     "rope_parameters.rope_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size="32"), "hidden_size"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(attention_bias="yes"), "attention_bias"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="qwen2", use_sliding_window=True,
          layer_types=["full_attention"]), "layer_types"),
    (dict(model_type="gpt2"), "model_type"),
])
def test_bad_config_names_the_key(change, key):
  with pytest.raises(CompressionError, match=key.replace(".", r"\.")):
    llama.config_from_hf(hf_config(**change))


def test_config_semantics_per_model_type():
  """HF's per-class meaning of shared keys."""
  c = llama.config_from_hf(hf_config(sliding_window=4))  # llama ignores it
  assert c.layer_window(0) is None
  c = llama.config_from_hf(hf_config(model_type="mistral"))
  assert c.layer_window(1) == 4096  # MistralConfig's default window
  c = llama.config_from_hf(hf_config(model_type="qwen2", sliding_window=8))
  assert c.qkv_bias and not c.o_bias and c.layer_window(1) is None
  c = llama.config_from_hf(hf_config(
      model_type="qwen2", use_sliding_window=True, sliding_window=8,
      layer_types=["sliding_attention", "full_attention"]))
  assert (c.layer_window(0), c.layer_window(1)) == (8, None)
  with pytest.raises(CompressionError, match="cannot express"):
    llama.config_to_hf(c)  # a window on the first layer only: not qwen2's
  with pytest.raises(CompressionError, match="cannot express"):
    llama.config_to_hf(llama.LlamaConfig(sliding_window=4))


def _projection_paths(zoo):
  out = []
  for i in range(zoo.num_hidden_layers):
    b = f"params/model/layers_{i}/"
    out += [f"{b}self_attn/{n}_proj/kernel" for n in "qkvo"]
    out += [f"{b}mlp/{n}_proj/kernel" for n in ("gate", "up", "down")]
  if not zoo.tie_word_embeddings:
    out.append("params/lm_head/kernel")
  return sorted(out)


def test_quantized_run_equals_materialized():
  cfg = hf_config(**CASES["llama"])  # with biases
  zoo, v = load(cfg, ref.llama_state_dict(cfg, seed=list(CASES).index(
      "llama")))
  q = cj.quantize(v, 4, group_size=16)
  touched = sorted(p for p, x in leaves_with_paths(q) if cj.is_compressed(x))
  assert touched == _projection_paths(zoo)  # no embedding, norm or bias
  model = llama.LlamaForCausalLM(zoo)
  ids, mask, pos = batch()
  kw = dict(positions=pos, attention_mask=mask)
  got = jax.jit(lambda t: cj.run(model, t, ids, **kw))(q)
  want = jax.jit(lambda t: model.apply(cj.materialize_tree(t), ids, **kw))(q)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want) - np.asarray(
      _apply(model, v, ids, pos, mask))).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "llama_gqa_bias_linear_tied"])
def test_scale_groups_fold_exactly(name):
  """Random positive scales applied through the groups (folded into norms
  and, without GQA, v) leave the logits unchanged."""
  cfg = hf_config(**CASES[name])
  zoo, v = load(cfg, ref.llama_state_dict(cfg))
  groups = plan_groups(v, llama.scale_groups(zoo), set(_projection_paths(zoo)))
  gqa = zoo.num_key_value_heads < zoo.num_attention_heads
  o_groups = [g for g in groups if g.consumers[0].endswith("o_proj/kernel")]
  assert all(g.foldable != gqa for g in o_groups) and o_groups
  rng = np.random.default_rng(0)
  k = {p: x.shape[0] for p, x in leaves_with_paths(v)}
  scales = [rng.uniform(0.5, 2.0, k[g.consumers[0]]) for g in groups]
  scaled = apply_scales(v, groups, scales)
  model = llama.LlamaForCausalLM(zoo)
  ids, mask, pos = batch()
  got = jax.jit(lambda t: cj.run(model, t, ids, positions=pos,
                                 attention_mask=mask))(scaled)
  np.testing.assert_allclose(got, _apply(model, v, ids, pos, mask),
                             rtol=1e-4, atol=1e-4)


def test_remat():
  """remat=True: the same params and logits, and the gradient recomputes
  each layer (a checkpoint in its jaxpr)."""
  cfg = hf_config(**CASES["mistral_window"])
  sd = ref.llama_state_dict(cfg)
  zoo, v = load(cfg, sd)
  model = llama.LlamaForCausalLM(dataclasses.replace(zoo, remat=True))
  ids, mask, pos = batch()
  got = np.asarray(_apply(model, v, ids, pos, mask))
  want = ref.llama_forward(cfg, sd, ids, pos, mask)
  assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4

  def remats(m):
    grad = jax.grad(lambda p: jnp.mean(m.apply(p, ids)))
    return str(jax.make_jaxpr(grad)(v)).count("remat")

  assert remats(model) >= zoo.num_hidden_layers
  assert remats(llama.LlamaForCausalLM(zoo)) == 0
