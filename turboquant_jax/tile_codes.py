"""Codes stored in the order the Mosaic GPU decode kernel loads them ("tiles" layout).

The cache's default layout keeps each token's codes as bit-planes (`packing`); the tiles
layout keeps them as `pallas_kernels.register_codes` tiles of `tokens` tokens, so the
kernel (`pallas_kernels.decode_attention_mgpu`) copies a tile and decodes it straight
into the tensor cores' registers:

- keys: tiles [tokens, d] (a 32-bit word holds codes of one token);
- values: tiles [d, tokens] (a word holds codes of several tokens).

A write packs the tiles a run of new tokens touches, clears the new tokens' bits in the
stored tiles (so rewriting a position is exact), OR-s the new bits in and writes the
tiles back. Each row's tokens are a contiguous run, as the cache's appends and
calibration re-codes are. (Scattering one token's bits instead made a layer's append
faster alone but the whole decode step slower on the H200: README.) Level indices
(0 = the smallest level), not the planes' sign-magnitude codes, are what the tiles hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import byte_codes, register_codes
from turboquant_jax import packing, quantizers

Array = jax.Array

TILE_TOKENS = 128  # the kernel steps 128 tokens at a time


def tile_tokens(groups: tuple[tuple[int, int], ...]) -> int:
  """Tokens per tile for every (channels, bits) group of keys and values (all share one
  tile length, so a block of tokens is one tile in each): the smallest multiple of 128
  that every group packs into."""
  tt = TILE_TOKENS
  while True:
    try:
      for d, b in groups:
        register_codes.TileSpec(b, tt, d)
        register_codes.TileSpec(b, d, tt)
      return tt
    except ValueError:
      tt += TILE_TOKENS
      if tt > 1024:
        raise ValueError(f"no tile length for the (channels, bits) groups {groups}") from None


OPERANDS = ("fp16", "int8")


def plain_nibbles(operand: str, bits: int, levels: str) -> bool:
  """Whether a group's tiles store plain nibbles: 4-bit int8 tiles of evenly spaced
  ("uniform") levels, which the kernel decodes without a table."""
  return operand == "int8" and bits == 4 and levels == "uniform"


@dataclasses.dataclass(frozen=True)
class TileLayout:
  """Static description of one side's tiles: width, head size, tokens per tile, whether
  tiles are [d, tokens] (values) or [tokens, d] (keys), and the kernel operand their
  words decode to: "fp16" (`register_codes` tiles) or "int8" (`byte_codes` tiles, 128
  tokens x 128 channels, or 256 x 64 for the 64-channel groups of fractional widths; 2-4
  bits); plain: 4-bit int8 tiles hold the level indices as they are (evenly spaced
  levels: `byte_codes` plain nibbles, decoded without a table; `plain_nibbles`)."""
  bits: int
  dim: int
  tokens: int
  transposed: bool
  operand: str = "fp16"
  plain: bool = False

  def __post_init__(self):
    if self.operand not in OPERANDS:
      raise ValueError(f"operand must be one of {OPERANDS}, got {self.operand!r}")
    if self.operand == "int8" and (self.shape not in byte_codes.SHAPES
                                   or self.bits not in (2, 3, 4)):
      raise ValueError(f"int8 tiles are {byte_codes.SHAPES} (tokens x channels for keys, "
                       f"the transpose for values) at 2-4 bits, got {self.tokens} tokens x "
                       f"{self.dim} channels at {self.bits}")
    if self.plain and (self.operand != "int8" or self.bits != 4):
      raise ValueError(f"plain nibbles are 4-bit int8 tiles, got {self.bits}-bit "
                       f"{self.operand} tiles")

  @property
  def shape(self) -> tuple[int, int]:
    """The decoded tile's [rows, cols]."""
    return (self.dim, self.tokens) if self.transposed else (self.tokens, self.dim)

  @property
  def spec(self) -> register_codes.TileSpec:
    """The tile's shape as a `register_codes.TileSpec` (int8 tiles have the same word
    arrays: [64, 8·bits] per 128 x 128 tile)."""
    if self.transposed:
      return register_codes.TileSpec(self.bits, self.dim, self.tokens)
    return register_codes.TileSpec(self.bits, self.tokens, self.dim)

  def pack(self, tiles: Array, mask: bool = False) -> Array:
    """Level indices [..., rows, cols] -> int32 words [..., 64, C]; mask: the values are
    bit masks (2^bits - 1 marks a slot), packed to the same bits as any code's."""
    if self.operand == "int8":
      return byte_codes.pack_tile(tiles, self.bits, mask=mask, plain=self.plain)
    return register_codes.pack_tile(tiles, self.spec)

  def unpack(self, words: Array) -> Array:
    if self.operand == "int8":
      return byte_codes.unpack_tile(words, self.bits, self.shape, plain=self.plain)
    return register_codes.unpack_tile(words, self.spec)


