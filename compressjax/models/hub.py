"""Hugging Face model directories in and out.

    pre = load_pretrained("path/to/llama", dtype="bfloat16")
    ids, mask = pre.tokenizer.encode_padded(["hello", "hi there"])
    logits = pre.module.apply(pre.variables, ids)
    save_pretrained("out/", pre)                       # float, same HF layout
    save_gptq("out-gptq/", pre, cj.quantize(pre.variables, 4, group_size=128,
                                            scale_dtype=jnp.float16))

A directory holds config.json (its `model_type` picks the zoo family, see
`hf.family_for`), the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json` ({"metadata": {"total_size": bytes},
"weight_map": {tensor: shard file}}), and optionally tokenizer.json,
tokenizer_config.json and generation_config.json.

Memory: tensors are read one at a time with the `safetensors` package
(memory-mapped), converted to the target dtype (numpy via ml_dtypes, so
bfloat16 needs no float32 copy of the model) and handed to jax, which on CPU
keeps the numpy buffer without a copy. The file is opened anew for each
tensor: a mapping kept open for the whole load leaves every page it touched
resident, which doubles the peak (measured in bench/hub.py). Peak host memory
is one copy of the weights in the target dtype plus a few tensors.

GPTQ export (`save_gptq`) is in `gptq_export`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.models import hf
from compressjax.models.tokenizer import Tokenizer, load_tokenizer, read_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")

# safetensors dtypes of float weights; F64 is read as float32 (jax keeps no
# float64 without x64).
_READ_DTYPES = ("F32", "F16", "BF16", "F64")
_TARGETS = {"float32": np.float32, "float16": np.float16,
            "bfloat16": ml_dtypes.bfloat16}
_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16",
            "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded HF checkpoint.

  Attributes:
    family: the zoo family (`hf.Family`) that read it.
    config: the zoo config.
    module: the flax module (`family.build(config)`).
    variables: {'params': ...} in the zoo's layout.
    tokenizer: `tokenizer.Tokenizer`, or None without tokenizer.json.
    hf_config: config.json as read (keys the family ignores included; they
      are written back on save).
    path: the directory it came from (None when built in memory).
  """

  family: hf.Family
  config: Any
  module: Any
  variables: Any
  tokenizer: Tokenizer | None
  hf_config: Mapping[str, Any]
  path: pathlib.Path | None = None


def target_dtype(dtype) -> np.dtype | None:
  """None, or one of float32 / float16 / bfloat16 (names, aliases, dtypes)."""
  if dtype is None:
    return None
  name = _ALIASES.get(str(dtype).lower(), str(dtype))
  if name not in _TARGETS:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      pass
  if name not in _TARGETS:
    raise CompressionError(f"dtype {dtype!r} is not a weight dtype; use None "
                           "(keep the checkpoint's), 'float32', 'float16' or "
                           "'bfloat16'")
  return np.dtype(_TARGETS[name])


# -- reading -----------------------------------------------------------------


def read_config(path) -> dict:
  """config.json of a HF directory, checked for the errors users meet."""
  path = pathlib.Path(path)
  if not path.is_dir():
    what = "is a file" if path.exists() else "does not exist"
    raise CompressionError(
        f"{path} {what}; pass the directory that holds config.json and "
        "model.safetensors (a Hugging Face model directory)")
  cfg = read_json(path / CONFIG)
  if cfg is None:
    raise CompressionError(
        f"{path / CONFIG} is missing; a Hugging Face model directory needs "
        "its config.json (transformers' save_pretrained writes it)")
  if "model_type" not in cfg:
    raise CompressionError(
        f"{path / CONFIG} has no 'model_type'; add it (e.g. \"llama\") so the "
        "model family can be chosen")
  if "quantization_config" in cfg:
    method = (cfg["quantization_config"] or {}).get("quant_method", "?")
    raise CompressionError(
        f"{path / CONFIG} describes a quantized checkpoint (quant_method "
        f"{method!r}); load_pretrained reads float checkpoints: load the "
        "original float model and compress it with compressjax")
  return cfg


def _open(file: pathlib.Path):
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(str(file), framework="numpy")
  except SafetensorError as e:
    raise CompressionError(
        f"{file} is not a readable safetensors file ({e}); it is truncated or "
        "corrupt: download or copy it again") from None
  except OSError as e:
    raise CompressionError(f"{file} cannot be opened ({e})") from None


