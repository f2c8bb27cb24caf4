import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax.kv_cache import DenseKVCache

B, L, HKV, HQ, D = 2, 32, 2, 4, 16


def rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def reference(q, k, v, lengths, q_positions, sliding_window=None, soft_cap=None, scale=None):
  """jax.nn.dot_product_attention on the token-major K/V of the valid tokens."""
  kp = jnp.arange(k.shape[1])
  mask = (kp[None, None, :] <= q_positions[:, :, None]) & (kp < lengths[:, None])[:, None, :]
  if sliding_window is not None:
    mask &= q_positions[:, :, None] - kp[None, None, :] < sliding_window
  if soft_cap is not None:
    # jax.nn.dot_product_attention has no soft cap: apply it to q·k by hand.
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, HQ // HKV, axis=2)) * (scale or D**-0.5)
    s = soft_cap * jnp.tanh(s / soft_cap)
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, HQ // HKV, axis=2))
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)


@pytest.mark.parametrize("q_len", [1, 5])
def test_attend_equals_jax_dot_product_attention(q_len, rng):
  k, v = rand(rng, B, 20, HKV, D), rand(rng, B, 20, HKV, D)
  cache = DenseKVCache.create(B, L, HKV, D).update(k, v, num_tokens=jnp.array([20, 13]))
  q = rand(rng, B, q_len, HQ, D)
  q_pos = jnp.array([[19], [12]]) - q_len + 1 + jnp.arange(q_len)
  got = jax.jit(lambda c, q, p: c.attend(q, q_positions=p))(cache, q, q_pos)
  want = reference(q, k, v, cache.lengths, q_pos)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sliding_window_and_soft_cap(rng):
  k, v = rand(rng, B, 24, HKV, D), rand(rng, B, 24, HKV, D)
  cache = DenseKVCache.create(B, L, HKV, D).update(k, v)
  q = rand(rng, B, 1, HQ, D) * 4
  got = cache.attend(q, sliding_window=7, soft_cap=5.0, scale=0.3)
  want = reference(q, k, v, cache.lengths, jnp.full((B, 1), 23), sliding_window=7,
                   soft_cap=5.0, scale=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_step_by_step_equals_one_shot(rng):
  k, v = rand(rng, B, 10, HKV, D), rand(rng, B, 10, HKV, D)
  step = jax.jit(lambda c, kk, vv: c.update(kk, vv))
  cache = DenseKVCache.create(B, L, HKV, D)
  for t in range(10):
    cache = step(cache, k[:, t:t + 1], v[:, t:t + 1])
  one = DenseKVCache.create(B, L, HKV, D).update(k, v)
  jax.tree.map(np.testing.assert_array_equal, cache, one)


def test_overflow_raises_eagerly_and_flags_under_jit(rng):
  cache = DenseKVCache.create(1, 4, HKV, D).update(rand(rng, 1, 3, HKV, D), rand(rng, 1, 3, HKV, D))
  k2 = rand(rng, 1, 2, HKV, D)
  with pytest.raises(ValueError, match="cache full"):
    cache.update(k2, k2)
  full = jax.jit(lambda c, kk: c.update(kk, kk))(cache, k2)
  assert bool(full.overflowed[0]) and int(full.lengths[0]) == 3
  np.testing.assert_array_equal(full.keys, cache.keys)  # nothing written, nothing wrapped
  assert np.all(np.isnan(np.asarray(full.attend(rand(rng, 1, 1, HQ, D)))))


def test_bad_shapes_name_the_argument(rng):
  cache = DenseKVCache.create(B, L, HKV, D)
  with pytest.raises(ValueError, match="^k must"):
    cache.update(rand(rng, B, 1, HKV + 1, D), rand(rng, B, 1, HKV, D))
  with pytest.raises(ValueError, match="^v must"):
    cache.update(rand(rng, B, 1, HKV, D), jnp.ones((B, 1, HKV, D), jnp.int32))
  with pytest.raises(ValueError, match="^q must"):
    cache.attend(rand(rng, B, 1, HQ, D + 1))
  with pytest.raises(ValueError, match="multiple"):
    cache.attend(rand(rng, B, 1, 3, D))
  with pytest.raises(ValueError, match="gaps"):
    cache.update(rand(rng, B, 1, HKV, D), rand(rng, B, 1, HKV, D), positions=jnp.array([1, 0]))
  with pytest.raises(ValueError, match="max_len"):
    DenseKVCache.create(B, 0, HKV, D)


def test_memory_report_matches_nbytes():
  cache = DenseKVCache.create(B, L, HKV, D, dtype=jnp.bfloat16)
  rep = cache.memory_report()
  assert rep["total"] == sum(x.nbytes for x in jax.tree.leaves(cache))
  assert rep["bytes_per_token_per_head"] == 2 * D * 2


def test_implementation_choice_off_the_gpu(rng):
  cache = DenseKVCache.create(2, 16, 2, 32, jnp.bfloat16).update(
      *[jnp.asarray(rng.standard_normal((2, 5, 2, 32)), jnp.bfloat16)] * 2)
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.bfloat16)
  np.testing.assert_array_equal(cache.attend(q), cache.attend(q, implementation="reference"))
  assert not cache.cudnn_supported()  # CPU: cuDNN is not there
  with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
    cache.attend(q, implementation="cudnn")
  with pytest.raises(ValueError, match="implementation must be"):
    cache.attend(q, implementation="flash")
