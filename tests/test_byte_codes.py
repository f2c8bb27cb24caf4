"""byte_codes: 3-bit codes packed for the byte-permute (PRMT) decode into int8 fragments."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import byte_codes as bc

LEVELS = np.array([-127, -79, -45, -14, 14, 45, 79, 127])


def test_every_word_bit_holds_one_code_bit():
  rows, cols, bits = bc.bit_sources()
  assert rows.size == bc.WORD_ROWS * bc.WORDS_PER_ROW * 32
  target = (rows * bc.COLS + cols) * bc.BITS + bits
  assert np.array_equal(np.sort(target), np.arange(bc.ROWS * bc.COLS * bc.BITS))


def test_pack_unpack_round_trip():
  codes = np.random.default_rng(0).integers(0, 8, (3, bc.ROWS, bc.COLS))
  words = bc.pack_tile(jnp.asarray(codes))
  assert words.shape == (3, bc.WORD_ROWS, bc.WORDS_PER_ROW) and words.dtype == jnp.int32
  np.testing.assert_array_equal(bc.unpack_tile(words), codes)


@pytest.mark.parametrize("seed", [1, 2])
def test_prmt_decode_gives_each_codes_level_in_the_int8_fragment_layout(seed):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 8, (bc.ROWS, bc.COLS))
  levels = np.sort(rng.choice(np.arange(-128, 128), 8, replace=False))
  words = np.asarray(bc.pack_tile(jnp.asarray(codes)))
  np.testing.assert_array_equal(bc.decode_words(words, levels), levels[codes])
  # A flipped word bit changes exactly one decoded level (the layout is a bijection).
  flipped = words.copy()
  flipped[5, 7] ^= 1 << 13
  assert np.sum(bc.decode_words(flipped, levels) != levels[codes]) == 1


def test_prmt_semantics():
  lo, hi = bc.level_pool(LEVELS)
  assert bc.prmt(lo, hi, 0x7654) == np.array(LEVELS[[4, 5, 6, 7]], np.int8).view(np.uint32)[0]
  assert bc.prmt(lo, hi, 0x0008) & 0xFF == 0xFF     # sign of byte 0 (-127) replicated


def test_errors():
  with pytest.raises(ValueError, match="128, 128"):
    bc.pack_tile(jnp.zeros((64, 128), jnp.int32))
  with pytest.raises(ValueError, match="64, 24"):
    bc.unpack_tile(jnp.zeros((64, 16), jnp.int32))
  with pytest.raises(ValueError, match="8 levels"):
    bc.level_pool([1, 2, 3])
