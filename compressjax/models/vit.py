"""Vision Transformer in flax.linen, faithful to Hugging Face's `ViTModel` /
`ViTForImageClassification` so converted HF weights give the same outputs.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (Sec. 3.1,
Eq. 1-4): z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos; pre-LN blocks
z' = MSA(LN(z)) + z, z = MLP(LN(z')) + z'; y = LN(z_L^0). The patch
projection E is a stride-p p x p convolution, as in HF.

Input layout: NCHW, `pixels` (B, num_channels, H, W) float, exactly HF's
`pixel_values` (what its image processors return), with (H, W) equal to
`image_size` (no position interpolation). The model transposes to NHWC once,
before the patch convolution (flax's layout).

    model = ViTModel(ViTConfig(..., num_labels=1000))
    variables = model.init(jax.random.key(0), pixels)
    logits = model.apply(variables, pixels)                 # (B, num_labels)
    feats = model.apply(variables, pixels, method="features")   # (B, 1+N, D)
    pooled = model.apply(variables, pixels, method="pooled")    # needs pooler

`__call__` returns the classifier's logits on the [CLS] token when
`num_labels > 0`, otherwise the features: the final LayerNorm's output
(B, 1 + N, D), HF's `last_hidden_state` (token 0 is [CLS], then the N
patches in row-major order).

Param paths mirror HF's names (`models.hf.mirror`):

  params/embeddings/cls_token                     (1, 1, D)
  params/embeddings/position_embeddings           (1, 1 + N, D)
  params/embeddings/patch_embeddings/projection/{kernel,bias}
                                                  kernel (p, p, C, D) conv
  params/encoder/layer_{i}/layernorm_before/{scale,bias}
  params/encoder/layer_{i}/attention/attention/{query,key,value}/{kernel,bias}
  params/encoder/layer_{i}/attention/output/dense/{kernel,bias}
  params/encoder/layer_{i}/layernorm_after/{scale,bias}
  params/encoder/layer_{i}/intermediate/dense/{kernel,bias}
  params/encoder/layer_{i}/output/dense/{kernel,bias}
  params/layernorm/{scale,bias}
  params/pooler/dense/{kernel,bias}               (config.pooler)
  params/classifier/{kernel,bias}                 (num_labels > 0)

`compressjax.core.rules.default_filter` selects every Dense kernel,
classifier included; it skips the patch convolution (its path holds
'embeddings'), cls_token and position_embeddings (compress the convolution
with an explicit rule; the runtime materializes a compressed conv kernel).

HF loading: family "vit" (model_type "vit"). ViTModel checkpoints
('embeddings...', with the pooler) and ViTForImageClassification ones
('vit.embeddings...', 'classifier.*', no pooler) load; the 'vit.' prefix is
optional for the base model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from compressjax.models import hf
from compressjax.models.bert import (BertIntermediate, BertPooler, attend,
                                     check_activation, check_positive,
                                     config_error, dense, layer_norm)


def _pair(v) -> tuple[int, int]:
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Field names are HF config.json keys (except `pooler`, `dtype`;
  `num_labels` is HF's len(id2label))."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: Any = 224  # int or (height, width)
  patch_size: Any = 16  # int or (height, width)
  num_channels: int = 3
  qkv_bias: bool = True
  initializer_range: float = 0.02
  pooler_output_size: int | None = None  # None: hidden_size
  pooler_act: str = "tanh"
  num_labels: int = 0  # > 0: the image-classification head
  pooler: bool = True  # HF add_pooling_layer (ViTModel's default)
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_positive(self, ("hidden_size", "num_hidden_layers",
                          "num_attention_heads", "intermediate_size",
                          "num_channels"))
    check_activation("hidden_act", self.hidden_act)
    check_activation("pooler_act", self.pooler_act)
    if self.hidden_size % self.num_attention_heads:
      raise config_error("num_attention_heads", self.num_attention_heads,
                         f"must divide hidden_size {self.hidden_size}")
    if not (isinstance(self.layer_norm_eps, (int, float))
            and self.layer_norm_eps > 0):
      raise config_error("layer_norm_eps", self.layer_norm_eps, "must be > 0")
    for k in ("image_size", "patch_size"):
      v = getattr(self, k)
      p = _pair(v)
      if len(p) != 2 or not all(isinstance(i, int) and not isinstance(
          i, bool) and i > 0 for i in p):
        raise config_error(k, v, "must be a positive integer or a (height, "
                           "width) pair of them")
    if any(i < p for i, p in zip(self.image_hw, self.patch_hw)):
      raise config_error("patch_size", self.patch_size,
                         f"is larger than image_size {self.image_size}")
    if (isinstance(self.num_labels, bool) or not isinstance(
        self.num_labels, int) or self.num_labels < 0):
      raise config_error("num_labels", self.num_labels,
                         "must be a non-negative integer")
    if self.pooler_output_size is None:  # HF's default
      object.__setattr__(self, "pooler_output_size", self.hidden_size)
    check_positive(self, ("pooler_output_size",))

  @property
  def image_hw(self) -> tuple[int, int]:
    return _pair(self.image_size)

  @property
  def patch_hw(self) -> tuple[int, int]:
    return _pair(self.patch_size)

  @property
  def num_patches(self) -> int:
    (h, w), (ph, pw) = self.image_hw, self.patch_hw
    return (h // ph) * (w // pw)


def nchw_to_nhwc(pixels):
  """HF pixel_values (B, C, H, W) -> flax's (B, H, W, C)."""
  return jnp.transpose(pixels, (0, 2, 3, 1))


