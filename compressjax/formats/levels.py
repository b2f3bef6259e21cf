"""Formats given by a fixed, sorted set of levels: binary, ternary, NF4.

Rounding goes to the nearest level (ties to the lower one); the stored code is
the level's index, `bits` wide. The scale rule says how a quantizer picks the
per-group scale s (values are levels * s):
  absmax    s = max|w| / max|level|                    (NF4, QLoRA Sec. 3)
  mean_abs  s = mean|w|                                 (binary: the L2-optimal
            scale for sign(w), Rastegari et al. 2016, XNOR-Net Eq. 3)
  twn       s = 1.4 * mean|w|, so the rounding threshold s/2 is TWN's
            Delta = 0.7 * mean|w| (Li & Liu 2016, Ternary Weight Networks Eq. 6)

NF4 (Dettmers et al. 2023, QLoRA Sec. 3): 16 levels from quantiles of N(0, 1),
8 positive and 7 negative plus an exact zero, normalized to [-1, 1]; values as
bitsandbytes' `create_normal_map(offset=0.9677083)`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from compressjax.core.errors import CompressionError
from compressjax.core.format import Capabilities, KernelDecode, register_format
from compressjax.formats.rounding import stochastic_index
from compressjax.formats.scaled import ScaledFormat, nonzero_scale

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)


SCALE_RULES = ("absmax", "mean_abs", "twn")


@register_format
@dataclasses.dataclass(frozen=True)
class LevelsFormat(ScaledFormat):
  kind = "levels"
  name: str = "ternary"
  levels: tuple[float, ...] = (-1.0, 0.0, 1.0)
  scale_rule: str = "absmax"

  def __post_init__(self):
    lv = np.asarray(self.levels, np.float64)
    if lv.ndim != 1 or lv.size < 2 or np.any(np.diff(lv) <= 0):
      raise CompressionError("levels must be strictly increasing, at least "
                             "two")
    if lv.size > 256:
      raise CompressionError(f"at most 256 levels fit 8 bits, got {lv.size}")
    if self.scale_rule not in SCALE_RULES:
      raise CompressionError(f"unknown scale rule {self.scale_rule!r}; use "
                             f"one of {SCALE_RULES}")
    # a tuple of floats whatever came in (a JSON list): hashable metadata
    object.__setattr__(self, "levels", tuple(float(v) for v in lv))

  @property
  def capabilities(self) -> Capabilities:
    # GPTQ / SparseGPT recompute an absmax scale per group from updated
    # weights; the mean-based rules are defined on the original weights.
    return Capabilities(groups=True, calibrated=self.scale_rule == "absmax",
                        qat=True, float_scale=True)

  @property
  def code_range(self) -> tuple[float, float]:
    return float(min(self.levels)), float(max(self.levels))

  def scale_zero(self, x, reduce, store=lambda s: s):
    a = jnp.abs(x)
    if self.scale_rule == "absmax":
      s = reduce(a, jnp.max) / self.max_value
    else:
      s = reduce(a, jnp.mean) * (1.4 if self.scale_rule == "twn" else 1.0)
    return store(nonzero_scale(s)), None

  def kernel_decode(self) -> KernelDecode:
    # codes past the last level never occur; the table still has 2**bits
    pad = (0.0,) * (2**self.bits - len(self.levels))
    return KernelDecode(table=self.levels + pad)

  @property
  def bits(self) -> int:
    return max(1, int(np.ceil(np.log2(len(self.levels)))))

  @property
  def max_value(self) -> float:
    return float(np.max(np.abs(self.levels)))

  @property
  def storage_dtype(self):
    return jnp.uint8

  def round(self, x, key=None):
    lv = jnp.asarray(self.levels, jnp.float32)
    if key is not None:
      return lv[stochastic_index(x, lv, key)]
    return self.decode(self.encode(x))

  def encode(self, x):
    """Index of the nearest level (exact for values that are levels)."""
    lv = jnp.asarray(self.levels, jnp.float32)
    mids = (lv[1:] + lv[:-1]) / 2
    return jnp.searchsorted(mids, x, side="left").astype(jnp.uint8)

  def decode(self, stored):
    return jnp.asarray(self.levels, jnp.float32)[stored.astype(jnp.int32)]


BINARY = LevelsFormat("binary", (-1.0, 1.0), "mean_abs")
TERNARY = LevelsFormat("ternary", (-1.0, 0.0, 1.0), "twn")
NF4 = LevelsFormat("nf4", NF4_LEVELS, "absmax")
