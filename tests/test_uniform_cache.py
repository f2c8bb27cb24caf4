"""The integer baseline cache: llama.cpp-style symmetric and KIVI-style asymmetric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.uniform_cache import (UniformConfig, UniformKVCache, dequantize_groups,
                                          quantize_groups)

B, L, HKV, HQ, D = 2, 128, 2, 4, 64
NOTHING_EXACT = dict(window=0, num_sinks=0)


def rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def head_major(x):
  return np.asarray(x).transpose(0, 2, 1, 3)


def q4_0_reference(x):
  """ggml's quantize_row_q4_0_reference and dequantize_row_q4_0, in numpy (blocks of 32)."""
  x = np.asarray(x, np.float32).reshape(-1, 32)
  idx = np.argmax(np.abs(x), axis=1)
  m = x[np.arange(len(x)), idx]
  d = (m / -8).astype(np.float16).astype(np.float32)
  inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
  q = np.minimum(15, np.trunc(x * inv[:, None] + 8.5)).astype(np.int8)
  return ((q - 8) * d[:, None]).reshape(-1)


def test_symmetric_4_bit_matches_llama_cpp_q4_0(rng):
  x = rng.standard_normal((64, 32)).astype(np.float32) * rng.uniform(0.1, 10, (64, 1))
  q, s, m = quantize_groups(jnp.asarray(x), 4, True, -1, jnp.float16)
  assert m is None
  got = np.asarray(dequantize_groups(q, s, None, 4))
  np.testing.assert_allclose(got.reshape(-1), q4_0_reference(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_error_is_at_most_half_a_step(bits, rng):
  x = rng.standard_normal((50, 32)).astype(np.float32) * 3 + 1
  q, s, m = quantize_groups(jnp.asarray(x), bits, False, -1, jnp.float16)
  y = np.asarray(dequantize_groups(q, s, m, bits))
  step = np.asarray(s, np.float32)
  # Half a step, plus what fp16 rounding of the minimum and the scale can move a value.
  slack = 1e-3 * (np.abs(x).max(axis=1, keepdims=True) + step * (1 << bits))
  assert np.all(np.abs(y - x) <= step / 2 + slack)
  assert int(q.max()) <= (1 << bits) - 1


@pytest.mark.parametrize("config", [UniformConfig.kivi(4), UniformConfig.llama_cpp(8),
                                    UniformConfig.llama_cpp(4, group_size=16)])
def test_window_covering_everything_is_exactly_dense(config, rng):
  config = UniformConfig(**{**config.__dict__, "window": L})
  k, v = rand(rng, B, 70, HKV, D), rand(rng, B, 70, HKV, D)
  q = rand(rng, B, 2, HQ, D)
  cache, dense = UniformKVCache.create(B, L, HKV, D, config=config), DenseKVCache.create(
      B, L, HKV, D)
  for a, b in ((0, 33), (33, 34), (34, 70)):
    cache, dense = (c.update(k[:, a:b], v[:, a:b]) for c in (cache, dense))
  np.testing.assert_allclose(cache.attend(q), dense.attend(q), rtol=1e-5, atol=1e-6)


def test_channel_groups_do_not_depend_on_how_tokens_arrive(rng):
  """Keys are grouped by position: any chunking gives bit-identical codes, unfinished
  groups are read exactly from staging, finished ones per channel within half a step."""
  config = UniformConfig.kivi(3, **NOTHING_EXACT)
  k, v = rand(rng, B, 100, HKV, D), rand(rng, B, 100, HKV, D)
  whole = UniformKVCache.create(B, L, HKV, D, config=config).update(k, v)
  pieces = UniformKVCache.create(B, L, HKV, D, config=config)
  step = jax.jit(lambda c, kk, vv: c.update(kk, vv))
  for a, b in ((0, 1), (1, 31), (31, 33), (33, 70), (70, 99), (99, 100)):
    pieces = step(pieces, k[:, a:b], v[:, a:b])
  keys_w, values_w = whole.reconstruct()
  keys_p, values_p = pieces.reconstruct()
  np.testing.assert_array_equal(keys_w[:, :, :100], keys_p[:, :, :100])
  np.testing.assert_array_equal(values_w[:, :, :100], values_p[:, :, :100])
  exact = head_major(k)
  np.testing.assert_array_equal(keys_w[:, :, 96:100], exact[:, :, 96:100])  # staged
  groups = exact[:, :, :96].reshape(B, HKV, 3, 32, D)
  step_size = (groups.max(3) - groups.min(3)) / 7
  err = np.abs(np.asarray(keys_w[:, :, :96]).reshape(groups.shape) - groups)
  assert np.all(err <= step_size[:, :, :, None] / 2 + 2e-3 * np.abs(groups).max())
  assert np.any(err > 0)


def test_rewind_into_a_finished_group_keeps_the_rest(rng):
  config = UniformConfig.kivi(4, **NOTHING_EXACT)
  k, v = rand(rng, 1, 80, HKV, D), rand(rng, 1, 80, HKV, D)
  cache = UniformKVCache.create(1, L, HKV, D, config=config).update(k, v)
  k2, v2 = rand(rng, 1, 10, HKV, D), rand(rng, 1, 10, HKV, D)
  rewound = cache.update(k2, v2, positions=jnp.array([40]))
  assert int(rewound.lengths[0]) == 50
  keys, _ = rewound.reconstruct()
  want = np.concatenate([head_major(k)[:, :, :40], head_major(k2)], axis=2)
  np.testing.assert_array_equal(keys[:, :, :32], cache.reconstruct()[0][:, :, :32])
  assert np.abs(np.asarray(keys[:, :, :50]) - want).max() < 0.5
  np.testing.assert_array_equal(keys[:, :, 32:40], cache.reconstruct()[0][:, :, 32:40])
  np.testing.assert_array_equal(keys[:, :, 40:50], want[:, :, 40:50])  # staged, exact


def test_errors_shrink_with_bits_and_window_and_sinks_are_exact(rng):
  k, v = rand(rng, B, 100, HKV, D), rand(rng, B, 100, HKV, D)
  q = rand(rng, B, 1, HQ, D)
  ref = DenseKVCache.create(B, L, HKV, D).update(k, v).attend(q)
  errs = []
  for bits in (2, 3, 4, 8):
    cache = UniformKVCache.create(B, L, HKV, D, config=UniformConfig.kivi(bits, **NOTHING_EXACT))
    out = cache.update(k, v).attend(q)
    errs.append(float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)))
  assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01
  cache = UniformKVCache.create(B, L, HKV, D, config=UniformConfig.kivi(2, window=8,
                                                                         num_sinks=3))
  keys, values = cache.update(k, v).reconstruct()
  np.testing.assert_array_equal(values[:, :, :3], head_major(v)[:, :, :3])
  np.testing.assert_array_equal(values[:, :, 92:100], head_major(v)[:, :, 92:100])
  assert not np.allclose(values[:, :, 3:92], head_major(v)[:, :, 3:92])