class _Checkpoint:
  """Tensor name -> safetensors file of a HF directory, validated on open."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.files: dict[str, pathlib.Path] = {}
    if (path / WEIGHTS).is_file():
      with _open(path / WEIGHTS) as f:
        self.files = {k: path / WEIGHTS for k in f.keys()}
    elif (path / INDEX).is_file():
      self._read_index(path / INDEX)
    else:
      raise CompressionError(self._no_weights())

  def _read_index(self, index: pathlib.Path) -> None:
    d = read_json(index)
    wm = d.get("weight_map")
    if not isinstance(wm, dict) or not all(
        isinstance(v, str) for v in wm.values()):
      raise CompressionError(
          f"{index} has no 'weight_map' object of tensor name -> shard file; "
          "restore the index from the original checkpoint")
    by_shard: dict[str, list[str]] = {}
    for name, shard in wm.items():
      by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
      file = index.parent / shard
      if not file.is_file():
        raise CompressionError(
            f"{index.name} lists shard {shard!r} (holding {len(names)} "
            f"tensors, e.g. {names[0]!r}), but {file} is missing; copy every "
            "shard of the checkpoint")
      with _open(file) as f:
        keys = set(f.keys())
      lost = [n for n in names if n not in keys]
      if lost:
        raise CompressionError(
            f"{index.name} places tensor {lost[0]!r} in {shard!r}, which does "
            f"not hold it ({len(lost)} such tensors); the index and the shards "
            "come from different checkpoints")
      self.files.update({n: file for n in names})

  def _no_weights(self) -> str:
    p = self.path
    if (p / "pytorch_model.bin").exists() or (
        p / "pytorch_model.bin.index.json").exists():
      return (f"{p} has only PyTorch pickles (pytorch_model.bin), which are "
              "not supported (loading them runs arbitrary code); convert "
              "them to safetensors, e.g. with transformers: AutoModel."
              "from_pretrained(p).save_pretrained(p, safe_serialization=True)")
    others = sorted(f.name for f in p.glob("*.safetensors"))
    if others:
      return (f"{p} has no {WEIGHTS} or {INDEX}, only {', '.join(others)}; "
              f"rename a single file to {WEIGHTS}, or write the index")
    return (f"{p} holds no weights: expected {WEIGHTS} or {INDEX} with its "
            "shards")

  @property
  def names(self) -> list[str]:
    return list(self.files)

  def get(self, name: str) -> np.ndarray:
    """One tensor, read from a mapping opened for it alone (see module doc)."""
    file = self.files[name]
    with _open(file) as f:
      st = f.get_slice(name).get_dtype()
      if st not in _READ_DTYPES:
        raise CompressionError(
            f"tensor {name!r} in {file} has dtype {st}; float weights (F32, "
            "F16, BF16) are supported: a quantized or integer tensor cannot "
            "be a float param")
      try:
        a = f.get_tensor(name)
      except Exception as e:  # safetensors raises plain errors for bad data
        raise CompressionError(f"tensor {name!r} in {file} cannot be read "
                               f"({e}); the file is corrupt") from None
    return a.astype(np.float32) if st == "F64" else a


def load_pretrained(path, dtype=None) -> Pretrained:
  """Loads a HF directory into the zoo (see the module doc).

  Args:
    path: the directory (config.json, model.safetensors or index + shards,
      optionally tokenizer files).
    dtype: weight dtype ('float32', 'float16', 'bfloat16'); None keeps the
      checkpoint's.
  """
  path = pathlib.Path(path)
  hf_config = read_config(path)
  family = hf.family_for(hf_config["model_type"])
  config = family.config_from_hf(hf_config)
  target = target_dtype(dtype)
  ckpt = _Checkpoint(path)

  def cast(a, dt):
    return a if a.dtype == dt else a.astype(dt)

  try:
    variables = hf.from_hf(family, config, ckpt.get, ckpt.names,
                           dtype=target, cast=cast)
  except CompressionError as e:
    if str(path) in str(e):  # already names its file
      raise
    err = CompressionError(f"{path}: {e}")  # name the checkpoint
    err.path = e.path
    raise err from None
  return Pretrained(family, config, family.build(config), variables,
                    load_tokenizer(path, hf_config), hf_config, path)


# -- writing -----------------------------------------------------------------


def parse_size(size) -> int:
  """Bytes of an int or of a string as transformers takes it: '5GB' (10^9),
  '5GiB' (2^30), 'MB', 'MiB', 'KB', 'KiB'."""
  if isinstance(size, int) and not isinstance(size, bool):
    if size <= 0:
      raise CompressionError(f"max_shard_size must be positive, got {size}")
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size),
                   re.IGNORECASE)
  if not m:
    raise CompressionError(f"max_shard_size {size!r} is neither bytes nor a "
                           "size such as '2GB' or '500MiB'")
  unit = m.group(2).upper()
  base = 1024 if "I" in unit else 1000
  return int(float(m.group(1)) * base ** "KMG".index(unit[0]) * base)


def write_weights(path, tensors: Mapping[str, np.ndarray],
                  max_shard_size=None) -> list[str]:
  """Writes `tensors` as model.safetensors, or as HF shards + index.json when
  they exceed `max_shard_size`; removes weight files of an earlier save in
  the same directory. Returns the file names written."""
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for f in path.iterdir():
    if _SHARD.fullmatch(f.name) or f.name == INDEX:
      f.unlink()
  limit = None if max_shard_size is None else parse_size(max_shard_size)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, a in tensors.items():
    if limit is not None and shards[-1] and size + a.nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(a)
    size += a.nbytes
  meta = {"format": "pt"}  # transformers checks this key
  if len(shards) == 1:
    save_file(shards[0], str(path / WEIGHTS), metadata=meta)
    return [WEIGHTS]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
           for i in range(len(shards))]
  weight_map = {}
  for file, shard in zip(names, shards):
    save_file(shard, str(path / file), metadata=meta)
    weight_map.update({k: file for k in shard})
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": weight_map}
  (path / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return names + [INDEX]


def write_json(file: pathlib.Path, d: Mapping[str, Any]) -> None:
  file.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def unpack_model(model) -> tuple[hf.Family, Any, Any, dict, Tokenizer | None,
                                 pathlib.Path | None]:
  """(family, config, variables, raw config.json, tokenizer, source dir) of a
  Pretrained or a (family, config[, variables]) tuple."""
  if isinstance(model, Pretrained):
    return (model.family, model.config, model.variables,
            dict(model.hf_config), model.tokenizer, model.path)
  if isinstance(model, tuple) and len(model) in (2, 3) and isinstance(
      model[0], hf.Family):
    return (model[0], model[1], model[2] if len(model) == 3 else None, {},
            None, None)
  raise CompressionError(
      f"expected a Pretrained or a (family, config, variables) tuple, got "
      f"{type(model).__name__}")


def hf_config_of(family: hf.Family, config, raw: Mapping[str, Any],
                 torch_dtype: str | None) -> dict:
  """config.json: the loaded one's keys, updated from the zoo config."""
  out = {**raw, **family.config_to_hf(config)}
  out.pop("quantization_config", None)
  if torch_dtype is not None:
    out["torch_dtype"] = torch_dtype
  return out


