"""byte_codes: codes packed for the byte-permute (PRMT) decode into int8 fragments."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import byte_codes as bc


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_word_bit_holds_one_code_bit(bits):
  rows, cols, which = bc.bit_sources(bits)
  assert rows.size == bc.WORD_ROWS * bc.words_per_row(bits) * 32
  target = (rows * bc.COLS + cols) * bits + which
  assert np.array_equal(np.sort(target), np.arange(bc.ROWS * bc.COLS * bits))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_round_trip(bits):
  codes = np.random.default_rng(bits).integers(0, 1 << bits, (3, bc.ROWS, bc.COLS))
  words = bc.pack_tile(jnp.asarray(codes), bits)
  assert words.shape == (3, bc.WORD_ROWS, 8 * bits) and words.dtype == jnp.int32
  np.testing.assert_array_equal(bc.unpack_tile(words, bits), codes)


@pytest.mark.parametrize("bits, shape", [(2, (128, 128)), (3, (128, 128)), (4, (128, 128)),
                                         (3, (256, 64)), (4, (64, 256)), (2, (256, 64))])
def test_prmt_decode_gives_each_codes_level_in_the_int8_fragment_layout(bits, shape):
  rng = np.random.default_rng(10 + bits)
  codes = rng.integers(0, 1 << bits, shape)
  levels = np.sort(rng.choice(np.arange(-127, 128), 1 << bits, replace=False))
  if bits == 4:   # sign-magnitude: ~T[7..0], T[0..7]
    t = np.sort(rng.choice(np.arange(0, 128), 8, replace=False))
    levels = np.concatenate([-t[::-1] - 1, t])
  words = np.asarray(bc.pack_tile(jnp.asarray(codes), bits))
  np.testing.assert_array_equal(bc.unpack_tile(words, bits, shape), codes)
  np.testing.assert_array_equal(bc.decode_words(words, levels, bits, shape), levels[codes])
  # A flipped word bit changes exactly one decoded level (the layout is a bijection).
  flipped = words.copy()
  flipped[5, 7] ^= 1 << 13
  assert np.sum(bc.decode_words(flipped, levels, bits, shape) != levels[codes]) == 1


def test_prmt_semantics():
  levels = np.array([-127, -79, -45, -14, 14, 45, 79, 127])
  lo, hi = bc.level_pools(levels, 3)
  assert bc.prmt(lo, hi, 0x7654) == np.array(levels[[4, 5, 6, 7]], np.int8).view(np.uint32)[0]
  assert bc.prmt(lo, hi, 0x0008) & 0xFF == 0xFF     # sign of byte 0 (-127) replicated
  # 4 bits: the sign bytes of a word's low four nibbles (bit 3 of nibbles 1 and 2 set).
  w = 0x0000_0880
  assert bc.prmt(w, (w << 4) & 0xFFFFFFFF, bc.SIGN_SELECTORS[0]) == 0x00FFFF00
  assert bc.prmt(w << 16, (w << 20) & 0xFFFFFFFF, bc.SIGN_SELECTORS[1]) == 0x00FFFF00


def test_sign_magnitude_nibbles():
  n = np.arange(16)
  v = bc.sign_magnitude(n)
  np.testing.assert_array_equal(v[8:], np.arange(8))           # positive: m, sign 0
  np.testing.assert_array_equal(v[:8], 15 - np.arange(8))      # 7 - m: 8 + m, sign 1
  np.testing.assert_array_equal(bc.sign_magnitude(v, inverse=True), n)


def test_errors():
  with pytest.raises(ValueError, match="rows, cols"):
    bc.pack_tile(jnp.zeros((64, 128), jnp.int32), 3)
  with pytest.raises(ValueError, match="one of"):
    bc.unpack_tile(jnp.zeros((64, 24), jnp.int32), 3, (128, 64))
  with pytest.raises(ValueError, match="64, 24"):
    bc.unpack_tile(jnp.zeros((64, 16), jnp.int32), 3)
  with pytest.raises(ValueError, match="8 integer levels"):
    bc.level_pools([1, 2, 3], 3)
  with pytest.raises(ValueError, match="in \\[-127, 127\\]"):
    bc.level_pools(np.arange(8) * 40, 3)
  with pytest.raises(ValueError, match="sign-magnitude"):
    bc.level_pools(np.arange(-8, 8) * 15, 4)                  # symmetric, no ~T
  with pytest.raises(ValueError, match="2, 3 or 4 bits"):
    bc.words_per_row(5)


@pytest.mark.parametrize("shape", bc.SHAPES)
def test_plain_nibbles_decode_by_two_masks_to_each_codes_index(shape):
  """4-bit plain nibbles: the level index itself, register 2k + h's byte j in nibble
  2j + h of word k, so w & 0x0F0F0F0F and (w >> 4) & 0x0F0F0F0F are the registers."""
  rows, cols, which = bc.bit_sources(4, shape, True)
  target = (rows * shape[1] + cols) * 4 + which
  assert np.array_equal(np.sort(target), np.arange(shape[0] * shape[1] * 4))
  codes = np.random.default_rng(7).integers(0, 16, shape)
  words = np.asarray(bc.pack_tile(jnp.asarray(codes), 4, plain=True))
  assert not np.array_equal(words, np.asarray(bc.pack_tile(jnp.asarray(codes), 4)))
  np.testing.assert_array_equal(bc.unpack_tile(words, 4, shape, plain=True), codes)
  np.testing.assert_array_equal(bc.decode_words(words, range(16), 4, shape, plain=True),
                                codes)
  flipped = words.copy()
  flipped[3, 9] ^= 1 << 22
  assert np.sum(bc.decode_words(flipped, range(16), 4, shape, plain=True) != codes) == 1
  with pytest.raises(ValueError, match="0..15"):
    bc.decode_words(words, np.arange(16) - 8, 4, shape, plain=True)
  with pytest.raises(ValueError, match="4-bit"):
    bc.bit_sources(3, shape, True)
