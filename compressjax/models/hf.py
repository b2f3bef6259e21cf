"""Hugging Face <-> zoo: one declarative tensor table per model family.

A `Family` says, for a zoo architecture, which HF `model_type`s it covers, how
to read and write HF's `config.json`, and, for a given config, every tensor
of the HF state dict as a `TensorSpec`: HF name, the zoo param path it
becomes, and the layout change between them. Loading (`from_hf`) and saving
(`to_hf`) are then one loop over that table, the same for every family, with
one place that reports missing, unexpected and mis-shaped tensors by name.
File I/O (safetensors shards, memory mapping, tokenizers) is `hub.py`'s.

Layouts (PyTorch -> Flax; the inverse on export):
  same     identity (embeddings, norms, biases, GPT-2's Conv1D (in, out))
  linear   nn.Linear weight (out, in) -> Dense kernel (in, out)
  conv2d   nn.Conv2d weight (out, in, kh, kw) -> Conv kernel (kh, kw, in, out)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from compressjax.core.errors import CompressionError

_LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    # name: (hf -> flax array, flax -> hf array, flax shape -> hf shape)
    "same": (lambda a: a, lambda a: a, lambda s: tuple(s)),
    "linear": (lambda a: a.T, lambda a: a.T, lambda s: tuple(s)[::-1]),
    "conv2d": (lambda a: a.transpose(2, 3, 1, 0),
               lambda a: a.transpose(3, 2, 0, 1),
               lambda s: (s[3], s[2], s[0], s[1])),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor. `path` None: known but not a zoo param (a tied lm_head
  saved anyway); it is accepted on load and not written on save."""

  hf: str
  path: str | None
  layout: str = "same"

  def __post_init__(self):
    if self.layout not in _LAYOUTS:
      raise ValueError(f"unknown layout {self.layout!r} for {self.hf}; "
                       f"use one of {sorted(_LAYOUTS)}")

  def to_flax(self, a):
    return _LAYOUTS[self.layout][0](a)

  def to_hf(self, a):
    return _LAYOUTS[self.layout][1](a)

  def hf_shape(self, flax_shape) -> tuple[int, ...]:
    return _LAYOUTS[self.layout][2](flax_shape)


@dataclasses.dataclass(frozen=True)
class Family:
  """A zoo architecture and its HF naming.

  Attributes:
    name: the family's name ('llama', 'gpt2', 'bert', 'vit').
    model_types: HF `model_type` values it loads ('llama', 'mistral', ...).
    config_from_hf: config.json dict -> zoo config (raises CompressionError
      on unsupported options, naming the key).
    config_to_hf: zoo config -> config.json dict (model_type, architectures
      and every field `config_from_hf` reads).
    build: zoo config -> flax module.
    example_args: zoo config -> positional args for `module.init` (shapes
      only; used with jax.eval_shape).
    tensors: zoo config -> every HF tensor, in state-dict order.
    ignored: regexes (fullmatch) of HF tensor names that are buffers, not
      params (e.g. rotary `inv_freq`, GPT-2's `attn.bias` causal mask).
    optional_prefix: a prefix that checkpoints may add to or omit from the
      `tensors` names of the base model (GPT2Model saves 'h.0...' where
      GPT2LMHeadModel saves 'transformer.h.0...'); `canonical` maps either
      spelling to the table's.
  """

  name: str
  model_types: tuple[str, ...]
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  config_to_hf: Callable[[Any], dict]
  build: Callable[[Any], Any]
  example_args: Callable[[Any], tuple]
  tensors: Callable[[Any], tuple[TensorSpec, ...]]
  ignored: tuple[str, ...] = ()
  optional_prefix: str = ""

  def is_ignored(self, hf_name: str) -> bool:
    return any(re.fullmatch(p, hf_name) for p in self.ignored)

  def canonical(self, names, known=()) -> dict[str, str]:
    """Checkpoint name -> the name `tensors` uses: the optional prefix added
    where the checkpoint omits it, or dropped where the checkpoint has it
    and the table does not. A name changes only when that makes it a known
    tensor (`known`, the table's names) or an ignored buffer, so head
    tensors outside the prefix ('lm_head.weight', 'classifier.weight' beside
    'vit.encoder...') and unknown names stay as the checkpoint spells them."""
    p, known = self.optional_prefix, set(known)
    ok = lambda n: n in known or self.is_ignored(n)  # noqa: E731

    def one(n):
      if not p or ok(n):
        return n
      if not n.startswith(p) and ok(p + n):
        return p + n
      if n.startswith(p) and ok(n[len(p):]):
        return n[len(p):]
      return n
    return {n: one(n) for n in names}

  def param_shapes(self, config) -> dict[str, tuple[int, ...]]:
    """Zoo param path -> shape, from an abstract init (no compute)."""
    from compressjax.core.tree import leaves_with_paths
    module = self.build(config)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), *self.example_args(config)))
    return {p: tuple(x.shape) for p, x in leaves_with_paths(shapes)}


