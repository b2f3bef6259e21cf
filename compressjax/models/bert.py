"""BERT-style encoders (BERT, RoBERTa) in flax.linen, faithful to Hugging
Face's `BertModel` / `RobertaModel` so converted HF weights give the same
outputs.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers
for Language Understanding" (Sec. 3, Fig. 2: input = token + segment +
position embeddings); Vaswani et al. 2017, Sec. 3.2.1 (scaled dot-product
attention, Eq. 1); post-LayerNorm blocks, x = LN(x + Sublayer(x)) (Sec. 3.1).
RoBERTa (Liu et al. 2019) is the same network; HF numbers its positions from
pad_token_id + 1 and skips padding (`position_ids` below).

Calling conventions (input_ids, attention_mask, token_type_ids: (B, T) int;
attention_mask 1 = real token, 0 = padding; None = all real, all type 0):

    model = BertModel(BertConfig(...))
    variables = model.init(jax.random.key(0), input_ids)
    hidden = model.apply(variables, input_ids, attention_mask, token_type_ids)
    pooled = model.apply(variables, input_ids, attention_mask,
                         method="pooled")                  # (B, D), tanh
    emb = model.apply(variables, input_ids, attention_mask,
                      method="sentence_embedding")          # (B, D) mean pool
    emb = mean_pool(hidden, attention_mask, normalize=True)  # same, L2 norm
    logits = model.apply(variables, input_ids, attention_mask,
                         method="logits")     # (B, num_labels), num_labels > 0

`hidden` is the last layer's output (B, T, D), HF's `last_hidden_state`
(padding positions hold values too, as in HF; `mean_pool` skips them).
`sentence_embedding` is the sentence-transformers mean over real tokens.

Param paths mirror HF's names: module path with '.'-list indices joined as
`layer_0`; nn.Linear weight -> Dense `kernel` (in, out); LayerNorm
weight/bias -> `scale`/`bias`; Embedding weight -> `embedding`:

  params/embeddings/{word,position,token_type}_embeddings/embedding
  params/embeddings/LayerNorm/{scale,bias}
  params/encoder/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
  params/encoder/layer_{i}/attention/output/dense/{kernel,bias}
  params/encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
  params/encoder/layer_{i}/intermediate/dense/{kernel,bias}
  params/encoder/layer_{i}/output/dense/{kernel,bias}
  params/encoder/layer_{i}/output/LayerNorm/{scale,bias}
  params/pooler/dense/{kernel,bias}                 (config.pooler)
  params/classifier/{kernel,bias}                   (BERT, num_labels > 0)
  params/classifier/{dense,out_proj}/{kernel,bias}  (RoBERTa, num_labels > 0)

HF loading (`compressjax.models.hf`): families "bert" (model_type "bert";
checkpoints as BertModel, 'embeddings...', or with the 'bert.' prefix of
BertFor* models) and "roberta" (model_type "roberta", prefix 'roberta.').
Heads: the sequence-classification one (architectures
[Bert|Roberta]ForSequenceClassification: `num_labels` > 0; BERT: a Linear on
the pooled output; RoBERTa: dense, tanh, out_proj on the <s> token, no
pooler). Other heads (cls.* of MaskedLM / PreTraining, lm_head.*,
qa_outputs.*, a token classifier) are not implemented: such a checkpoint is
refused naming its head tensors. With `mutable=["intermediates"]` the apply
also returns each layer's output and attention probabilities.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax.core.errors import CompressionError
from compressjax.models import hf

# HF ACT2FN names this zoo implements exactly ("gelu" is erf GELU;
# "gelu_new" / "gelu_pytorch_tanh" the tanh approximation).
ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

MODEL_TYPES = ("bert", "roberta")


def config_error(key: str, value: Any, why: str) -> CompressionError:
  """CompressionError naming the config.json key and its bad value."""
  return CompressionError(f"config key {key!r} = {value!r}: {why}")


def check_positive(config: Any, keys) -> None:
  for k in keys:
    v = getattr(config, k)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise config_error(k, v, "must be a positive integer")


def check_activation(key: str, value: Any) -> None:
  if not isinstance(value, str) or value not in ACTIVATIONS:
    raise config_error(key, value, f"unsupported activation; supported: "
                       f"{', '.join(sorted(ACTIVATIONS))}")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Field names are HF config.json keys (except `pooler`, `dtype`;
  `num_labels` is HF's len(id2label))."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  initializer_range: float = 0.02
  # "bert": positions 0..T-1; "roberta": HF's RoBERTa numbering (from
  # pad_token_id + 1 over real tokens; padding gets pad_token_id).
  model_type: str = "bert"
  pooler: bool = True  # HF add_pooling_layer (BertModel's default)
  num_labels: int = 0  # > 0: the sequence-classification head
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_positive(self, ("vocab_size", "hidden_size", "num_hidden_layers",
                          "num_attention_heads", "intermediate_size",
                          "max_position_embeddings", "type_vocab_size"))
    check_activation("hidden_act", self.hidden_act)
    if self.hidden_size % self.num_attention_heads:
      raise config_error("num_attention_heads", self.num_attention_heads,
                         f"must divide hidden_size {self.hidden_size}")
    if not (isinstance(self.layer_norm_eps, (int, float))
            and self.layer_norm_eps > 0):
      raise config_error("layer_norm_eps", self.layer_norm_eps, "must be > 0")
    if self.model_type not in MODEL_TYPES:
      raise config_error("model_type", self.model_type,
                         f"must be one of {MODEL_TYPES}")
    if not isinstance(self.pad_token_id, int) or not (
        0 <= self.pad_token_id < self.vocab_size):
      raise config_error("pad_token_id", self.pad_token_id, "must be a "
                         f"token id below vocab_size {self.vocab_size}")
    if max_length(self) < 1:
      raise config_error("max_position_embeddings",
                         self.max_position_embeddings, "RoBERTa positions "
                         "start at pad_token_id + 1: no room for a token")
    if (isinstance(self.num_labels, bool) or not isinstance(
        self.num_labels, int) or self.num_labels < 0):
      raise config_error("num_labels", self.num_labels,
                         "must be a non-negative integer")
    if self.num_labels and self.model_type == "bert" and not self.pooler:
      raise config_error("add_pooling_layer", False, "BERT's classifier "
                         "reads the pooled output; it needs the pooler")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def position_ids(config: BertConfig, input_ids):
  """(B, T) position indices as HF computes them for `config.model_type`."""
  t = input_ids.shape[-1]
  if config.model_type == "roberta":
    real = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(t), input_ids.shape)


def max_length(config: BertConfig) -> int:
  """Longest input the position table covers."""
  if config.model_type == "roberta":
    return config.max_position_embeddings - config.pad_token_id - 1
  return config.max_position_embeddings


def layer_norm(config, name: str) -> nn.LayerNorm:
  # two-pass variance, as torch.nn.LayerNorm computes it
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                      use_fast_variance=False, name=name)


def dense(config, features: int, name: str, use_bias: bool = True
          ) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=config.dtype, name=name,
                  kernel_init=nn.initializers.normal(
                      stddev=config.initializer_range))


def attend(q, k, v, num_heads: int, mask=None, sow: Callable | None = None):
  """Multi-head scaled dot-product attention (Vaswani et al. 2017, Eq. 1).

  q, k, v: (B, T, D) projections; mask: (B, T) keys to attend (1) or skip
  (0), or None. Masked scores get the dtype's minimum, as HF's additive
  mask does (a row with no real key then attends uniformly, as in HF).
  """
  b, t, d = q.shape
  hd = d // num_heads
  split = lambda y: y.reshape(b, t, num_heads, hd)  # noqa: E731
  scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k))
  scores = scores / jnp.asarray(math.sqrt(hd), scores.dtype)
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :] > 0, scores,
                       jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if sow is not None:
    sow(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, split(v)).reshape(b, t, d)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    init = nn.initializers.normal(stddev=c.initializer_range)
    embed = lambda n, name: nn.Embed(  # noqa: E731
        n, c.hidden_size, embedding_init=init, name=name)
    x = embed(c.vocab_size, "word_embeddings")(input_ids)
    # HF's order of the sums (word + type, then + position)
    x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = x + embed(c.max_position_embeddings, "position_embeddings")(
        position_ids(c, input_ids))
    return layer_norm(c, "LayerNorm")(x.astype(c.dtype))


class BertSelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    # Separate 2-D Dense projections: one matrix each to the compressors.
    q, k, v = (dense(c, c.hidden_size, n)(x) for n in ("query", "key",
                                                         "value"))
    # No-op unless applied with mutable=["intermediates"].
    return attend(q, k, v, c.num_attention_heads, mask,
                  lambda p: self.sow("intermediates", "attn", p))


class BertSelfOutput(nn.Module):
  """dense, then LayerNorm(. + residual): the post-LN step."""

  config: BertConfig

  @nn.compact
  def __call__(self, h, residual):
    c = self.config
    return layer_norm(c, "LayerNorm")(dense(c, c.hidden_size, "dense")(h)
                                      + residual)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    y = BertSelfAttention(self.config, name="self")(x, mask)
    return BertSelfOutput(self.config, name="output")(y, x)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return ACTIVATIONS[c.hidden_act](
        dense(c, c.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    a = BertAttention(self.config, name="attention")(x, mask)
    h = BertIntermediate(self.config, name="intermediate")(a)
    out = BertSelfOutput(self.config, name="output")(h, a)
    self.sow("intermediates", "hidden", out)
    return out


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, mask)
    return x


class BertPooler(nn.Module):
  """tanh(dense(h[:, 0])): the first ([CLS]) token's pooled output."""

  config: Any  # BertConfig or vit.ViTConfig (same field names)
  features: int | None = None
  activation: str = "tanh"

  @nn.compact
  def __call__(self, hidden):
    c = self.config
    y = dense(c, self.features or c.hidden_size, "dense")(hidden[:, 0])
    return ACTIVATIONS[self.activation](y)


