"""A small decoder-only byte-level transformer language model (flax.linen).

Pre-LayerNorm GPT-style blocks. Every matmul weight is a 2-D `nn.Dense`
kernel of shape (in_features, out_features), so each compression method
(groups along in_features, N:M runs, SVD) sees ordinary matrices. Param paths:

  params/embed/embedding            (256, d_model)      token embedding
  params/pos_embed/embedding        (seq_len, d_model)  learned positions
  params/block_{i}/ln_1/{scale,bias}   (norm="rms": scale only)
  params/block_{i}/attn/{query,key,value,out}/{kernel,bias}
  params/block_{i}/ln_2/{scale,bias}
  params/block_{i}/mlp/{fc1,fc2}/{kernel,bias}
  params/ln_f/{scale,bias}
  params/head/{kernel,bias}         (d_model, 256)      untied output head

With `mutable=["intermediates"]` the apply also returns each block's output
(intermediates/block_{i}/hidden, (B, T, d_model)) and attention probabilities
(intermediates/block_{i}/attn/attn, (B, n_heads, T, T); attention="xla"
only, the Pallas kernel never forms them); otherwise the sows are no-ops (see
`compressjax.train.distill.intermediates`).

    model = TransformerLM(TransformerConfig())
    variables = model.init(jax.random.key(0), tokens)   # tokens (B, T) int
    logits = model.apply(variables, tokens)             # (B, T, 256)

KV cache (the decoders' calling convention, models.llama):

    cache = model.init_cache(batch, capacity, store=spec)   # compressjax.kv
    logits, cache = model.apply(variables, tokens, positions=pos,
                                attention_mask=mask, cache=cache)

With a cache (or positions / attention_mask) attention runs through
`kv.attention`, masked by token positions, and the position table is indexed
by each token's position (each row counts its real tokens from 0 by
default); the capacity is at most `seq_len`, the size of that table. Without
them the forward is the original one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax import kv
from compressjax.core.base import is_concrete
from compressjax.core.errors import CompressionError


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  d_mlp: int = 512
  seq_len: int = 128  # maximum context (size of the position table)
  dtype: Any = jnp.float32
  # "layer" (nn.LayerNorm: mean, variance, scale, bias) or "rms" (nn.RMSNorm:
  # scale only). RMSNorm commutes with orthogonal maps of the residual stream,
  # which QuaRot's folded residual rotation needs (see rotation_plan).
  norm: str = "layer"
  # "xla": einsum + softmax; "pallas": the block-sparse flash-attention
  # kernel (pallas_kernels.attention; interpret mode on CPU, slow there),
  # which skips the blocks the mask empties.
  attention: str = "xla"
  window: int | None = None  # sliding-window attention: last `window` keys
  attention_block: int = 128

  def __post_init__(self):
    if self.norm not in ("layer", "rms"):
      raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")
    if self.attention not in ("xla", "pallas"):
      raise ValueError(f"attention must be 'xla' or 'pallas', got "
                       f"{self.attention!r}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be a positive number of keys, got "
                       f"{self.window}")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} is not divisible by n_heads "
                       f"{self.n_heads}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TransformerConfig":
    """From a config mapping; keys that are not fields are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in names})


def _norm(config: TransformerConfig, name: str) -> nn.Module:
  return (nn.RMSNorm(name=name) if config.norm == "rms"
          else nn.LayerNorm(name=name))


def _dense(features: int, name: str, std: float = 0.02) -> nn.Dense:
  return nn.Dense(features, name=name,
                  kernel_init=nn.initializers.normal(stddev=std))


def attention_mask(config: TransformerConfig, t: int):
  """Causal, or causal sliding window of `config.window` keys (a mask of the
  kernels' algebra, so both attention paths use one definition)."""
  from pallas_kernels.attention import mask as masks
  m = masks.CausalMask((t, t))
  if config.window is not None:
    m = m & masks.LocalMask((t, t), config.window - 1, 0)
  return m


