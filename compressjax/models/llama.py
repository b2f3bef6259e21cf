"""Llama-family decoders (Llama 1-3, SmolLM, Mistral, Qwen2) in flax.linen,
faithful to Hugging Face transformers' modeling_llama / modeling_mistral /
modeling_qwen2, so HF weights loaded through `models.hf` give HF's logits.

Architecture (Touvron et al. 2023, "LLaMA"): pre-norm blocks
    h = x + o_proj(Attn(RoPE(q_proj(n1(x))), RoPE(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))       (SwiGLU)
with RMSNorm n(x) = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019;
computed in float32, cast back before the weight, as HF), rotary position
embeddings (Su et al. 2021, Eq. 34, in HF's rotate-half layout: dims i and
i + D/2 form a pair, angle pos * inv_freq_i, inv_freq_i = theta^(-2i/D)),
grouped-query attention (Ainslie et al. 2023; kv head of query head h is
h // (H / H_kv)) and scores scaled by head_dim^-0.5. RoPE scaling: "linear"
(inv_freq / factor) and "llama3" (Llama 3.1: wavelengths longer than
original_max / low_freq_factor divided by factor, shorter than original_max /
high_freq_factor kept, smooth interpolation between). Model differences:
Qwen2 has q/k/v biases (no o bias); Llama's `attention_bias` biases q, k, v,
o and `mlp_bias` the MLP; Mistral (every layer) and Qwen2 (layers from
`max_window_layers`, or per `layer_types`) use sliding-window attention.

Calling convention (shared with models.gpt2):

    model = LlamaForCausalLM(config)
    logits = model.apply(variables, input_ids)                 # (B, T, vocab)
    cache = model.init_cache(batch, capacity, dtype)           # empty KV cache
    logits, cache = model.apply(variables, input_ids, positions=pos,
                                attention_mask=mask, cache=cache)

`input_ids` (B, T) int. `attention_mask` (B, T): 1 token / 0 padding over
the tokens passed in this call (with a cache, earlier padding is remembered
by the cache); left-pad a batch for generation. `positions` (B, T) int:
default, each row counts its real tokens from 0 (continuing from the cache's
last position), so a left-padded row starts at 0 on its first real token, as
HF's generate. With `cache` (a tuple of per-layer `kv` stores, see
compressjax.kv) the new tokens are appended and attend to everything stored;
the apply then returns (logits, cache). Works under `jax.jit` (static
shapes) and `cj.run` on compressed trees.

Param paths mirror the HF names (`models.hf.mirror`):
  params/model/embed_tokens/embedding                  (vocab, hidden)
  params/model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (in, out) [+ bias]
  params/model/layers_{i}/mlp/{gate,up,down}_proj/kernel    [+ bias]
  params/model/layers_{i}/{input,post_attention}_layernorm/scale
  params/model/norm/scale
  params/lm_head/kernel                                (hidden, vocab), untied
HF 'model.layers.0.self_attn.q_proj.weight' (out, in) is
params/model/layers_0/self_attn/q_proj/kernel (in, out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compressjax import kv
from compressjax.core.errors import CompressionError
from compressjax.models import hf

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "swish")  # HF's ACT2FN: both are x * sigmoid(x)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Zoo config of the Llama family (HF field names where they mean the same).

  Attributes beyond HF's: `qkv_bias`, `o_bias`, `mlp_bias` (which Linear
  layers carry a bias; HF decides this per model_type), `window_layers` (the
  layers that use `sliding_window`; None: every layer), `remat` (wrap each
  layer in nn.remat: recompute activations in the backward pass), and
  `model_type` (the HF class `config_to_hf` writes).
  """

  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int | None = None  # None: num_attention_heads
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  window_layers: tuple[int, ...] | None = None
  remat: bool = False
  model_type: str = "llama"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.window_layers is not None:
      set_("window_layers", tuple(sorted(int(i) for i in self.window_layers)))
    if self.num_attention_heads % self.num_key_value_heads:
      raise CompressionError(
          f"num_attention_heads {self.num_attention_heads} is not a multiple "
          f"of num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise CompressionError(f"head_dim {self.head_dim} must be even (RoPE "
                             "rotates pairs of dims)")
    if self.rope_type not in ROPE_TYPES:
      raise CompressionError(f"rope_type {self.rope_type!r} is not supported;"
                             f" use one of {ROPE_TYPES}")
    if self.model_type not in MODEL_TYPES:
      raise CompressionError(f"model_type {self.model_type!r} is not one of "
                             f"{MODEL_TYPES}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise CompressionError(f"sliding_window must be >= 1 token or None, got"
                             f" {self.sliding_window}")
    bad = [i for i in self.window_layers or ()
           if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise CompressionError(f"window_layers {bad} are not layers of a "
                             f"{self.num_hidden_layers}-layer model")

  def layer_window(self, i: int) -> int | None:
    """Sliding window of layer i (None: full causal attention)."""
    if self.sliding_window is None:
      return None
    if self.window_layers is not None and i not in self.window_layers:
      return None
    return self.sliding_window


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """(head_dim / 2,) float32 inverse frequencies, as HF's ROPE_INIT_FUNCTIONS
  (default, linear, llama3) compute them in float32."""
  c, d = config, config.head_dim
  f32 = np.float32
  inv = f32(1.0) / (f32(c.rope_theta) ** (
      np.arange(0, d, 2).astype(f32) / f32(d)))
  if c.rope_type == "linear":
    inv = inv / f32(c.rope_factor)
  elif c.rope_type == "llama3":
    old = c.rope_original_max_position_embeddings
    lo, hi = c.rope_low_freq_factor, c.rope_high_freq_factor
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > old / lo, inv / f32(c.rope_factor), inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(f32)


def rotary(config: LlamaConfig, index, dtype):
  """cos, sin (B, T, head_dim) for positions `index` (B, T), in float32 then
  cast to the activations' dtype (as HF)."""
  freqs = index[..., None].astype(jnp.float32) * jnp.asarray(
      rope_inv_freq(config))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x, cos, sin):
  """x (B, T, H, D) rotated: x cos + rotate_half(x) sin (HF's layout)."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rot * sin[:, :, None]


class RMSNorm(nn.Module):
  """HF's LlamaRMSNorm: normalized in float32, cast back, times the weight."""

  eps: float

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                            + self.eps)
    return w * y.astype(x.dtype)


