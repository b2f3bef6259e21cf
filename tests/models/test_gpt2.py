"""GPT-2 zoo model against an independent float64 numpy forward of HF's
modeling_gpt2 (tests/models/hf_reference.py), loaded from random HF-named
state dicts through models.hf; round trips; bad config.json values;
quantized runs; scale groups."""

import jax
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.core.tree import leaves_with_paths
from compressjax.models import gpt2, hf
from compressjax.quantization.scaling import apply_scales, plan_groups
from tests.models import hf_reference as ref

# n_inner 64: the MLP kernels share shapes with the llama tests' (quantizer
# compilations are cached by shape).
BASE = dict(model_type="gpt2", vocab_size=64, n_positions=64, n_embd=32,
            n_layer=2, n_head=4, n_inner=64, layer_norm_epsilon=1e-5)

CASES = {
    "gpt2": {},  # tied, gelu_new
    "untied_gelu_inverse_layer_scale": dict(
        tie_word_embeddings=False, activation_function="gelu",
        scale_attn_by_inverse_layer_idx=True, n_inner=None),
}


def hf_config(**kw):
  return {**BASE, **kw}


def load(cfg, sd):
  zoo = gpt2.config_from_hf(cfg)
  return zoo, hf.from_hf(gpt2.FAMILY, zoo, sd.__getitem__, list(sd))


def batch():
  ids = np.random.default_rng(1).integers(0, 64, (2, 11))
  mask = np.ones((2, 11), np.int32)
  mask[1, :3] = 0
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return ids, mask, pos


_apply = jax.jit(lambda m, v, ids, pos, mask: m.apply(
    v, ids, positions=pos, attention_mask=mask), static_argnums=0)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf_reference(name):
  cfg = hf_config(**CASES[name])
  sd = ref.gpt2_state_dict(cfg, seed=list(CASES).index(name))
  zoo, variables = load(cfg, sd)
  ids, mask, pos = batch()
  got = np.asarray(_apply(gpt2.GPT2LMHeadModel(zoo), variables, ids, pos,
                          mask))
  want = ref.gpt2_forward(cfg, sd, ids, pos, mask)
  err = np.abs(got - want)[mask.astype(bool)].max()
  print(f"{name}: max |logit diff| = {err:.2e}")
  assert err <= 1e-4
  assert np.abs(want).max() > 1.0
  back = hf.to_hf(gpt2.FAMILY, zoo, variables)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert gpt2.config_from_hf(gpt2.config_to_hf(zoo)) == zoo


def test_options_change_logits():
  """Each option moves the reference's logits by more than the 1e-4 the
  model must match it to (erf vs tanh GELU is the smallest change)."""
  ids, _, _ = batch()
  cfg = hf_config(**CASES["untied_gelu_inverse_layer_scale"])
  sd = ref.gpt2_state_dict(cfg)
  a = ref.gpt2_forward(cfg, sd, ids)
  for change in (dict(scale_attn_by_inverse_layer_idx=False),
                 dict(activation_function="gelu_new")):
    assert np.abs(a - ref.gpt2_forward({**cfg, **change}, sd, ids)).max() \
        > 2e-4, change


def test_checkpoint_without_prefix_with_buffers_and_untied_head():
  """GPT2Model checkpoints ('h.0...', with the attn.bias / masked_bias
  buffers) load as GPT2LMHeadModel's; an untied lm_head.weight sits outside
  the prefix."""
  for case in CASES:
    cfg = hf_config(**CASES[case])
    sd = ref.gpt2_state_dict(cfg, buffers=True)
    bare = {k.removeprefix("transformer."): x for k, x in sd.items()}
    _, a = load(cfg, sd)
    _, b = load(cfg, bare)
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert "lm_head.weight" in bare and "lm_head" in b["params"]


@pytest.mark.parametrize("change, key", [
    (dict(activation_function="swish"), "activation_function"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(n_head=5), "n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
    (dict(model_type="llama"), "model_type"),
])
def test_bad_config_names_the_key(change, key):
  with pytest.raises(CompressionError, match=key):
    gpt2.config_from_hf(hf_config(**change))


def test_too_long_input_is_refused():
  zoo = gpt2.config_from_hf(hf_config(n_positions=8))
  m = gpt2.GPT2LMHeadModel(zoo)
  with pytest.raises(CompressionError, match="n_positions"):
    m.init(jax.random.key(0), np.zeros((1, 9), np.int32))


def _kernels(zoo):
  out = [f"params/transformer/h_{i}/{n}/kernel" for i in range(zoo.n_layer)
         for n in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
  return sorted(out + ([] if zoo.tie_word_embeddings
                       else ["params/lm_head/kernel"]))


def test_quantized_run_equals_materialized():
  cfg = hf_config()
  zoo, v = load(cfg, ref.gpt2_state_dict(cfg))
  q = cj.quantize(v, 4, group_size=16)
  touched = sorted(p for p, x in leaves_with_paths(q) if cj.is_compressed(x))
  assert touched == _kernels(zoo)  # not wte / wpe, norms or biases
  model = gpt2.GPT2LMHeadModel(zoo)
  ids, mask, pos = batch()
  kw = dict(positions=pos, attention_mask=mask)
  got = jax.jit(lambda t: cj.run(model, t, ids, **kw))(q)
  want = jax.jit(lambda t: model.apply(cj.materialize_tree(t), ids, **kw))(q)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scale_groups_fold_exactly():
  cfg = hf_config(**CASES["untied_gelu_inverse_layer_scale"])
  zoo, v = load(cfg, ref.gpt2_state_dict(cfg, seed=1))
  groups = plan_groups(v, gpt2.scale_groups(zoo), set(_kernels(zoo)))
  assert sum(g.foldable for g in groups) == 2 * zoo.n_layer + 1
  rng = np.random.default_rng(0)
  k = {p: x.shape[0] for p, x in leaves_with_paths(v)}
  scaled = apply_scales(v, groups, [rng.uniform(0.5, 2.0, k[g.consumers[0]])
                                    for g in groups])
  model = gpt2.GPT2LMHeadModel(zoo)
  ids, mask, pos = batch()
  got = jax.jit(lambda t: cj.run(model, t, ids, positions=pos,
                                 attention_mask=mask))(scaled)
  np.testing.assert_allclose(got, _apply(model, v, ids, pos, mask),
                             rtol=1e-4, atol=1e-4)
