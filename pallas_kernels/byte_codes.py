"""3-bit codes stored for a byte-permute decode into int8 wgmma operands.

`pallas_kernels.register_codes` decodes codes into fp16 fragments with a few bit
operations and fp16 FMAs per pair of codes (~2.5 instructions per code with the level
polynomial). Here the level is looked up instead: `prmt.b32 d, lo, hi, sel` picks each of
d's four bytes from the eight bytes of (lo, hi) by a 3-bit index in a nibble of sel, so
with the eight levels of a 3-bit codebook as int8 in (lo, hi) one instruction turns four
codes into four levels, exactly (any codebook: Lloyd-Max itself, no polynomial), already
in the layout of wgmma's 8-bit A operand (`WGMMA_LAYOUT_8BIT`: thread t = 32·w + 4·r + c
holds, per register (mt, kt, rh), row 64·mt + 16·w + 8·rh + r and the four columns
16·kt + 4·c + 0..3, one byte each).

Storage, no bit wasted: a thread's twelve words (loaded as int32 [64, 24] in the fp16
WGMMA layout, as `register_codes` tiles are) form four groups of three; in a group, bits
0-2 of each nibble of the three words hold 24 codes (selectors after one AND with
0x77777777), and the bits 3 of the nibbles hold 8 more (word b's nibble i bit 3 is bit b
of the fourth selector's nibble i: three shifts and three LOP3). Each selector word feeds
two PRMTs (its low and high halves): 21 instructions per 32 codes.

`bit_sources` maps every bit of the word array to its (row, col, code bit); `pack_tile`
and `unpack_tile` follow from it, and `decode_words` runs the decode in numpy, selector by
selector, as the kernel does (the tests' reference). Pure numpy / jnp: the Mosaic GPU code
is `benchmarks.mgpu_probe_s8.prmt_decoder`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BITS = 3
ROWS = COLS = 128            # one tile: 128 tokens x 128 channels (keys) or the transpose
WORD_ROWS = 64
WORDS_PER_ROW = ROWS * COLS * BITS // 32 // WORD_ROWS      # 24
GROUPS = WORDS_PER_ROW // 2 * 2 // 6                        # 4 groups of 3 words per thread


def _thread_word(w: int, lane: int, k: int) -> tuple[int, int]:
  """(row, col) in the [64, 24] word array of word k of thread 32·w + lane, as the fp16
  WGMMA layout loads an int32 array: k = 4·ct + 2·rh + v."""
  r8, c = divmod(lane, 4)
  ct, rem = divmod(k, 4)
  rh, v = divmod(rem, 2)
  return 16 * w + 8 * rh + r8, 8 * ct + 2 * c + v


def _out_register(w: int, lane: int, n: int) -> tuple[int, int]:
  """(row, first col) of output register n of thread 32·w + lane in WGMMA_LAYOUT_8BIT
  over a [128, 128] tile: n = 16·mt + 2·kt + rh."""
  r8, c = divmod(lane, 4)
  mt, rem = divmod(n, 16)
  kt, rh = divmod(rem, 2)
  return 64 * mt + 16 * w + 8 * rh + r8, 16 * kt + 4 * c


@functools.lru_cache(maxsize=None)
def bit_sources() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For every bit of the word array, flattened [64·24·32]: the (row, col) of the tile
  whose code it holds and which code bit."""
  src = np.full((WORD_ROWS, WORDS_PER_ROW, 32, 3), -1, np.int64)

  def claim(word, pos, row, col, bit):
    r, c = word
    if src[r, c, pos, 0] >= 0:
      raise AssertionError(f"word ({r}, {c}) bit {pos} claimed twice")
    src[r, c, pos] = (row, col, bit)

  for w in range(4):
    for lane in range(32):
      for n in range(32):                       # output registers of the thread
        g, s, half = n // 8, (n % 8) // 2, n % 2
        row, col = _out_register(w, lane, n)
        for j in range(4):                      # bytes: nibble 4·half + j of selector s
          i = 4 * half + j
          for b in range(BITS):
            if s < 3:       # bits 0-2 of nibble i of word 3g + s
              claim(_thread_word(w, lane, 3 * g + s), 4 * i + b, row, col + j, b)
            else:           # bit 3 of nibble i of word 3g + b
              claim(_thread_word(w, lane, 3 * g + b), 4 * i + 3, row, col + j, b)
  if np.any(src[..., 0] < 0):
    raise AssertionError("the layout leaves word bits unused")
  return tuple(src[..., k].reshape(-1) for k in range(3))