@flax.struct.dataclass
class TileCodes:
  """Codes of one channel group in the tiles layout.

  Attributes:
    words: int32 [B, H, (L / tokens)·64, C], `TileLayout.pack` tiles in order.
    norms: [B, H, L] ‖x‖ in the quantizer's norm dtype.
    norm_max: float32 [B, H], the largest norm ever written to the row (as stored): an
      upper bound of `norms` kept on append, so a decode step need not reduce over L
      (the int8 kernel's p·‖v‖ scale, `decode_attention_mgpu.decode_partials`).
    layout: the `TileLayout` (static).
  """

  words: Array
  norms: Array
  norm_max: Array
  layout: TileLayout = flax.struct.field(pytree_node=False)


def empty(lead: tuple[int, int, int], layout: TileLayout, norm_dtype) -> TileCodes:
  """Tiles of level 0 and norm 0 for [B, H, L] tokens; L must be a multiple of
  layout.tokens."""
  b, h, length = lead
  if length % layout.tokens:
    raise ValueError(f"the tiles layout needs max_len divisible by {layout.tokens}, "
                     f"got {length}")
  rows = length // layout.tokens * register_codes.WORD_ROWS
  # Level 0's bits: zeros, except 4-bit sign-magnitude byte tiles (all ones).
  fill = -1 if layout.operand == "int8" and layout.bits == 4 and not layout.plain else 0
  return TileCodes(words=jnp.full((b, h, rows, layout.spec.words_per_row), fill, jnp.int32),
                   norms=jnp.zeros((b, h, length), norm_dtype),
                   norm_max=jnp.zeros((b, h), jnp.float32), layout=layout)


def _raised_max(norm_max: Array, norms: Array, written: Array) -> Array:
  """norm_max [B, H] raised to the written [B, T] of norms [B, H, T] (stored dtype)."""
  new = jnp.where(written[:, None, :], norms.astype(jnp.float32), 0.0)
  return jnp.maximum(norm_max, jnp.max(new, axis=-1, initial=0.0))


