"""Lossless bit packing of b-bit codes (b = 1..5) into bit-planes of uint8.

Layout (what a GPU kernel unpacks with shifts and masks into one natural-order tile):

- A b-bit code is split into planes of widths `plane_widths(b)`, low bits first:
  1 → (1,), 2 → (2,), 3 → (2, 1), 4 → (4,), 5 → (4, 1). A 3-bit code n is stored as
  n & 3 in a 2-bit plane and n >> 2 in a 1-bit plane.
- A plane of width w over d codes is a uint8 row of d·w/8 bytes; byte r holds the k = 8/w
  consecutive codes r·k + i at bits [i·w, (i+1)·w). Unpacking every plane the same way,
  `((row[:, None] >> i·w) & (2^w - 1))` for i < k flattened, gives each plane's codes in
  natural order, so the planes of one code combine element by element.
- For power-of-two d (the head dims 16..256 the kernels serve), every plane row holds a
  power-of-two number of bytes, as Pallas GPU blocks require. Other d ≥ 16 whose d·w is a
  multiple of 8 pack with the same layout (d = 80, 96, ...).

Bytes per vector: d·b/8. Planes are separate arrays so each is its own kernel operand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_PLANE_WIDTHS = {0: (), 1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1)}


def plane_widths(bits: int) -> tuple[int, ...]:
  """Widths of the bit-planes that store a `bits`-bit code, low bits first."""
  try:
    return _PLANE_WIDTHS[bits]
  except (KeyError, TypeError):
    raise ValueError(f"packing supports 0..5 bits per code, got {bits!r}") from None


def packed_bytes(d: int, bits: int) -> int:
  """Bytes that `pack_codes` stores for one d-vector of `bits`-bit codes."""
  return sum(d * w // 8 for w in plane_widths(bits))


def _check_dim(d: int, bits: int) -> None:
  for w in plane_widths(bits):
    if (d * w) % 8:
      raise ValueError(f"a {w}-bit plane needs d·{w} divisible by 8, got d={d}")


def _pack_plane(codes: Array, w: int) -> Array:
  """codes: [..., d] uint8 < 2^w -> [..., d·w/8] uint8, k = 8/w consecutive codes a byte."""
  d = codes.shape[-1]
  k = 8 // w
  groups = codes.reshape(*codes.shape[:-1], d // k, k).astype(jnp.uint8)
  shifts = jnp.arange(k, dtype=jnp.uint8) * w
  # Codes occupy disjoint bit ranges, so the sum is a bitwise or.
  return jnp.sum(groups << shifts, axis=-1, dtype=jnp.uint8)


def _unpack_plane(row: Array, w: int) -> Array:
  """row: [..., R] uint8 -> [..., R·8/w] uint8 codes."""
  k = 8 // w
  shifts = jnp.arange(k, dtype=jnp.uint8) * w
  codes = (row[..., None] >> shifts) & jnp.uint8((1 << w) - 1)
  return codes.reshape(*row.shape[:-1], k * row.shape[-1])


def pack_codes(codes: Array, bits: int) -> tuple[Array, ...]:
  """Packs integer codes into bit-planes.

  Args:
    codes: [..., d] integers in [0, 2^bits).
    bits: 0..5.

  Returns:
    One uint8 array per plane of `plane_widths(bits)`, plane p of shape [..., d·w_p/8].
  """
  widths = plane_widths(bits)
  _check_dim(codes.shape[-1], bits)
  codes = codes.astype(jnp.uint8)
  planes, shift = [], 0
  for w in widths:
    planes.append(_pack_plane((codes >> shift) & ((1 << w) - 1), w))
    shift += w
  return tuple(planes)


def unpack_codes(planes: tuple[Array, ...], bits: int) -> Array:
  """Inverse of `pack_codes`: planes -> [..., d] uint8 codes."""
  widths = plane_widths(bits)
  if len(planes) != len(widths):
    raise ValueError(f"{bits}-bit codes have {len(widths)} planes, got {len(planes)}")
  codes, shift = None, 0
  for plane, w in zip(planes, widths):
    part = _unpack_plane(plane, w) << shift
    codes = part if codes is None else codes | part
    shift += w
  return codes


def pack_signs(signs: Array) -> Array:
  """±1 (or bool, True = +1) [..., m] -> [..., m/8] uint8, a 1-bit plane (1 = positive)."""
  bits = signs > 0 if signs.dtype != jnp.bool_ else signs
  return pack_codes(bits.astype(jnp.uint8), 1)[0]


def unpack_signs(plane: Array) -> Array:
  """Inverse of `pack_signs`: [..., m/8] uint8 -> [..., m] float32 of ±1."""
  return unpack_codes((plane,), 1).astype(jnp.float32) * 2.0 - 1.0

