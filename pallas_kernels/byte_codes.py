"""Codes stored for a byte-permute decode into int8 wgmma operands (2, 3 or 4 bits).

`pallas_kernels.register_codes` decodes codes into fp16 fragments with a few bit
operations and fp16 FMAs per pair of codes (~2.5 instructions per code with the level
polynomial). Here the level is looked up instead: `prmt.b32 d, lo, hi, sel` picks each of
d's four bytes from the eight bytes of (lo, hi) by a 3-bit index in a nibble of sel, so
with a codebook's levels as int8 in (lo, hi) one instruction turns four codes into four
levels, exactly (any codebook: Lloyd-Max itself, no polynomial), already in the layout of
wgmma's 8-bit A operand (`WGMMA_LAYOUT_8BIT`: thread t = 32·w + 4·r + c holds, per
register n = 2·(cols/16)·mt + 2·kt + rh, row 64·mt + 16·w + 8·rh + r and the four columns
16·kt + 4·c + 0..3, one byte each) of a tile of 16,384 codes: [128, 128] (whole heads of
128 channels), or [256, 64] / [64, 256] (the 64-channel groups of fractional widths:
keys, values), 32 registers per thread either way.

A thread's words are loaded as int32 [64, C] in the fp16 WGMMA layout, as
`register_codes` tiles are (C = 8·bits: 16, 24 or 32; 8, 12 or 16 words per thread), and
every word bit holds a code bit:
- 2 bits: a word holds 16 codes, bits 0-1 and 2-3 of its nibbles; selectors w & 0x3333...
  and (w >> 2) & 0x3333..., each feeding two PRMTs (its low and high halves), the four
  levels in `lo`: 9 instructions per 16 codes.
- 3 bits: three words hold 32 codes: bits 0-2 of each nibble 24 of them (selectors after
  one AND with 0x7777...), the bits 3 of the nibbles 8 more (word b's nibble i bit 3 is
  bit b of the fourth selector's nibble i: three shifts and three LOP3): 21 per 32 codes.
- 4 bits: a word holds 8 codes, one per nibble, in sign-magnitude: the 16 levels are
  symmetric on a half-integer grid, y + 1/2 with y = T[m] (codes 8 + m) or y = ~T[m] =
  -T[m] - 1 (codes 7 - m), T eight integers in [0, 127]; the nibble holds m in bits 0-2
  and the sign in bit 3 (`sign_magnitude`). One PRMT looks up T[m] (selector w & 0x7777...),
  a second makes the sign bytes 0x00 / 0xFF by sign-replicating bits 3 and 7 of w's bytes
  (from w and w << 4, constant selectors), one XOR applies them: 9 per 8 codes (13 with
  two tables and a byte mask, which also took two more registers per thread). The 1/2
  is the kernel's: it adds 1/2·Σq to a key's dot and 1/2·Σp·‖v‖ to a value's output.
- 4 bits, plain (`plain=True`, for evenly spaced levels, `codebook.uniform_codebook`): a
  nibble holds the level index n itself, register 2k + h's byte j in word k's nibble
  2j + h, so ``w & 0x0F0F0F0F`` and ``(w >> 4) & 0x0F0F0F0F`` are the two registers (3
  per 8 codes, no table): the level is (n - 15/2)·Δ, the -15/2 the kernel's as the 1/2
  above (H200, K4/V3 at 8 x 32K: the kernel 89 -> 78 us, `key_decode_probe_gpu.json`).

`bit_sources` maps every bit of the word array to its (row, col, code bit); `pack_tile`
and `unpack_tile` follow from it, and `decode_words` runs the decode in numpy, instruction
by instruction as the kernel does (the tests' reference). Pure numpy / jnp: the Mosaic GPU
code is `benchmarks.mgpu_probe_s8.prmt_decoder`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ROWS = COLS = 128            # the default tile: 128 tokens x 128 channels, or the transpose
SHAPES = ((128, 128), (256, 64), (64, 256))   # tiles of 16,384 codes
WORD_ROWS = 64
REGISTERS = 32               # int8x4 output registers per thread of a tile
# 4 bits: PRMT selectors of the sign bytes of a word's low / high four codes from (w, w << 4):
# code j's sign (nibble bit 3) is bit 7 of byte j // 2 of w (odd j) or of w << 4 (even j).
SIGN_SELECTORS = (0x9D8C, 0xBFAE)


def check_bits(bits: int) -> None:
  if bits not in (2, 3, 4):
    raise ValueError(f"byte codes support 2, 3 or 4 bits, got {bits!r}")


def words_per_row(bits: int) -> int:
  check_bits(bits)
  return ROWS * COLS * bits // 32 // WORD_ROWS


def thread_words(bits: int) -> int:
  return words_per_row(bits) // 2


def _thread_word(w: int, lane: int, k: int) -> tuple[int, int]:
  """(row, col) in the [64, 24] word array of word k of thread 32·w + lane, as the fp16
  WGMMA layout loads an int32 array: k = 4·ct + 2·rh + v."""
  r8, c = divmod(lane, 4)
  ct, rem = divmod(k, 4)
  rh, v = divmod(rem, 2)
  return 16 * w + 8 * rh + r8, 8 * ct + 2 * c + v


def check_shape(shape) -> tuple[int, int]:
  shape = tuple(shape)
  if shape not in SHAPES:
    raise ValueError(f"byte-code tiles are one of {SHAPES}, got {shape}")
  return shape


def _out_register(w: int, lane: int, n: int, cols: int = COLS) -> tuple[int, int]:
  """(row, first col) of output register n of thread 32·w + lane in WGMMA_LAYOUT_8BIT
  over a tile of `cols` columns: n = 2·(cols/16)·mt + 2·kt + rh."""
  r8, c = divmod(lane, 4)
  mt, rem = divmod(n, cols // 8)
  kt, rh = divmod(rem, 2)
  return 64 * mt + 16 * w + 8 * rh + r8, 16 * kt + 4 * c


PLAIN_MASK = 0x0F0F0F0F


def code_bit(bits: int, n: int, j: int, b: int, plain: bool = False) -> tuple[int, int]:
  """Where bit b of the code decoded into byte j of output register n lives: (the
  thread's word index, bit position in that word); plain: 4-bit plain nibbles."""
  if plain:
    if bits != 4:
      raise ValueError(f"plain nibbles are 4-bit codes, got {bits} bits")
    k, half = divmod(n, 2)
    return k, 4 * (2 * j + half) + b
  if bits == 2:
    k, r = divmod(n, 4)
    sel, half = divmod(r, 2)
    return k, 4 * (4 * half + j) + 2 * sel + b
  if bits == 3:
    g, r = divmod(n, 8)
    sel, half = divmod(r, 2)
    i = 4 * half + j
    return (3 * g + sel, 4 * i + b) if sel < 3 else (3 * g + b, 4 * i + 3)
  k, half = divmod(n, 2)
  return k, 4 * (4 * half + j) + b


@functools.lru_cache(maxsize=None)
def bit_sources(bits: int, shape=(ROWS, COLS), plain: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For every bit of the word array, flattened [64·C·32]: the (row, col) of the tile
  (of `shape`) whose code it holds and which code bit (plain: 4-bit plain nibbles)."""
  _, cols = check_shape(shape)
  c = words_per_row(bits)
  src = np.full((WORD_ROWS, c, 32, 3), -1, np.int64)
  for w in range(4):
    for lane in range(32):
      for n in range(REGISTERS):
        row, col = _out_register(w, lane, n, cols)
        for j in range(4):
          for b in range(bits):
            k, pos = code_bit(bits, n, j, b, plain)
            r, cc = _thread_word(w, lane, k)
            if src[r, cc, pos, 0] >= 0:
              raise AssertionError(f"word ({r}, {cc}) bit {pos} claimed twice")
            src[r, cc, pos] = (row, col + j, b)
  if np.any(src[..., 0] < 0):
    raise AssertionError(f"{bits} bits: the layout leaves word bits unused")
  return tuple(src[..., k].reshape(-1) for k in range(3))


def sign_magnitude(codes, inverse: bool = False):
  """4-bit level indices n -> stored nibbles: 8 + m -> m, 7 - m -> 8 + m (m < 8: the
  magnitude's index, bit 3 the sign); inverse: back. Works on ints and integer arrays."""
  if inverse:
    return codes ^ ((codes >> 3) * 7 + 8)       # v < 8: v ^ 8; v >= 8: v ^ 15
  return codes ^ ((1 - (codes >> 3)) * 7 + 8)   # n >= 8: n ^ 8; n < 8: n ^ 15


def pack_tile(codes: Array, bits: int, mask: bool = False, plain: bool = False) -> Array:
  """Level indices [..., rows, cols] (integers < 2^bits; a shape of `SHAPES`) -> int32
  words [..., 64, 8·bits] (4 bits: in `sign_magnitude`, or as they are with plain);
  mask: the values are bit masks of a tile's slots, packed as they are."""
  if tuple(codes.shape[-2:]) not in SHAPES:
    raise ValueError(f"expected [..., rows, cols] codes of {SHAPES}, got {codes.shape}")
  rows, cols = codes.shape[-2:]
  src_row, src_col, src_bit = bit_sources(bits, (rows, cols), plain)
  flat = codes.reshape(*codes.shape[:-2], rows * cols).astype(jnp.uint32)
  if bits == 4 and not mask and not plain:
    flat = sign_magnitude(flat)
  bit = (flat[..., src_row * cols + src_col] >> jnp.asarray(src_bit, jnp.uint32)) & 1
  bit = bit.reshape(*codes.shape[:-2], WORD_ROWS, words_per_row(bits), 32)
  words = jnp.sum(bit << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(words, jnp.int32)


def unpack_tile(words: Array, bits: int, shape=(ROWS, COLS), plain: bool = False) -> Array:
  """Inverse of `pack_tile`: int32 [..., 64, 8·bits] -> uint8 level indices
  [..., rows, cols] of `shape`."""
  c = words_per_row(bits)
  if words.shape[-2:] != (WORD_ROWS, c):
    raise ValueError(f"expected [..., {WORD_ROWS}, {c}] words, got {words.shape}")
  rows, cols = check_shape(shape)
  src_row, src_col, src_bit = bit_sources(bits, (rows, cols), plain)
  u = jax.lax.bitcast_convert_type(words, jnp.uint32)
  bit = ((u[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).reshape(
      *words.shape[:-2], -1)
  order = np.argsort((src_row * cols + src_col) * bits + src_bit)
  gathered = bit[..., order].reshape(*words.shape[:-2], rows * cols, bits)
  codes = jnp.sum(gathered << jnp.arange(bits, dtype=jnp.uint32), axis=-1)
  if bits == 4 and not plain:
    codes = sign_magnitude(codes, inverse=True)
  return codes.reshape(*words.shape[:-2], rows, cols).astype(jnp.uint8)


def prmt(lo: int, hi: int, sel: int) -> int:
  """PTX `prmt.b32` (default mode) on Python ints: byte j of the result is byte
  (sel >> 4j) & 7 of hi:lo, or that byte's sign replicated when bit 4j + 3 is set."""
  pool = (lo & 0xFFFFFFFF) | (hi & 0xFFFFFFFF) << 32
  out = 0
  for j in range(4):
    nib = (sel >> (4 * j)) & 0xF
    byte = (pool >> (8 * (nib & 7))) & 0xFF
    if nib & 8:
      byte = 0xFF if byte & 0x80 else 0
    out |= byte << (8 * j)
  return out


def level_pools(levels, bits: int) -> tuple[int, ...]:
  """The 2^bits int8 levels (level index order) as PRMT source words (lo, hi) (hi unused
  at 2 bits); at 4 bits the words of T, the magnitudes: the levels must be
  (~T[7], ..., ~T[0], T[0], ..., T[7]) with T in [0, 127] (see the module docstring)."""
  check_bits(bits)
  b = np.asarray(levels)
  if b.shape != (1 << bits,) or np.any(b != np.round(b)) or np.any(np.abs(b) > 127 + (bits == 4)):
    raise ValueError(f"{bits} bits need {1 << bits} integer levels in [-127, 127] (4 bits: "
                     f"[-128, 127]), got {levels!r}")
  if bits == 4:
    t = b[8:]
    if np.any(t < 0) or np.any(b[7::-1] != -t - 1):
      raise ValueError(f"4-bit levels must be (~T[7], ..., ~T[0], T[0], ..., T[7]) with T "
                       f"in [0, 127] (sign-magnitude), got {levels!r}")
    b = t
  b = np.concatenate([b.astype(np.int8).view(np.uint8), np.zeros(8, np.uint8)])
  b = b[:8].astype(np.int64)
  return tuple(int(b[i] | b[i + 1] << 8 | b[i + 2] << 16 | b[i + 3] << 24)
               for i in range(0, len(b), 4))


def selectors(bits: int, words: list[int]) -> list[tuple[int, ...]]:
  """The decode's selector words from a thread's words, in output order (each feeds
  two registers: its low and high halves): (index selector,) or, at 4 bits, (index
  selector, w, w << 4: the sign bytes' sources)."""
  m3, m7 = 0x33333333, 0x77777777
  if bits == 2:
    return [(x,) for w in words for x in (w & m3, (w >> 2) & m3)]
  if bits == 3:
    out = []
    for g in range(0, len(words), 3):
      a, b, c = words[g:g + 3]
      out += [(a & m7,), (b & m7,), (c & m7,),
              (((a >> 3) & 0x11111111) | ((b >> 2) & 0x22222222) | ((c >> 1) & 0x44444444),)]
    return out
  return [(w & m7, w, (w << 4) & 0xFFFFFFFF) for w in words]


def decode_words(words: np.ndarray, levels, bits: int, shape=(ROWS, COLS),
                 plain: bool = False) -> np.ndarray:
  """Runs the kernel's decode in numpy: int32 words [64, 8·bits] -> int8 levels of
  `shape`, thread by thread, with PTX's PRMT and the kernel's selectors; plain: the
  4-bit plain nibbles' masks (levels must then be 0..15: the bytes are the indices)."""
  w = np.asarray(words).view(np.uint32).astype(np.int64)
  rows, cols = check_shape(shape)
  out = np.zeros((rows, cols), np.int8)
  if plain and (bits != 4 or tuple(levels) != tuple(range(16))):
    raise ValueError(f"plain nibbles decode 4-bit codes to 0..15, got {bits} bits, "
                     f"levels {levels!r}")
  pools = None if plain else level_pools(levels, bits)
  for wp in range(4):
    for lane in range(32):
      tw = [int(w[_thread_word(wp, lane, k)]) for k in range(thread_words(bits))]
      if plain:   # register 2k + h: word k's nibbles h, h + 2, h + 4, h + 6
        regs = [(x >> (4 * half)) & PLAIN_MASK for x in tw for half in range(2)]
      else:
        regs = []
        for sel in selectors(bits, tw):
          for half in range(2):
            r = prmt(pools[0], pools[1], sel[0] >> (16 * half))
            if bits == 4:   # ~T where the sign bytes are 0xFF
              r ^= prmt(sel[1], sel[2], SIGN_SELECTORS[half])
            regs.append(r)
      for n, r in enumerate(regs):
        row, col = _out_register(wp, lane, n, cols)
        out[row, col:col + 4] = np.array([r], np.uint32).view(np.int8)
  return out
