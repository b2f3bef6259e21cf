"""The number-format protocol: every quantization scheme is one object.

A `Format` is frozen and hashable (it is static pytree metadata of the leaves
it produces) and knows everything the rest of the library asks about it:

  name            the config name (`formats.get(name)` gives it back)
  bits            stored bits per element (codes of < 8 bits are packed)
  storage_dtype   dtype of the stored codes
  block_size      the format's own block of elements sharing a scale (OCP MX
                  32, NVFP4 16), or None: the user's `group_size` decides
  scale_format    how block scales are stored: None for a plain float array
                  (in the user's `scale_dtype`), else the Format of the scale
                  codes (E8M0 for MX, fp8 e4m3 for NVFP4)
  capabilities    what algorithms and kernels may do with it (`Capabilities`)
  code_range      (lo, hi) of the code domain, before a zero point
  absmax_code     the code a group's max |w| maps to under an absmax scale

and implements: `encode` / `decode` / `round` (code values <-> stored
integers, nearest representable code), `scale_zero` (the per-group scale and
zero point rule), `kernel_decode` (how a matmul kernel turns stored codes into
values: an integer offset, a float8 bit pattern or a 2**bits table; None when
no kernel applies), `check_layout` and `quantize` (round-to-nearest of a
float array into its compressed leaf). A new format is one class plus one
registry entry; dispatch, RTN, GPTQ, SparseGPT and QAT ask the object.

Configs (`to_config` / `format_from_config`) carry a version number, so a
checkpoint written with an older layout fails with a clear message instead of
rebuilding a wrong leaf; list-valued fields come back as tuples (hashable).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax.numpy as jnp

from compressjax.core.errors import CompressionError

FORMATS: dict[str, type] = {}
# Version of the format configs and of the leaf layouts they describe.
# 2: QArray/CodebookArray store a (K, N) matrix over declared contraction axes.
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What may be done with a format (asked by algorithms and dispatch).

  Attributes:
    groups: takes the user's `group_size` / `per_tensor` (False: its blocks
      are part of its definition).
    zero_point: stores an integer zero point per group (asymmetric).
    calibrated: GPTQ / SparseGPT may round it column by column with one float
      scale per group computed by `scale_zero` from the updated weights.
    qat: fake quantization with a learned plain float step (LSQ / STE).
    uniform: codes are evenly spaced integers (LSQ's step init applies).
    float_scale: one plain float scale per group (so the scales can be
      double-quantized, learned, or recomputed by GPTQ).
  """

  groups: bool = True
  zero_point: bool = False
  calibrated: bool = False
  qat: bool = False
  uniform: bool = False
  float_scale: bool = False


class KernelDecode(NamedTuple):
  """How a matmul kernel maps stored codes to values (exactly one is set).

  offset: value = stored integer + offset (integer formats).
  float8: stored bytes are the bit patterns of this XLA float8 dtype name.
  table:  value = table[stored] (2**bits float values).
  """

  offset: int | None = None
  float8: str | None = None
  table: tuple[float, ...] | None = None


Reduce = Callable[[Any, Callable], Any]


class Format:
  """Base class of number formats (see module docstring)."""

  kind: ClassVar[str] = "format"
  bits: int
  block_size: ClassVar[int | None] = None
  capabilities: ClassVar[Capabilities] = Capabilities(groups=False)

  @property
  def name(self) -> str:
    raise NotImplementedError

  @property
  def scale_format(self) -> "Format | None":
    return None

  @property
  def storage_dtype(self):
    raise NotImplementedError

  @property
  def code_range(self) -> tuple[float, float]:
    raise NotImplementedError

  @property
  def absmax_code(self) -> float:
    return float(self.code_range[1])

  def encode(self, q):
    """Code values (already rounded to representable ones) -> stored ints."""
    raise NotImplementedError

  def decode(self, stored):
    """Stored ints -> float32 code values."""
    raise NotImplementedError

  def round(self, x, key=None):
    """Float32 values in the code domain -> nearest representable codes
    (stochastically when a PRNG key is given)."""
    raise NotImplementedError

  def scale_zero(self, x, reduce: Reduce, store=lambda s: s):
    """(scale, zero or None) of the groups of x: `reduce(v, fn)` reduces v
    over each group's elements with fn (jnp.max / jnp.min / jnp.mean);
    `store(s)` is the scale as it will be stored (its dtype rounding), which
    a zero point must be computed from."""
    raise CompressionError(f"format {self.name} has no per-group scale rule")

  def kernel_decode(self) -> KernelDecode | None:
    return None

  def asymmetric(self) -> "Format":
    """The zero-point variant of this format (`symmetric=False`)."""
    raise CompressionError(f"asymmetric quantization needs an integer "
                           f"format, not {self.name}")

  def check_layout(self, k: int, group_size: int | None, per_tensor: bool,
                   path: str) -> None:
    """Raises CompressionError if the format cannot store a (K, N) matrix
    with these options (K: the flattened contraction)."""
    if self.capabilities.groups:
      return
    if group_size is not None or per_tensor:
      raise CompressionError(
          f"{self.name} has its own blocks of {self.block_size}; drop "
          "group_size / per_tensor", path)
    if self.block_size and k % self.block_size:
      raise CompressionError(
          f"{self.name} blocks of {self.block_size} do not divide "
          f"in_features {k} (the flattened contraction axes); skip this "
          "param with a rule or use another format for it", path)

  def quantize(self, w, *, contract: tuple[int, ...],
               group_size: int | None = None, per_tensor: bool = False,
               scale_dtype: Any = None, key=None):
    """Round-to-nearest quantization of float array w into a compressed leaf
    whose groups run along the flattened `contract` axes."""
    raise NotImplementedError

  def fake_quantize(self, w, *, contract: tuple[int, ...],
                    group_size: int | None = None, per_tensor: bool = False,
                    scale_dtype: Any = None, key=None):
    """`quantize(...).materialize()` in float32 (what searches over scales
    or clip ranges evaluate; formats that need no packed codes for it
    override this with the same arithmetic, cheaper to trace)."""
    return self.quantize(w, contract=contract, group_size=group_size,
                         per_tensor=per_tensor, scale_dtype=scale_dtype,
                         key=key).materialize().astype(jnp.float32)

  # -- configs ---------------------------------------------------------------
  def to_config(self) -> dict[str, Any]:
    return {"kind": self.kind, "version": FORMAT_VERSION,
            **dataclasses.asdict(self)}

  @classmethod
  def from_config(cls, cfg: dict[str, Any]) -> "Format":
    return cls(**{k: _tuples(v) for k, v in cfg.items()})

  def __str__(self) -> str:
    return self.name


def _tuples(v: Any) -> Any:
  """JSON gives lists back: static metadata must be hashable tuples."""
  if isinstance(v, (list, tuple)):
    return tuple(_tuples(x) for x in v)
  return v


def register_format(cls):
  FORMATS[cls.kind] = cls
  return cls


def format_from_config(cfg: dict[str, Any]) -> Format:
  cfg = dict(cfg)
  kind = cfg.pop("kind", None)
  version = cfg.pop("version", 1)
  if version != FORMAT_VERSION:
    raise CompressionError(
        f"number format config {kind!r} has layout version {version}, this "
        f"compressjax reads version {FORMAT_VERSION}: the checkpoint was "
        "written with another compressed layout; quantize the float params "
        "again (or restore with the compressjax version that wrote it)")
  if kind not in FORMATS:
    raise CompressionError(f"unknown number format {kind!r}; known: "
                           f"{sorted(FORMATS)} (import the module that "
                           "defines it before restoring)")
  return FORMATS[kind].from_config(cfg)
