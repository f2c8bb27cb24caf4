"""The sliding-window ring against the dense cache of the whole context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import forward
from models import Decoder
from tests.test_decoder import TINY
from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache
from turboquant_jax.layer_policy import per_layer, window_rings
from turboquant_jax.ring_cache import RingKVCache

B, H, D, HQ = 2, 2, 16, 4


def kv(rng, t):
  return (jnp.asarray(rng.standard_normal((B, t, H, D)), jnp.float32),
          jnp.asarray(rng.standard_normal((B, t, H, D)), jnp.float32))


@pytest.mark.parametrize("window, max_query, chunks", [
    (8, 1, [5] + [1] * 20),            # decode past the ring several times
    (8, 4, [30, 4, 3, 4, 1, 4]),       # a prefill longer than the ring, then chunks
    (6, 3, [2, 3, 3, 3, 3, 3, 3, 1]),
])
def test_ring_attends_as_the_dense_cache_within_the_window(rng, window, max_query, chunks):
  max_len = 64
  ring = RingKVCache.create(B, max_len, H, D, window=window, max_query=max_query)
  dense = DenseKVCache.create(B, max_len, H, D)
  assert ring.capacity == window + max_query - 1
  for i, t in enumerate(chunks):
    k, v = kv(rng, t)
    n = jnp.array([t, max(t - 1, 0)]) if i else None   # row 1 ragged after the prompt
    ring, dense = ring.update(k, v, num_tokens=n), dense.update(k, v, num_tokens=n)
    np.testing.assert_array_equal(ring.lengths, dense.lengths)
    tq = min(t, max_query)
    q = jnp.asarray(rng.standard_normal((B, tq, HQ, D)), jnp.float32)
    got = ring.attend(q, sliding_window=window, soft_cap=5.0 if i % 2 else None)
    want = dense.attend(q, sliding_window=window, soft_cap=5.0 if i % 2 else None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rewrite_within_the_ring_equals_dense(rng):
  ring = RingKVCache.create(B, 40, H, D, window=4, max_query=3)
  dense = DenseKVCache.create(B, 40, H, D)
  k, v = kv(rng, 20)
  ring, dense = ring.update(k, v), dense.update(k, v)
  k, v = kv(rng, 2)
  pos = jnp.array([19, 20])             # rewind one token in row 0, append in row 1
  ring, dense = ring.update(k, v, positions=pos), dense.update(k, v, positions=pos)
  q = jnp.asarray(rng.standard_normal((B, 2, HQ, D)), jnp.float32)
  np.testing.assert_allclose(ring.attend(q, sliding_window=4),
                             dense.attend(q, sliding_window=4), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no longer holds"):
    ring.update(k, v, positions=jnp.array([10, 10]))


def test_ring_refuses_what_it_cannot_serve(rng):
  ring = RingKVCache.create(B, 16, H, D, window=4)
  k, v = kv(rng, 3)
  ring = ring.update(k, v)
  with pytest.raises(ValueError, match="need a ring"):
    ring.attend(jnp.ones((B, 2, HQ, D)), sliding_window=4)
  with pytest.raises(ValueError, match="sliding window of 4"):
    ring.attend(jnp.ones((B, 1, HQ, D)), sliding_window=8)
  with pytest.raises(ValueError, match="cache full"):
    ring.update(*kv(rng, 14))
  with pytest.raises(ValueError, match="window must be"):
    RingKVCache.create(B, 16, H, D, window=0)
  # Under jit nothing raises: the row is flagged and its outputs are NaN.
  full = jax.jit(lambda c, k, v: c.update(k, v))(ring, *kv(rng, 14))
  assert bool(jnp.all(full.overflowed)) and int(full.lengths[0]) == 3
  assert bool(jnp.all(jnp.isnan(full.attend(jnp.ones((B, 1, HQ, D))))))
  back = jax.jit(lambda c, k, v: c.update(k, v, positions=jnp.array([0, 13])))(
      ring.update(*kv(rng, 10)), *kv(rng, 1))
  np.testing.assert_array_equal(back.overflowed, [True, False])


def test_memory_is_the_window_not_the_context():
  ring = RingKVCache.create(1, 32768, 1, 256, jnp.bfloat16, window=512)
  rep = ring.memory_report()
  assert rep["capacity"] == 512 and rep["keys_values"] == 512 * 256 * 2 * 2
  assert rep["compression_vs_bf16"] > 60


def test_decoder_with_rings_on_local_layers_equals_full_caches():
  """Gemma-style decoder (local layers with a 5-token window): rings on the local layers,
  dense or TurboQuant on the global one, the same logits as exact full caches on the local
  layers, step by step past the window."""
  cfg = TINY["gemma"]
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
  tq = lambda *a, **kw: TurboQuantKVCache.create(  # noqa: E731
      *a, config=TurboQuantConfig(key_bits=3, value_bits=3, window=4), **kw)
  local = [i for i in range(cfg.num_layers) if cfg.layer_window(i) is not None]
  for default in (DenseKVCache.create, tq):
    # The rings are exact: compare with exact full caches on the local layers.
    full = model.init_caches(2, 32, per_layer(default, full_precision_layers=local))
    rings = model.init_caches(2, 32, window_rings(default, cfg.layer_window))
    kinds = [type(c).__name__ for c in rings]
    assert kinds.count("RingKVCache") == sum(cfg.layer_window(i) is not None
                                             for i in range(cfg.num_layers)) >= 1
    _, full = forward(model, tokens[:, :10], full, prefill=True)
    _, rings = forward(model, tokens[:, :10], rings, prefill=True)
    for i in range(10, 24):
      a, full = forward(model, tokens[:, i:i + 1], full)
      b, rings = forward(model, tokens[:, i:i + 1], rings)
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def _q8_0(x, group):
  """The q8_0 round trip of x [..., D], written out: one scale per `group` channels."""
  xg = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, group)
  d = (np.abs(xg).max(-1, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
  q = np.clip(np.round(xg / np.where(d == 0, 1.0, d)), -127, 127)
  return jnp.asarray((q * d).reshape(x.shape))


@pytest.mark.parametrize("head_dim, group, recent", [(64, 32, 0), (16, 16, 0), (64, 32, 3)])
def test_int8_ring_attends_as_a_dense_cache_of_its_q8_0_values(rng, head_dim, group, recent):
  """16 channels: one scale per token. recent: the latest tokens read exact (bf16)."""
  window, max_query, max_len = 8, 3, 48
  ring = RingKVCache.create(B, max_len, H, head_dim, jnp.int8, window=window,
                            max_query=max_query, exact_recent=recent)
  assert ring.quantized and ring.keys.dtype == jnp.uint8
  assert ring.key_scales.shape == (B, H, ring.capacity, head_dim // group)
  exact = DenseKVCache.create(B, max_len, H, head_dim)
  ks, vs = [], []
  for i, t in enumerate([13, 1, 3, 1, 2, 3, 1]):
    k = jnp.asarray(rng.standard_normal((B, t, H, head_dim)) * 3.0, jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, t, H, head_dim)), jnp.float32)
    ring, exact = ring.update(k, v), exact.update(k, v)
    ks.append(k), vs.append(v)
    # The reference: every token so far as q8_0 codes, the latest `recent` as bf16.
    hk, hv = jnp.concatenate(ks, 1), jnp.concatenate(vs, 1)
    n = hk.shape[1]
    late = (jnp.arange(n) >= n - recent)[None, :, None, None]
    bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    mixed = [jnp.where(late, bf16(x), _q8_0(x, group)) for x in (hk, hv)]
    dense = DenseKVCache.create(B, max_len, H, head_dim).update(*mixed)
    q = jnp.asarray(rng.standard_normal((B, min(t, max_query), HQ, head_dim)), jnp.float32)
    cap = 5.0 if i % 2 else None
    got = ring.attend(q, sliding_window=window, soft_cap=cap)
    np.testing.assert_allclose(got, dense.attend(q, sliding_window=window, soft_cap=cap),
                               rtol=1e-5, atol=1e-5)
    # ... and near the exact values (8-bit codes under scores of std ~3: 1-2% here).
    full = exact.attend(q, sliding_window=window, soft_cap=cap)
    assert float(jnp.linalg.norm(got - full) / jnp.linalg.norm(full)) < 0.04


def test_int8_ring_recent_tokens_survive_a_rewrite(rng):
  """A rewrite drops the recent copies at and after its position; the codes stay right."""
  ring = RingKVCache.create(B, 40, H, D, jnp.int8, window=6, max_query=2, exact_recent=4)
  ref = RingKVCache.create(B, 40, H, D, window=6, max_query=2)
  k, v = kv(rng, 12)
  ring, ref = ring.update(k, v), ref.update(k, v)
  k, v = kv(rng, 2)
  pos = jnp.array([10, 12])
  ring, ref = ring.update(k, v, positions=pos), ref.update(k, v, positions=pos)
  assert sorted(np.asarray(ring.recent_positions[0]).tolist()) == [8, 9, 10, 11]
  assert sorted(np.asarray(ring.recent_positions[1]).tolist()) == [10, 11, 12, 13]
  q = jnp.asarray(rng.standard_normal((B, 2, HQ, D)), jnp.float32)
  got, want = ring.attend(q, sliding_window=6), ref.attend(q, sliding_window=6)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.02
  with pytest.raises(ValueError, match="exact_recent is for int8"):
    RingKVCache.create(B, 40, H, D, window=6, exact_recent=4)


def test_int8_ring_memory_counts_the_scales():
  ring = RingKVCache.create(1, 32768, 1, 256, jnp.int8, window=512)
  rep = ring.memory_report()
  assert rep["keys_values"] == 2 * (512 * 256 + 512 * 8 * 2)    # codes + fp16 scale / 32
  assert rep["bytes_per_token_per_head"] * 8 / (2 * 256) == 8.5
  recent = RingKVCache.create(1, 32768, 1, 256, jnp.int8, window=512, exact_recent=128)
  assert recent.memory_report()["keys_values"] == rep["keys_values"] + 2 * 128 * 256 * 2
  with pytest.raises(ValueError, match="float32, bfloat16, float16 or int8"):
    RingKVCache.create(1, 64, 1, 16, jnp.int32, window=8)


def test_decoder_with_int8_rings_stays_close_to_exact_rings():
  cfg = TINY["gemma"]
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 20), 0, cfg.vocab_size)
  exact = model.init_caches(2, 32, window_rings(DenseKVCache.create, cfg.layer_window))
  rings = model.init_caches(2, 32, window_rings(DenseKVCache.create, cfg.layer_window,
                                                ring_dtype=jnp.int8))
  assert any(isinstance(c, RingKVCache) and c.quantized for c in rings)
  assert all(not c.quantized for c in exact if isinstance(c, RingKVCache))
  _, exact = forward(model, tokens[:, :8], exact, prefill=True)
  _, rings = forward(model, tokens[:, :8], rings, prefill=True)
  for i in range(8, 20):
    a, exact = forward(model, tokens[:, i:i + 1], exact)
    b, rings = forward(model, tokens[:, i:i + 1], rings)
    assert float(jnp.max(jnp.abs(b - a))) < 0.02 * float(jnp.max(jnp.abs(a)))