def _to_tiles(x: Array, layout: TileLayout) -> Array:
  """[..., n·tokens, d] -> [..., n, rows, cols] in the tile's orientation."""
  *lead, t, d = x.shape
  x = x.reshape(*lead, t // layout.tokens, layout.tokens, d)
  return jnp.swapaxes(x, -1, -2) if layout.transposed else x


def _from_tiles(x: Array, layout: TileLayout) -> Array:
  if layout.transposed:
    x = jnp.swapaxes(x, -1, -2)
  *lead, n, tt, d = x.shape
  return x.reshape(*lead, n * tt, d)


def write_run(codes: TileCodes, levels: Array, norms: Array, start: Array,
              count: Array) -> TileCodes:
  """Writes token j of the run to position start + j, for j < count (per row).

  The tiles the run touches are packed from the new tokens and from a mask of their slots;
  the mask's bits are cleared in the stored tiles and the new bits OR-ed in.

  Args:
    codes: the `TileCodes` to update.
    levels: uint8 [B, H, T, d] level indices. norms: [B, H, T].
    start: int32 [B] first position of each row's run; count: int32 [B] tokens written
      (0 writes nothing). Positions past the cache are dropped (callers check overflow).
  """
  layout = codes.layout
  tt, wr = layout.tokens, register_codes.WORD_ROWS
  t = levels.shape[2]
  n_tiles = codes.norms.shape[-1] // tt
  touched = min((t + tt - 2) // tt + 1, n_tiles)        # tiles a run of t tokens can touch
  ones = (1 << layout.bits) - 1

  def one_row(words, lv, start, count):
    first = jnp.clip(start // tt, 0, n_tiles - touched)
    slots = start - first * tt + jnp.arange(t)
    slots = jnp.where(jnp.arange(t) < count, slots, touched * tt)   # dropped
    h, d = lv.shape[0], lv.shape[-1]
    window = jnp.zeros((h, touched * tt, d), jnp.uint8).at[:, slots].set(lv, mode="drop")
    mask = jnp.zeros((h, touched * tt, d), jnp.uint8).at[:, slots].set(
        jnp.uint8(ones), mode="drop")
    new = layout.pack(_to_tiles(window, layout))
    clear = layout.pack(_to_tiles(mask, layout), mask=True)
    new = new.reshape(h, touched * wr, -1)
    clear = clear.reshape(h, touched * wr, -1)
    old = jax.lax.dynamic_slice_in_dim(words, first * wr, touched * wr, axis=1)
    # new & clear: a slot outside the run packs as code 0, whose bits need not be 0.
    return jax.lax.dynamic_update_slice_in_dim(words, (old & ~clear) | (new & clear),
                                               first * wr, axis=1)

  words = jax.vmap(one_row)(codes.words, levels, start, count)
  idx = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  idx = jnp.where(jnp.arange(t)[None, :] < count[:, None], idx, codes.norms.shape[-1])
  new_norms = jax.vmap(lambda buf, upd, i: buf.at[:, i].set(upd.astype(buf.dtype),
                                                            mode="drop"))(
      codes.norms, norms, idx)
  written = jnp.arange(t)[None, :] < count[:, None]
  return codes.replace(words=words, norms=new_norms, norm_max=_raised_max(
      codes.norm_max, norms.astype(codes.norms.dtype), written))


def write_tiles(codes: TileCodes, words: Array, norms: Array, start: Array,
                count: Array) -> TileCodes:
  """Writes packed tiles of a run that starts on a tile boundary: token j < count of each
  row to position start + j (the fused append, `pallas_kernels.tile_quantize`).

  Tiles the run fills are replaced; in the one it fills in part, only the run's slots
  change (the others keep their bits, as `write_run` keeps them); tiles past its end
  are untouched.

  Args:
    codes: the `TileCodes` to update.
    words: int32 [B, H, n·64, C]: `register_codes.pack_tile` of n tiles of the run's
      tokens. norms: [B, H, n·tokens] in the codes' norm dtype.
    start: int32 [B], multiples of the tile length with start + n·tokens within the cache
      where count > 0 (callers check; rows with count 0 are left as they are).
    count: int32 [B] in [0, n·tokens].
  """
  layout = codes.layout
  tt, wr = layout.tokens, register_codes.WORD_ROWS
  b, h, rows, c = words.shape
  n = rows // wr
  if codes.words.shape[:2] != (b, h) or codes.words.shape[-1] != c or rows % wr:
    raise ValueError(f"words {words.shape} do not fit the codes {codes.words.shape}")
  if norms.shape != (b, h, n * tt):
    raise ValueError(f"norms {norms.shape} do not fit {n} tiles of {tt} tokens")
  ones = (1 << layout.bits) - 1
  filled, rem = count // tt, count % tt
  # The part-filled tile's slot mask, packed like the codes: [B, 64, C].
  slots = jnp.arange(tt, dtype=jnp.int32)[None, :, None] < rem[:, None, None]
  mask = jnp.broadcast_to(jnp.where(slots, jnp.uint8(ones), jnp.uint8(0)),
                          (b, tt, layout.dim))
  mask = layout.pack(_to_tiles(mask, layout)[:, 0], mask=True)

  def one_row(buf, new, norm_buf, new_norms, start, count, filled, mask):
    first = start // tt
    old = jax.lax.dynamic_slice_in_dim(buf, first * wr, rows, axis=1)   # [H, n·64, C]
    tile = (jnp.arange(rows) // wr)[None, :, None]
    mask = jnp.tile(mask, (n, 1))[None]
    merged = jnp.where(tile < filled, new,
                       jnp.where(tile == filled, (old & ~mask) | (new & mask), old))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, merged, first * wr, axis=1)
    old_norms = jax.lax.dynamic_slice_in_dim(norm_buf, start, n * tt, axis=1)
    keep = jnp.arange(n * tt)[None, :] < count
    norm_buf = jax.lax.dynamic_update_slice_in_dim(
        norm_buf, jnp.where(keep, new_norms.astype(norm_buf.dtype), old_norms), start,
        axis=1)
    return buf, norm_buf

  new_words, new_norms = jax.vmap(one_row)(codes.words, words, codes.norms, norms, start,
                                           count, filled, mask)
  written = jnp.arange(n * tt)[None, :] < count[:, None]
  return codes.replace(words=new_words, norms=new_norms, norm_max=_raised_max(
      codes.norm_max, norms.astype(codes.norms.dtype), written))


def read_levels(codes: TileCodes) -> Array:
  """uint8 [B, H, L, d] level indices of every position."""
  b, h = codes.words.shape[:2]
  tiles = codes.words.reshape(b, h, -1, register_codes.WORD_ROWS, codes.words.shape[-1])
  return _from_tiles(codes.layout.unpack(tiles), codes.layout)


def to_planes(codes: TileCodes) -> Any:
  """The same codes as `quantizers.MSECodes` (bit-planes), for the jnp reference paths."""
  bits = codes.layout.bits
  sign_magnitude = quantizers.code_of_level(read_levels(codes).astype(jnp.int32), bits)
  return quantizers.MSECodes(planes=packing.pack_codes(sign_magnitude.astype(jnp.uint8), bits),
                             norms=codes.norms)
