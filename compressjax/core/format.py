"""The number-format abstraction a QArray is parameterized by.

A format maps code values q (the quantized domain, before scale and zero
point) to stored integers and back. Formats live in `compressjax.formats`; the
registry here lets checkpoints rebuild them from their config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

FORMATS: dict[str, type] = {}


class Format:
  """Base class: frozen, hashable (it is static pytree metadata)."""

  kind: ClassVar[str] = "format"
  bits: int  # stored bits per element

  @property
  def storage_dtype(self):
    raise NotImplementedError

  def encode(self, q):
    """Code values (already rounded to representable ones) -> stored ints."""
    raise NotImplementedError

  def decode(self, stored):
    """Stored ints -> float32 code values."""
    raise NotImplementedError

  def round(self, x, key=None):
    """Float32 values in the code domain -> nearest representable codes."""
    raise NotImplementedError

  def to_config(self) -> dict[str, Any]:
    return {"kind": self.kind, **dataclasses.asdict(self)}


def register_format(cls):
  FORMATS[cls.kind] = cls
  return cls


def format_from_config(cfg: dict[str, Any]) -> Format:
  cfg = dict(cfg)
  kind = cfg.pop("kind")
  if kind not in FORMATS:
    raise ValueError(f"unknown number format {kind!r}; known: {sorted(FORMATS)}")
  return FORMATS[kind](**cfg)