def copy_extras(source: pathlib.Path | None, path: pathlib.Path) -> None:
  """Copies generation_config.json from the directory a model came from."""
  if source is None:
    return
  src = source / GENERATION_CONFIG
  if src.is_file() and src.resolve() != (path / GENERATION_CONFIG).resolve():
    (path / GENERATION_CONFIG).write_bytes(src.read_bytes())


def dtype_name(tensors: Mapping[str, np.ndarray]) -> str | None:
  names = {a.dtype.name for a in tensors.values()
           if jnp.issubdtype(a.dtype, jnp.floating)}
  return names.pop() if len(names) == 1 else None


def cast_floats(tensors: dict[str, np.ndarray], dtype) -> dict:
  dt = target_dtype(dtype)
  if dt is None:
    return tensors
  return {k: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating)
          and a.dtype != dt else a for k, a in tensors.items()}


def save_pretrained(path, model, tokenizer: Tokenizer | None = None,
                    max_shard_size=None, dtype=None) -> list[str]:
  """Writes a float zoo tree as a HF directory (the inverse of
  `load_pretrained`; load -> save -> load is bit-exact).

  Args:
    model: a Pretrained, or (family, config, variables).
    tokenizer: written beside the weights (default: the Pretrained's).
    max_shard_size: bytes or '2GB'-style; None writes one model.safetensors.
    dtype: cast float weights ('float32', 'float16', 'bfloat16'); None keeps
      each param's dtype.
  Returns the weight files written. Compressed leaves are refused (see
  `save_gptq`, or materialize the tree first).
  """
  path = pathlib.Path(path)
  family, config, variables, raw, tok, source = unpack_model(model)
  if variables is None:
    raise CompressionError("save_pretrained needs the variables: pass a "
                           "Pretrained or (family, config, variables)")
  tensors = cast_floats(hf.to_hf(family, config, variables), dtype)
  files = write_weights(path, tensors, max_shard_size)
  write_json(path / CONFIG, hf_config_of(family, config, raw,
                                         dtype_name(tensors)))
  copy_extras(source, path)
  tok = tokenizer if tokenizer is not None else tok
  if tok is not None:
    tok.save(path)
  return files


def save_gptq(path, model, compressed_variables, **kw):
  """GPTQ export; see `compressjax.models.gptq_export.save_gptq`."""
  from compressjax.models import gptq_export
  return gptq_export.save_gptq(path, model, compressed_variables, **kw)
