"""Independent numpy float64 forwards of Hugging Face decoders.

Written from transformers' modeling_llama / modeling_mistral / modeling_qwen2
/ modeling_gpt2 and modeling_rope_utils math, operating on HF config dicts
and HF-named state dicts in PyTorch layouts (Linear weight (out, in), GPT-2
Conv1D weight (in, out)). Masks are built as HF builds them, by sequence
index: causal (kv_idx <= q_idx), sliding window (kv_idx > q_idx - window),
padding (attention_mask[kv_idx] == 1), with the dtype minimum where masked.
Nothing here imports compressjax.

Also: random state dicts with exactly the tensors HF's modules create for a
config (`llama_state_dict`, `gpt2_state_dict`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

# ------------------------------------------------------------------ helpers


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _mask(b, t, attention_mask, window):
  """(B, 1, T, T) bool: HF's causal & padding [& sliding window] mask."""
  q = np.arange(t)[:, None]
  k = np.arange(t)[None, :]
  allowed = k <= q
  if window is not None:
    allowed = allowed & (k > q - window)
  allowed = np.broadcast_to(allowed, (b, 1, t, t))
  if attention_mask is not None:
    allowed = allowed & (np.asarray(attention_mask)[:, None, None, :] == 1)
  return allowed


def _attend(q, k, v, allowed, scale):
  """q, k, v (B, H, T, D) -> (B, T, H * D)."""
  s = q @ np.swapaxes(k, -1, -2) * scale
  s = np.where(allowed, s, np.finfo(np.float64).min)
  out = _softmax(s) @ v
  b, h, t, d = out.shape
  return out.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _positions(b, t, positions):
  return (np.broadcast_to(np.arange(t), (b, t)) if positions is None
          else np.asarray(positions))


# -------------------------------------------------------------------- llama


def _rope_spec(cfg):
  """(theta, rope dict or None) from rope_parameters (v5) or rope_scaling +
  rope_theta (v4)."""
  params = cfg.get("rope_parameters")
  if params is not None:
    return params.get("rope_theta", cfg.get("rope_theta", 10000.0)), params
  return cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")


def inv_freq(cfg, dim):
  """modeling_rope_utils: default / linear / llama3 inverse frequencies."""
  theta, rs = _rope_spec(cfg)
  inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  kind = "default" if rs is None else rs.get("rope_type",
                                             rs.get("type", "default"))
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / rs["factor"]
  if kind == "llama3":
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = np.empty_like(inv)
    for i, f in enumerate(inv):
      wavelen = 2 * math.pi / f
      if wavelen < old / high:      # high frequency: unchanged
        out[i] = f
      elif wavelen > old / low:     # low frequency: interpolated by factor
        out[i] = f / factor
      else:                         # in between: smooth mix
        smooth = (old / wavelen - low) / (high - low)
        out[i] = (1 - smooth) * f / factor + smooth * f
    return out
  raise ValueError(f"reference has no rope_type {kind}")


def _rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], -1)


def _rms(x, w, eps):
  return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def llama_windows(cfg):
  """Per-layer sliding window as HF's llama / mistral / qwen2 configs give."""
  n = cfg["num_hidden_layers"]
  mt = cfg["model_type"]
  if mt == "llama":
    return [None] * n
  if mt == "mistral":
    return [cfg.get("sliding_window", 4096)] * n
  window = cfg.get("sliding_window", 4096) if cfg.get(
      "use_sliding_window", False) else None
  types = cfg.get("layer_types") or [
      "sliding_attention" if window is not None
      and i >= cfg.get("max_window_layers", 28) else "full_attention"
      for i in range(n)]
  return [window if t == "sliding_attention" else None for t in types]


def _head_dim(cfg):
  return cfg.get("head_dim") or cfg["hidden_size"] // cfg[
      "num_attention_heads"]