def pack_tile(codes: Array) -> Array:
  """Level indices [..., 128, 128] (integers < 8) -> int32 words [..., 64, 24]."""
  if codes.shape[-2:] != (ROWS, COLS):
    raise ValueError(f"expected [..., {ROWS}, {COLS}] codes, got {codes.shape}")
  src_row, src_col, src_bit = bit_sources()
  flat = codes.reshape(*codes.shape[:-2], ROWS * COLS).astype(jnp.uint32)
  bits = (flat[..., src_row * COLS + src_col] >> jnp.asarray(src_bit, jnp.uint32)) & 1
  bits = bits.reshape(*codes.shape[:-2], WORD_ROWS, WORDS_PER_ROW, 32)
  words = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(words, jnp.int32)


def unpack_tile(words: Array) -> Array:
  """Inverse of `pack_tile`: int32 [..., 64, 24] -> uint8 level indices [..., 128, 128]."""
  if words.shape[-2:] != (WORD_ROWS, WORDS_PER_ROW):
    raise ValueError(f"expected [..., {WORD_ROWS}, {WORDS_PER_ROW}] words, got {words.shape}")
  src_row, src_col, src_bit = bit_sources()
  u = jax.lax.bitcast_convert_type(words, jnp.uint32)
  bits = ((u[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).reshape(
      *words.shape[:-2], -1)
  order = np.argsort((src_row * COLS + src_col) * BITS + src_bit)
  gathered = bits[..., order].reshape(*words.shape[:-2], ROWS * COLS, BITS)
  codes = jnp.sum(gathered << jnp.arange(BITS, dtype=jnp.uint32), axis=-1)
  return codes.reshape(*words.shape[:-2], ROWS, COLS).astype(jnp.uint8)


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


def level_pool(levels) -> tuple[int, int]:
  """The eight int8 levels (level index order) as the two PRMT source words."""
  b = np.asarray(levels, np.int8).view(np.uint8).astype(np.int64)
  if b.shape != (8,):
    raise ValueError(f"a 3-bit codebook has 8 levels, got {np.shape(levels)}")
  return (int(b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24),
          int(b[4] | b[5] << 8 | b[6] << 16 | b[7] << 24))


def decode_words(words: np.ndarray, levels) -> np.ndarray:
  """Runs the kernel's decode in numpy: int32 words [64, 24] -> int8 levels [128, 128],
  thread by thread, selector by selector, with PTX's PRMT."""
  w = np.asarray(words).view(np.uint32).astype(np.int64)
  lo, hi = level_pool(levels)
  out = np.zeros((ROWS, COLS), np.int8)
  for wp in range(4):
    for lane in range(32):
      tw = [w[_thread_word(wp, lane, k)] for k in range(3 * GROUPS)]
      n = 0
      for g in range(GROUPS):
        a, b, c = tw[3 * g:3 * g + 3]
        sels = [x & 0x77777777 for x in (a, b, c)]
        sels.append(((a >> 3) & 0x11111111) | ((b >> 2) & 0x22222222)
                    | ((c >> 1) & 0x44444444))
        for s in sels:
          for half in range(2):
            r = prmt(lo, hi, s if half == 0 else s >> 16)
            row, col = _out_register(wp, lane, n)
            out[row, col:col + 4] = np.array([r], np.uint32).view(np.int8)
            n += 1
  return out
