"""ViT: random HF-named checkpoints (ViTModel, ViTForImageClassification)
through models.hf give the numpy float64 reference's outputs; the HF export
is exact; compressed trees (conv kernel included) run; scale groups fold
exactly; bad configs are refused by key."""

import jax
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.rules import default_filter
from compressjax.core.tree import iter_compressed, leaves_with_paths
from compressjax.models import hf, vit
from compressjax.quantization.scaling import apply_scales, plan_groups
from tests.models import hf_reference_encoders as ref

TOL = 1e-4


def hf_config(classifier=True, **kw):
  c = dict(model_type="vit", hidden_size=16, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=24, hidden_act="gelu",
           layer_norm_eps=1e-12, image_size=[8, 12], patch_size=4,
           num_channels=3, qkv_bias=True, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0, initializer_range=0.02,
           encoder_stride=4)
  if classifier:
    c.update(architectures=["ViTForImageClassification"],
             id2label={str(i): f"c{i}" for i in range(5)},
             label2id={f"c{i}": i for i in range(5)})
  else:
    c.update(architectures=["ViTModel"])
  c.update(kw)
  return c


def checkpoint(cfg, seed, classifier=True):
  rng = np.random.default_rng(seed)
  sd = ref.random_vit_state_dict(
      cfg, rng, prefix="vit." if classifier else "", pooler=not classifier,
      num_labels=5 if classifier else 0)
  pixels = rng.normal(0, 1, (2, 3, 8, 12)).astype(np.float32)
  family = hf.family_for("vit")
  config = family.config_from_hf(cfg)
  variables = hf.from_hf(family, config, sd.__getitem__, list(sd))
  return sd, config, variables, pixels


def test_classifier_matches_reference():
  cfg = hf_config()
  sd, config, variables, pixels = checkpoint(cfg, 0)
  assert config.num_labels == 5 and not config.pooler
  model = vit.ViTModel(config)
  logits, feats = jax.jit(lambda v: (
      model.apply(v, pixels), model.apply(v, pixels, method="features")))(
          variables)
  want = ref.vit_forward(sd, cfg, pixels, prefix="vit.")
  d = (np.abs(logits - want["logits"]).max(),
       np.abs(feats - want["hidden"]).max())
  print(f"vit classifier: logits {d[0]:.2e}, features {d[1]:.2e}")
  assert max(d) <= TOL, d
  assert feats.shape == (2, 1 + 2 * 3, 16)
  # an NHWC batch is refused, with the fix in the message
  with pytest.raises(ValueError, match="NCHW"):
    model.apply(variables, pixels.transpose(0, 2, 3, 1))


def test_headless_matches_reference():
  """ViTModel with the pooler, no q/k/v bias, a wider tanh pooler and the
  tanh GELU."""
  cfg = hf_config(False, qkv_bias=False, pooler_output_size=20,
                  hidden_act="gelu_new", image_size=8, patch_size=[4, 2])
  sd, config, variables, _ = checkpoint(cfg, 1, classifier=False)
  assert config.pooler and config.num_labels == 0
  pixels = np.random.default_rng(2).normal(0, 1, (2, 3, 8, 8)).astype(
      np.float32)
  model = vit.ViTModel(config)
  feats, pooled = jax.jit(lambda v: (
      model.apply(v, pixels), model.apply(v, pixels, method="pooled")))(
          variables)
  want = ref.vit_forward(sd, cfg, pixels)
  d = (np.abs(feats - want["hidden"]).max(),
       np.abs(pooled - want["pooled"]).max())
  print(f"vit headless: features {d[0]:.2e}, pooled {d[1]:.2e}")
  assert max(d) <= TOL, d
  assert pooled.shape == (2, 20)