def _flash(q, k, v, mask, block: int):
  """(B, T, H, D) -> (B, T, H, D) through the block-sparse kernel."""
  from pallas_kernels.attention import block_sparse_attention
  sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
  t = q.shape[1]
  blk = min(block, -(-t // 8) * 8)
  return sw(block_sparse_attention(sw(q), sw(k), sw(v), mask, block_q=blk,
                                   block_kv=blk))


class CausalSelfAttention(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions=None, cache=None):
    """positions (B, T) with NO_POSITION on padding, or None (causal over
    the T tokens); cache a `kv` store or None. Returns (out, cache)."""
    c = self.config
    b, t, d = x.shape
    hd = d // c.n_heads
    # Separate 2-D Dense projections (not a fused or 3-D DenseGeneral kernel)
    # so each is one matrix to the compression methods and the runtime.
    split = lambda y: y.reshape(b, t, c.n_heads, hd)
    q = split(_dense(d, "query")(x))
    k = split(_dense(d, "key")(x))
    v = split(_dense(d, "value")(x))
    if positions is not None:
      y, cache = kv.attention(q, k, v, positions, cache=cache,
                              scale=hd ** -0.5, window=c.window)
    elif c.attention == "pallas":
      y = _flash(q, k, v, attention_mask(c, t), c.attention_block)
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(
          x.dtype)
      allowed = jnp.asarray(attention_mask(c, t).to_dense())
      logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
      attn = jax.nn.softmax(logits, axis=-1)
      # No-op unless applied with mutable=["intermediates"] (and init denies
      # that collection by default): distillation reads it (train.distill).
      self.sow("intermediates", "attn", attn)
      y = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    # GPT-2 style: scale residual-branch outputs down with depth.
    return _dense(d, "out", 0.02 / (2 * c.n_layers) ** 0.5)(
        y.reshape(b, t, d)), cache


class MLP(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = nn.gelu(_dense(c.d_mlp, "fc1")(x))
    return _dense(c.d_model, "fc2", 0.02 / (2 * c.n_layers) ** 0.5)(h)


class Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions=None, cache=None):
    a, cache = CausalSelfAttention(self.config, name="attn")(
        _norm(self.config, "ln_1")(x), positions, cache)
    x = x + a
    x = x + MLP(self.config, name="mlp")(_norm(self.config, "ln_2")(x))
    self.sow("intermediates", "hidden", x)  # residual stream; see attn's sow
    return x, cache


class TransformerLM(nn.Module):
  """Byte-level decoder-only LM: int tokens (B, T) -> logits (B, T, 256)."""

  config: TransformerConfig

  def init_cache(self, batch: int, capacity: int, dtype: Any = jnp.float32,
                 store: Any = kv.DenseKV) -> tuple:
    """An empty KV cache: one `store` per block, `capacity` tokens each (at
    most seq_len: positions index the learned position table)."""
    c = self.config
    if capacity > c.seq_len:
      raise CompressionError(
          f"KV cache capacity {capacity} exceeds the model's seq_len "
          f"{c.seq_len} (its learned position table); use capacity <= "
          f"{c.seq_len}")
    return kv.init_cache(c.n_layers, batch, capacity, c.n_heads,
                         c.d_model // c.n_heads, dtype, store)

  @nn.compact
  def __call__(self, tokens, positions=None, attention_mask=None,
               cache=None):
    c = self.config
    t = tokens.shape[-1]
    if cache is None and t > c.seq_len:
      raise ValueError(f"sequence length {t} exceeds the model's seq_len "
                       f"{c.seq_len}")
    kv.check_cache(cache, c.n_layers)
    init = nn.initializers.normal(stddev=0.02)
    x = nn.Embed(c.vocab_size, c.d_model, embedding_init=init,
                 name="embed")(tokens.astype(jnp.int32))
    table = nn.Embed(c.seq_len, c.d_model, embedding_init=init,
                     name="pos_embed")
    keyed = cache is not None or positions is not None or \
        attention_mask is not None
    tok_pos = None
    if keyed:
      index, tok_pos = kv.token_positions(
          tokens.shape, positions, attention_mask,
          None if cache is None else cache[0])
      if is_concrete(index) and int(jnp.max(index)) >= c.seq_len:
        raise CompressionError(
            f"position {int(jnp.max(index))} is past the model's seq_len "
            f"{c.seq_len} (its learned position table)")
      pos = table(index)
    else:
      pos = table(jnp.arange(t))
    x = (x + pos).astype(c.dtype)
    out = []
    for i in range(c.n_layers):
      x, ci = Block(c, name=f"block_{i}")(
          x, tok_pos, None if cache is None else cache[i])
      out.append(ci)
    x = _norm(c, "ln_f")(x)
    logits = _dense(c.vocab_size, "head")(x)
    return logits if cache is None else (logits, tuple(out))


def next_token_loss(logits, targets):
  """Per-token cross entropy in float32, shape targets.shape."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32),
                              axis=-1)[..., 0]


def scale_groups(config: TransformerConfig, prefix: str = "params/"):
  """AWQ / SmoothQuant scale groups (`compressjax.quantization.ScaleGroup`) of
  this model: which kernels share an input and where its per-channel scale
  folds. Per block: ln_1 -> query, key, value (fold into ln_1); value -> out
  (attention mixes tokens, not channels, and the head split is a reshape, so
  out's input channel j is value's output column j: fold into value's kernel
  columns and bias); ln_2 -> fc1 (fold into ln_2); fc2 after gelu (explicit
  input scale). Then ln_f -> head. With norm="rms" the norms have a scale
  only. `prefix` is the path of the params collection in the tree
  (model.init's variables: 'params/')."""
  from compressjax.quantization.scaling import ScaleGroup  # no import cycle

  def norm(name):
    if config.norm == "rms":
      return (f"{name}/scale",)
    return (f"{name}/scale", f"{name}/bias")

  groups = []
  for i in range(config.n_layers):
    b = f"{prefix}block_{i}/"
    groups += [
        ScaleGroup(tuple(f"{b}attn/{n}/kernel"
                         for n in ("query", "key", "value")), "norm",
                   norm(f"{b}ln_1")),
        ScaleGroup((f"{b}attn/out/kernel",), "linear",
                   (f"{b}attn/value/kernel", f"{b}attn/value/bias")),
        ScaleGroup((f"{b}mlp/fc1/kernel",), "norm", norm(f"{b}ln_2")),
        ScaleGroup((f"{b}mlp/fc2/kernel",)),
    ]
  groups.append(ScaleGroup((f"{prefix}head/kernel",), "norm",
                           norm(f"{prefix}ln_f")))
  return tuple(groups)


def rotation_plan(config: TransformerConfig, prefix: str = "params/"):
  """Where QuaRot's rotations fold in this model
  (`compressjax.quantization.rotation.RotationPlan`, for `quarot`).

  Residual writers (their last axis is added to the stream): the token and
  position embeddings, attn/out and mlp/fc2 (kernel and bias). Readers: ln_1
  -> query, key, value; ln_2 -> fc1; ln_f -> head (each with its bias, into
  which a LayerNorm bias folds). Value/out pairs with head_dim d_model /
  n_heads (heads are a reshape of value's output columns). fc2 reads gelu's
  output: nothing to fold into, so it is rotated online. `config.norm` says
  whether the residual rotation folds as is ("rms") or needs centring
  ("layer"). `prefix`: the params collection's path ('params/')."""
  from compressjax.quantization.rotation import (Reader, RotationPlan,  # no cycle
                                             ValueOut)

  def dense(name):
    return (f"{name}/kernel", f"{name}/bias")

  def reader(norm, names):
    kb = [dense(n) for n in names]
    return Reader(f"{norm}/scale",
                  f"{norm}/bias" if config.norm == "layer" else None,
                  tuple(k for k, _ in kb), tuple(b for _, b in kb))

  writers = [f"{prefix}embed/embedding", f"{prefix}pos_embed/embedding"]
  readers, value_out, down = [], [], []
  for i in range(config.n_layers):
    b = f"{prefix}block_{i}/"
    writers += [*dense(f"{b}attn/out"), *dense(f"{b}mlp/fc2")]
    readers += [reader(f"{b}ln_1", [f"{b}attn/{n}"
                                    for n in ("query", "key", "value")]),
                reader(f"{b}ln_2", [f"{b}mlp/fc1"])]
    value_out.append(ValueOut(*dense(f"{b}attn/value"), f"{b}attn/out/kernel",
                              config.d_model // config.n_heads))
    down.append(f"{b}mlp/fc2/kernel")
  readers.append(reader(f"{prefix}ln_f", [f"{prefix}head"]))
  return RotationPlan(config.norm, tuple(writers), tuple(readers),
                      tuple(value_out), tuple(down))
