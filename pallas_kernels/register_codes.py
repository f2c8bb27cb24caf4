"""Low-bit codes stored in the order Hopper's tensor cores take them from registers.

A Mosaic GPU kernel feeds `wgmma` its left operand A from registers, in the WGMMA
fragment layout: thread t = 32·w + l of a warpgroup holds, of an [M, K] tile, the rows
64·mt + 16·w + 8·rh + l//4 and the column pairs (8·ct + 2·(l%4), +1), one 32-bit register
of two fp16 per (mt, ct, rh). This module stores b-bit codes (b = 2, 3, 4) so that the
words a thread loads in the *same* fragment layout, as an int32 array [64, C], decode to
its own fragment with a few bit operations and no data exchange between threads:

- Every output register (one pair of codes: the low and the high 16-bit half) is made by
  masking one shifted code word, OR-ing in the fp16 constant 1024 plus a filler bit, and
  one fp16x2 fused multiply-add: `t = (src & mask) | const` holds 1024 + 2^(P-1)·(2n + 1)
  exactly for the code n at bits P.., so `t·2^-P - (1024·2^-P + 2^(b-1))` is
  u = n - (2^b - 1)/2, the centred code, exactly (fp16 holds these integers and halves).
  4 bits: 2 shifts + 4 × (LOP3 + HFMA2) per word of 8 codes; 2 bits: 2 + 8 × 2 per 16; 3
  bits (a 2-bit and a 1-bit word, no wasted bits): about 1.75 instructions per code.
- Which word, shift and bits make each output register is one static "program" per
  (bits, tile shape), below. Packing is derived from the same program, so the kernel's
  decode and `pack_tile` cannot disagree; `decode_words` runs the program in numpy as the
  reference for both (tests).

The decoded tile gives u, not the reconstruction level: the kernel turns u into levels
with a polynomial folded into its products (see `pallas_kernels.decode_attention_mgpu`).

Codes here are *level indices* n (0 = most negative level), not the quantizers'
sign-magnitude codes (`turboquant_jax.quantizers.level_of_code` converts).

This module is pure numpy / jnp: tables and packing. The Mosaic GPU code that executes a
program lives in the kernel module.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

WORD_ROWS = 64       # a code tile is an int32 [64, C] array: one row of words per thread quad
_MAGIC = 0x6400      # fp16 1024.0: its 10 mantissa bits hold an integer exactly
_SHIFT_LEFT_1 = 1    # source word kinds: w << 1 and w >> 7 (see _a_source)
_SHIFT_RIGHT_7 = -7
# A 3-bit code's high bit comes from a 1-bit word shifted so that it lands right above
# the low two bits; group j of a 1-bit word holds its bits at offset _B_OFFSETS[j] + 2k.
_B_OFFSETS = (0, 1, 8, 9)
_B_SHIFTS = (3, 2, -5, -6)   # left shift (negative: right) that moves offset j + 2k to 2k + 3


@dataclasses.dataclass(frozen=True)
class TileSpec:
  """A decoded tile [rows, cols] of `bits`-bit codes and its word array [64, words_per_row].

  For keys rows are tokens and cols channels (scores^T = K·q^T); for values rows are
  channels and cols tokens (out^T = V^T·p^T).
  """

  bits: int
  rows: int
  cols: int

  def __post_init__(self):
    if self.bits not in (2, 3, 4):
      raise ValueError(f"register codes support 2, 3 or 4 bits, got {self.bits!r}")
    if self.rows % 64 or self.cols % 16 or self.rows <= 0 or self.cols <= 0:
      raise ValueError(f"a tile needs rows % 64 == 0 and cols % 16 == 0, got "
                       f"{self.rows} x {self.cols}")
    if self.words_per_row % 8:
      raise ValueError(f"{self.rows} x {self.cols} x {self.bits} bits is {self.words} words, "
                       "not a whole number of [64, 8] word tiles")

  @property
  def words(self) -> int:
    return self.rows * self.cols * self.bits // 32

  @property
  def words_per_row(self) -> int:
    return self.words // WORD_ROWS

  @property
  def pairs(self) -> int:
    """Output registers (pairs of codes) per thread and row half."""
    return self.rows // 64 * self.cols // 8


def tile_rows(bits: int, cols: int, at_least: int = 64) -> int:
  """The fewest rows (a multiple of 64, ≥ at_least) that make a whole word tile."""
  rows = -(-at_least // 64) * 64
  while (rows * cols * bits) % (32 * WORD_ROWS * 8):
    rows += 64
  return rows


@dataclasses.dataclass(frozen=True)
class PairOp:
  """How one output register (pair g of a row half) is made from the thread's words.

  a_word / b_word: index into the thread's words of that row half, word k of the half
  being the int32 at word column 8·(k // 2) + 2·(l % 4) + k % 2 (b_word -1: none).
  a_shift, b_shift: left shift of the source word (negative: logical right shift).
  """

  a_word: int
  a_shift: int
  a_mask: int
  b_word: int
  b_shift: int
  b_mask: int
  const: int      # magic exponent and filler bit, both halves
  position: int   # P: the code's lowest bit in the masked word


@functools.lru_cache(maxsize=None)
def program(spec: TileSpec) -> tuple[PairOp, ...]:
  """The decode program: one `PairOp` per output pair g = mt·(cols/8) + ct."""
  b = spec.bits
  n_a = spec.pairs // 8 if b == 3 else None
  ops = []
  for g in range(spec.pairs):
    b_word = b_shift = b_mask = 0
    if b == 4:
      a_word, k = divmod(g, 4)
      shift = _SHIFT_LEFT_1 if k < 2 else _SHIFT_RIGHT_7
      position = 1 + 4 * (k % 2)
      width = 4
    else:
      a_word, s = divmod(g, 8)
      shift = _SHIFT_LEFT_1 if s < 4 else _SHIFT_RIGHT_7
      position = 1 + 2 * (s % 4)
      width = 2
    a_mask = _both_halves(((1 << width) - 1) << position)
    if b == 3:
      b_word = n_a + g // 16
      j = 2 * ((g // 8) % 2) + (g % 8) // 4
      b_shift = _B_SHIFTS[j]
      b_mask = _both_halves(1 << (position + 2))
    else:
      b_word = -1
    const = _both_halves(_MAGIC | (1 << (position - 1)))
    ops.append(PairOp(a_word, shift, a_mask, b_word, b_shift, b_mask, const, position))
  return tuple(ops)


def _both_halves(x16: int) -> int:
  return (x16 & 0xFFFF) | ((x16 & 0xFFFF) << 16)


def fma_constants(spec: TileSpec, op: PairOp) -> tuple[float, float]:
  """(scale, bias) with u = t·scale + bias, both exact in fp16."""
  scale = 2.0 ** -op.position
  bias = -(1024.0 * scale + 2.0 ** (spec.bits - 1))
  return scale, bias


def words_per_half(spec: TileSpec) -> int:
  return spec.words_per_row // 4


def _shift(word: np.ndarray, s: int) -> np.ndarray:
  return (word << np.uint32(s)) if s >= 0 else (word >> np.uint32(-s))


@functools.lru_cache(maxsize=None)
def bit_sources(spec: TileSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For every bit of the word array, flattened [64·C·32]: the (row, col) of the decoded
  tile whose code it holds, and which code bit (-1 row: an unused bit)."""
  c = spec.words_per_row
  src_row = np.full((WORD_ROWS, c, 32), -1, np.int64)
  src_col = np.zeros((WORD_ROWS, c, 32), np.int64)
  src_bit = np.zeros((WORD_ROWS, c, 32), np.int64)
  low_bits = 2 if spec.bits == 3 else spec.bits
  for word_row, p, op, out_row, out_col in _fragment_pairs(spec):
    for h in range(2):
      # Bits of the A word: code bit i sits at P + i after the shift.
      for i in range(low_bits):
        pos = op.position + i + 16 * h - op.a_shift
        _claim(src_row, src_col, src_bit, word_row, _word_col(op.a_word, p), pos,
               out_row, out_col + h, i)
      if spec.bits == 3:
        pos = op.position + 2 + 16 * h - op.b_shift
        _claim(src_row, src_col, src_bit, word_row, _word_col(op.b_word, p), pos,
               out_row, out_col + h, 2)
  if np.any(src_row < 0):
    raise AssertionError(f"{spec}: the program leaves word bits unused")
  return src_row.reshape(-1), src_col.reshape(-1), src_bit.reshape(-1)


def _fragment_pairs(spec: TileSpec):
  """Every output register of a warpgroup: (word row, l % 4, its PairOp, output row,
  first output column), thread by thread as the WGMMA layout assigns them."""
  half_cols = spec.cols // 8
  for warp in range(4):
    for lane in range(32):
      r8, p = divmod(lane, 4)
      for rh in range(2):
        for g, op in enumerate(program(spec)):
          mt, ct = divmod(g, half_cols)
          yield (16 * warp + 8 * rh + r8, p, op, 64 * mt + 16 * warp + 8 * rh + r8,
                 8 * ct + 2 * p)


def _word_col(k: int, p: int) -> int:
  return 8 * (k // 2) + 2 * p + k % 2


def _claim(src_row, src_col, src_bit, r, c, pos, out_row, out_col, bit):
  if not 0 <= pos < 32:
    raise AssertionError(f"bit position {pos} outside the word")
  if src_row[r, c, pos] >= 0:
    raise AssertionError(f"word ({r}, {c}) bit {pos} claimed twice")
  src_row[r, c, pos], src_col[r, c, pos], src_bit[r, c, pos] = out_row, out_col, bit


def pack_tile(codes: Array, spec: TileSpec) -> Array:
  """Level indices [..., rows, cols] (integers < 2^bits) -> int32 words [..., 64, C]."""
  if codes.shape[-2:] != (spec.rows, spec.cols):
    raise ValueError(f"expected [..., {spec.rows}, {spec.cols}] codes, got {codes.shape}")
  src_row, src_col, src_bit = bit_sources(spec)
  flat = codes.reshape(*codes.shape[:-2], spec.rows * spec.cols).astype(jnp.uint32)
  bits = (flat[..., src_row * spec.cols + src_col] >> jnp.asarray(src_bit, jnp.uint32)) & 1
  bits = bits.reshape(*codes.shape[:-2], WORD_ROWS, spec.words_per_row, 32)
  words = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(words, jnp.int32)


def unpack_tile(words: Array, spec: TileSpec) -> Array:
  """Inverse of `pack_tile`: int32 [..., 64, C] -> uint8 level indices [..., rows, cols]."""
  if words.shape[-2:] != (WORD_ROWS, spec.words_per_row):
    raise ValueError(f"expected [..., 64, {spec.words_per_row}] words, got {words.shape}")
  src_row, src_col, src_bit = bit_sources(spec)
  u = jax.lax.bitcast_convert_type(words, jnp.uint32)
  bits = (u[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  bits = bits.reshape(*words.shape[:-2], -1)
  # Every (row, col, bit) appears exactly once among the word bits: scatter by its index.
  target = (src_row * spec.cols + src_col) * spec.bits + src_bit
  order = np.argsort(target)
  gathered = bits[..., order].reshape(*words.shape[:-2], spec.rows * spec.cols, spec.bits)
  codes = jnp.sum(gathered << jnp.arange(spec.bits, dtype=jnp.uint32), axis=-1)
  return codes.reshape(*words.shape[:-2], spec.rows, spec.cols).astype(jnp.uint8)


def decode_words(words: np.ndarray, spec: TileSpec) -> np.ndarray:
  """Runs the decode program in numpy, thread by thread, as the kernel does.

  words: int32 [64, C] -> float32 [rows, cols] centred codes u = n - (2^b - 1)/2, each
  computed through the same fp16 bit patterns and fp16 FMA the kernel uses.
  """
  w = np.asarray(words).view(np.uint32)
  out = np.full((spec.rows, spec.cols), np.nan, np.float32)
  for word_row, p, op, out_row, out_col in _fragment_pairs(spec):
    a = _shift(w[word_row, _word_col(op.a_word, p)], op.a_shift)
    t = (a & np.uint32(op.a_mask)) | np.uint32(op.const)
    if op.b_word >= 0:
      bw = _shift(w[word_row, _word_col(op.b_word, p)], op.b_shift)
      t |= bw & np.uint32(op.b_mask)
    halves = np.array([t & 0xFFFF, t >> 16], np.uint16).view(np.float16)
    scale, bias = fma_constants(spec, op)
    u = (halves.astype(np.float32) * np.float32(scale) + np.float32(bias))
    out[out_row, out_col:out_col + 2] = u.astype(np.float16)  # one rounding, as fma.rn.f16x2
  return out
