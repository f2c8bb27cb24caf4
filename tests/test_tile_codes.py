"""The tiles layout: runs written into tiles read back exactly (rewrites too), and a
cache in the tiles layout holds and attends exactly as one in bit-planes."""

import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import tile_codes
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache


@pytest.mark.parametrize("bits, d, transposed, operand", [
    (2, 128, False, "fp16"), (3, 128, True, "fp16"), (4, 64, True, "fp16"),
    (3, 256, False, "fp16"),
    # int8 byte tiles (`byte_codes`): 128 x 128, the same runs
    (3, 128, False, "int8"), (4, 128, True, "int8"), (2, 128, True, "int8"),
    (3, 64, False, "int8"), (4, 64, True, "int8")])   # 64-channel groups: 256-token tiles
def test_runs_read_back(rng, bits, d, transposed, operand):
  tt = tile_codes.tile_tokens(((d, bits),)) if operand == "fp16" else 16384 // d
  layout = tile_codes.TileLayout(bits, d, tt, transposed, operand)
  b, h, length = 2, 3, 4 * tt
  codes = tile_codes.empty((b, h, length), layout, jnp.float16)
  expect = np.zeros((b, h, length, d), np.uint8)
  expect_norms = np.zeros((b, h, length), np.float16)
  expect_max = np.zeros((b, h), np.float32)   # of every norm written, rewritten ones too
  # Runs that start mid-tile, cross tiles, rewrite earlier positions, write nothing, and
  # end at the cache's last position.
  for start, t, count in [((0, 5), tt + 7, (tt + 7, tt)), ((tt + 3, 2 * tt), 1, (1, 0)),
                          ((2, 2), 40, (40, 39)), ((length - 9, 3 * tt), 9, (9, 9))]:
    lv = rng.integers(0, 1 << bits, (b, h, t, d)).astype(np.uint8)
    nm = rng.uniform(0.5, 2, (b, h, t)).astype(np.float16)
    codes = tile_codes.write_run(codes, jnp.asarray(lv), jnp.asarray(nm),
                                 jnp.asarray(start, jnp.int32), jnp.asarray(count, jnp.int32))
    for i in range(b):
      expect[i, :, start[i]:start[i] + count[i]] = lv[i, :, :count[i]]
      expect_norms[i, :, start[i]:start[i] + count[i]] = nm[i, :, :count[i]]
      expect_max[i] = np.maximum(expect_max[i], nm[i, :, :count[i]].max(-1, initial=0))
  np.testing.assert_array_equal(np.asarray(tile_codes.read_levels(codes)), expect)
  np.testing.assert_array_equal(np.asarray(codes.norms), expect_norms)
  np.testing.assert_array_equal(np.asarray(codes.norm_max), expect_max)


def test_tile_lengths_and_errors():
  assert tile_codes.tile_tokens(((128, 2), (128, 3), (128, 4))) == 128
  assert tile_codes.tile_tokens(((64, 3),)) == 256
  assert tile_codes.tile_tokens(((64, 4), (64, 3), (128, 4))) == 256   # 3.5 bits at d = 128
  with pytest.raises(ValueError, match="divisible by 128"):
    tile_codes.empty((1, 1, 200), tile_codes.TileLayout(4, 128, 128, False), jnp.float16)
  with pytest.raises(ValueError, match="no tile length"):   # d=64 halves: 32-channel groups
    TurboQuantKVCache.create(1, 512, 1, 64, config=TurboQuantConfig(key_bits=3.5,
                                                                    layout="tiles"))
  with pytest.raises(ValueError, match="MSE keys"):
    TurboQuantConfig(key_bits=3, value_bits=3, key_quantizer="prod", layout="tiles")
  with pytest.raises(ValueError, match="layout must be"):
    TurboQuantConfig(layout="rows")
  with pytest.raises(ValueError, match="int8 tiles are"):
    tile_codes.TileLayout(3, 64, 128, False, "int8")
  with pytest.raises(ValueError, match="operand must be"):
    tile_codes.TileLayout(3, 128, 128, False, "fp8")
  with pytest.raises(ValueError, match="plain nibbles"):
    tile_codes.TileLayout(3, 128, 128, False, "int8", plain=True)


@pytest.mark.parametrize("kw", [dict(key_bits=3, value_bits=4, levels="cubic"),
                                dict(key_bits=2, value_bits=3, center_keys=False, window=16,
                                     num_sinks=0),
                                # Fractional: two channel groups of 64, 256-token tiles
                                # (a window of one, so the prefill calibrates).
                                dict(key_bits=3.5, value_bits=2.5, window=256),
                                # int8 byte tiles: 4-bit keys as plain nibbles.
                                dict(key_bits=4, value_bits=3, levels=("uniform", "int8"),
                                     tile_operand="int8")])
def test_tiles_cache_equals_planes_cache(rng, kw):
  """Prefill (calibration re-codes the window), ragged rows and decode steps: the same
  codes, so the same reconstruction and attention; memory counted the same (but for the
tiles' norm bound)."""
  b, length, h, d = 2, 512, 2, 128
  tiles = TurboQuantKVCache.create(b, length, h, d, config=TurboQuantConfig(layout="tiles", **kw))
  # The same window (by default two tiles where those are longer than 128 tokens).
  assert tiles.key_codes[0].layout.plain == (kw.get("levels") == ("uniform", "int8"))
  kw = dict(kw, window=tiles.config.window)
  kw.pop("tile_operand", None)
  caches = [TurboQuantKVCache.create(b, length, h, d, config=TurboQuantConfig(**kw)), tiles]
  k = jnp.asarray(rng.standard_normal((b, 300, h, d)) + 0.5, jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, 300, h, d)), jnp.float32)
  caches = [c.update(k, v, num_tokens=jnp.array([300, 170])) for c in caches]
  for i in range(3):
    k1 = jnp.asarray(rng.standard_normal((b, 1, h, d)), jnp.float32)
    caches = [c.update(k1, -k1) for c in caches]
  planes, tiles = caches
  for x, y in zip(planes.reconstruct(), tiles.reconstruct()):
    np.testing.assert_array_equal(np.asarray(x[:, :, :303]), np.asarray(y[:, :, :303]))
  q = jnp.asarray(rng.standard_normal((b, 1, 8, d)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(planes.attend(q)), np.asarray(tiles.attend(q)))
  rp, rt = planes.memory_report(), tiles.memory_report()
  # The tiles keep one more float32 per row and head and group: the norms' running max.
  extra = sum(c.norm_max.nbytes for c in (*tiles.key_codes, *tiles.value_codes))
  assert extra == 4 * b * h * (len(tiles.key_codes) + len(tiles.value_codes))
  assert rt["key_norms"] + rt["value_norms"] == rp["key_norms"] + rp["value_norms"] + extra
  assert rt["bytes_per_token_per_head"] == pytest.approx(
      rp["bytes_per_token_per_head"] + extra / (b * h * length), rel=1e-12)
  assert rp["key_codes"] == rt["key_codes"] > 0
