"""GPT-2 (Radford et al. 2019) in flax.linen, faithful to Hugging Face
transformers' modeling_gpt2, so HF weights loaded through `models.hf` give
HF's logits.

Pre-LayerNorm blocks (Radford et al. 2019, Sec. 2.3):
    h = x + c_proj(Attn(split(c_attn(ln_1(x)))))
    y = h + mlp.c_proj(act(mlp.c_fc(ln_2(h))))
with learned token (wte) and position (wpe) embeddings, a final ln_f, and
logits from the tied embedding (x wte^T) unless tie_word_embeddings is
false. c_attn stays fused as HF has it: one (n_embd, 3 n_embd) kernel whose
output is [q | k | v]. act is `activation_function` ("gelu_new": the tanh
approximation of GELU, Hendrycks & Gimpel 2016). Scores are scaled by
head_dim^-0.5 (`scale_attn_weights`) and by 1 / (layer + 1)
(`scale_attn_by_inverse_layer_idx`).

Calling convention (shared with models.llama):

    model = GPT2LMHeadModel(config)
    logits = model.apply(variables, input_ids)                 # (B, T, vocab)
    cache = model.init_cache(batch, capacity, dtype)           # empty KV cache
    logits, cache = model.apply(variables, input_ids, positions=pos,
                                attention_mask=mask, cache=cache)

`attention_mask` (B, T): 1 token / 0 padding over this call's tokens;
`positions` (B, T): default, each row counts its real tokens from 0 (so a
left-padded row starts at position 0 on its first real token, as HF's
generate sets position_ids); they index wpe. `cache`: a tuple of per-layer
`kv` stores (compressjax.kv); the apply then returns (logits, cache).

Param paths mirror the HF names (`models.hf.mirror`); HF's Conv1D weights
are already (in, out), so kernels load as they are:
  params/transformer/wte/embedding                    (vocab, n_embd)
  params/transformer/wpe/embedding                    (n_positions, n_embd)
  params/transformer/h_{i}/ln_{1,2}/{scale,bias}
  params/transformer/h_{i}/attn/c_attn/{kernel,bias}  (n_embd, 3 n_embd)
  params/transformer/h_{i}/attn/c_proj/{kernel,bias}
  params/transformer/h_{i}/mlp/{c_fc,c_proj}/{kernel,bias}
  params/transformer/ln_f/{scale,bias}
  params/lm_head/kernel                               untied only
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax import kv
from compressjax.core.errors import CompressionError
from compressjax.models import hf

# HF's ACT2FN names GPT-2 checkpoints use -> function.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Zoo config of GPT-2 (HF's field names); `remat` wraps each block in
  nn.remat."""

  vocab_size: int = 256
  n_positions: int = 128
  n_embd: int = 64
  n_layer: int = 2
  n_head: int = 4
  n_inner: int | None = None  # None: 4 * n_embd
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  remat: bool = False

  def __post_init__(self):
    if self.n_inner is None:
      object.__setattr__(self, "n_inner", 4 * self.n_embd)
    if self.n_embd % self.n_head:
      raise CompressionError(f"n_embd {self.n_embd} is not divisible by "
                             f"n_head {self.n_head}")
    if self.activation_function not in ACTIVATIONS:
      raise CompressionError(
          f"activation_function {self.activation_function!r} is not "
          f"supported; use one of {sorted(ACTIVATIONS)}")

  def attention_scale(self, layer: int) -> float:
    s = (self.n_embd // self.n_head) ** -0.5 if self.scale_attn_weights \
        else 1.0
    return s / (layer + 1) if self.scale_attn_by_inverse_layer_idx else s


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, name=name,
                  kernel_init=nn.initializers.normal(stddev=0.02))


