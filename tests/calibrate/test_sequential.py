"""Sequential (block-by-block) calibration against a hand-built sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import compressjax as cj
from compressjax.calibrate import (block_prefix, capture, execution_order,
                                   one_shot, sequential, stages_of)
from compressjax.core.rules import default_filter
from compressjax.models import transformer
from compressjax.quantization.gptq import gptq, gptq_quantize


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.tanh(nn.Dense(32, name=f"layer_{i}")(x))
    return nn.Dense(8, name="head")(x)


X = jax.random.normal(jax.random.key(0), (64, 32)) @ jax.random.normal(
    jax.random.key(1), (32, 32))
BATCHES = [X[:32], X[32:]]
MODEL = MLP()
PARAMS = MODEL.init(jax.random.key(2), X)
BUILD = lambda s: gptq(s, 3)


def test_stages_follow_execution_order():
  cfg = transformer.TransformerConfig(vocab_size=256, d_model=32, n_layers=2,
                                      n_heads=2, d_mlp=64, seq_len=16)
  model = transformer.TransformerLM(cfg)
  v = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
  sel = [p for p, x in cj.core.leaves_with_paths(v) if default_filter(p, x)]
  order = execution_order(model, v, jnp.zeros((2, 16), jnp.int32), sel)
  assert sorted(order) == sorted(sel)
  assert order[0].startswith("params/block_0/attn/")
  assert order[-1] == "params/head/kernel"
  groups = stages_of(order)
  assert [g for g, _ in groups] == ["params/block_0", "params/block_1",
                                    "params/head"]
  assert block_prefix("params/layers/3/mlp/kernel") == "params/layers/3"


def test_sequential_equals_hand_built_sequence():
  out = sequential(MODEL, PARAMS, BATCHES, BUILD, progress=False)
  # by hand: quantize layer i with the Hessian of the inputs produced by the
  # already-quantized layers before it
  p = PARAMS["params"]
  h = X
  for name in ["layer_0", "layer_1", "layer_2", "head"]:
    hess = 2 * h.T @ h / h.shape[0]
    q = gptq_quantize(p[name]["kernel"], hess, bits=3)
    np.testing.assert_array_equal(out["params"][name]["kernel"].codes,
                                  q.codes, err_msg=name)
    np.testing.assert_allclose(out["params"][name]["kernel"].scale, q.scale,
                               rtol=1e-6)
    h = jnp.tanh(h @ q.materialize() + p[name]["bias"])
  # one-shot calibrates on float inputs, so later layers differ
  shot = one_shot(MODEL, PARAMS, BATCHES, BUILD)
  assert not np.array_equal(shot["params"]["layer_2"]["kernel"].codes,
                            out["params"]["layer_2"]["kernel"].codes)
  np.testing.assert_array_equal(shot["params"]["layer_0"]["kernel"].codes,
                                out["params"]["layer_0"]["kernel"].codes)
  # the untouched params are carried over
  np.testing.assert_array_equal(out["params"]["head"]["bias"],
                                p["head"]["bias"])


def test_custom_stages_and_progress():
  msgs = []
  out = sequential(MODEL, PARAMS, BATCHES, BUILD,
                   stages=["params/layer_0", "params/layer_1",
                           "params/layer_2", "params/head"],
                   progress=msgs.append)
  assert len(msgs) == 4 and msgs[0].startswith("stage 1/4 params/layer_0")
  with pytest.raises(cj.CompressionError, match="none of the stage prefixes"):
    sequential(MODEL, PARAMS, BATCHES, BUILD, stages=["params/layer_0"],
               progress=False)
  with pytest.raises(cj.CompressionError, match="no batches"):
    sequential(MODEL, PARAMS, [], BUILD)
  assert cj.bits_per_weight(out) < 32


def test_cached_stage_inputs_equal_rerunning_the_model():
  """Each stage runs only its segment on cached inputs, masks included: the
  statistics every stage sees equal those of rerunning the whole model."""
  from compressjax.data import text
  from compressjax.quantization import quantize
  cfg = transformer.TransformerConfig(vocab_size=256, d_model=32, n_layers=2,
                                      n_heads=2, d_mlp=64, seq_len=16)
  model = transformer.TransformerLM(cfg)
  v = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
  calib = text.text_batches(["x = 1", "for i in range(3):", "pass", "y"],
                            text.ByteTokenizer(), batch_size=2,
                            max_length=16, pad_multiple=16)

  def recorder(seen):
    def build(stats):  # record, then a cheap compression: later stages
      seen.append(stats)  # see inputs that differ from the float model's
      return quantize(3, group_size=16)
    return build

  fast, slow, msgs = [], [], []
  out = sequential(model, v, calib, recorder(fast), progress=msgs.append)
  assert "inputs of the next" in msgs[0]  # the cached path ran
  ref = sequential(model, v, calib, recorder(slow), progress=False,
                   cache_inputs=False)
  assert len(fast) == len(slow) == 3
  for a, b in zip(fast, slow):
    assert sorted(a) == sorted(b)
    for p in a:
      for k in ("gram", "abs_sum", "sq_sum", "abs_max", "count"):
        np.testing.assert_allclose(getattr(a[p], k), getattr(b[p], k),
                                   rtol=1e-5, atol=1e-5, err_msg=p)
    assert a.description["tokens"] == 5 + 16 + 4 + 1  # padding left out
  np.testing.assert_array_equal(out["params"]["head"]["kernel"].codes,
                                ref["params"]["head"]["kernel"].codes)


def test_shared_weights_fall_back_to_rerunning():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
      first = nn.Dense(32, name="layer_0")
      x = nn.tanh(first(x))
      x = nn.tanh(nn.Dense(32, name="layer_1")(x))
      return first(x)  # layer_0 again, after layer_1

  model = Tied()
  v = model.init(jax.random.key(2), X)
  msgs = []
  out = sequential(model, v, BATCHES, BUILD, progress=msgs.append)
  assert "rerunning the whole model" in msgs[0]
  ref = sequential(model, v, BATCHES, BUILD, progress=False,
                   cache_inputs=False)
  np.testing.assert_array_equal(out["params"]["layer_0"]["kernel"].codes,
                                ref["params"]["layer_0"]["kernel"].codes)


def test_nnx_list_of_blocks_equals_hand_built_sequence():
  from flax import nnx
  from compressjax.sparsity import wanda, wanda_prune

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
      return x + jnp.tanh(self.fc(x))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Block(rngs) for _ in range(3)])

    def __call__(self, x):
      for b in self.blocks:
        x = b(x)
      return x

  net = Net(nnx.Rngs(0))
  state = nnx.state(net, nnx.Param)
  xs = [jax.random.normal(jax.random.key(i), (6, 8)) for i in range(2)]
  out = sequential(net, state, xs, lambda s: wanda(s, 0.5), progress=False)
  h = jnp.concatenate(xs)
  for i in range(3):  # int keys of the nnx.List: stage 'blocks/i'
    fc = state["blocks"][i]["fc"]
    want = wanda_prune(fc["kernel"][...], jnp.sqrt(jnp.sum(h * h, 0)))
    got = out["blocks"][i]["fc"]["kernel"].get_value()
    np.testing.assert_array_equal(got.materialize(), want.materialize())
    h = h + jnp.tanh(h @ want.materialize() + fc["bias"][...])