_MIRROR = {  # kind -> (zoo name of HF's `weight`, layout)
    "linear": ("kernel", "linear"),     # nn.Linear
    "conv1d": ("kernel", "same"),       # GPT-2's Conv1D, already (in, out)
    "norm": ("scale", "same"),          # LayerNorm / RMSNorm
    "embedding": ("embedding", "same"),
    "conv2d": ("kernel", "conv2d"),    # nn.Conv2d
}


def mirror(hf_name: str, kind: str, prefix: str = "params/",
           hf_prefix: str = "") -> TensorSpec:
  """The spec whose zoo path mirrors the HF name: the module path with list
  indices joined to their list ('model.layers.0.self_attn.q_proj' ->
  'model/layers_0/self_attn/q_proj'), then `weight` renamed by `kind` (see
  _MIRROR) and `bias` kept: 'model.layers.0.self_attn.q_proj.weight' ->
  'params/model/layers_0/self_attn/q_proj/kernel', layout 'linear'.
  `hf_prefix` is prepended to the HF name only (a task model's 'bert.' in
  front of a base model the zoo keeps at the top level)."""
  if kind not in _MIRROR:
    raise ValueError(f"unknown kind {kind!r} for {hf_name}; use one of "
                     f"{sorted(_MIRROR)}")
  *mods, leaf = hf_name.split(".")
  parts: list[str] = []
  for m in mods:
    if m.isdigit() and parts:
      parts[-1] += f"_{m}"
    else:
      parts.append(m)
  if leaf == "weight":
    name, layout = _MIRROR[kind]
  elif leaf == "bias":
    name, layout = "bias", "same"
  else:
    raise ValueError(f"{hf_name}: expected a .weight or .bias tensor")
  return TensorSpec(hf_prefix + hf_name, prefix + "/".join(parts + [name]),
                    layout)


def module(name: str, kind: str, bias: bool = True, hf_prefix: str = ""
           ) -> tuple[TensorSpec, ...]:
  """The weight (and bias) specs of HF module `name` (see `mirror`)."""
  names = (f"{name}.weight",) + ((f"{name}.bias",) if bias else ())
  return tuple(mirror(n, kind, hf_prefix=hf_prefix) for n in names)


REQUIRED = object()  # config_field default: the key must be present


def config_field(config: Mapping[str, Any], key: str, types: tuple,
                 default: Any = REQUIRED, *, nullable: bool = False,
                 positive: bool = False) -> Any:
  """config.json's `key`, checked: a missing key takes `default` (or is an
  error when REQUIRED); null is None when `nullable`; else the value must be
  an instance of `types` (bool is not an int; an int is a float) and, with
  `positive`, > 0. Raises CompressionError naming the key."""
  if key not in config:
    if default is REQUIRED:
      raise CompressionError(f"config.json has no {key!r}; it is required "
                             f"for model_type {config.get('model_type')!r}")
    return default
  v = config[key]
  if v is None and nullable:
    return None
  ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
  if not ok and float in types and isinstance(v, int) and not isinstance(
      v, bool):
    v, ok = float(v), True
  if not ok or (positive and v <= 0):
    names = " or ".join(t.__name__ for t in types)
    raise CompressionError(
        f"config.json {key!r} = {v!r} must be {'a positive ' if positive else ''}"
        f"{names}{' or null' if nullable else ''}; fix config.json")
  return v


FAMILIES: dict[str, Family] = {}  # by HF model_type


def register(family: Family) -> Family:
  for t in family.model_types:
    FAMILIES[t] = family
  return family


