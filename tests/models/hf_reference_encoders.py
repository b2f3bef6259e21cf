"""Independent numpy float64 references of HF BertModel / RobertaModel and
ViTModel / ViTForImageClassification, computed straight from HF-named state
dicts in PyTorch layouts (Linear weight (out, in), Conv2d weight
(out, in, kh, kw)), plus builders of random state dicts in exact HF naming.
Nothing here imports compressjax: the tests compare the zoo against it."""

from __future__ import annotations

import numpy as np
from scipy.special import erf

ACT = {
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(
        np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
}


def _w(sd, name):
  return np.asarray(sd[name], np.float64)


def linear(sd, name, x, bias=True):
  y = x @ _w(sd, name + ".weight").T
  return y + _w(sd, name + ".bias") if bias else y


def layer_norm(sd, name, x, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * _w(sd, name + ".weight") + _w(
      sd, name + ".bias")


def softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def attention(sd, name, x, heads, mask=None, qkv_bias=True):
  """HF eager self-attention: additive mask (1 - mask) * finfo.min."""
  b, t, d = x.shape
  hd = d // heads

  def split(y):
    return y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)

  q, k, v = (split(linear(sd, f"{name}.{n}", x, qkv_bias))
             for n in ("query", "key", "value"))
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  if mask is not None:
    s = s + (1.0 - mask[:, None, None, :]) * np.finfo(np.float64).min
  return (softmax(s) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)


# --- BERT / RoBERTa ----------------------------------------------------------

def bert_forward(sd, cfg, input_ids, attention_mask=None,
                 token_type_ids=None, prefix=""):
  """{'hidden': (B, T, D), 'pooled': (B, D) or None, 'logits': (B, L) or
  None} of HF BertModel (or RobertaModel, cfg['model_type'] == 'roberta';
  logits of [Bert|Roberta]ForSequenceClassification when the state dict
  has 'classifier.*')."""
  p = prefix
  eps = cfg["layer_norm_eps"]
  act = ACT[cfg["hidden_act"]]
  ids = np.asarray(input_ids)
  b, t = ids.shape
  mask = (np.ones((b, t)) if attention_mask is None
          else np.asarray(attention_mask, np.float64))
  tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(
      token_type_ids)
  if cfg["model_type"] == "roberta":  # create_position_ids_from_input_ids
    pad = cfg["pad_token_id"]
    real = (ids != pad).astype(np.int64)
    pos = np.cumsum(real, axis=1) * real + pad
  else:
    pos = np.broadcast_to(np.arange(t), (b, t))
  e = p + "embeddings."
  x = (_w(sd, e + "word_embeddings.weight")[ids]
       + _w(sd, e + "token_type_embeddings.weight")[tt]
       + _w(sd, e + "position_embeddings.weight")[pos])
  x = layer_norm(sd, e + "LayerNorm", x, eps)
  for i in range(cfg["num_hidden_layers"]):
    l = f"{p}encoder.layer.{i}."
    a = attention(sd, l + "attention.self", x, cfg["num_attention_heads"],
                  mask)
    a = layer_norm(sd, l + "attention.output.LayerNorm",
                   linear(sd, l + "attention.output.dense", a) + x, eps)
    h = act(linear(sd, l + "intermediate.dense", a))
    x = layer_norm(sd, l + "output.LayerNorm",
                   linear(sd, l + "output.dense", h) + a, eps)
  pooled = logits = None
  if p + "pooler.dense.weight" in sd:
    pooled = np.tanh(linear(sd, p + "pooler.dense", x[:, 0]))
  if "classifier.weight" in sd:  # BertForSequenceClassification
    logits = linear(sd, "classifier", pooled)
  if "classifier.out_proj.weight" in sd:  # RobertaClassificationHead
    logits = linear(sd, "classifier.out_proj",
                    np.tanh(linear(sd, "classifier.dense", x[:, 0])))
  return {"hidden": x, "pooled": pooled, "logits": logits}


def mean_pool(hidden, attention_mask, normalize=False):
  """sentence-transformers Pooling(mean) [+ Normalize]."""
  m = np.asarray(attention_mask, np.float64)[..., None]
  x = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  if normalize:
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


def random_bert_state_dict(cfg, rng, prefix="", pooler=True, num_labels=0):
  """HF BertModel state dict (float32 numpy, PyTorch layouts), including the
  `embeddings.position_ids` buffer older transformers save; with num_labels
  that of [Bert|Roberta]ForSequenceClassification (pass the prefix, and
  pooler=False for RoBERTa)."""
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  sd = {}

  def lin(name, n_out, n_in, pre=prefix):
    sd[f"{pre}{name}.weight"] = rng.normal(0, 0.3, (n_out, n_in))
    sd[f"{pre}{name}.bias"] = rng.normal(0, 0.1, (n_out,))

  def ln(name):
    sd[f"{prefix}{name}.weight"] = 1 + rng.normal(0, 0.2, (d,))
    sd[f"{prefix}{name}.bias"] = rng.normal(0, 0.1, (d,))

  e = "embeddings."
  sd[f"{prefix}{e}word_embeddings.weight"] = rng.normal(
      0, 1, (cfg["vocab_size"], d))
  sd[f"{prefix}{e}position_embeddings.weight"] = rng.normal(
      0, 1, (cfg["max_position_embeddings"], d))
  sd[f"{prefix}{e}token_type_embeddings.weight"] = rng.normal(
      0, 1, (cfg["type_vocab_size"], d))
  ln(e + "LayerNorm")
  for i in range(cfg["num_hidden_layers"]):
    l = f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      lin(f"{l}attention.self.{n}", d, d)
    lin(l + "attention.output.dense", d, d)
    ln(l + "attention.output.LayerNorm")
    lin(l + "intermediate.dense", f, d)
    lin(l + "output.dense", d, f)
    ln(l + "output.LayerNorm")
  if pooler:
    lin("pooler.dense", d, d)
  if num_labels and cfg["model_type"] == "roberta":
    lin("classifier.dense", d, d, "")
    lin("classifier.out_proj", num_labels, d, "")
  elif num_labels:
    lin("classifier", num_labels, d, "")
  sd = {k: v.astype(np.float32) for k, v in sd.items()}
  sd[f"{prefix}{e}position_ids"] = np.arange(
      cfg["max_position_embeddings"], dtype=np.int64)[None]
  return sd


# --- ViT ---------------------------------------------------------------------

def _pair(v):
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def vit_forward(sd, cfg, pixels, prefix=""):
  """{'hidden': (B, 1 + N, D) final layernorm output, 'pooled', 'logits'}
  of HF ViTModel / ViTForImageClassification; pixels NCHW."""
  p = prefix
  eps = cfg["layer_norm_eps"]
  act = ACT[cfg["hidden_act"]]
  qkv_bias = cfg.get("qkv_bias", True)
  x = np.asarray(pixels, np.float64)
  b, c, h, w = x.shape
  ph, pw = _pair(cfg["patch_size"])
  gh, gw = h // ph, w // pw
  # the stride-p p x p convolution as a matmul over flattened patches
  patches = x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw)
  patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
  e = p + "embeddings."
  wconv = _w(sd, e + "patch_embeddings.projection.weight")
  z = patches @ wconv.reshape(wconv.shape[0], -1).T + _w(
      sd, e + "patch_embeddings.projection.bias")
  cls = np.broadcast_to(_w(sd, e + "cls_token"), (b, 1, z.shape[-1]))
  z = np.concatenate([cls, z], axis=1) + _w(sd, e + "position_embeddings")
  for i in range(cfg["num_hidden_layers"]):
    l = f"{p}encoder.layer.{i}."
    a = attention(sd, l + "attention.attention",
                  layer_norm(sd, l + "layernorm_before", z, eps),
                  cfg["num_attention_heads"], qkv_bias=qkv_bias)
    z = linear(sd, l + "attention.output.dense", a) + z
    hdn = act(linear(sd, l + "intermediate.dense",
                     layer_norm(sd, l + "layernorm_after", z, eps)))
    z = linear(sd, l + "output.dense", hdn) + z
  z = layer_norm(sd, p + "layernorm", z, eps)
  out = {"hidden": z, "pooled": None, "logits": None}
  if p + "pooler.dense.weight" in sd:
    out["pooled"] = ACT[cfg.get("pooler_act", "tanh")](
        linear(sd, p + "pooler.dense", z[:, 0]))
  if "classifier.weight" in sd:
    out["logits"] = linear(sd, "classifier", z[:, 0])
  return out


