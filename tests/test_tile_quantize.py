"""The fused append kernel (interpret mode) against its jnp reference, the quantizer's own
levels and `register_codes.pack_tile`, bit for bit; its write into the cache's tiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turboquant_jax as tq
from pallas_kernels import register_codes, tile_quantize
from turboquant_jax import tile_codes
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

# (bits, d, tokens, values): keys' and values' tiles of the cache's widths; d == tokens
# for values is the case a shape test cannot tell from keys.
CASES = [(4, 64, 256, False), (3, 64, 256, False), (4, 64, 256, True), (3, 64, 256, True),
         (3, 128, 128, False), (3, 128, 128, True), (2, 128, 128, True),
         (2, 64, 128, False)]


def _inputs(key, d, bits, rows, tokens, dtype=jnp.float32):
  q = tq.MSEQuantizer.create(jax.random.fold_in(key, 1), d=d, bits=bits)
  x = 3.0 * jax.random.normal(jax.random.fold_in(key, 2), (rows, tokens, d))
  x = x.at[0, 5].set(0.0).at[1, 7, 3].set(jnp.nan).at[1, 9, 0].set(jnp.inf)
  return q, x.astype(dtype)


@pytest.mark.parametrize("bits,d,tokens,values", CASES)
def test_kernel_matches_quantizer_and_pack_tile(bits, d, tokens, values):
  key = jax.random.PRNGKey(bits * 1000 + d + tokens + values)
  q, x = _inputs(key, d, bits, rows=2, tokens=2 * tokens)
  kw = dict(bits=bits, tokens=tokens, transposed=values)
  words, norms = tile_quantize.quantize_tiles(x, q.rotation.matrix.T, q.boundaries,
                                              interpret=True, **kw)
  ref_words, ref_norms = tile_quantize.quantize_tiles_reference(
      x, q.rotation.matrix.T, q.boundaries, **kw)
  np.testing.assert_array_equal(words, ref_words)
  np.testing.assert_array_equal(norms, ref_norms)
  # The quantizer's levels, packed by pack_tile: what the cache's jnp path writes.
  levels, q_norms = jax.jit(q.quantize_levels)(x)   # jitted: NaN is not refused
  layout = tile_codes.TileLayout(bits, d, tokens, values)
  tiles = tile_codes._to_tiles(levels, layout)
  expect = register_codes.pack_tile(tiles, layout.spec).reshape(words.shape)
  np.testing.assert_array_equal(words, expect)
  np.testing.assert_array_equal(norms, q_norms.astype(jnp.float32))
  assert np.isnan(norms[1, 7]) and np.isnan(norms[1, 9]) and norms[0, 5] == 0


@pytest.mark.parametrize("norm_fit", ["projected", "matched"])
@pytest.mark.parametrize("bits,d,tokens,values", [(4, 64, 256, False), (3, 128, 128, True)])
def test_kernel_fitted_norms_match_the_quantizer(bits, d, tokens, values, norm_fit):
  """`norm_fit`: the same words, and the norms `quantize_levels` stores (the values'
  tiles sum the fit over two 64-channel blocks at d = 128: equal up to rounding)."""
  key = jax.random.PRNGKey(bits * 100 + d)
  q, x = _inputs(key, d, bits, rows=2, tokens=tokens)
  q = dataclasses.replace(q, norm_fit=norm_fit)
  kw = dict(bits=bits, tokens=tokens, transposed=values, centroids=q.centroids,
            norm_fit=norm_fit)
  words, norms = tile_quantize.quantize_tiles(x, q.rotation.matrix.T, q.boundaries,
                                              interpret=True, **kw)
  ref_words, ref_norms = tile_quantize.quantize_tiles_reference(
      x, q.rotation.matrix.T, q.boundaries, **kw)
  exact_words, exact_norms = tile_quantize.quantize_tiles_reference(
      x, q.rotation.matrix.T, q.boundaries, bits=bits, tokens=tokens, transposed=values)
  np.testing.assert_array_equal(words, ref_words)
  np.testing.assert_array_equal(words, exact_words)
  _, q_norms = jax.jit(q.quantize_levels)(x)
  for got in (norms, ref_norms):
    np.testing.assert_allclose(got, q_norms, rtol=2e-6)
  finite = np.isfinite(exact_norms) & (exact_norms > 0)
  # Codes shrink a vector on average (E <y, c> = E ‖c‖² = 1 - D_mse), so fitted norms
  # are larger on average (not each: a vector's fit can pass 1).
  ratio = np.asarray(norms)[finite] / np.asarray(exact_norms)[finite]
  assert 1.0 < np.mean(ratio) < 1.05 and not np.allclose(ratio, 1.0)
  assert np.isnan(norms[1, 7]) and norms[0, 5] == 0
  with pytest.raises(ValueError, match="needs centroids"):
    tile_quantize.quantize_tiles(x, q.rotation.matrix.T, q.boundaries, interpret=True,
                                 bits=bits, tokens=tokens, transposed=values,
                                 norm_fit=norm_fit)


def test_kernel_takes_bfloat16():
  q, x = _inputs(jax.random.PRNGKey(3), 64, 3, rows=1, tokens=256, dtype=jnp.bfloat16)
  kw = dict(bits=3, tokens=256, transposed=False)
  got = tile_quantize.quantize_tiles(x, q.rotation.matrix.T, q.boundaries, interpret=True,
                                     **kw)
  want = tile_quantize.quantize_tiles_reference(x, q.rotation.matrix.T, q.boundaries, **kw)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits,d,tokens,values", CASES)
def test_pack_fields_reproduce_pack_tile(bits, d, tokens, values):
  """The products alone (numpy, float64), on random levels: every word bit placed."""
  spec = (register_codes.TileSpec(bits, d, tokens) if values
          else register_codes.TileSpec(bits, tokens, d))
  levels = np.random.default_rng(bits + d).integers(0, 1 << bits, (spec.rows, spec.cols))
  halves = np.zeros((2, 64, tile_quantize.pack_fields(spec)[0].matrices.shape[-1]))
  for f in tile_quantize.pack_fields(spec):
    field = (levels >> f.shift) & f.mask
    for mt in range(spec.rows // 64):
      for h in range(2):
        halves[h] += field[64 * mt:64 * mt + 64] @ f.matrices[mt, h]
  words = (halves[0].astype(np.uint64) | (halves[1].astype(np.uint64) << 16)).astype(np.uint32)
  expect = np.asarray(register_codes.pack_tile(jnp.asarray(levels), spec)).view(np.uint32)
  np.testing.assert_array_equal(words[:, :spec.words_per_row], expect)


def test_kernel_rejects_bad_input():
  q = tq.MSEQuantizer.create(jax.random.PRNGKey(0), d=64, bits=3)
  x = jnp.zeros((1, 200, 64))
  with pytest.raises(ValueError, match="whole number"):
    tile_quantize.quantize_tiles(x, q.rotation.matrix.T, q.boundaries, bits=3, tokens=256,
                                 transposed=False, interpret=True)
  with pytest.raises(ValueError, match="do not fit"):
    tile_quantize.quantize_tiles(jnp.zeros((1, 256, 64)), q.rotation.matrix.T[:32],
                                 q.boundaries, bits=3, tokens=256, transposed=False,
                                 interpret=True)
  assert tile_quantize.unsupported(register_codes.TileSpec(4, 192, 64)) is not None
  # Shared memory: 128 tokens of d = 128 fit (128 KB), of d = 256 (Gemma 3) do not (384).
  assert tile_quantize.unsupported(register_codes.TileSpec(3, 128, 128), 128) is None
  assert "shared memory" in tile_quantize.unsupported(register_codes.TileSpec(3, 128, 256),
                                                      256)


def test_write_tiles_matches_write_run():
  """Aligned runs of ragged lengths (a full tile, a part-filled one, none) into tiles
  already holding codes: the same words and norms as the jnp writer."""
  layout = tile_codes.TileLayout(3, 64, 256, False)
  rng = np.random.default_rng(0)
  b, h, length, n = 3, 2, 1024, 2
  old = tile_codes.empty((b, h, length), layout, jnp.float16)
  old = tile_codes.write_run(old, jnp.asarray(rng.integers(0, 8, (b, h, length, 64)),
                                              jnp.uint8),
                             jnp.asarray(rng.random((b, h, length)), jnp.float32),
                             jnp.zeros((b,), jnp.int32), jnp.full((b,), length, jnp.int32))
  levels = jnp.asarray(rng.integers(0, 8, (b, h, n * 256, 64)), jnp.uint8)
  norms = jnp.asarray(2 * rng.random((b, h, n * 256)), jnp.float16)  # raises the max
  start = jnp.array([256, 0, 768], jnp.int32)
  count = jnp.array([300, 512, 0], jnp.int32)
  want = tile_codes.write_run(old, levels, norms, start, count)
  words = register_codes.pack_tile(tile_codes._to_tiles(levels, layout), layout.spec)
  got = tile_codes.write_tiles(old, words.reshape(b, h, n * 64, -1), norms, start, count)
  np.testing.assert_array_equal(got.words, want.words)
  np.testing.assert_array_equal(got.norms, want.norms)
  np.testing.assert_array_equal(got.norm_max, want.norm_max)
  np.testing.assert_array_equal(got.norm_max, np.asarray(got.norms, np.float32).max(-1))


def _fill(config, steps, key=jax.random.PRNGKey(0), b=2, h=1, d=128, length=1024):
  cache = TurboQuantKVCache.create(b, length, h, d, jnp.bfloat16, config=config)
  update = jax.jit(lambda c, k, v, p, n: c.update(k, v, p, n))
  for i, (t, pos, num) in enumerate(steps):
    k = jax.random.normal(jax.random.fold_in(key, 2 * i), (b, t, h, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (b, t, h, d), jnp.bfloat16)
    cache = update(cache, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(num, jnp.int32))
  return cache


# A prefill that starts on a tile (ragged: one row shorter), one that does not, an aligned
# chunk past the calibration, a rewrite of earlier positions, then single tokens. Two
# shapes (num_tokens cuts the rest): each shape compiles the update once per config.
STEPS = [(300, [0, 0], [300, 180]), (300, [300, 180], [212, 120]),
         (300, [512, 256], [256, 256]), (300, [256, 64], [64, 64]),
         (1, [768, 512], [1, 1])]


def test_cache_with_append_kernel_equals_jnp(monkeypatch):
  """3.5 bits (two channel groups, each its own rotation and tiles), keys centred before
  RoPE (the Mosaic kernel's default cache, but a window of one 256-token tile: the prefill
  calibrates)."""
  config = TurboQuantConfig(key_bits=3.5, value_bits=3.5, layout="tiles",
                            levels="cubic", center_keys="rope", window=256)
  with_kernel = lambda on: dataclasses.replace(config, append_kernel=on)  # noqa: E731
  fused = _fill(with_kernel(True), STEPS)
  plain = _fill(with_kernel(False), STEPS)
  assert fused.fused_append and not plain.fused_append
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  # The comparison means something only if the kernel wrote: a kernel that flips a bit
  # must change the cache.
  real = tile_quantize.quantize_tiles
  monkeypatch.setattr(tile_quantize, "quantize_tiles",
                      lambda *a, **k: (lambda w, n: (w ^ 1, n))(*real(*a, **k)))
  # The cache's update is jitted at module level: a seed of its own (static config)
  # traces it again, with the broken kernel, where jax.clear_caches() cost later tests
  # their compiles.
  config = dataclasses.replace(config, seed=config.seed + 1)
  one_tile = [(256, [0], [256])]       # the smallest fused write: one row, one tile
  broken = _fill(with_kernel(True), one_tile, b=1, length=512)
  plain1 = _fill(with_kernel(False), one_tile, b=1, length=512)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(broken.key_codes),
                                                       jax.tree.leaves(plain1.key_codes)))


def test_cache_with_append_kernel_equals_jnp_with_fitted_norms():
  """The fused writer with `norm_fit` (keys projected, values matched) writes what jnp
  writes: the same codes, norms equal up to float rounding."""
  config = TurboQuantConfig(key_bits=3.5, value_bits=3, layout="tiles", levels="cubic",
                            center_keys="rope", window=256, seed=7,
                            norm_fit=("projected", "matched"))
  fused = _fill(dataclasses.replace(config, append_kernel=True), STEPS)
  plain = _fill(dataclasses.replace(config, append_kernel=False), STEPS)
  assert fused.fused_append
  for side in ("key_codes", "value_codes"):
    for a, b in zip(getattr(fused, side), getattr(plain, side)):
      np.testing.assert_array_equal(a.words, b.words)
      np.testing.assert_allclose(np.asarray(a.norms, np.float32),
                                 np.asarray(b.norms, np.float32), rtol=2e-3)


def test_append_kernel_config_errors():
  with pytest.raises(ValueError, match="tiles"):
    TurboQuantConfig(append_kernel=True)
  with pytest.raises(ValueError, match="None, True or False"):
    TurboQuantConfig(append_kernel="yes")
  with pytest.raises(ValueError, match="dense"):
    TurboQuantKVCache.create(1, 512, 1, 64, config=TurboQuantConfig(
        key_bits=3, value_bits=3, layout="tiles", rotation="hadamard", append_kernel=True))
  cache = TurboQuantKVCache.create(1, 512, 1, 64, config=TurboQuantConfig(
      key_bits=3, value_bits=3, layout="tiles"))
  assert not cache.fused_append      # the default: GPUs only
  # Gemma 3's 256-channel heads: refused when asked, and left to jnp by default.
  with pytest.raises(ValueError, match="shared memory"):
    TurboQuantKVCache.create(1, 512, 1, 256, config=TurboQuantConfig(
        key_bits=3, value_bits=3, layout="tiles", append_kernel=True))


def test_default_use_is_gpu_and_large_writes_only(monkeypatch):
  """By default the kernel writes only where it measured faster: on a GPU, writes of at
  least FUSED_APPEND_TOKENS tokens over the batch."""
  from turboquant_jax import turboquant_cache
  config = TurboQuantConfig(key_bits=3, value_bits=3, layout="tiles")
  small = TurboQuantKVCache.create(1, 8192, 1, 64, config=config)
  large = TurboQuantKVCache.create(8, 8192, 1, 64, config=config)
  assert not large._fused_for(8192)                      # the CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert turboquant_cache.FUSED_APPEND_TOKENS == 32768
  assert large._fused_for(4096) and not small._fused_for(4096) and not large._fused_for(1)
  off = TurboQuantKVCache.create(8, 8192, 1, 64, config=dataclasses.replace(
      config, append_kernel=False))
  assert not off._fused_for(4096)


def test_kernel_rejects_unknown_precision():
  q = tq.MSEQuantizer.create(jax.random.PRNGKey(0), d=64, bits=3)
  with pytest.raises(ValueError, match="precision"):
    tile_quantize.quantize_tiles(jnp.zeros((1, 256, 64)), q.rotation.matrix.T, q.boundaries,
                                 bits=3, tokens=256, transposed=False, interpret=True,
                                 precision="fast")
