"""Tiny Hugging Face directories for tests, written without compressjax.

  write_hf_dir(path, state_dict, config)  config.json + model.safetensors, or
                                          shards + model.safetensors.index.json
                                          (HF's names and index schema), in
                                          float32 / float16 / bfloat16
  write_tokenizer(path, texts)            a BPE trained in the test, saved as
                                          tokenizer.json + tokenizer_config.json
  TOY, toy_config_dict, toy_state_dict    a toy family (registered as model
                                          type 'cj_toy') whose table uses every
                                          layout: linear, same (an embedding, a
                                          GPT-2-style Conv1D (in, out) weight),
                                          conv2d, a tied lm_head (path None), an
                                          ignored buffer and an optional prefix
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from compressjax.core.errors import CompressionError
from compressjax.models import hf

DTYPES = {"float32": np.float32, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16}


def write_hf_dir(path, state_dict: Mapping[str, np.ndarray],
                 config: Mapping, dtype: str | None = None,
                 shards: int = 1) -> pathlib.Path:
  """Writes config.json and the weights as HF does: one model.safetensors,
  or `shards` files model-0000i-of-0000n.safetensors with an index.json
  ({"metadata": {"total_size"}, "weight_map"}); `dtype` casts every tensor."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  sd = {k: np.ascontiguousarray(np.asarray(v).astype(DTYPES[dtype])
                                if dtype else np.asarray(v))
        for k, v in state_dict.items()}
  (path / "config.json").write_text(json.dumps(dict(config), indent=2))
  meta = {"format": "pt"}
  if shards == 1:
    save_file(sd, str(path / "model.safetensors"), metadata=meta)
    return path
  names = list(sd)
  parts = np.array_split(np.arange(len(names)), shards)
  weight_map = {}
  for i, part in enumerate(parts):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({names[j]: sd[names[j]] for j in part}, str(path / file),
              metadata=meta)
    weight_map.update({names[j]: file for j in part})
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in sd.values()))},
           "weight_map": weight_map}
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  return path


def write_tokenizer(path, texts: Sequence[str], vocab_size: int = 300,
                    bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>"):
  """Trains a byte-level BPE on `texts`; writes tokenizer.json (BOS added by
  its post-processor) and tokenizer_config.json. Returns the Tokenizer."""
  from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,
                          processors, trainers)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[pad, bos, eos],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tk.train_from_iterator(list(texts), trainer)
  tk.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
      special_tokens=[(bos, tk.token_to_id(bos))])
  tk.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
      "eos_token": {"content": eos, "lstrip": False, "rstrip": False},
      "pad_token": pad}))
  return tk


# -- a toy family --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab: int = 40
  hidden: int = 32
  inter: int = 64
  layers: int = 2
  channels: int = 3
  tie: bool = True


class _Block(nn.Module):
  cfg: ToyConfig

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    h = nn.gelu(nn.Dense(self.cfg.inter, name="up")(h))
    return x + nn.Dense(self.cfg.hidden, use_bias=False, name="down")(h)


class ToyModel(nn.Module):
  """tokens (B, T) and an image (B, 4, 4, C) -> logits (B, T + 4, vocab)."""

  cfg: ToyConfig

  @nn.compact
  def __call__(self, tokens, image):
    c = self.cfg
    embed = nn.Embed(c.vocab, c.hidden, name="embed")
    x = embed(tokens)
    p = nn.Conv(c.hidden, (2, 2), strides=(2, 2), name="patch")(image)
    x = jnp.concatenate([x, p.reshape(p.shape[0], -1, c.hidden)], axis=1)
    x = nn.Dense(c.hidden, name="proj")(x)
    for i in range(c.layers):
      x = _Block(c, name=f"block_{i}")(x)
    if c.tie:
      return embed.attend(x)
    return nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)


def _config_from_hf(d):
  try:
    return ToyConfig(vocab=d["vocab_size"], hidden=d["hidden_size"],
                     inter=d["intermediate_size"],
                     layers=d["num_hidden_layers"],
                     channels=d["num_channels"],
                     tie=d.get("tie_word_embeddings", True))
  except KeyError as e:
    raise CompressionError(f"config.json lacks {e.args[0]!r}") from None


def _config_to_hf(c: ToyConfig) -> dict:
  return {"model_type": "cj_toy", "architectures": ["CjToyModel"],
          "vocab_size": c.vocab, "hidden_size": c.hidden,
          "intermediate_size": c.inter, "num_hidden_layers": c.layers,
          "num_channels": c.channels, "tie_word_embeddings": c.tie}


def _tensors(c: ToyConfig) -> tuple[hf.TensorSpec, ...]:
  S = hf.TensorSpec
  out = [S("model.embed.weight", "params/embed/embedding"),
         S("model.patch.weight", "params/patch/kernel", "conv2d"),
         S("model.patch.bias", "params/patch/bias"),
         S("model.proj.weight", "params/proj/kernel"),  # Conv1D: (in, out)
         S("model.proj.bias", "params/proj/bias")]
  for i in range(c.layers):
    p, b = f"model.layers.{i}.", f"params/block_{i}/"
    out += [S(p + "norm.weight", b + "norm/scale"),
            S(p + "norm.bias", b + "norm/bias"),
            S(p + "up.weight", b + "up/kernel", "linear"),
            S(p + "up.bias", b + "up/bias"),
            S(p + "down.weight", b + "down/kernel", "linear")]
  out.append(S("lm_head.weight", None if c.tie else "params/lm_head/kernel",
               "linear"))
  return tuple(out)


TOY = hf.register(hf.Family(
    name="cj_toy", model_types=("cj_toy",), config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf, build=ToyModel,
    example_args=lambda c: (jnp.zeros((1, 3), jnp.int32),
                            jnp.zeros((1, 4, 4, c.channels))),
    tensors=_tensors, ignored=(r"model\.layers\.\d+\.rotary\.inv_freq",),
    optional_prefix="model."))


def toy_config_dict(**kw) -> dict:
  d = _config_to_hf(ToyConfig())
  d.update(kw)
  return d


def toy_state_dict(cfg: Mapping, seed: int = 0, lm_head: bool = True,
                   prefix: str = "model.") -> dict[str, np.ndarray]:
  """Random float32 weights in HF layout, shapes written out by hand
  (torch: Linear (out, in), Conv2d (out, in, kh, kw), Conv1D (in, out))."""
  rng = np.random.default_rng(seed)
  V, H, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
  C = cfg["num_channels"]
  shapes = {"embed.weight": (V, H), "patch.weight": (H, C, 2, 2),
            "patch.bias": (H,), "proj.weight": (H, H), "proj.bias": (H,)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"layers.{i}."
    shapes.update({p + "norm.weight": (H,), p + "norm.bias": (H,),
                   p + "up.weight": (I, H), p + "up.bias": (I,),
                   p + "down.weight": (H, I)})
  sd = {prefix + k: rng.standard_normal(s).astype(np.float32)
        for k, s in shapes.items()}
  if lm_head:
    sd["lm_head.weight"] = (sd[prefix + "embed.weight"].copy()
                            if cfg.get("tie_word_embeddings", True)
                            else rng.standard_normal((V, H)).astype(np.float32))
  return sd