def mean_pool(hidden, attention_mask=None, normalize: bool = False):
  """Sentence-transformers mean pooling: the mean of `hidden` (B, T, D) over
  the real tokens of `attention_mask` (B, T) (None: all), optionally
  L2-normalized (torch F.normalize: x / max(|x|, 1e-12))."""
  if attention_mask is None:
    attention_mask = jnp.ones(hidden.shape[:2], hidden.dtype)
  m = attention_mask.astype(hidden.dtype)[..., None]
  x = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  if normalize:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


class RobertaClassificationHead(nn.Module):
  """out_proj(tanh(dense(h[:, 0]))) (HF RobertaClassificationHead)."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden):
    c = self.config
    x = jnp.tanh(dense(c, c.hidden_size, "dense")(hidden[:, 0]))
    return dense(c, c.num_labels, "out_proj")(x)


class BertModel(nn.Module):
  """HF BertModel / RobertaModel: ids (B, T) -> last hidden states (B, T, D)
  (methods `pooled`, `sentence_embedding`, `logits`; see the module
  docstring)."""

  config: BertConfig

  def setup(self):
    c = self.config
    self.embeddings = BertEmbeddings(c)
    self.encoder = BertEncoder(c)
    self.pooler = BertPooler(c) if c.pooler else None
    self.classifier = None
    if c.num_labels:
      self.classifier = (RobertaClassificationHead(c)
                         if c.model_type == "roberta"
                         else dense(c, c.num_labels, None))

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    c = self.config
    input_ids = jnp.asarray(input_ids).astype(jnp.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape "
                       f"{input_ids.shape}")
    if input_ids.shape[1] > max_length(c):
      raise ValueError(
          f"sequence length {input_ids.shape[1]} exceeds the "
          f"{max_length(c)} positions of max_position_embeddings "
          f"{c.max_position_embeddings} ({c.model_type})")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
    x = self.embeddings(input_ids, jnp.asarray(token_type_ids, jnp.int32))
    x = self.encoder(x, attention_mask)
    if self.is_initializing():  # create the heads' params in init
      if self.pooler is not None:
        self.pooler(x)
      if self.classifier is not None:
        self._head(x)
    return x

  def _head(self, hidden):
    if self.config.model_type == "roberta":
      return self.classifier(hidden)
    return self.classifier(self.pooler(hidden))

  def logits(self, input_ids, attention_mask=None, token_type_ids=None):
    """[Bert|Roberta]ForSequenceClassification logits, (B, num_labels)."""
    if self.classifier is None:
      raise ValueError("this BertConfig has num_labels=0 (no "
                       "sequence-classification head)")
    return self._head(self(input_ids, attention_mask, token_type_ids))

  def pooled(self, input_ids, attention_mask=None, token_type_ids=None):
    """HF pooler_output: tanh(dense(hidden[:, 0])), (B, D)."""
    if self.pooler is None:
      raise ValueError("this BertConfig has pooler=False (a checkpoint "
                       "without pooler.dense); use sentence_embedding or "
                       "the hidden states")
    return self.pooler(self(input_ids, attention_mask, token_type_ids))

  def sentence_embedding(self, input_ids, attention_mask=None,
                         token_type_ids=None, normalize: bool = False):
    """Mean of the last hidden states over real tokens, (B, D)."""
    hidden = self(input_ids, attention_mask, token_type_ids)
    return mean_pool(hidden, attention_mask, normalize)


def scale_groups(config: BertConfig, prefix: str = "params/"):
  """AWQ / SmoothQuant scale groups (`compressjax.quantization.ScaleGroup`).

  Post-LN means every LayerNorm's output is both the next sublayer's input
  and the residual added before the following LayerNorm (LN(dense(.) + x)),
  so 1/s folded into a LayerNorm would also scale that residual: no
  LayerNorm is a producer here. Per layer: query, key, value share the
  layer input (explicit scale, one s for the three); value -> attention
  output dense folds into value's kernel columns and bias (attention mixes
  tokens, not channels; heads are a reshape); intermediate (reads the
  attention block's LayerNorm, which is also the residual) and output dense
  (reads the activation) are explicit. The pooler reads the model's output
  hidden states: explicit; so is the classifier (BERT: reads the tanh pooled
  output; RoBERTa: dense reads the hidden states, out_proj a tanh).
  `prefix`: the params collection's path."""
  from compressjax.quantization.scaling import ScaleGroup  # no import cycle

  groups = []
  for i in range(config.num_hidden_layers):
    b = f"{prefix}encoder/layer_{i}/"
    att = f"{b}attention/self/"
    groups += [
        ScaleGroup(tuple(f"{att}{n}/kernel" for n in ("query", "key",
                                                        "value"))),
        ScaleGroup((f"{b}attention/output/dense/kernel",), "linear",
                   (f"{att}value/kernel", f"{att}value/bias")),
        ScaleGroup((f"{b}intermediate/dense/kernel",)),
        ScaleGroup((f"{b}output/dense/kernel",)),
    ]
  if config.pooler:
    groups.append(ScaleGroup((f"{prefix}pooler/dense/kernel",)))
  if config.num_labels and config.model_type == "roberta":
    groups += [ScaleGroup((f"{prefix}classifier/{n}/kernel",))
               for n in ("dense", "out_proj")]
  elif config.num_labels:
    groups.append(ScaleGroup((f"{prefix}classifier/kernel",)))
  return tuple(groups)


# --- Hugging Face tensor table ---------------------------------------------

def tensors(config: BertConfig) -> tuple[hf.TensorSpec, ...]:
  """Every tensor of HF BertModel / RobertaModel, in state-dict order (names
  without the 'bert.' / 'roberta.' prefix, as the bare models save them;
  `Family.optional_prefix` accepts the prefixed spelling), or, with
  num_labels > 0, of [Bert|Roberta]ForSequenceClassification (prefixed base
  names, then 'classifier.*')."""
  p = f"{config.model_type}." if config.num_labels else ""
  specs = [hf.mirror(f"embeddings.{n}_embeddings.weight", "embedding",
                     hf_prefix=p)
           for n in ("word", "position", "token_type")]
  specs += hf.module("embeddings.LayerNorm", "norm", hf_prefix=p)
  for i in range(config.num_hidden_layers):
    b = f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      specs += hf.module(f"{b}attention.self.{n}", "linear", hf_prefix=p)
    specs += hf.module(f"{b}attention.output.dense", "linear", hf_prefix=p)
    specs += hf.module(f"{b}attention.output.LayerNorm", "norm", hf_prefix=p)
    specs += hf.module(f"{b}intermediate.dense", "linear", hf_prefix=p)
    specs += hf.module(f"{b}output.dense", "linear", hf_prefix=p)
    specs += hf.module(f"{b}output.LayerNorm", "norm", hf_prefix=p)
  if config.pooler:
    specs += hf.module("pooler.dense", "linear", hf_prefix=p)
  if config.num_labels and config.model_type == "roberta":
    specs += hf.module("classifier.dense", "linear") + hf.module("classifier.out_proj", "linear")
  elif config.num_labels:
    specs += hf.module("classifier", "linear")
  return tuple(specs)


# HF BertFor*/RobertaFor* classes built without the pooler
# (add_pooling_layer=False); every other architecture has it.
_NO_POOLER = re.compile(r".*For(MaskedLM|TokenClassification|"
                        r"QuestionAnswering|CausalLM)$|.*LMHeadModel$|"
                        r"RobertaForSequenceClassification")
_CLASSIFIER = {"bert": "BertForSequenceClassification",
               "roberta": "RobertaForSequenceClassification"}
_BARE = {"bert": "BertModel", "roberta": "RobertaModel"}

# config.json keys whose other values change the network; value: the only
# one this zoo implements
_REQUIRED = {"position_embedding_type": "absolute", "is_decoder": False,
             "add_cross_attention": False}

_DEFAULTS = {  # HF BertConfig / RobertaConfig defaults for absent keys
    "bert": dict(vocab_size=30522, pad_token_id=0),
    "roberta": dict(vocab_size=50265, pad_token_id=1),
}


def config_from_hf(d: Mapping[str, Any], model_type: str = "bert"
                   ) -> BertConfig:
  """BertConfig from a config.json dict of `model_type` ('bert' or
  'roberta'); unsupported values raise CompressionError naming the key."""
  mt = d.get("model_type", model_type)
  if mt != model_type:
    raise config_error("model_type", mt, f"this family loads {model_type!r}")
  for k, want in _REQUIRED.items():
    if k in d and d[k] is not None and d[k] != want:
      raise config_error(k, d[k], f"only {want!r} is implemented")
  archs = list(d.get("architectures") or [])
  pooler = d.get("add_pooling_layer",
                 not any(_NO_POOLER.fullmatch(a) for a in archs))
  num_labels = 0
  if _CLASSIFIER[mt] in archs:
    labels = d.get("id2label")
    num_labels = len(labels) if labels else d.get("num_labels", 2)
    if num_labels == 0:
      raise config_error("num_labels", 0, "a classifier with no outputs")
  names = {f.name for f in dataclasses.fields(BertConfig)} - {
      "model_type", "pooler", "dtype", "num_labels"}
  kw = {**_DEFAULTS[mt], **{k: d[k] for k in names if k in d}}
  if kw["pad_token_id"] is None and mt == "bert":
    kw["pad_token_id"] = 0  # only RoBERTa's positions read it
  return BertConfig(model_type=mt, pooler=bool(pooler),
                    num_labels=num_labels, **kw)


def config_to_hf(config: BertConfig) -> dict:
  """A config.json HF transformers reads back as the same model."""
  mt = config.model_type
  arch = _CLASSIFIER[mt] if config.num_labels else _BARE[mt]
  out = {"model_type": mt, "architectures": [arch]}
  for f in dataclasses.fields(config):
    if f.name not in ("model_type", "pooler", "dtype", "num_labels"):
      out[f.name] = getattr(config, f.name)
  out.update(_REQUIRED)
  if config.num_labels:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  if config.pooler == bool(_NO_POOLER.fullmatch(arch)):
    # not the class's default: compressjax's key (HF builds the default)
    out["add_pooling_layer"] = config.pooler
  return out


def example_args(config: BertConfig) -> tuple:
  return (jnp.zeros((1, min(8, max_length(config))), jnp.int32),)


def _family(name: str) -> hf.Family:
  p = re.escape(name)
  return hf.Family(
      name=name, model_types=(name,),
      config_from_hf=lambda d: config_from_hf(d, name),
      config_to_hf=config_to_hf, build=BertModel, example_args=example_args,
      tensors=tensors,
      # buffers: position_ids (persistent in older transformers), the
      # all-zero token_type_ids (non-persistent, listed for old saves)
      ignored=(rf"({p}\.)?embeddings\.position_ids",
               rf"({p}\.)?embeddings\.token_type_ids"),
      optional_prefix=f"{name}.")


BERT = hf.register(_family("bert"))
ROBERTA = hf.register(_family("roberta"))