def _dense(features: int, bias: bool, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, name=name,
                  kernel_init=nn.initializers.normal(stddev=0.02))


class LlamaAttention(nn.Module):
  config: LlamaConfig
  layer: int

  @nn.compact
  def __call__(self, x, rope, positions, cache):
    c = self.config
    b, t, _ = x.shape
    h, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    # Separate 2-D Dense kernels (as HF's Linear layers), so every
    # compression method and the runtime see matrices.
    q = _dense(h * d, c.qkv_bias, "q_proj")(x).reshape(b, t, h, d)
    k = _dense(hkv * d, c.qkv_bias, "k_proj")(x).reshape(b, t, hkv, d)
    v = _dense(hkv * d, c.qkv_bias, "v_proj")(x).reshape(b, t, hkv, d)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    # rotary: moves rotated vectors by more positions (StreamingLLM stores
    # see sink keys at positions within the cache, kv.policies).
    y, cache = kv.attention(
        q, k, v, positions, cache=cache, scale=d ** -0.5,
        window=c.layer_window(self.layer),
        rotary=lambda x, idx: apply_rotary(x, *rotary(c, idx, x.dtype)))
    return _dense(c.hidden_size, c.o_bias, "o_proj")(
        y.reshape(b, t, h * d)), cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = _dense(c.intermediate_size, c.mlp_bias, "gate_proj")(x)
    up = _dense(c.intermediate_size, c.mlp_bias, "up_proj")(x)
    return _dense(c.hidden_size, c.mlp_bias, "down_proj")(
        jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig
  layer: int

  @nn.compact
  def __call__(self, x, rope, positions, cache):
    c = self.config
    a, cache = LlamaAttention(c, self.layer, name="self_attn")(
        RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), rope, positions,
        cache)
    x = x + a
    x = x + LlamaMLP(c, name="mlp")(
        RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
    # No-op unless applied with mutable=["intermediates"] (distillation).
    self.sow("intermediates", "hidden", x)
    return x, cache


class LlamaModel(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size,
        embedding_init=nn.initializers.normal(stddev=0.02))
    layer = nn.remat(LlamaDecoderLayer) if c.remat else LlamaDecoderLayer
    self.layers = [layer(c, i) for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps)

  def __call__(self, input_ids, index, positions, cache):
    x = self.embed_tokens(input_ids.astype(jnp.int32))
    rope = rotary(self.config, index, x.dtype)
    out = []
    for i, layer in enumerate(self.layers):
      x, ci = layer(x, rope, positions, None if cache is None else cache[i])
      out.append(ci)
    return self.norm(x), None if cache is None else tuple(out)


class LlamaForCausalLM(nn.Module):
  """input_ids (B, T) -> logits (B, T, vocab); see the module docstring."""

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.model = LlamaModel(c)
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c.vocab_size, False, "lm_head")

  def init_cache(self, batch: int, capacity: int, dtype: Any = jnp.float32,
                 store: Any = kv.DenseKV) -> tuple:
    """An empty KV cache: one `store` per layer, `capacity` tokens each."""
    c = self.config
    return kv.init_cache(c.num_hidden_layers, batch, capacity,
                         c.num_key_value_heads, c.head_dim, dtype, store)

  def __call__(self, input_ids, positions=None, attention_mask=None,
               cache=None):
    c = self.config
    kv.check_cache(cache, c.num_hidden_layers)
    index, tokens = kv.token_positions(
        input_ids.shape, positions, attention_mask,
        None if cache is None else cache[0])
    h, cache = self.model(input_ids, index, tokens, cache)
    logits = (self.model.embed_tokens.attend(h) if c.tie_word_embeddings
              else self.lm_head(h))
    return logits if cache is None else (logits, cache)


