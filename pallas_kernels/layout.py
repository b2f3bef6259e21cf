"""Documented storage layout of packed low-bit codes (shared with compressjax).

Layout (documented contract, also used by `pallas_kernels`): codes of `bits`
bits are packed along one axis as an LSB-first bit stream. Code i of that axis
occupies stream bits [i*bits, (i+1)*bits), least significant bit first; byte j
holds stream bits [8j, 8j+8) with stream bit 8j as its least significant bit.
For 4 bits this means code 2i sits in the LOW nibble of byte i and code 2i+1 in
the HIGH nibble (bitsandbytes uses the opposite order). For 2 bits code 4i+k
sits in bits [2k, 2k+2) of byte i. The axis is zero-padded to a whole number of
bytes; the packed axis has length ceil(n * bits / 8).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def packed_length(n: int, bits: int) -> int:
  return -(-n * bits // 8)


def _pad_to(u, axis: int, multiple: int):
  n = u.shape[axis]
  pad = (-n) % multiple
  if pad:
    widths = [(0, 0)] * u.ndim
    widths[axis] = (0, pad)
    u = jnp.pad(u, widths)
  return u


def pack(u, bits: int, axis: int = 0):
  """Packs unsigned codes `u` (values < 2**bits) into uint8 along `axis`."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bits must be in [1, 8], got {bits}")
  u = jnp.asarray(u).astype(jnp.uint8)
  if bits == 8:
    return u
  u = jnp.moveaxis(u, axis, -1)
  n = u.shape[-1]
  if 8 % bits == 0:
    per = 8 // bits
    u = _pad_to(u, -1, per)
    u = u.reshape(u.shape[:-1] + (u.shape[-1] // per, per))
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    # Fields do not overlap, so the sum is the bitwise or.
    out = jnp.sum(u << shifts, axis=-1, dtype=jnp.uint8)
  else:
    u = _pad_to(u, -1, 8)  # 8 codes fill exactly `bits` bytes
    bit = (u[..., None] >> jnp.arange(bits, dtype=jnp.uint8)) & 1
    bit = bit.reshape(bit.shape[:-2] + (-1, 8))
    out = jnp.sum(bit << jnp.arange(8, dtype=jnp.uint8), axis=-1,
                  dtype=jnp.uint8)[..., :packed_length(n, bits)]
  return jnp.moveaxis(out.astype(jnp.uint8), -1, axis)


def unpack(p, bits: int, n: int, axis: int = 0):
  """Inverse of `pack`: returns uint8 codes with length `n` along `axis`."""
  if bits == 8:
    return p
  p = jnp.moveaxis(jnp.asarray(p), axis, -1)
  if 8 % bits == 0:
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    u = (p[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    u = u.reshape(u.shape[:-2] + (-1,))
  else:
    p = _pad_to(p, -1, bits)  # whole groups of 8 codes
    bit = (p[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    bit = bit.reshape(bit.shape[:-2] + (-1, bits))
    u = jnp.sum(bit << jnp.arange(bits, dtype=jnp.uint8), axis=-1,
                dtype=jnp.uint8)
  return jnp.moveaxis(u[..., :n], -1, axis)


def pack_reference(u: np.ndarray, bits: int) -> np.ndarray:
  """Slow numpy bit-stream packer of a 1-D array (the definition, for tests)."""
  u = np.asarray(u).astype(np.int64).ravel()
  nbytes = packed_length(u.size, bits)
  out = np.zeros(nbytes, np.uint8)
  for i, v in enumerate(u):
    for b in range(bits):
      if (v >> b) & 1:
        s = i * bits + b
        out[s // 8] |= np.uint8(1 << (s % 8))
  return out
