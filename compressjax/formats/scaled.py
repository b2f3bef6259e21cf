"""Element formats with one float scale per group: the shared quantizer.

For a format with a scale rule (`scale_zero`) and a rounding (`round`), the
round-to-nearest quantizer of an array w contracted over `contract` is, on its
(K, N) matrix (`core/contraction.py`), per group of `group_size` consecutive
rows and per output feature (or per tensor):
  s, z = scale_zero(group)           (z: integer zero point or None)
  q = round(w / s + z)               codes, stored by `encode`
and w_hat = (q - z) * s, so |w - w_hat| <= s / 2 wherever w lies inside the
group's representable range (always, for absmax and min/max scales). The
scale is stored in `scale_dtype`; a scale rounded down by that cast is bumped
to the next representable value so the s/2 bound still holds with the stored
scale. See e.g. GPTQ (Frantar et al. 2022, Sec. 2) for RTN as the baseline.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from compressjax.core.contraction import MatrixLayout, apply_groups, group_reduce
from compressjax.core.format import Format
from compressjax.core.qarray import QArray, pack_codes


def store_scale(s, scale_dtype: Any = jnp.float32):
  """Casts the scale; rounds up where the cast rounded down."""
  sc = s.astype(scale_dtype)
  low = sc.astype(jnp.float32) < s
  return jnp.where(low, jnp.nextafter(sc, jnp.array(jnp.inf, sc.dtype)), sc)


def nonzero_scale(s):
  """An all-zero group gets scale 1 (any scale is exact for it)."""
  return jnp.where(s > 0, s, 1.0)


class ScaledFormat(Format):
  """Base of int / float / level formats: elements times a float scale."""

  def _round_groups(self, w, contract, group_size, per_tensor, scale_dtype,
                    key):
    """The module doc's arithmetic on w's (K, N) matrix: (layout, code
    values q, stored scale s (G, N), zero z or None)."""
    lay = MatrixLayout(tuple(w.shape), tuple(contract))
    x = lay.to_matrix(w.astype(jnp.float32))
    groups = 1 if group_size is None else lay.k // group_size
    s, z = self.scale_zero(
        x, lambda v, fn: group_reduce(v, groups, fn, per_tensor),
        lambda s: store_scale(s, scale_dtype or jnp.float32))
    y = apply_groups(x, s.astype(jnp.float32), lambda a, b: a / b)
    if z is not None:
      y = apply_groups(y, z, lambda a, b: a + b)
    return lay, self.round(y, key), s, z

  def quantize(self, w, *, contract: tuple[int, ...],
               group_size: int | None = None, per_tensor: bool = False,
               scale_dtype: Any = jnp.float32, key=None) -> QArray:
    w = jnp.asarray(w)
    _, q, s, z = self._round_groups(w, contract, group_size, per_tensor,
                                    scale_dtype, key)
    return QArray(codes=pack_codes(self.encode(q), self.bits), scale=s,
                  zero=None if z is None else z.astype(jnp.uint8),
                  shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name,
                  fmt=self, contract=tuple(contract))

  def fake_quantize(self, w, *, contract: tuple[int, ...],
                    group_size: int | None = None, per_tensor: bool = False,
                    scale_dtype: Any = jnp.float32, key=None):
    """w_hat = (q - z) * s in float32, codes never packed."""
    w = jnp.asarray(w)
    lay, q, s, z = self._round_groups(w, contract, group_size, per_tensor,
                                      scale_dtype, key)
    if z is not None:
      q = apply_groups(q, z.astype(jnp.float32), lambda a, b: a - b)
    return lay.from_matrix(apply_groups(q, s.astype(jnp.float32),
                                        lambda a, b: a * b))