def test_round_trip_and_prefix():
  cfg = hf_config()
  sd, config, variables, _ = checkpoint(cfg, 3)
  family = hf.family_for("vit")
  out = hf.to_hf(family, config, variables)
  assert set(out) == set(sd)
  for k, a in out.items():
    assert a.shape == sd[k].shape and a.dtype == sd[k].dtype, k
    np.testing.assert_array_equal(a, sd[k], err_msg=k)
  # the base model's tensors without 'vit.' load the same; head stays bare
  bare = {k.removeprefix("vit."): v for k, v in sd.items()}
  v2 = hf.from_hf(family, config, bare.__getitem__, list(bare))
  jax.tree.map(np.testing.assert_array_equal, variables, v2)
  for c in (hf_config(), hf_config(False, image_size=[8, 12])):
    config = family.config_from_hf(c)
    assert family.config_from_hf(family.config_to_hf(config)) == config
  # a classifier checkpoint under a ViTModel config: its head is refused
  headless = family.config_from_hf(hf_config(False))
  with pytest.raises(cj.CompressionError, match=r"unexpected tensors "
                     r"classifier\.bias, classifier\.weight"):
    hf.from_hf(family, headless, sd.__getitem__, list(sd))


def test_quantized_run_conv_and_default_filter():
  cfg = hf_config(num_hidden_layers=1)
  sd, config, variables, pixels = checkpoint(cfg, 4)
  model = vit.ViTModel(config)
  conv = "params/embeddings/patch_embeddings/projection/kernel"
  selected = {p for p, x in leaves_with_paths(variables)
              if default_filter(p, x)}
  kernels = {s.path for s in vit.tensors(config) if s.layout == "linear"}
  # every Dense kernel, the classifier's included; not the patch conv
  assert selected == kernels and "params/classifier/kernel" in selected
  assert conv not in selected
  # quantize the conv too, with an explicit rule
  q = cj.quantize(variables, 8, rules=[(conv, {})])
  assert {p for p, _ in iter_compressed(q)} == kernels | {conv}
  run = jax.jit(lambda t: cj.run(model, t, pixels))(q)
  m = hf.to_hf(hf.family_for("vit"), config, cj.materialize_tree(q))
  want = ref.vit_forward(m, cfg, pixels, prefix="vit.")["logits"]
  np.testing.assert_allclose(run, want, atol=1e-5)
  err = np.abs(run - ref.vit_forward(sd, cfg, pixels, "vit.")["logits"])
  assert 1e-4 < err.max() < 0.2, err.max()


def test_scale_groups_fold_exactly():
  cfg = hf_config(qkv_bias=False)
  sd, config, variables, pixels = checkpoint(cfg, 5)
  model = vit.ViTModel(config)
  kernels = {s.path for s in vit.tensors(config) if s.layout == "linear"}
  groups = plan_groups(variables, vit.scale_groups(config), kernels)
  assert {c for g in groups for c in g.consumers} == kernels
  assert sum(g.foldable for g in groups) == 3 * 2  # per layer: 2 LN, value
  leaves = dict(leaves_with_paths(variables))
  rng = np.random.default_rng(6)
  scales = [rng.uniform(0.5, 2.0, leaves[g.consumers[0]].shape[0])
            for g in groups]
  scaled = apply_scales(variables, groups, scales)
  logits, feats = jax.jit(lambda v: (
      cj.run(model, v, pixels), cj.run(model, v, pixels, method="features")))(
          scaled)
  want = ref.vit_forward(sd, cfg, pixels, prefix="vit.")
  np.testing.assert_allclose(logits, want["logits"], atol=TOL)
  np.testing.assert_allclose(feats, want["hidden"], atol=TOL)


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "quick_gelu"), ("pooler_act", "softmax"),
    ("num_attention_heads", 3), ("image_size", [8, 0]), ("patch_size", 16),
    ("architectures", ["ViTForMaskedImageModeling"]),
    ("id2label", {}), ("model_type", "deit"), ("layer_norm_eps", -1.0)])
def test_bad_config_names_key(key, value):
  cfg = hf_config(**{key: value})
  if key == "id2label":
    cfg["num_labels"] = 0
    key = "num_labels"
  with pytest.raises(cj.CompressionError, match=repr(key)):
    vit.config_from_hf(cfg)