class ViTPatchEmbeddings(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x_nhwc):
    c = self.config
    y = nn.Conv(c.hidden_size, c.patch_hw, strides=c.patch_hw,
                padding="VALID", dtype=c.dtype, name="projection",
                kernel_init=nn.initializers.truncated_normal(
                    c.initializer_range))(x_nhwc)
    return y.reshape(y.shape[0], -1, c.hidden_size)  # row-major patches


class ViTEmbeddings(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x_nhwc):
    c = self.config
    init = nn.initializers.truncated_normal(c.initializer_range)
    cls = self.param("cls_token", init, (1, 1, c.hidden_size))
    pos = self.param("position_embeddings", init,
                     (1, c.num_patches + 1, c.hidden_size))
    x = ViTPatchEmbeddings(c, name="patch_embeddings")(x_nhwc)
    cls = jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden_size))
    return (jnp.concatenate([cls.astype(x.dtype), x], axis=1)
            + pos).astype(c.dtype)


class ViTSelfAttention(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    q, k, v = (dense(c, c.hidden_size, n, c.qkv_bias)(x)
               for n in ("query", "key", "value"))
    return attend(q, k, v, c.num_attention_heads, None,
                  lambda p: self.sow("intermediates", "attn", p))


class ViTAttention(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return _Output(c, name="output")(ViTSelfAttention(c, name="attention")(x))


class _Output(nn.Module):
  """HF ViTSelfOutput / ViTOutput: one `dense` (the residual is the
  layer's)."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    return dense(self.config, self.config.hidden_size, "dense")(x)


class ViTLayer(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = ViTAttention(c, name="attention")(layer_norm(c, "layernorm_before")(
        x)) + x
    h = BertIntermediate(c, name="intermediate")(
        layer_norm(c, "layernorm_after")(x))
    x = _Output(c, name="output")(h) + x
    self.sow("intermediates", "hidden", x)
    return x


class ViTEncoder(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    for i in range(self.config.num_hidden_layers):
      x = ViTLayer(self.config, name=f"layer_{i}")(x)
    return x


class ViTModel(nn.Module):
  """HF ViTModel / ViTForImageClassification: pixels (B, C, H, W) -> logits
  (num_labels > 0) or features (see the module docstring)."""

  config: ViTConfig

  def setup(self):
    c = self.config
    self.embeddings = ViTEmbeddings(c)
    self.encoder = ViTEncoder(c)
    self.layernorm = layer_norm(c, None)
    self.pooler = (BertPooler(c, c.pooler_output_size, c.pooler_act)
                   if c.pooler else None)
    self.classifier = (dense(c, c.num_labels, None) if c.num_labels
                       else None)

  def features(self, pixels):
    """Final LayerNorm output (B, 1 + N, D): HF's last_hidden_state."""
    c = self.config
    pixels = jnp.asarray(pixels)
    want = (c.num_channels, *c.image_hw)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
      raise ValueError(
          f"pixels must be NCHW (batch, {want[0]}, {want[1]}, {want[2]}) "
          f"as HF's pixel_values, got shape {pixels.shape}; an NHWC batch "
          f"x goes in as x.transpose(0, 3, 1, 2)")
    x = self.embeddings(nchw_to_nhwc(pixels.astype(c.dtype)))
    return self.layernorm(self.encoder(x))

  def pooled(self, pixels):
    """HF pooler_output: pooler_act(dense(features[:, 0]))."""
    if self.pooler is None:
      raise ValueError("this ViTConfig has pooler=False (no pooler.dense)")
    return self.pooler(self.features(pixels))

  def __call__(self, pixels):
    f = self.features(pixels)
    if self.is_initializing() and self.pooler is not None:
      self.pooler(f)  # create its params in init
    if self.classifier is None:
      return f
    return self.classifier(f[:, 0])


def scale_groups(config: ViTConfig, prefix: str = "params/"):
  """AWQ / SmoothQuant scale groups (`compressjax.quantization.ScaleGroup`).

  Pre-LN: per layer layernorm_before -> query, key, value (fold into it; its
  output feeds only the attention); value -> attention output dense (fold
  into value's kernel columns and bias: attention mixes tokens, not
  channels); layernorm_after -> intermediate (fold); output dense after the
  activation: explicit. The pooler and classifier read the final layernorm,
  whose output is also the model's `features`: explicit (one s for both),
  so every output stays exact. `prefix`: the params collection's path."""
  from compressjax.quantization.scaling import ScaleGroup  # no import cycle

  def norm(n):
    return (f"{n}/scale", f"{n}/bias")

  groups = []
  for i in range(config.num_hidden_layers):
    b = f"{prefix}encoder/layer_{i}/"
    att = f"{b}attention/attention/"
    value = (f"{att}value/kernel",) + ((f"{att}value/bias",)
                                       if config.qkv_bias else ())
    groups += [
        ScaleGroup(tuple(f"{att}{n}/kernel" for n in ("query", "key",
                                                        "value")), "norm",
                   norm(f"{b}layernorm_before")),
        ScaleGroup((f"{b}attention/output/dense/kernel",), "linear", value),
        ScaleGroup((f"{b}intermediate/dense/kernel",), "norm",
                   norm(f"{b}layernorm_after")),
        ScaleGroup((f"{b}output/dense/kernel",)),
    ]
  head = ((f"{prefix}pooler/dense/kernel",) if config.pooler else ()) + (
      (f"{prefix}classifier/kernel",) if config.num_labels else ())
  if head:
    groups.append(ScaleGroup(head))
  return tuple(groups)


# --- Hugging Face tensor table ---------------------------------------------

def tensors(config: ViTConfig) -> tuple[hf.TensorSpec, ...]:
  """Every tensor of HF ViTModel, or of ViTForImageClassification (base
  names with the 'vit.' prefix, then 'classifier.*') when num_labels > 0."""
  p = "vit." if config.num_labels else ""
  e = "embeddings."
  specs = [hf.TensorSpec(f"{p}{e}{n}", f"params/embeddings/{n}")
           for n in ("cls_token", "position_embeddings")]
  conv = f"{e}patch_embeddings.projection"
  specs += hf.module(conv, "conv2d", hf_prefix=p)
  for i in range(config.num_hidden_layers):
    b = f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      specs += hf.module(f"{b}attention.attention.{n}", "linear", config.qkv_bias, hf_prefix=p)
    specs += hf.module(f"{b}attention.output.dense", "linear", hf_prefix=p)
    specs += hf.module(f"{b}intermediate.dense", "linear", hf_prefix=p)
    specs += hf.module(f"{b}output.dense", "linear", hf_prefix=p)
    specs += hf.module(f"{b}layernorm_before", "norm", hf_prefix=p)
    specs += hf.module(f"{b}layernorm_after", "norm", hf_prefix=p)
  specs += hf.module("layernorm", "norm", hf_prefix=p)
  if config.pooler:
    specs += hf.module("pooler.dense", "linear", hf_prefix=p)
  if config.num_labels:
    specs += hf.module("classifier", "linear")
  return tuple(specs)


_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "layer_norm_eps",
            "image_size", "patch_size", "num_channels", "qkv_bias",
            "initializer_range", "pooler_output_size", "pooler_act")
_CLASSIFIER = "ViTForImageClassification"


def config_from_hf(d: Mapping[str, Any]) -> ViTConfig:
  """ViTConfig from a config.json dict; unsupported values raise
  CompressionError naming the key."""
  mt = d.get("model_type", "vit")
  if mt != "vit":
    raise config_error("model_type", mt, "this family loads 'vit'")
  archs = list(d.get("architectures") or [])
  unknown = [a for a in archs if a not in ("ViTModel", _CLASSIFIER)]
  if unknown:
    raise config_error("architectures", archs,
                       "only ViTModel and ViTForImageClassification are "
                       "implemented (the masked-image-modeling decoder is "
                       "not)")
  num_labels = 0
  if _CLASSIFIER in archs:
    labels = d.get("id2label")
    num_labels = (len(labels) if labels else d.get("num_labels", 2))
    if num_labels == 0:
      raise config_error("num_labels", 0, "an identity classifier; load the "
                         "checkpoint as ViTModel (architectures ['ViTModel'])")
  pooler = d.get("add_pooling_layer", not num_labels)
  kw = {k: d[k] for k in _HF_KEYS if k in d}
  if isinstance(kw.get("image_size"), list):
    kw["image_size"] = tuple(kw["image_size"])
  if isinstance(kw.get("patch_size"), list):
    kw["patch_size"] = tuple(kw["patch_size"])
  return ViTConfig(num_labels=num_labels, pooler=bool(pooler), **kw)


def config_to_hf(config: ViTConfig) -> dict:
  """A config.json HF transformers reads back as the same model."""
  out = {"model_type": "vit",
         "architectures": [_CLASSIFIER if config.num_labels else "ViTModel"]}
  for k in _HF_KEYS:
    v = getattr(config, k)
    out[k] = list(v) if isinstance(v, tuple) else v
  if config.num_labels:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  if config.pooler == bool(config.num_labels):  # not the class's default
    out["add_pooling_layer"] = config.pooler
  return out


def example_args(config: ViTConfig) -> tuple:
  return (jnp.zeros((1, config.num_channels, *config.image_hw), jnp.float32),)


VIT = hf.register(hf.Family(
    name="vit", model_types=("vit",), config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=ViTModel, example_args=example_args,
    tensors=tensors, optional_prefix="vit."))
