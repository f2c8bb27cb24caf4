"""Register-layout codes: lossless packing, and the decode program (run in numpy exactly as
the Mosaic GPU kernel runs it) giving back the centred codes."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import register_codes as rc


def tile_specs():
  """Every valid tile of 64..256 rows and columns: keys [tokens, channels] and values
  [channels, tokens] for head dims 64..256."""
  specs = []
  for bits in (2, 3, 4):
    for rows in (64, 128, 256):
      for cols in (64, 128, 256):
        try:
          specs.append(rc.TileSpec(bits, rows, cols))
        except ValueError:
          pass
  return specs


SPECS = tile_specs()
# Packing runs through jnp (one compilation per shape): the tiles up to 16K codes cover
# every program shape (each width, 1-4 row tiles, 64-256 columns).
SMALL_SPECS = [s for s in SPECS if s.rows * s.cols <= 128 * 128]


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=str)
def test_pack_unpack_round_trip(spec, rng):
  codes = rng.integers(0, 1 << spec.bits, (3, spec.rows, spec.cols))
  words = rc.pack_tile(jnp.asarray(codes), spec)
  assert words.shape == (3, rc.WORD_ROWS, spec.words_per_row) and words.dtype == jnp.int32
  np.testing.assert_array_equal(rc.unpack_tile(words, spec), codes)
  # b bits per code, nothing padded.
  assert words.size * 32 == codes.size * spec.bits


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_decode_program_gives_centred_codes(spec, rng):
  codes = rng.integers(0, 1 << spec.bits, (spec.rows, spec.cols))
  words = np.asarray(rc.pack_tile(jnp.asarray(codes), spec))
  u = rc.decode_words(words, spec)
  np.testing.assert_array_equal(u, codes - ((1 << spec.bits) - 1) / 2)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_word_bit_holds_exactly_one_code_bit(spec):
  rows, cols, bits = rc.bit_sources(spec)
  triples = set(zip(rows.tolist(), cols.tolist(), bits.tolist()))
  assert len(triples) == rows.size == spec.rows * spec.cols * spec.bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_key_words_hold_one_token_each(bits):
  """With tokens as rows, appending a token writes whole words (no read-modify-write)."""
  spec = rc.TileSpec(bits, rc.tile_rows(bits, 128), 128)
  rows = rc.bit_sources(spec)[0].reshape(rc.WORD_ROWS, spec.words_per_row, 32)
  assert np.all(rows == rows[:, :, :1])


def test_fma_constants_are_exact_in_fp16():
  for spec in SPECS:
    for op in rc.program(spec):
      for x in rc.fma_constants(spec, op):
        assert float(np.float16(x)) == x


def test_bad_specs_and_shapes_raise():
  with pytest.raises(ValueError, match="2, 3 or 4 bits"):
    rc.TileSpec(5, 64, 128)
  with pytest.raises(ValueError, match="rows % 64"):
    rc.TileSpec(4, 32, 128)
  with pytest.raises(ValueError, match="word tiles"):
    rc.TileSpec(3, 64, 128)   # 768 words: not whole [64, 8] tiles
  spec = rc.TileSpec(4, 64, 128)
  with pytest.raises(ValueError, match="codes"):
    rc.pack_tile(jnp.zeros((64, 64), jnp.int32), spec)
  with pytest.raises(ValueError, match="words"):
    rc.unpack_tile(jnp.zeros((64, 8), jnp.int32), spec)


def test_tile_rows_is_the_smallest_whole_tile():
  assert rc.tile_rows(4, 128) == 64
  assert rc.tile_rows(3, 128) == 128
  assert rc.tile_rows(3, 64) == 256
  assert rc.tile_rows(2, 64) == 128