@pytest.mark.parametrize("config,per_token", [
    (UniformConfig.kivi(4), 2 * 32 + 2 * 2 * 64 / 32 + 2 * 2 * 2),   # keys: per channel
    (UniformConfig.llama_cpp(4), 2 * (32 + 2 * 2)),                  # 4.5 bits, as q4_0
    (UniformConfig.llama_cpp(8), 2 * (64 + 2 * 2)),                  # 8.5 bits, as q8_0
])
def test_memory_report_counts_every_buffer(config, per_token):
  cache = UniformKVCache.create(B, L, HKV, D, config=config)
  rep = cache.memory_report()
  assert rep["bytes_per_token_per_head"] == per_token
  assert rep["total"] == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_full_cache_raises_eagerly_and_poisons_under_jit(rng):
  cache = UniformKVCache.create(1, 64, HKV, D).update(rand(rng, 1, 60, HKV, D),
                                                      rand(rng, 1, 60, HKV, D))
  extra = rand(rng, 1, 5, HKV, D)
  with pytest.raises(ValueError, match="cache full"):
    cache.update(extra, extra)
  full = jax.jit(lambda c, x: c.update(x, x))(cache, extra)
  assert bool(full.overflowed[0]) and int(full.lengths[0]) == 60
  np.testing.assert_array_equal(full.staging, cache.staging)
  assert np.all(np.isnan(np.asarray(full.attend(rand(rng, 1, 1, HQ, D)))))


def test_bad_config_and_inputs(rng):
  with pytest.raises(ValueError, match="key_bits"):
    UniformConfig(key_bits=5)
  with pytest.raises(ValueError, match="symmetric"):
    UniformConfig(symmetric=True, key_axis="channel")
  with pytest.raises(ValueError, match="group_size"):
    UniformKVCache.create(1, 64, HKV, 48, config=UniformConfig(group_size=32))
  cache = UniformKVCache.create(1, 64, HKV, D)
  assert UniformKVCache.create(1, 70, HKV, D).max_len == 96  # whole key groups
  with pytest.raises(ValueError, match="NaN"):
    cache.update(jnp.full((1, 1, HKV, D), jnp.nan), rand(rng, 1, 1, HKV, D))
  with pytest.raises(ValueError, match="^k must"):
    cache.update(rand(rng, 1, 1, HKV, D + 1), rand(rng, 1, 1, HKV, D))
