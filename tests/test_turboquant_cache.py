import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import codebook
from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

B, L, HKV, HQ, D = 2, 64, 2, 4, 64
NOTHING_EXACT = dict(window=0, num_sinks=0, center_keys=False)


def rand(rng, *shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def outlier_kv(rng, b, t, h, d):
  """K/V shaped like a small real model's: keys with a large shared offset (it cancels in
  an exact softmax but dominates a per-vector norm) and a few outlier channels, scaled so
  that logits spread as much as for random data; values with one large channel."""
  noise = rng.standard_normal((b, t, h, d))
  noise[..., [1, 7, 30]] *= 4.0
  noise /= np.sqrt(np.mean(noise**2))
  offset = 4.0 * rng.standard_normal((1, 1, h, d))
  v = rng.standard_normal((b, t, h, d))
  v[..., 5] *= 6.0
  return jnp.asarray(noise + offset, jnp.float32), jnp.asarray(v, jnp.float32)


def cosines(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def fill(cache_cls, k, v, chunks=(None,), **create):
  cache = cache_cls.create(B, L, HKV, D, **create)
  start = 0
  for size in chunks:
    stop = k.shape[1] if size is None else start + size
    cache = cache.update(k[:, start:stop], v[:, start:stop])
    start = stop
  return cache


CONFIGS = [
    TurboQuantConfig(),
    TurboQuantConfig(key_bits=2.5, value_bits=2, key_quantizer="prod", center_keys=False),
    TurboQuantConfig(key_bits=4, value_bits=3, num_sinks=0, rotation="hadamard"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_window_covering_everything_is_exactly_dense(config, rng):
  config = TurboQuantConfig(**{**config.__dict__, "window": L})
  k, v = rand(rng, B, 50, HKV, D), rand(rng, B, 50, HKV, D)
  dense = fill(DenseKVCache, k, v, chunks=(20, 1, 29))
  tq = fill(TurboQuantKVCache, k, v, chunks=(20, 1, 29), config=config)
  for q_len in (1, 4):
    q = rand(rng, B, q_len, HQ, D)
    for kwargs in ({}, dict(sliding_window=9, soft_cap=3.0)):
      np.testing.assert_allclose(jax.jit(lambda c, q: c.attend(q, **kwargs))(tq, q),
                                 dense.attend(q, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data", ["random", "outliers"])
def test_four_bits_close_to_dense_and_error_shrinks_with_bits(data, rng):
  """Every token read from its codes (no window, no sinks; centered keys for outliers).

  Flat attention over random vectors averages the coding errors of keys and values, each
  ~D_mse relative: expected 1 - cos ≈ D_mse(4) ≈ 0.0093, so the mean cosine is ~0.991 and a
  single output can dip lower. Measured over 4 seeds: mean 0.990-0.992, min 0.96-0.98.
  """
  t = 60
  k, v = (rand(rng, B, t, HKV, D), rand(rng, B, t, HKV, D)) if data == "random" else outlier_kv(
      rng, B, t, HKV, D)
  q = rand(rng, B, 8, HQ, D)
  want = fill(DenseKVCache, k, v).attend(q)
  errors = []
  for bits in (2, 2.5, 3, 3.5, 4):
    config = TurboQuantConfig(key_bits=bits, value_bits=bits, window=0, num_sinks=0,
                              center_keys=data == "outliers")
    got = fill(TurboQuantKVCache, k, v, config=config).attend(q)
    errors.append(float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)))
    if bits == 4:
      cos = cosines(got, want)
      assert cos.mean() >= 0.985 and cos.min() >= 0.95, (cos.mean(), cos.min())
      assert 1 - cos.mean() <= 1.5 * codebook.lloyd_max_codebook(D, 4).mse
  assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_centering_window_and_sinks_help_on_outlier_keys(rng):
  k, v = outlier_kv(rng, B, 60, HKV, D)
  q = rand(rng, B, 4, HQ, D)
  want = fill(DenseKVCache, k, v).attend(q)
  err = lambda cfg: float(jnp.linalg.norm(  # noqa: E731
      fill(TurboQuantKVCache, k, v, chunks=(16, 44), config=cfg).attend(q) - want))
  plain = err(TurboQuantConfig(key_bits=3, value_bits=3, **NOTHING_EXACT))
  centered = err(TurboQuantConfig(key_bits=3, value_bits=3, window=0, num_sinks=0))
  full = err(TurboQuantConfig(key_bits=3, value_bits=3, window=16, num_sinks=4))
  assert centered < 0.5 * plain and full < centered


def test_ragged_batch_rows_match_single_sequence_caches(rng):
  config = TurboQuantConfig(window=8, num_sinks=2)
  k, v = rand(rng, B, 30, HKV, D), rand(rng, B, 30, HKV, D)
  num = jnp.array([30, 17])
  cache = TurboQuantKVCache.create(B, L, HKV, D, config=config).update(k, v, num_tokens=num)
  k2, v2 = rand(rng, B, 1, HKV, D), rand(rng, B, 1, HKV, D)
  cache = cache.update(k2, v2)
  q = rand(rng, B, 1, HQ, D)
  out = cache.attend(q)
  assert list(cache.lengths) == [31, 18]
  for b in range(B):
    n = int(num[b])
    single = TurboQuantKVCache.create(1, L, HKV, D, config=config).update(
        k[b:b + 1, :n], v[b:b + 1, :n]).update(k2[b:b + 1], v2[b:b + 1])
    np.testing.assert_allclose(out[b:b + 1], single.attend(q[b:b + 1]), rtol=1e-5, atol=1e-5)


def test_chunked_prefill_matches_dense_causally(rng):
  # q_len > 1: each query sees its own prefix only.
  config = TurboQuantConfig(window=L)
  k, v = rand(rng, B, 40, HKV, D), rand(rng, B, 40, HKV, D)
  q = rand(rng, B, 40, HQ, D)
  got = TurboQuantKVCache.create(B, L, HKV, D, config=config).update(k, v).attend(q)
  np.testing.assert_allclose(got, DenseKVCache.create(B, L, HKV, D).update(k, v).attend(q),
                             rtol=1e-5, atol=1e-5)


def test_window_ring_holds_the_last_tokens_and_survives_rewind(rng):
  config = TurboQuantConfig(window=8, num_sinks=2, key_bits=4, value_bits=4)
  k, v = rand(rng, 1, 20, HKV, D), rand(rng, 1, 20, HKV, D)
  cache = TurboQuantKVCache.create(1, L, HKV, D, config=config)
  for t in range(20):
    cache = cache.update(k[:, t:t + 1], v[:, t:t + 1])
  assert sorted(np.asarray(cache.window_positions[0])) == list(range(12, 20))
  assert int(cache.exact_window_start()[0]) == 12
  np.testing.assert_array_equal(cache.window_keys[0, :, 19 % 8], k[0, 19])
  # Rewind 5 tokens and write 2 new ones: positions 12..14 are still exact, 15..16 are new,
  # and the ring no longer holds 10..11 exactly (they come from the codes).
  k2, v2 = rand(rng, 1, 2, HKV, D), rand(rng, 1, 2, HKV, D)
  rewound = cache.update(k2, v2, positions=jnp.array([15]))
  assert int(rewound.lengths[0]) == 17 and int(rewound.exact_window_start()[0]) == 12
  held = np.asarray(rewound.window_positions[0])
  # Every position is read once: sinks [0, 2), codes [2, 12), window exactly [12, 17).
  assert sorted(p for p in held if 12 <= p < 17) == list(range(12, 17))
  np.testing.assert_array_equal(rewound.window_keys[0, :, 15 % 8], k2[0, 0])
  dense = DenseKVCache.create(1, L, HKV, D).update(k, v).update(k2, v2, positions=jnp.array([15]))
  q = rand(rng, 1, 4, HQ, D)
  assert cosines(rewound.attend(q), dense.attend(q)).min() > 0.98


def test_jit_vmap_and_donation(rng):
  config = TurboQuantConfig(window=4, num_sinks=1)
  k, v = rand(rng, B, 12, HKV, D), rand(rng, B, 12, HKV, D)
  q = rand(rng, B, 1, HQ, D)
  eager = TurboQuantKVCache.create(B, L, HKV, D, config=config).update(k, v)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(cache, kk, vv, qq):
    cache = cache.update(kk, vv)
    return cache, cache.attend(qq)

  cache, out = step(TurboQuantKVCache.create(B, L, HKV, D, config=config), k, v, q)
  np.testing.assert_allclose(out, eager.attend(q), rtol=1e-5, atol=1e-6)
  # vmap over layers: a stack of two caches with their own rotations.
  layers = [TurboQuantKVCache.create(B, L, HKV, D, config=config, layer=i) for i in range(2)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  outs = jax.jit(jax.vmap(lambda c: c.update(k, v).attend(q)))(stacked)
  for i, layer in enumerate(layers):
    np.testing.assert_allclose(outs[i], layer.update(k, v).attend(q), rtol=1e-5, atol=1e-6)
  assert not np.allclose(outs[0], outs[1])  # different layers, different rotations


@pytest.mark.parametrize("chunk", [1, 8], ids=["decode_token", "prefill_chunk"])
@pytest.mark.parametrize("layout", ["planes", "tiles"])
def test_append_path_in_place_and_compiled_once_per_shape(chunk, layout, rng):
  """The decode loop's append: jitted with the cache donated, every buffer is written in
  place (aliased, none copied) and one compilation serves every append of that shape,
  through calibration and past the window."""
  bits = (3.5, 3) if layout == "planes" else (4, 3)
  config = TurboQuantConfig(key_bits=bits[0], value_bits=bits[1], window=8, num_sinks=2,
                            layout=layout)
  length = L if layout == "planes" else 256      # tiles of 128 tokens
  cache = TurboQuantKVCache.create(B, length, HKV, D, jnp.bfloat16, config=config)
  append = jax.jit(lambda c, kk, vv: c.update(kk, vv), donate_argnums=0)
  compiled = append.lower(cache, *[jnp.zeros((B, chunk, HKV, D), jnp.bfloat16)] * 2
                          ).compile().as_text()
  # One alias per buffer of the cache (codes, norms, window, sinks, bookkeeping, ...).
  assert compiled.count("may-alias") + compiled.count("must-alias") >= len(
      jax.tree.leaves(cache))
  # And no decode step copies the window ring around its in-place update (calibration
  # once read the ring as it was before the write: two ring copies per step).
  entry = compiled[compiled.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  ring = "bf16[" + ",".join(map(str, cache.window_keys.shape)) + "]"
  assert chunk > 1 or not [x for x in entry.splitlines() if " copy(" in x and ring in x]
  import warnings
  eager = TurboQuantKVCache.create(B, length, HKV, D, jnp.bfloat16, config=config)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "donated buffers were not usable" would raise
    for i in range(0, 40, chunk):
      k = rand(rng, B, chunk, HKV, D).astype(jnp.bfloat16)
      v = rand(rng, B, chunk, HKV, D).astype(jnp.bfloat16)
      leaves = jax.tree.leaves(cache)
      cache = append(cache, k, v)
      assert all(x.is_deleted() for x in leaves)
      eager = eager.update(k, v)
  assert append._cache_size() == 1
  np.testing.assert_array_equal(cache.lengths, [40, 40])
  assert bool(jnp.all(cache.calibrated))
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", CONFIGS)
def test_memory_report_counts_every_buffer(config):
  cache = TurboQuantKVCache.create(B, L, HKV, 128, config=config)
  rep = cache.memory_report()
  assert rep["total"] == sum(x.nbytes for x in jax.tree.leaves(cache))
  per_token = (cache.key_quantizer.bytes_per_vector() + cache.value_quantizer.bytes_per_vector())
  assert rep["bytes_per_token_per_head"] == per_token
  # e.g. 3.5 + 3.5 bits, MSE, d = 128: 56 bytes of codes and 2 fp16 norms per vector.
  if config == TurboQuantConfig():
    assert per_token == 2 * (56 + 2 * 2)
  assert rep["compression_vs_bf16"] == rep["bf16_total"] / rep["total"]


def test_full_cache_raises_eagerly_and_poisons_under_jit(rng):
  cache = TurboQuantKVCache.create(1, 8, HKV, D).update(rand(rng, 1, 6, HKV, D),
                                                        rand(rng, 1, 6, HKV, D))
  extra = rand(rng, 1, 3, HKV, D)
  with pytest.raises(ValueError, match="cache full"):
    cache.update(extra, extra)
  full = jax.jit(lambda c, x: c.update(x, x))(cache, extra)
  assert bool(full.overflowed[0]) and int(full.lengths[0]) == 6
  jax.tree.map(np.testing.assert_array_equal, full.key_codes, cache.key_codes)
  assert np.all(np.isnan(np.asarray(full.attend(rand(rng, 1, 1, HQ, D)))))


def test_bad_config_and_inputs(rng):
  with pytest.raises(ValueError, match="key_bits"):
    TurboQuantConfig(key_bits=3.25)
  with pytest.raises(ValueError, match="key_quantizer"):
    TurboQuantConfig(key_quantizer="qjl")
  with pytest.raises(ValueError, match="window"):
    TurboQuantConfig(window=-1)
  with pytest.raises(ValueError, match="window"):
    TurboQuantConfig(window=True)
  with pytest.raises(ValueError, match="levels"):
    TurboQuantConfig(levels="linear")
  # 5 bits: planes and float levels only, MSE keys.
  with pytest.raises(ValueError, match="tiles' serves 2-4 bits per side, got value_bits=5"):
    TurboQuantConfig(value_bits=5, layout="tiles")
  with pytest.raises(ValueError, match="int8' serves 1-4 bits, got key_bits=5"):
    TurboQuantConfig(key_bits=5, levels="int8")
  with pytest.raises(ValueError, match="prod' serves up to 4 bits"):
    TurboQuantConfig(key_bits=5, key_quantizer="prod")
  TurboQuantConfig(key_bits=5, value_bits=5, levels="quintic")   # planes: fine
  cache = TurboQuantKVCache.create(B, L, HKV, D)
  with pytest.raises(ValueError, match="^k must"):
    cache.update(rand(rng, B, 1, HKV, D - 1), rand(rng, B, 1, HKV, D))
  with pytest.raises(ValueError, match="same shape"):
    cache.update(rand(rng, B, 2, HKV, D), rand(rng, B, 1, HKV, D))
  with pytest.raises(ValueError, match="NaN"):
    cache.update(rand(rng, B, 1, HKV, D).at[0, 0, 0, 0].set(jnp.nan), rand(rng, B, 1, HKV, D))


def test_calibration_waits_for_a_window_and_is_causal(rng):
  """Token by token: nothing is calibrated (and attention is exactly dense) until the row
  holds `window` tokens; then μ is the mean of the keys past the sinks, and later keys
  never change it. A prefill of the same tokens calibrates to the same μ and codes."""
  w, s = 16, 2
  config = TurboQuantConfig(window=w, num_sinks=s, key_bits=2.5, value_bits=2.5)
  k, v = outlier_kv(rng, 1, 40, HKV, D)
  q = rand(rng, 1, 1, HQ, D)
  cache = TurboQuantKVCache.create(1, L, HKV, D, config=config)
  dense = DenseKVCache.create(1, L, HKV, D)
  for t in range(w - 1):
    cache, dense = (c.update(k[:, t:t + 1], v[:, t:t + 1]) for c in (cache, dense))
  assert not bool(cache.calibrated[0])
  np.testing.assert_allclose(cache.attend(q), dense.attend(q), rtol=1e-5, atol=1e-6)
  cache = cache.update(k[:, w - 1:w], v[:, w - 1:w])
  assert bool(cache.calibrated[0])
  mean = np.mean(np.asarray(k[0, s:w]), axis=0)  # [H, D]
  np.testing.assert_allclose(cache.key_mean[0], mean, rtol=1e-5, atol=1e-5)
  mu, perm = np.asarray(cache.key_mean), np.asarray(cache.key_perm)
  for t in range(w, 40):
    cache = cache.update(k[:, t:t + 1], v[:, t:t + 1])
  np.testing.assert_array_equal(cache.key_mean, mu)
  np.testing.assert_array_equal(cache.key_perm, perm)
  # The window's early tokens were re-coded with μ: same codes as a prefill of them.
  prefill_mu = TurboQuantKVCache.create(1, L, HKV, D, config=config).update(k[:, :w], v[:, :w])
  np.testing.assert_array_equal(prefill_mu.key_perm, perm)
  np.testing.assert_allclose(prefill_mu.key_mean, mu, rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.tree.leaves(cache.key_codes), jax.tree.leaves(
      prefill_mu.update(k[:, w:], v[:, w:]).key_codes)):
    np.testing.assert_allclose(np.asarray(got, np.float32)[:, :, :40],
                               np.asarray(want, np.float32)[:, :, :40], atol=1e-3)


def test_calibration_tokens_choose_the_mean_before_the_window_fills(rng):
  """calibration_tokens < window: the row calibrates once it holds that many tokens, to
  the mean and channel orders a window of that length chooses; bad values raise."""
  s, n = 2, 12
  k, v = outlier_kv(rng, 1, 30, HKV, D)
  make = lambda **kw: TurboQuantKVCache.create(1, L, HKV, D, config=TurboQuantConfig(  # noqa: E731
      num_sinks=s, key_bits=2.5, value_bits=2.5, **kw))
  early, short = make(window=24, calibration_tokens=n), make(window=n)
  assert early.calibration_length == n and early.window_keys.shape[2] == 24
  for t in range(n):
    early, short = (c.update(k[:, t:t + 1], v[:, t:t + 1]) for c in (early, short))
    assert bool(early.calibrated[0]) == (t == n - 1) == bool(short.calibrated[0])
  np.testing.assert_allclose(early.key_mean[0], np.mean(np.asarray(k[0, s:n]), axis=0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(early.key_perm, short.key_perm)
  for bad in (0, 25, True, 2.0):
    with pytest.raises(ValueError, match="calibration_tokens"):
      TurboQuantConfig(window=24, calibration_tokens=bad)


def test_sinks_stay_bit_exact_after_many_appends(rng):
  config = TurboQuantConfig(window=4, num_sinks=3, key_bits=2, value_bits=2)
  k, v = rand(rng, B, 60, HKV, D), rand(rng, B, 60, HKV, D)
  cache = TurboQuantKVCache.create(B, L, HKV, D, config=config).update(k[:, :5], v[:, :5])
  step = jax.jit(lambda c, kk, vv: c.update(kk, vv))
  for t in range(5, 60):
    cache = step(cache, k[:, t:t + 1], v[:, t:t + 1])
  np.testing.assert_array_equal(cache.sink_keys, kv_head_major(k[:, :3]))
  np.testing.assert_array_equal(cache.sink_values, kv_head_major(v[:, :3]))
  keys, values = cache.reconstruct()
  np.testing.assert_array_equal(keys[:, :, :3], kv_head_major(k[:, :3]))
  np.testing.assert_array_equal(values[:, :, 56:60], kv_head_major(v[:, 56:60]))


def test_holding_sinks_drops_their_writes_and_nothing_else(rng):
  """Appends of a cache `holding_sinks` write no sink: deferred ones (the decode loop's)
  past the sinks equal a plain append leaf for leaf (and compile fewer scatters); at a
  sink position the sinks stay, deferred or not, whether the window defers codes or not."""
  from turboquant_jax import kv_cache
  k, v = rand(rng, B, 140, HKV, D), rand(rng, B, 140, HKV, D)
  cache = TurboQuantKVCache.create(B, 256, HKV, D, config=TurboQuantConfig(window=128))
  assert cache.defers_codes

  def append(c, kk, vv):
    return kv_cache.flush_caches([kv_cache.deferring([c])[0].update(kk, vv)])[0]

  step = jax.jit(append)
  short = step(cache, k[:, :1], v[:, :1])
  held = step(short.holding_sinks(), k[:, 1:2], v[:, 1:2])
  assert held.sinks_held and not np.any(held.sink_keys[:, :, 1])
  # Appends that do their rare work at once (the sinks under its conditional) too, and a
  # window too short to defer codes (the sinks under a conditional of their own).
  small = TurboQuantKVCache.create(B, L, HKV, D, config=TurboQuantConfig(window=32))
  for c in (short, small.update(k[:, :1], v[:, :1])):
    undeferred = c.holding_sinks().update(k[:, 1:2], v[:, 1:2])
    assert not np.any(undeferred.sink_keys[:, :, 1])
    np.testing.assert_array_equal(undeferred.window_keys[:, :, 1:2], kv_head_major(k[:, 1:2]))
    # A rewrite (its rare work runs: it codes the rewritten token) leaves them too.
    rewritten = c.holding_sinks().update(k[:, 5:6], v[:, 5:6], positions=0)
    np.testing.assert_array_equal(rewritten.sink_keys[:, :, :1], kv_head_major(k[:, :1]))
  full = cache.update(k[:, :139], v[:, :139])
  plain, held = step(full, k[:, 139:], v[:, 139:]), step(full.holding_sinks(), k[:, 139:],
                                                           v[:, 139:])
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(held)):
    np.testing.assert_array_equal(a, b)
  scatters = lambda c: step.lower(c, k[:, 139:], v[:, 139:]).as_text().count("scatter")  # noqa: E731
  assert scatters(full.holding_sinks()) < scatters(full)


def kv_head_major(x):
  return np.asarray(x).transpose(0, 2, 1, 3)


def test_reconstruct_is_what_attention_reads(rng):
  config = TurboQuantConfig(window=8, num_sinks=2, key_bits=3, value_bits=3.5)
  k, v = outlier_kv(rng, B, 50, HKV, D)
  cache = TurboQuantKVCache.create(B, L, HKV, D, config=config).update(k, v)
  keys, values = cache.reconstruct()
  q = rand(rng, B, 3, HQ, D)
  dense = DenseKVCache(keys=keys, values=values, lengths=cache.lengths,
                       overflowed=cache.overflowed)
  np.testing.assert_allclose(cache.attend(q), dense.attend(q), rtol=2e-4, atol=2e-5)


def rope_keys(rng, b, t, spec, offset=3.0):
  """Keys with a fixed mean before RoPE (what a real model's keys have), after RoPE."""
  from turboquant_jax.rope import rotate
  pre = rng.standard_normal((b, t, HKV, D)) + offset * rng.standard_normal((1, 1, HKV, D))
  pos = jnp.arange(t)[None, :, None]
  return rotate(jnp.asarray(pre, jnp.float32), pos, spec), jnp.asarray(pre, jnp.float32)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_centering_offsets_mean_and_gain(interleaved, rng):
  """Centred before RoPE: μ is the mean of the keys turned back to position 0; the offset
  added to every compressed score is q·R(t)·μ at each position (the reference and the
  interpret-mode kernel); the reconstruction beats centering after RoPE."""
  from turboquant_jax.rope import RopeSpec, rotate
  from turboquant_jax import kernel_attention
  spec = RopeSpec(1000.0, interleaved)
  config = TurboQuantConfig(window=8, num_sinks=2, key_bits=2.5, value_bits=3,
                            center_keys="rope")
  k, pre = rope_keys(rng, B, 60, spec)
  v = rand(rng, B, 60, HKV, D)
  cache = TurboQuantKVCache.create(B, L, HKV, D, config=config, rope=spec).update(k, v)
  np.testing.assert_allclose(cache.key_mean, np.asarray(pre[:, 2:60]).mean(1), atol=1e-4)
  qf = rand(rng, B, HKV, 3, D)
  direct = jnp.einsum("bhqd,bhld->bhql", qf, rotate(
      jnp.broadcast_to(cache.key_mean[:, :, None], (B, HKV, L, D)),
      jnp.arange(L)[None, None], spec))
  np.testing.assert_allclose(cache.query_offsets(qf), direct, rtol=1e-4, atol=1e-3)
  pos = jnp.array([[59, 50, -1], [59, 20, 10]])
  kw = dict(scale=0.3, soft_cap=5.0, num_splits=2)
  got = kernel_attention.compressed_partials(cache, qf, pos, block_k=32, interpret=True,
                                             compute_dtype=jnp.float32, poison=True, **kw)
  want = kernel_attention.compressed_partials_reference(cache, qf, pos, **kw)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  plain = TurboQuantKVCache.create(B, L, HKV, D, config=TurboQuantConfig(
      **{**config.__dict__, "center_keys": "plain"}), rope=spec).update(k, v)
  assert plain.rope is None
  exact = kv_head_major(k)[:, :, 2:52]
  err = lambda c: float(np.linalg.norm(c.reconstruct()[0][:, :, 2:52] - exact))  # noqa: E731
  assert err(cache) < 0.6 * err(plain)


def test_rope_centering_is_causal_and_prefill_equals_decode(rng):
  from turboquant_jax.rope import RopeSpec
  spec = RopeSpec(100.0)
  w, s = 16, 2
  config = TurboQuantConfig(window=w, num_sinks=s, key_bits=3, value_bits=3,
                            center_keys="rope")
  k, pre = rope_keys(rng, 1, 40, spec)
  v = rand(rng, 1, 40, HKV, D)
  step = TurboQuantKVCache.create(1, L, HKV, D, config=config, rope=spec)
  for t in range(40):
    step = step.update(k[:, t:t + 1], v[:, t:t + 1])
    if t == w - 1:
      mu = np.asarray(step.key_mean)
      np.testing.assert_allclose(mu[0], np.asarray(pre[0, s:w]).mean(0), atol=1e-4)
  np.testing.assert_array_equal(step.key_mean, mu)
  prefill = TurboQuantKVCache.create(1, L, HKV, D, config=config, rope=spec).update(
      k[:, :w], v[:, :w]).update(k[:, w:], v[:, w:])
  np.testing.assert_allclose(prefill.key_mean, mu, atol=1e-6)
  q = rand(rng, 1, 1, HQ, D)
  np.testing.assert_allclose(prefill.attend(q), step.attend(q), rtol=1e-4, atol=1e-5)


def test_rope_centering_with_everything_exact_is_dense(rng):
  from turboquant_jax.rope import RopeSpec
  spec = RopeSpec(100.0, interleaved=True)
  config = TurboQuantConfig(window=L, center_keys="rope")
  k, _ = rope_keys(rng, B, 50, spec)
  v = rand(rng, B, 50, HKV, D)
  tq = fill(TurboQuantKVCache, k, v, chunks=(20, 1, 29), config=config, rope=spec)
  dense = fill(DenseKVCache, k, v, chunks=(20, 1, 29))
  q = rand(rng, B, 2, HQ, D)
  np.testing.assert_allclose(tq.attend(q), dense.attend(q), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="center_keys"):
    TurboQuantConfig(center_keys="post")


def test_value_centering_is_causal_and_lowers_error_on_offset_values(rng):
  """center_values: μ_v is the mean of the values past the sinks when the row first holds
  a window, fixed after; the reconstruction adds it back (error well below the
  uncentred cache's on values with a common offset), the reference attention and the
  Triton kernel's merge count the compressed tokens' share of μ_v, and token-by-token
  decoding codes the same as a prefill of the first window."""
  w, s, t = 16, 2, 192
  k = rand(rng, 1, t, HKV, D)
  v = rand(rng, 1, t, HKV, D) + 3.0
  q = rand(rng, 1, 1, HQ, D)
  make = lambda cv: TurboQuantKVCache.create(  # noqa: E731
      1, t, HKV, D, config=TurboQuantConfig(window=w, num_sinks=s, key_bits=3,
                                            value_bits=3, center_values=cv))
  centred, plain = make(True).update(k, v), make(False).update(k, v)
  mean = np.mean(np.asarray(v[0, s:t]), axis=0)
  np.testing.assert_allclose(centred.value_mean[0], mean, rtol=1e-5, atol=1e-5)
  truth = np.swapaxes(np.asarray(v), 1, 2)[:, :, :t]
  err = lambda c: np.linalg.norm(np.asarray(c.reconstruct()[1])[:, :, :t] - truth)  # noqa: E731
  assert err(centred) < 0.5 * err(plain)
  dense = DenseKVCache.create(1, t, HKV, D).update(k, v).attend(q)
  ref = centred.attend(q, implementation="reference")
  assert (np.linalg.norm(ref - dense) < 0.7 * np.linalg.norm(
      plain.attend(q, implementation="reference") - dense))
  got = centred.attend(q, implementation="triton", block_k=16, num_splits=2)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  # Causal: chosen from the first window; token by token equals a prefill of the window.
  stepwise = make(True)
  for i in range(w + 8):
    stepwise = stepwise.update(k[:, i:i + 1], v[:, i:i + 1])
  np.testing.assert_allclose(stepwise.value_mean[0], np.mean(np.asarray(v[0, s:w]), axis=0),
                             rtol=1e-5, atol=1e-5)
  prefill = make(True).update(k[:, :w], v[:, :w]).update(k[:, w:w + 8], v[:, w:w + 8])
  for a, b in zip(jax.tree.leaves(stepwise.value_codes), jax.tree.leaves(prefill.value_codes)):
    np.testing.assert_allclose(np.asarray(a, np.float32)[:, :, :w + 8],
                               np.asarray(b, np.float32)[:, :, :w + 8], atol=1e-3)


@pytest.mark.parametrize("layout", ["planes", "tiles"])
def test_appends_code_whole_blocks_from_the_window(layout, rng):
  """A window of a block or more: single-token appends leave their codes to the append
  that completes a block, which codes it from the window. Attention is what an eagerly
  coded cache gives, completed blocks hold the same codes, a rewrite codes its token, and
  any longer update codes every pending token."""
  if layout == "planes":
    config, n, start = (TurboQuantConfig(key_bits=3.5, value_bits=3, window=128), 128,
                        np.array([200, 260]))
  else:   # 3-bit codes of 64 channels come in tiles of 256 tokens
    config, n, start = TurboQuantConfig(key_bits=3, value_bits=4, levels="cubic", window=256,
                                        layout="tiles"), 256, np.array([470, 520])
  k, v = outlier_kv(rng, B, 600, HKV, D)
  q = rand(rng, B, 1, HQ, D)
  make = lambda: TurboQuantKVCache.create(B, 1024, HKV, D, config=config)  # noqa: E731
  cache = make().update(k[:, :start.max()], v[:, :start.max()], num_tokens=start)
  assert cache.defers_codes and cache.code_block == n and bool(jnp.all(cache.calibrated))
  append = jax.jit(lambda c, kk, vv: c.update(kk, vv), donate_argnums=0)
  rows, steps = np.arange(B), 60      # row 0 completes a block, row 1 does not
  for i in range(steps):
    cache = append(cache, k[rows, start + i][:, None], v[rows, start + i][:, None])
  assert append._cache_size() == 1
  ends = start + steps
  coded = ends - ends % n           # blocks completed (by the prefill or the appends)
  eager = make().update(k[:, :start.max()], v[:, :start.max()], num_tokens=start)
  eager = eager.update(*(jnp.stack([x[b, start[b]:start[b] + steps] for b in rows])
                         for x in (k, v)))
  np.testing.assert_array_equal(cache.lengths, ends)

  def codes(c):
    return [np.asarray(x) for x in jax.tree.leaves(c.code_planes())]
  for got, want in zip(codes(cache), codes(eager)):
    for b in rows:
      np.testing.assert_array_equal(got[b, :, :coded[b]], want[b, :, :coded[b]])
  for got, want in zip(cache.key_codes + cache.value_codes, eager.key_codes + eager.value_codes):
    for b in rows:     # appended since the prefill, past the last block: no codes yet
      pending = max(coded[b], start[b])
      assert not np.any(got.norms[b, :, pending:]) and np.all(want.norms[b, :, :ends[b]])
      assert pending < ends[b]
  np.testing.assert_allclose(cache.attend(q), eager.attend(q), rtol=1e-5, atol=1e-6)

  # A rewrite of an earlier position codes that token at once (the rest stay pending).
  x = rand(rng, B, 1, HKV, D)
  rewound = cache.update(x, x, positions=jnp.asarray(ends - 5))
  reference = eager.update(x, x, positions=jnp.asarray(ends - 5))
  np.testing.assert_array_equal(rewound.lengths, ends - 4)
  np.testing.assert_allclose(rewound.attend(q), reference.attend(q), rtol=1e-5, atol=1e-6)
  for got, want in zip(codes(rewound), codes(reference)):
    for b in rows:
      np.testing.assert_array_equal(got[b, :, ends[b] - 5], want[b, :, ends[b] - 5])

  # A longer update codes every pending token and its own: the same codes everywhere.
  y = rand(rng, B, 2, HKV, D)
  cache, eager = (c.update(y, y) for c in (cache, eager))
  for got, want in zip(codes(cache), codes(eager)):
    for b in rows:
      np.testing.assert_array_equal(got[b, :, :ends[b] + 2], want[b, :, :ends[b] + 2])
  np.testing.assert_allclose(cache.attend(q), eager.attend(q), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits, layout, window, expected", [
    (3.5, "planes", None, 256), (3, "tiles", None, 256),   # `WINDOW`
    (3.5, "tiles", None, 512),      # 256-token tiles: two, so decode codes them lazily
    (3.5, "tiles", 128, 128), (3, "tiles", 300, 300)])
def test_default_window_holds_a_block(bits, layout, window, expected):
  cfg = TurboQuantConfig(key_bits=bits, value_bits=bits, layout=layout, window=window)
  cache = TurboQuantKVCache.create(1, 1024, HKV, 128, config=cfg)   # 3-bit tiles: 128 tokens
  assert cache.config.window == expected == cache.window_keys.shape[2]
  assert cache.defers_codes == (expected >= cache.code_block)
  assert cache.lazy_code_steps == min(max(expected - cache.code_block, 0), cache.code_block) * (
      expected >= cache.code_block)
  short = TurboQuantKVCache.create(1, 256, HKV, 128, config=cfg)   # never past the cache
  assert short.config.window == min(expected, 256)


def test_lazy_constants_are_what_lazy_appends_leave_as_they_are(rng):
  """The fields `lazy_constants` names are those that single-token appends with their rare
  work dropped (a lazy run: `deferring`, then `drop_deferred`) and `code_completed` leave
  untouched: decode_loop passes them undonated and never gets them back."""
  from turboquant_jax import kv_cache
  cache = TurboQuantKVCache.create(B, 512, HKV, D, config=TurboQuantConfig(window=256))
  k, v = outlier_kv(rng, B, 520, HKV, D)
  update = jax.jit(lambda c, kk, vv, n: c.update(kk, vv, num_tokens=n))
  cache = update(cache, k[:, :256], v[:, :256], jnp.array([250, 246]))
  cache = update(cache, k[:, 250:506], v[:, 250:506], jnp.array([10, 10]))  # calibrate
  cache = update(cache, k[:, 260:516], v[:, 260:516], jnp.array([120, 0]))
  assert list(cache.lengths) == [380, 256] and bool(jnp.all(cache.calibrated))
  assert bool(cache.skips_rare_work(20))
  lengths = np.asarray(cache.lengths)

  append = jax.jit(lambda c, kk, vv: kv_cache.drop_deferred(
      [kv_cache.deferring([c])[0].update(kk, vv)])[0])

  def lazy_run(c, steps):
    since = c.lengths
    for t in range(steps):
      c = append(c, k[:, 380 + t:381 + t], v[:, 380 + t:381 + t])
    return c, c.code_completed(since)

  for steps, codes in ((2, False), (20, True)):     # 380 + 20 completes row 0's block
    ran, coded = lazy_run(cache, steps)
    assert (not codes) == all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(coded.key_codes), jax.tree.leaves(ran.key_codes)))
    named = cache.lazy_constants(codes=codes, lengths=lengths)
    assert ("key_codes" in named) == (not codes) and "sink_keys" in named
    assert "sink_keys" not in cache.lazy_constants(codes=codes, lengths=np.array([2, 9]))
    for field in named:
      for a, b in zip(jax.tree.leaves(getattr(coded, field)),
                      jax.tree.leaves(getattr(cache, field))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(coded.window_keys, cache.window_keys)


@pytest.mark.parametrize("config", [
    TurboQuantConfig(key_bits=3.5, value_bits=3),    # planes, channel groups
    # 256-token tiles at d = 64, calibrating at 256 tokens.
    TurboQuantConfig(key_bits=3, value_bits=3, layout="tiles", levels="cubic", window=256)])
def test_layers_flush_together_as_each_alone(config, rng, monkeypatch):
  """A decoder's layers (caches of one structure, each its own rotations) flush their
  deferred work as vmapped copies of at most FLUSH_TOGETHER_BYTES of stacked inputs (here
  two layers and one: `kv_cache.flush_caches`): leaf for leaf what each cache's own flush
  builds, through calibration and completed blocks at different steps per row, with two
  copies of the work in the program instead of three."""
  from turboquant_jax import kv_cache, turboquant_cache
  layers, steps = 3, 100
  k, v = outlier_kv(rng, layers * B, 300, HKV, D)
  k, v = k.reshape(layers, B, 300, HKV, D), v.reshape(layers, B, 300, HKV, D)
  start = [TurboQuantKVCache.create(B, 512, HKV, D, config=config, layer=i).update(
      k[i, :, :200], v[i, :, :200], num_tokens=jnp.array([200, 180])) for i in range(layers)]
  monkeypatch.setattr(turboquant_cache, "FLUSH_TOGETHER_BYTES",
                      2 * turboquant_cache._small_bytes(start[0].deferring().update(
                          k[0, :, 200:201], v[0, :, 200:201])))

  def step(together, caches, kv):
    caches = kv_cache.deferring(caches)
    caches = [c.update(kk[:, None], vv[:, None]) for c, kk, vv in zip(caches, *kv)]
    due = jnp.any(jnp.stack([c.flush_due for c in caches]))
    if together:
      return kv_cache.flush_caches(caches), due
    return jax.lax.cond(due, lambda cs: [c.flush() for c in cs],
                        lambda cs: [c.skip_flush() for c in cs], caches), due

  def run(together):
    return jax.lax.scan(functools.partial(step, together), start,
                        (k[:, :, 200:200 + steps].transpose(2, 0, 1, 3, 4),
                         v[:, :, 200:200 + steps].transpose(2, 0, 1, 3, 4)))

  (got, due), (want, _) = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
  assert 2 <= int(due.sum()) < steps // 10      # calibrations and completed blocks
  assert bool(jnp.all(jnp.stack([c.calibrated for c in got])))
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)
  # Layers differ (their rotations): equal codes across layers would mean a mix-up.
  codes = lambda c: jax.tree.leaves(c.key_codes)  # noqa: E731
  for i in range(1, layers):
    assert not all(np.array_equal(a, b) for a, b in zip(codes(got[0]), codes(got[i])))
  # Two copies of the work for three layers: its sorts (channel orders, ring order).
  sorts = [_count_primitive(jax.make_jaxpr(functools.partial(run, t))().jaxpr, "sort")
           for t in (True, False)]
  assert 0 < 3 * sorts[0] == 2 * sorts[1]


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name`, through calls, loops and conditionals."""
  import jax.extend
  return sum((eqn.primitive.name == name) + sum(
      _count_primitive(sub, name) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns)


def test_windows_shorter_than_a_block_code_every_append(rng):
  cache = TurboQuantKVCache.create(1, 256, HKV, D, config=TurboQuantConfig(window=64))
  assert not cache.defers_codes
  k, v = rand(rng, 1, 70, HKV, D), rand(rng, 1, 70, HKV, D)
  for t in range(70):
    cache = cache.update(k[:, t:t + 1], v[:, t:t + 1])
  norms = np.asarray(cache.code_planes()[0][0].norms)
  assert np.all(norms[:, :, :70] > 0) and not np.any(norms[:, :, 70:])


@pytest.mark.parametrize("config", [
    TurboQuantConfig(key_bits=3.5, value_bits=3),    # planes, RoPE-free centring, groups
    # 256-token tiles at d = 64; a window of one tile, so 256 tokens calibrate.
    TurboQuantConfig(key_bits=3, value_bits=3, layout="tiles", levels="cubic", window=256)])
def test_deferred_appends_flushed_equal_appends(config, rng):
  """Appends that defer their rare work (`deferring`) and are flushed after each step
  (`kv_cache.flush_caches`) build the same cache, leaf for leaf, and attend the same,
  through sinks, calibration and completed blocks at different steps per row, and a
  rewrite; the flush runs only where work is due."""
  from turboquant_jax import kv_cache
  steps = 300
  k, v = outlier_kv(rng, B, steps + 5, HKV, D)
  q = rand(rng, steps, B, 1, HQ, D)
  rewind = np.zeros((steps, B), bool)
  rewind[200] = True                    # step 200 rewrites position length - 3
  start = TurboQuantKVCache.create(B, 512, HKV, D, config=config).update(
      k[:, :5], v[:, :5], num_tokens=jnp.array([5, 1]))   # row 1 passes its sinks later

  def run(defer):
    def step(cache, xs):
      kk, vv, qq, back = xs
      positions = jnp.where(back, cache.lengths - 3, cache.lengths)
      c = kv_cache.deferring([cache])[0] if defer else cache
      c = c.update(kk[:, None], vv[:, None], positions=positions)
      out = c.attend(qq)
      due = c.flush_due if defer else jnp.zeros((), bool)
      return (kv_cache.flush_caches([c])[0] if defer else c), (out, due)
    return jax.jit(lambda c: jax.lax.scan(step, c, (
        k[:, 5:].transpose(1, 0, 2, 3), v[:, 5:].transpose(1, 0, 2, 3), q,
        jnp.asarray(rewind))))(start)

  (eager, (want, _)), (deferred, (got, due)) = run(False), run(True)
  assert deferred.pending is None and not deferred.defer
  assert jax.tree.structure(deferred) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(deferred), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(got, want)
  assert bool(jnp.all(deferred.calibrated))
  # Due: calibration at 128 tokens, the completed blocks and the rewrite, nothing else.
  lengths, now = [], np.array([5, 1])
  for back in rewind:
    now = np.where(back, now - 3, now) + 1
    lengths.append(now)
  expect = np.any(np.array(lengths) % start.code_block == 0, axis=1) | rewind.any(axis=1)
  assert 2 < expect.sum() < 10
  np.testing.assert_array_equal(due, expect)

  cache = kv_cache.deferring([start])[0].update(k[:, 5:6], v[:, 5:6])
  with pytest.raises(ValueError, match="flush"):
    cache.update(k[:, 6:7], v[:, 6:7])


@pytest.mark.parametrize("layout", ["planes", "tiles"])
def test_prerotated_values_give_the_rotated_output(layout, rng):
  """A values_prerotated cache fed Π·v (Π = `value_rotation`, the rotation a plain cache
  applies itself) stores the plain cache's value codes and returns its output times Πᵀ
  (row vectors): the decoder's folded output projection rotates it back."""
  from turboquant_jax import value_rotation
  b, t, h, d = 2, 300, 2, 64
  base = dict(key_bits=3, value_bits=3, window=32, num_sinks=2, layout=layout,
              **({"levels": "quintic"} if layout == "tiles" else {}))
  plain, pre = TurboQuantConfig(**base), TurboQuantConfig(**base, values_prerotated=True)
  rot = value_rotation(plain, 1, d)
  np.testing.assert_allclose(rot @ rot.T, np.eye(d), atol=1e-5)
  np.testing.assert_array_equal(rot, value_rotation(pre, 1, d))
  k = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((b, 1, 2 * h, d)), jnp.float32)
  lengths = jnp.array([t, 200])
  outs = []
  for config, values in ((plain, v), (pre, v @ rot.T)):
    cache = TurboQuantKVCache.create(b, 512, h, d, config=config, layer=1)
    cache = cache.update(k, values, num_tokens=lengths)
    outs.append(cache.attend(q))
  np.testing.assert_allclose(outs[1], outs[0] @ rot.T, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="integer value_bits"):
    TurboQuantConfig(value_bits=3.5, values_prerotated=True)
  with pytest.raises(ValueError, match="integer value_bits"):
    value_rotation(TurboQuantConfig(value_bits=2.5), 0, d)


def test_norm_dtype_per_side(rng):
  """norm_dtype as a (keys, values) pair: each side stores its own, the memory report
  counts each, and the pair behaves as one dtype where both sides agree."""
  f16, f8 = jnp.float16, jnp.float8_e4m3fn
  d = 64
  pair = TurboQuantConfig(key_bits=3, value_bits=3, norm_dtype=(f16, f8))
  cache = TurboQuantKVCache.create(1, 256, 2, d, config=pair)
  assert {g.norm_dtype for g in cache.key_quantizer.groups} == {f16}
  assert {g.norm_dtype for g in cache.value_quantizer.groups} == {f8}
  rep = cache.memory_report()
  assert rep["key_norms"] == 2 * rep["value_norms"] == 2 * 2 * 256
  same = TurboQuantConfig(key_bits=3, value_bits=3, norm_dtype=[f16, f16])
  assert same.norm_dtype == (f16, f16) and hash(same) is not None   # static: hashable
  k = jnp.asarray(rng.standard_normal((1, 200, 2, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 200, 2, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((1, 1, 4, d)), jnp.float32)
  one = TurboQuantConfig(key_bits=3, value_bits=3, norm_dtype=f16)
  outs = [TurboQuantKVCache.create(1, 256, 2, d, config=c).update(k, v).attend(q)
          for c in (same, one)]
  np.testing.assert_array_equal(outs[0], outs[1])
  for bad in ((f16,), (f16, f8, f8), (f16, jnp.int8)):
    with pytest.raises(ValueError, match="norm_dtype"):
      TurboQuantConfig(norm_dtype=bad)


def test_default_norm_fit_leaves_attention_unshrunk(rng):
  """The default stores projected value norms: attention averages the values' errors
  over tokens, so the shrinkage of matched (or the paper's exact) norms, a bias along each
  value, stays in the output where part of the projected values' noise averages away."""
  t, d = 256, 64
  config = TurboQuantConfig(key_bits=4, value_bits=2, window=0, num_sinks=0,
                            norm_dtype=jnp.float32)
  assert config.norm_fits == ("projected", "projected")
  assert TurboQuantConfig(key_bits=3, key_quantizer="prod").norm_fits == ("exact", "projected")
  q = jnp.zeros((1, 1, 1, d), jnp.float32)      # equal scores: the output is the mean value
  fits = (None, ("projected", "matched"), "exact")
  errors = np.zeros(len(fits))
  for seed in range(3):
    k = rand(rng, 1, t, 1, d)
    v = rand(rng, 1, 1, 1, d) + rand(rng, 1, t, 1, d, scale=2.0)   # a shared direction
    want = np.asarray(jnp.mean(v, axis=1))[:, None]
    for i, fit in enumerate(fits):
      cache = TurboQuantKVCache.create(1, t, 1, d, config=dataclasses.replace(
          config, norm_fit=fit, seed=seed)).update(k, v)
      if fit is None:   # <v̂, v> = ‖v‖² per token
        vh = np.swapaxes(np.asarray(v), 1, 2)
        values = np.asarray(cache.reconstruct()[1])
        np.testing.assert_allclose(np.sum(values * vh, -1), np.sum(vh * vh, -1), rtol=1e-4)
      errors[i] += np.linalg.norm(np.asarray(cache.attend(q)) - want) / np.linalg.norm(want)
  assert errors[0] < 0.85 * errors[1] and errors[1] < 0.85 * errors[2], errors / 3


@pytest.mark.parametrize("layout", ["planes", "tiles"])
def test_norm_fit_keys_projected_values_matched(layout, rng):
  """A cache with fitted norms reads back keys whose projection on the key is exact and
  values of exact norm; the config rejects what it cannot serve."""
  levels = "lloyd_max" if layout == "planes" else "cubic"
  config = TurboQuantConfig(key_bits=4, value_bits=3, center_keys=False, window=0,
                            num_sinks=0, layout=layout, levels=levels,
                            norm_fit=["projected", "matched"], norm_dtype=jnp.float32)
  assert config.norm_fit == ("projected", "matched")
  k, v = rand(rng, B, 40, HKV, D), rand(rng, B, 40, HKV, D, scale=2.0)
  length = L if layout == "planes" else 256     # tiles of 256 tokens at D = 64
  cache = TurboQuantKVCache.create(B, length, HKV, D, config=config).update(k, v)
  keys, values = (np.asarray(x)[:, :, :40] for x in cache.reconstruct())
  kh, vh = (np.swapaxes(np.asarray(x), 1, 2) for x in (k, v))
  np.testing.assert_allclose(np.sum(keys * kh, -1), np.sum(kh * kh, -1), rtol=1e-4)
  np.testing.assert_allclose(np.sum(values * values, -1), np.sum(vh * vh, -1), rtol=1e-4)
  exact = TurboQuantKVCache.create(B, length, HKV, D, config=TurboQuantConfig(
      key_bits=4, value_bits=3, center_keys=False, window=0, num_sinks=0, layout=layout,
      levels=levels, norm_dtype=jnp.float32, norm_fit="exact")).update(k, v)
  ek = np.asarray(exact.reconstruct()[0])[:, :, :40]
  assert np.mean(np.sum(ek * kh, -1) / np.sum(kh * kh, -1)) < 0.995   # shrunk
  with pytest.raises(ValueError, match="norm_fit"):
    TurboQuantConfig(norm_fit="unbiased")
  with pytest.raises(ValueError, match="norm_fit"):
    TurboQuantConfig(norm_fit=("projected", "matched", "exact"))
  with pytest.raises(ValueError, match="QJL keys"):
    TurboQuantConfig(key_bits=3, key_quantizer="prod", norm_fit="projected")