def random_vit_state_dict(cfg, rng, *, prefix="", pooler=True,
                          num_labels=0):
  """HF ViTModel (or, with num_labels, ViTForImageClassification: pass
  prefix='vit.', pooler=False) state dict, float32 numpy."""
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  c = cfg["num_channels"]
  (h, w), (ph, pw) = _pair(cfg["image_size"]), _pair(cfg["patch_size"])
  n = (h // ph) * (w // pw)
  qkv_bias = cfg.get("qkv_bias", True)
  sd = {}

  def lin(name, n_out, n_in, bias=True, pre=prefix):
    sd[f"{pre}{name}.weight"] = rng.normal(0, 0.3, (n_out, n_in))
    if bias:
      sd[f"{pre}{name}.bias"] = rng.normal(0, 0.1, (n_out,))

  def ln(name):
    sd[f"{prefix}{name}.weight"] = 1 + rng.normal(0, 0.2, (d,))
    sd[f"{prefix}{name}.bias"] = rng.normal(0, 0.1, (d,))

  e = prefix + "embeddings."
  sd[e + "cls_token"] = rng.normal(0, 1, (1, 1, d))
  sd[e + "position_embeddings"] = rng.normal(0, 1, (1, n + 1, d))
  sd[e + "patch_embeddings.projection.weight"] = rng.normal(
      0, 0.3, (d, c, ph, pw))
  sd[e + "patch_embeddings.projection.bias"] = rng.normal(0, 0.1, (d,))
  for i in range(cfg["num_hidden_layers"]):
    l = f"encoder.layer.{i}."
    for nm in ("query", "key", "value"):
      lin(f"{l}attention.attention.{nm}", d, d, qkv_bias)
    lin(l + "attention.output.dense", d, d)
    lin(l + "intermediate.dense", f, d)
    lin(l + "output.dense", d, f)
    ln(l + "layernorm_before")
    ln(l + "layernorm_after")
  ln("layernorm")
  if pooler:
    lin("pooler.dense", cfg.get("pooler_output_size") or d, d)
  if num_labels:
    lin("classifier", num_labels, d, pre="")
  return {k: v.astype(np.float32) for k, v in sd.items()}