def _layer_norm(c: GPT2Config, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch's LayerNorm.
  return nn.LayerNorm(epsilon=c.layer_norm_epsilon, use_fast_variance=False,
                      name=name)


class GPT2Attention(nn.Module):
  config: GPT2Config
  layer: int

  @nn.compact
  def __call__(self, x, positions, cache):
    c = self.config
    b, t, d = x.shape
    h = c.n_head
    qkv = _dense(3 * d, "c_attn")(x)
    q, k, v = (a.reshape(b, t, h, d // h) for a in jnp.split(qkv, 3, -1))
    y, cache = kv.attention(q, k, v, positions, cache=cache,
                            scale=c.attention_scale(self.layer))
    return _dense(d, "c_proj")(y.reshape(b, t, d)), cache


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    act = ACTIVATIONS[c.activation_function]
    return _dense(c.n_embd, "c_proj")(act(_dense(c.n_inner, "c_fc")(x)))


class GPT2Block(nn.Module):
  config: GPT2Config
  layer: int

  @nn.compact
  def __call__(self, x, positions, cache):
    c = self.config
    a, cache = GPT2Attention(c, self.layer, name="attn")(
        _layer_norm(c, "ln_1")(x), positions, cache)
    x = x + a
    x = x + GPT2MLP(c, name="mlp")(_layer_norm(c, "ln_2")(x))
    # No-op unless applied with mutable=["intermediates"] (distillation).
    self.sow("intermediates", "hidden", x)
    return x, cache


class GPT2Model(nn.Module):
  config: GPT2Config

  def setup(self):
    c = self.config
    init = nn.initializers.normal(stddev=0.02)
    self.wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=init)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, embedding_init=init)
    block = nn.remat(GPT2Block) if c.remat else GPT2Block
    self.h = [block(c, i) for i in range(c.n_layer)]
    self.ln_f = _layer_norm(c, "ln_f")

  def __call__(self, input_ids, index, positions, cache):
    x = self.wte(input_ids.astype(jnp.int32)) + self.wpe(index)
    out = []
    for i, block in enumerate(self.h):
      x, ci = block(x, positions, None if cache is None else cache[i])
      out.append(ci)
    return self.ln_f(x), None if cache is None else tuple(out)


class GPT2LMHeadModel(nn.Module):
  """input_ids (B, T) -> logits (B, T, vocab); see the module docstring."""

  config: GPT2Config

  def setup(self):
    c = self.config
    self.transformer = GPT2Model(c)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False,
                              kernel_init=nn.initializers.normal(stddev=0.02))

  def init_cache(self, batch: int, capacity: int, dtype: Any = jnp.float32,
                 store: Any = kv.DenseKV) -> tuple:
    """An empty KV cache: one `store` per layer, `capacity` tokens each."""
    c = self.config
    return kv.init_cache(c.n_layer, batch, capacity, c.n_head,
                         c.n_embd // c.n_head, dtype, store)

  def __call__(self, input_ids, positions=None, attention_mask=None,
               cache=None):
    c = self.config
    kv.check_cache(cache, c.n_layer)
    if cache is None and input_ids.shape[-1] > c.n_positions:
      raise CompressionError(f"{input_ids.shape[-1]} tokens exceed GPT-2's "
                             f"n_positions {c.n_positions}")
    index, tokens = kv.token_positions(
        input_ids.shape, positions, attention_mask,
        None if cache is None else cache[0])
    h, cache = self.transformer(input_ids, index, tokens, cache)
    logits = (self.transformer.wte.attend(h) if c.tie_word_embeddings
              else self.lm_head(h))
    return logits if cache is None else (logits, cache)


# ---------------------------------------------------------------- HF family

# GPT2Config's defaults for keys a config.json may omit.
_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12)


def config_from_hf(d: Mapping[str, Any]) -> GPT2Config:
  """GPT2Config from a gpt2 config.json (HF's defaults for omitted keys);
  CompressionError naming the key on options this model does not have."""
  if d.get("model_type") != "gpt2":
    raise CompressionError(f"config.json 'model_type' = "
                           f"{d.get('model_type')!r} is not 'gpt2'")
  f = lambda k, t, **kw: hf.config_field(d, k, t, **kw)  # noqa: E731
  pos = lambda k: f(k, (int,), default=_DEFAULTS[k], positive=True)  # noqa
  act = f("activation_function", (str,), default="gelu_new")
  if act not in ACTIVATIONS:
    raise CompressionError(
        f"config.json 'activation_function' = {act!r} is not supported; use "
        f"one of {sorted(ACTIVATIONS)}")
  if f("add_cross_attention", (bool,), default=False):
    raise CompressionError("config.json 'add_cross_attention' = true (an "
                           "encoder-decoder GPT-2) is not supported")
  n_embd, n_head = pos("n_embd"), pos("n_head")
  if n_embd % n_head:
    raise CompressionError(f"config.json 'n_embd' {n_embd} is not divisible "
                           f"by 'n_head' {n_head}")
  # reorder_and_upcast_attn only changes float16 rounding (we compute scores
  # in the activation dtype and softmax in float32 either way): accepted.
  f("reorder_and_upcast_attn", (bool,), default=False)
  return GPT2Config(
      vocab_size=pos("vocab_size"), n_positions=pos("n_positions"),
      n_embd=n_embd, n_layer=pos("n_layer"), n_head=n_head,
      n_inner=f("n_inner", (int,), default=None, nullable=True,
                positive=True),
      activation_function=act,
      layer_norm_epsilon=f("layer_norm_epsilon", (float,), default=1e-5,
                           positive=True),
      scale_attn_weights=f("scale_attn_weights", (bool,), default=True),
      scale_attn_by_inverse_layer_idx=f(
          "scale_attn_by_inverse_layer_idx", (bool,), default=False),
      tie_word_embeddings=f("tie_word_embeddings", (bool,), default=True))