def family_for(model_type: str | None) -> Family:
  _import_families()
  if model_type not in FAMILIES:
    raise CompressionError(
        f"unsupported model_type {model_type!r} in config.json; supported: "
        f"{', '.join(sorted(FAMILIES))}")
  return FAMILIES[model_type]


def _import_families() -> None:
  """Families register themselves on import; import the zoo's modules."""
  import importlib
  import pkgutil

  import compressjax.models as pkg
  for m in pkgutil.iter_modules(pkg.__path__):
    if m.name not in ("hf", "hub", "tokenizer", "gptq_export"):
      importlib.import_module(f"compressjax.models.{m.name}")


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, x in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = x
  return out


def _describe(names, n: int = 8) -> str:
  names = sorted(names)
  more = f" (+{len(names) - n} more)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def check_names(family: Family, config, names) -> None:
  """Raises CompressionError naming missing and unexpected HF tensors."""
  specs = family.tensors(config)
  known = {s.hf for s in specs}
  need = {s.hf for s in specs if s.path is not None}
  names = set(family.canonical(names, known).values())
  missing = need - names
  extra = {n for n in names - known if not family.is_ignored(n)}
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing tensors {_describe(missing)}")
    if extra:
      parts.append(f"unexpected tensors {_describe(extra)}")
    raise CompressionError(
        f"the checkpoint does not match a {family.name} model with this "
        f"config.json: " + "; ".join(parts) + ". Check config.json "
        "(num_hidden_layers, tie_word_embeddings, ...) against the weights")


def from_hf(family: Family, config, get: Callable[[str], Any],
            names, dtype=None, cast: Callable[[Any, Any], Any] | None = None
            ) -> dict:
  """Zoo variables ({'params': ...}) from HF tensors.

  Args:
    get: hf name -> array (numpy, possibly memory-mapped); called once per
      tensor, in table order, so a caller can stream from disk.
    names: every tensor name the checkpoint holds (for the missing /
      unexpected check, done before anything is read).
    dtype: target dtype of the params (None: keep the checkpoint's).
    cast: (array, dtype) -> array; default numpy astype (then jnp.asarray).
  """
  check_names(family, config, names)
  known = {s.hf for s in family.tensors(config)}
  stored = {c: n for n, c in family.canonical(names, known).items()}
  shapes = family.param_shapes(config)
  flat = {}
  for spec in family.tensors(config):
    if spec.path is None:
      continue
    a = get(stored[spec.hf])
    want = spec.hf_shape(shapes[spec.path])
    if tuple(a.shape) != want:
      raise CompressionError(
          f"tensor {spec.hf!r} has shape {tuple(a.shape)}, but config.json "
          f"implies {want} (zoo param {spec.path!r}); the config and the "
          f"weights disagree")
    a = spec.to_flax(a)
    if dtype is not None:
      a = cast(a, dtype) if cast else np.asarray(a).astype(dtype)
    flat[spec.path] = jax.numpy.asarray(a)
  return _nest(flat)


def hf_leaves(family: Family, config, variables):
  """(TensorSpec, leaf) for every zoo param of the table, in table order;
  the leaf may be a compressed leaf. Raises CompressionError naming a param
  the tree lacks."""
  from compressjax.core.tree import leaves_with_paths
  flat = dict(leaves_with_paths(variables))
  for spec in family.tensors(config):
    if spec.path is None:
      continue
    if spec.path not in flat:
      raise CompressionError(f"the tree has no param {spec.path!r} (HF "
                             f"tensor {spec.hf!r})", spec.path)
    yield spec, flat[spec.path]


def to_hf(family: Family, config, variables) -> dict[str, np.ndarray]:
  """HF state dict (name -> numpy array) of a float zoo tree; the inverse of
  `from_hf`. Compressed leaves are refused (export them with hub's GPTQ
  writer, or materialize the tree first)."""
  from compressjax.core.tree import is_compressed
  out = {}
  for spec, x in hf_leaves(family, config, variables):
    if is_compressed(x):
      raise CompressionError(
          "a compressed leaf has no HF float layout; export it with "
          "hub.save_gptq (int2/3/4/8 groups) or cj.materialize_tree the tree "
          "first", spec.path)
    out[spec.hf] = np.ascontiguousarray(spec.to_hf(np.asarray(x)))
  return out