# ---------------------------------------------------------------- HF family

# HF config classes' defaults for keys a config.json may omit.
_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=None, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=32768,
                  sliding_window=4096, max_window_layers=28),
}


def _rope_from_hf(d: Mapping[str, Any]) -> dict:
  """rope fields from `rope_scaling` + `rope_theta` (transformers 4) or
  `rope_parameters` (transformers 5, with rope_theta inside)."""
  theta = hf.config_field(d, "rope_theta", (float,), 10000.0, positive=True)
  key, spec = "rope_scaling", d.get("rope_scaling")
  if d.get("rope_parameters") is not None:
    key, spec = "rope_parameters", d["rope_parameters"]
  if spec is None:
    return dict(rope_theta=theta)
  if not isinstance(spec, Mapping):
    raise CompressionError(f"config.json {key!r} must be an object or null, "
                           f"got {spec!r}")
  if key == "rope_parameters":
    theta = hf.config_field(spec, "rope_theta", (float,), theta,
                            positive=True)
  kind = spec.get("rope_type", spec.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise CompressionError(
        f"config.json {key}.rope_type = {kind!r} is not supported; the llama "
        f"family supports {', '.join(ROPE_TYPES)} (or no {key})")
  out = dict(rope_theta=theta, rope_type=kind)

  def need(name, types):
    if name not in spec:
      raise CompressionError(f"config.json {key} of rope_type {kind!r} needs "
                             f"{name!r}; add it")
    try:
      return hf.config_field(spec, name, types, positive=True)
    except CompressionError as e:
      raise CompressionError(f"{key}: {e}") from None

  if kind in ("linear", "llama3"):
    out["rope_factor"] = need("factor", (float,))
  if kind == "llama3":
    out["rope_low_freq_factor"] = need("low_freq_factor", (float,))
    out["rope_high_freq_factor"] = need("high_freq_factor", (float,))
    out["rope_original_max_position_embeddings"] = need(
        "original_max_position_embeddings", (int,))
    if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
      raise CompressionError(f"config.json {key}: high_freq_factor must be "
                             "greater than low_freq_factor")
  return out


def config_from_hf(d: Mapping[str, Any]) -> LlamaConfig:
  """LlamaConfig from a llama / mistral / qwen2 config.json (HF's defaults
  for omitted keys); CompressionError naming the key on what HF would build
  differently from this zoo model."""
  mt = d.get("model_type")
  if mt not in MODEL_TYPES:
    raise CompressionError(f"config.json 'model_type' = {mt!r} is not one of "
                           f"the llama family's {MODEL_TYPES}")
  dflt = _DEFAULTS[mt]
  f = lambda k, t, **kw: hf.config_field(d, k, t, **kw)  # noqa: E731
  pos = lambda k: f(k, (int,), default=dflt[k], positive=True)  # noqa: E731
  heads = pos("num_attention_heads")
  hidden = pos("hidden_size")
  kv_heads = f("num_key_value_heads", (int,), default=dflt[
      "num_key_value_heads"], nullable=True, positive=True) or heads
  head_dim = f("head_dim", (int,), default=None, nullable=True,
               positive=True) or hidden // heads
  act = f("hidden_act", (str,), default="silu")
  if act not in ACTIVATIONS:
    raise CompressionError(
        f"config.json 'hidden_act' = {act!r} is not supported; the llama "
        f"family's MLP is SwiGLU: use one of {ACTIVATIONS}")
  prf = f("partial_rotary_factor", (float,), default=1.0)
  if prf != 1.0:
    raise CompressionError(f"config.json 'partial_rotary_factor' = {prf} is "
                           "not supported (the llama family rotates every "
                           "head dim: 1.0)")
  layers = pos("num_hidden_layers")
  fields = dict(
      vocab_size=pos("vocab_size"), hidden_size=hidden,
      intermediate_size=pos("intermediate_size"), num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=f("rms_norm_eps", (float,), default=1e-6, positive=True),
      max_position_embeddings=pos("max_position_embeddings"),
      tie_word_embeddings=f("tie_word_embeddings", (bool,), default=False),
      model_type=mt, **_rope_from_hf(d))
  if heads % kv_heads:
    raise CompressionError(f"config.json 'num_attention_heads' {heads} is not"
                           f" a multiple of 'num_key_value_heads' {kv_heads}")
  if mt == "llama":  # HF's Llama has no sliding window (ignores the key)
    bias = f("attention_bias", (bool,), default=False)
    fields.update(qkv_bias=bias, o_bias=bias,
                  mlp_bias=f("mlp_bias", (bool,), default=False))
  elif mt == "mistral":
    fields.update(sliding_window=f("sliding_window", (int,),
                                   default=dflt["sliding_window"],
                                   nullable=True, positive=True))
  else:  # qwen2
    fields.update(qkv_bias=True)
    window = f("sliding_window", (int,), default=dflt["sliding_window"],
               nullable=True, positive=True)
    if not f("use_sliding_window", (bool,), default=False):
      window = None
    types = d.get("layer_types")
    if types is not None:
      if (not isinstance(types, list) or len(types) != layers or
          any(t not in ("full_attention", "sliding_attention")
              for t in types)):
        raise CompressionError(
            f"config.json 'layer_types' must list {layers} entries, each "
            "'full_attention' or 'sliding_attention'")
      windowed = tuple(i for i, t in enumerate(types)
                       if t == "sliding_attention")
    else:
      first = f("max_window_layers", (int,),
                default=dflt["max_window_layers"])
      windowed = tuple(range(max(first, 0), layers))
    if window is not None and windowed:
      fields.update(sliding_window=window,
                    window_layers=None if len(windowed) == layers
                    else windowed)
  return LlamaConfig(**fields)


def config_to_hf(c: LlamaConfig) -> dict:
  """config.json that transformers reads back to this model; refuses
  configs its `model_type` cannot express (naming the field)."""
  mt = c.model_type

  def refuse(what):
    raise CompressionError(f"model_type {mt!r} cannot express {what}; set "
                           "model_type to one that can (llama: biases on q, "
                           "k, v, o together; qwen2: q, k, v biases and a "
                           "sliding window on the last layers; mistral: a "
                           "window on every layer, no biases)")

  windowed = tuple(i for i in range(c.num_hidden_layers)
                   if c.layer_window(i) is not None)
  out = dict(
      model_type=mt, architectures=[ARCHITECTURES[mt]],
      vocab_size=c.vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads,
      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
      hidden_act="silu", max_position_embeddings=c.max_position_embeddings,
      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
      rope_scaling=None, tie_word_embeddings=c.tie_word_embeddings)
  if c.rope_type == "linear":
    out["rope_scaling"] = dict(rope_type="linear", factor=c.rope_factor)
  elif c.rope_type == "llama3":
    out["rope_scaling"] = dict(
        rope_type="llama3", factor=c.rope_factor,
        low_freq_factor=c.rope_low_freq_factor,
        high_freq_factor=c.rope_high_freq_factor,
        original_max_position_embeddings=(
            c.rope_original_max_position_embeddings))
  if mt == "llama":
    if c.qkv_bias != c.o_bias:
      refuse(f"qkv_bias={c.qkv_bias} with o_bias={c.o_bias}")
    if windowed:
      refuse("a sliding window")
    out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  elif mt == "mistral":
    if c.qkv_bias or c.o_bias or c.mlp_bias:
      refuse("biases")
    if windowed and len(windowed) != c.num_hidden_layers:
      refuse(f"a sliding window on layers {windowed} only")
    out.update(sliding_window=c.sliding_window if windowed else None)
  else:
    if not c.qkv_bias or c.o_bias or c.mlp_bias:
      refuse(f"qkv_bias={c.qkv_bias}, o_bias={c.o_bias}, "
             f"mlp_bias={c.mlp_bias}")
    first = windowed[0] if windowed else c.num_hidden_layers
    if windowed != tuple(range(first, c.num_hidden_layers)):
      refuse(f"a sliding window on layers {windowed} (not the last ones)")
    out.update(use_sliding_window=bool(windowed),
               sliding_window=c.sliding_window if windowed else None,
               max_window_layers=first,
               layer_types=["sliding_attention" if i in windowed
                            else "full_attention"
                            for i in range(c.num_hidden_layers)])
  return out


def tensors(c: LlamaConfig) -> tuple[hf.TensorSpec, ...]:
  """Every HF tensor of LlamaForCausalLM / MistralForCausalLM /
  Qwen2ForCausalLM with this config, in state-dict order."""
  m = hf.mirror
  specs = [m("model.embed_tokens.weight", "embedding")]
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    for n in ("q", "k", "v"):
      specs += hf.module(f"{p}self_attn.{n}_proj", "linear", c.qkv_bias)
    specs += hf.module(f"{p}self_attn.o_proj", "linear", c.o_bias)
    for n in ("gate", "up", "down"):
      specs += hf.module(f"{p}mlp.{n}_proj", "linear", c.mlp_bias)
    specs.append(m(f"{p}input_layernorm.weight", "norm"))
    specs.append(m(f"{p}post_attention_layernorm.weight", "norm"))
  specs.append(m("model.norm.weight", "norm"))
  # Tied: HF drops lm_head.weight on save, but some checkpoints keep it.
  specs.append(hf.TensorSpec("lm_head.weight", None) if c.tie_word_embeddings
               else m("lm_head.weight", "linear"))
  return tuple(specs)


def scale_groups(config: LlamaConfig, prefix: str = "params/"):
  """AWQ / SmoothQuant scale groups (`compressjax.quantization.ScaleGroup`).

  Per layer: input_layernorm -> q, k, v (fold into the norm weight);
  v -> o (fold into v's kernel columns and bias; attention mixes tokens, not
  channels) only without GQA: with num_key_value_heads < num_attention_heads
  o's input channel (query head h, dim j) reads v's column (kv head h // G,
  dim j), so a fold is valid only when the scales repeat over the G query
  heads of a kv head, which a per-channel search does not give: o keeps an
  explicit input scale; post_attention_layernorm -> gate, up; down after
  silu(gate) * up (explicit). Then model/norm -> lm_head when untied (a tied
  head is the embedding, not a kernel). `prefix`: path of the params
  collection ('params/').
  """
  from compressjax.quantization.scaling import ScaleGroup  # no import cycle
  c = config
  groups = []
  for i in range(c.num_hidden_layers):
    b = f"{prefix}model/layers_{i}/"
    at, mlp = f"{b}self_attn/", f"{b}mlp/"
    groups.append(ScaleGroup(
        tuple(f"{at}{n}_proj/kernel" for n in ("q", "k", "v")), "norm",
        (f"{b}input_layernorm/scale",)))
    if c.num_key_value_heads == c.num_attention_heads:
      v = (f"{at}v_proj/kernel",) + ((f"{at}v_proj/bias",) if c.qkv_bias
                                     else ())
      groups.append(ScaleGroup((f"{at}o_proj/kernel",), "linear", v))
    else:
      groups.append(ScaleGroup((f"{at}o_proj/kernel",)))
    groups += [
        ScaleGroup((f"{mlp}gate_proj/kernel", f"{mlp}up_proj/kernel"), "norm",
                   (f"{b}post_attention_layernorm/scale",)),
        ScaleGroup((f"{mlp}down_proj/kernel",)),
    ]
  if not c.tie_word_embeddings:
    groups.append(ScaleGroup((f"{prefix}lm_head/kernel",), "norm",
                             (f"{prefix}model/norm/scale",)))
  return tuple(groups)


FAMILY = hf.register(hf.Family(
    name="llama", model_types=MODEL_TYPES, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=LlamaForCausalLM,
    example_args=lambda c: (jnp.zeros((1, 4), jnp.int32),),
    tensors=tensors,
    # rotary inv_freq buffers (older checkpoints saved them)
    ignored=(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",),
    optional_prefix="model."))