def config_to_hf(c: GPT2Config) -> dict:
  return dict(
      model_type="gpt2", architectures=["GPT2LMHeadModel"],
      vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
      n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner,
      activation_function=c.activation_function,
      layer_norm_epsilon=c.layer_norm_epsilon,
      scale_attn_weights=c.scale_attn_weights,
      scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
      reorder_and_upcast_attn=False, add_cross_attention=False,
      tie_word_embeddings=c.tie_word_embeddings)


def tensors(c: GPT2Config) -> tuple[hf.TensorSpec, ...]:
  """Every HF tensor of GPT2LMHeadModel with this config, in state-dict
  order (checkpoints of GPT2Model omit the 'transformer.' prefix)."""
  m = hf.mirror
  p = "transformer."
  specs = [m(f"{p}wte.weight", "embedding"), m(f"{p}wpe.weight", "embedding")]
  for i in range(c.n_layer):
    b = f"{p}h.{i}."
    for name, kind in (("ln_1", "norm"), ("attn.c_attn", "conv1d"),
                       ("attn.c_proj", "conv1d"), ("ln_2", "norm"),
                       ("mlp.c_fc", "conv1d"), ("mlp.c_proj", "conv1d")):
      specs += hf.module(f"{b}{name}", kind)
  specs += hf.module(f"{p}ln_f", "norm")
  specs.append(hf.TensorSpec("lm_head.weight", None) if c.tie_word_embeddings
               else m("lm_head.weight", "linear"))
  return tuple(specs)


def scale_groups(config: GPT2Config, prefix: str = "params/"):
  """AWQ / SmoothQuant scale groups (`compressjax.quantization.ScaleGroup`).

  Per block: ln_1 -> c_attn (fold into ln_1's scale and bias); attn.c_proj
  explicit: its input is the value part of the fused c_attn, a third of
  c_attn's output columns, and a "linear" producer must own all its last
  axis, so the fold into v has no place to go; ln_2 -> mlp.c_fc; mlp.c_proj
  after the activation (explicit). Then ln_f -> lm_head when untied.
  `prefix`: path of the params collection ('params/').
  """
  from compressjax.quantization.scaling import ScaleGroup  # no import cycle
  t = f"{prefix}transformer/"
  norm = lambda n: (f"{n}/scale", f"{n}/bias")  # noqa: E731
  groups = []
  for i in range(config.n_layer):
    b = f"{t}h_{i}/"
    groups += [
        ScaleGroup((f"{b}attn/c_attn/kernel",), "norm", norm(f"{b}ln_1")),
        ScaleGroup((f"{b}attn/c_proj/kernel",)),
        ScaleGroup((f"{b}mlp/c_fc/kernel",), "norm", norm(f"{b}ln_2")),
        ScaleGroup((f"{b}mlp/c_proj/kernel",)),
    ]
  if not config.tie_word_embeddings:
    groups.append(ScaleGroup((f"{prefix}lm_head/kernel",), "norm",
                             norm(f"{t}ln_f")))
  return tuple(groups)


FAMILY = hf.register(hf.Family(
    name="gpt2", model_types=("gpt2",), config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=GPT2LMHeadModel,
    example_args=lambda c: (jnp.zeros((1, 4), jnp.int32),),
    tensors=tensors,
    # the causal-mask buffers older checkpoints saved
    ignored=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
    optional_prefix="transformer."))
