"""Tiny models for the evaluation tests, built once per process: random HF
directories (tests/models/hf_fixtures) with a BPE tokenizer trained in-test,
and a tiny byte-level TransformerLM."""

from __future__ import annotations

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import compressjax as cj
from compressjax.models import hub, transformer
from tests.models import hf_fixtures as fx
from tests.models import hf_reference as ref

# A small corpus: Python-like and English lines (the tokenizer's training
# text and the evaluation text).
LINES = [
    "def main(argv):", "    return 0", "for i in range(10):",
    "    print(i)", "import os", "class Point(object):",
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token", "if x is None:",
    "    raise ValueError(x)", "with open(path) as f:", "x = [1, 2, 3]",
]
TEXT = "\n".join(LINES * 6)

# Every Linear in/out feature count is a multiple of 32 / 4 = 8 (GPTQ export)
# and of the group size 16; vocab 320 > the tokenizer's 300 ids.
LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=256, tie_word_embeddings=False)
GPT2 = dict(model_type="gpt2", vocab_size=320, n_positions=256, n_embd=32,
            n_layer=2, n_head=4, n_inner=64, layer_norm_epsilon=1e-5)


def _dir(name: str) -> str:
  return tempfile.mkdtemp(prefix=f"cj_eval_{name}_")


@functools.lru_cache(maxsize=None)
def llama_dir() -> str:
  d = _dir("llama")
  fx.write_hf_dir(d, ref.llama_state_dict(LLAMA, seed=0), LLAMA)
  fx.write_tokenizer(d, LINES, vocab_size=300)
  return d


@functools.lru_cache(maxsize=None)
def gpt2_dir() -> str:
  d = _dir("gpt2")
  fx.write_hf_dir(d, ref.gpt2_state_dict(GPT2, seed=1), GPT2)
  fx.write_tokenizer(d, LINES, vocab_size=300)
  return d


@functools.lru_cache(maxsize=None)
def llama() -> hub.Pretrained:
  return hub.load_pretrained(llama_dir())


@functools.lru_cache(maxsize=None)
def gpt2() -> hub.Pretrained:
  return hub.load_pretrained(gpt2_dir())


@functools.lru_cache(maxsize=None)
def byte_lm():
  """(TransformerLM with seq_len 64, random variables)."""
  model = transformer.TransformerLM(transformer.TransformerConfig(
      d_model=32, n_layers=2, n_heads=4, d_mlp=64, seq_len=64))
  # Random params of the init's shapes, drawn in numpy (no compilation):
  # norm scales 1, biases small, matrices N(0, 0.3^2) (peaked predictions).
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(s.shape, s.dtype)
    std = 0.02 if "bias" in name else 0.3
    return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def forward(module, variables, ids):
  """Plain `module.apply` on unpadded ids: the independent reference."""
  return module.apply(variables, ids)


# compressed trees for the tests, jitted (one compilation, not one per op)
materialize = jax.jit(cj.materialize_tree)
quantize4 = jax.jit(lambda t: cj.quantize(t, 4, group_size=16))
quantize8 = jax.jit(lambda t: cj.quantize(t, 8))