def llama_forward(cfg, sd, input_ids, positions=None, attention_mask=None):
  """Logits (B, T, vocab) float64 of LlamaForCausalLM / MistralForCausalLM /
  Qwen2ForCausalLM (eager attention)."""
  g = lambda n: np.asarray(sd[n], np.float64)  # noqa: E731
  has = lambda n: n in sd  # noqa: E731
  ids = np.asarray(input_ids)
  b, t = ids.shape
  heads = cfg["num_attention_heads"]
  kvh = cfg.get("num_key_value_heads") or heads
  d = _head_dim(cfg)
  eps = cfg.get("rms_norm_eps", 1e-6)
  pos = _positions(b, t, positions).astype(np.float64)
  freqs = pos[..., None] * inv_freq(cfg, d)[None, None]
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]  # (B, 1, T, D)

  def lin(x, name):
    y = x @ g(name + ".weight").T
    return y + g(name + ".bias") if has(name + ".bias") else y

  x = g("model.embed_tokens.weight")[ids]
  for i, window in enumerate(llama_windows(cfg)):
    p = f"model.layers.{i}."
    h = _rms(x, g(p + "input_layernorm.weight"), eps)
    split = lambda y, n: y.reshape(b, t, n, d).transpose(0, 2, 1, 3)  # noqa
    q = split(lin(h, p + "self_attn.q_proj"), heads)
    k = split(lin(h, p + "self_attn.k_proj"), kvh)
    v = split(lin(h, p + "self_attn.v_proj"), kvh)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = np.repeat(k, heads // kvh, axis=1)  # repeat_kv
    v = np.repeat(v, heads // kvh, axis=1)
    a = _attend(q, k, v, _mask(b, t, attention_mask, window), d ** -0.5)
    x = x + lin(a, p + "self_attn.o_proj")
    h = _rms(x, g(p + "post_attention_layernorm.weight"), eps)
    gate = lin(h, p + "mlp.gate_proj")
    silu = gate / (1 + np.exp(-gate))
    x = x + lin(silu * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
  x = _rms(x, g("model.norm.weight"), eps)
  tied = cfg.get("tie_word_embeddings", False)
  return x @ (g("model.embed_tokens.weight") if tied
              else g("lm_head.weight")).T


def llama_state_dict(cfg, seed=0, lm_head_when_tied=False):
  """Random float32 tensors named and shaped as HF's LlamaForCausalLM /
  MistralForCausalLM / Qwen2ForCausalLM create them for `cfg`."""
  rng = np.random.default_rng(seed)
  hid, inter = cfg["hidden_size"], cfg["intermediate_size"]
  heads = cfg["num_attention_heads"]
  kvh = cfg.get("num_key_value_heads") or heads
  d = _head_dim(cfg)
  mt = cfg["model_type"]
  # which Linear layers have a bias, per model class
  qkv_bias = {"llama": cfg.get("attention_bias", False), "mistral": False,
              "qwen2": True}[mt]
  o_bias = cfg.get("attention_bias", False) if mt == "llama" else False
  mlp_bias = cfg.get("mlp_bias", False) if mt == "llama" else False
  sd = {}

  def w(name, *shape, scale=0.1):
    sd[name] = (scale * rng.standard_normal(shape)).astype(np.float32)

  def linear(name, n_out, n_in, bias):
    w(name + ".weight", n_out, n_in, scale=1 / math.sqrt(n_in))
    if bias:
      w(name + ".bias", n_out)

  w("model.embed_tokens.weight", cfg["vocab_size"], hid, scale=1.0)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    linear(p + "self_attn.q_proj", heads * d, hid, qkv_bias)
    linear(p + "self_attn.k_proj", kvh * d, hid, qkv_bias)
    linear(p + "self_attn.v_proj", kvh * d, hid, qkv_bias)
    linear(p + "self_attn.o_proj", hid, heads * d, o_bias)
    linear(p + "mlp.gate_proj", inter, hid, mlp_bias)
    linear(p + "mlp.up_proj", inter, hid, mlp_bias)
    linear(p + "mlp.down_proj", hid, inter, mlp_bias)
    for n in ("input_layernorm", "post_attention_layernorm"):
      sd[p + n + ".weight"] = (1 + 0.1 * rng.standard_normal(hid)).astype(
          np.float32)
  sd["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(hid)).astype(
      np.float32)
  if not cfg.get("tie_word_embeddings", False):
    linear("lm_head", cfg["vocab_size"], hid, False)
  elif lm_head_when_tied:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
  return sd


# --------------------------------------------------------------------- gpt2

_ACT = {
    "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(
        math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "relu": lambda x: np.maximum(x, 0),
}


def _layer_norm(x, w, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + bias


def gpt2_forward(cfg, sd, input_ids, positions=None, attention_mask=None):
  """Logits (B, T, vocab) float64 of GPT2LMHeadModel (names with the
  'transformer.' prefix)."""
  g = lambda n: np.asarray(sd[n], np.float64)  # noqa: E731
  ids = np.asarray(input_ids)
  b, t = ids.shape
  e, heads = cfg["n_embd"], cfg["n_head"]
  d = e // heads
  eps = cfg.get("layer_norm_epsilon", 1e-5)
  act = _ACT[cfg.get("activation_function", "gelu_new")]
  tp = "transformer."
  x = g(tp + "wte.weight")[ids] + g(tp + "wpe.weight")[
      _positions(b, t, positions)]

  def conv1d(y, name):  # Conv1D: y @ W (in, out) + b
    return y @ g(name + ".weight") + g(name + ".bias")

  def ln(y, name):
    return _layer_norm(y, g(name + ".weight"), g(name + ".bias"), eps)

  for i in range(cfg["n_layer"]):
    p = f"{tp}h.{i}."
    qkv = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn")
    q, k, v = (a.reshape(b, t, heads, d).transpose(0, 2, 1, 3)
               for a in np.split(qkv, 3, axis=-1))
    scale = d ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
      scale /= i + 1
    a = _attend(q, k, v, _mask(b, t, attention_mask, None), scale)
    x = x + conv1d(a, p + "attn.c_proj")
    h = act(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc"))
    x = x + conv1d(h, p + "mlp.c_proj")
  x = ln(x, tp + "ln_f")
  tied = cfg.get("tie_word_embeddings", True)
  return x @ (g(tp + "wte.weight") if tied else g("lm_head.weight")).T


def gpt2_state_dict(cfg, seed=0, buffers=False):
  """Random float32 tensors as HF's GPT2LMHeadModel has them (Conv1D weights
  (in, out)); `buffers` adds the attn.bias / attn.masked_bias buffers older
  checkpoints saved."""
  rng = np.random.default_rng(seed)
  e = cfg["n_embd"]
  inner = cfg.get("n_inner") or 4 * e
  sd = {}

  def w(name, *shape, scale=0.1):
    sd[name] = (scale * rng.standard_normal(shape)).astype(np.float32)

  def conv1d(name, n_in, n_out):
    w(name + ".weight", n_in, n_out, scale=1 / math.sqrt(n_in))
    w(name + ".bias", n_out)

  def ln(name):
    sd[name + ".weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(
        np.float32)
    w(name + ".bias", e)

  tp = "transformer."
  w(tp + "wte.weight", cfg["vocab_size"], e, scale=1.0)
  w(tp + "wpe.weight", cfg["n_positions"], e, scale=0.3)
  n = cfg["n_positions"]
  for i in range(cfg["n_layer"]):
    p = f"{tp}h.{i}."
    ln(p + "ln_1")
    if buffers:
      sd[p + "attn.bias"] = np.tril(np.ones((n, n), bool))[None, None]
      sd[p + "attn.masked_bias"] = np.asarray(-1e4, np.float32)
    conv1d(p + "attn.c_attn", e, 3 * e)
    conv1d(p + "attn.c_proj", e, e)
    ln(p + "ln_2")
    conv1d(p + "mlp.c_fc", e, inner)
    conv1d(p + "mlp.c_proj", inner, e)
  ln(tp + "ln_f")
  if not cfg.get("tie_word_embeddings", True):
    w("lm_head.weight", cfg["vocab_size"], e, scale=1 / math.sqrt(e))
  return sd
