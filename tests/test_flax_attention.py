"""A tiny decoder written against the stock Flax attention, then with ours swapped in."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from turboquant_jax.flax_attention import (TurboQuantMultiHeadAttention,
                                           TurboQuantMultiHeadDotProductAttention)
from turboquant_jax.turboquant_cache import TurboQuantConfig

B, T, F, HEADS, KV_HEADS = 2, 24, 128, 4, 2
EXACT = TurboQuantConfig(window=T)  # the window covers everything: must equal the stock layer
FOUR_BITS = TurboQuantConfig(key_bits=4, value_bits=4, window=0, num_sinks=0)


class TinyDecoder(nnx.Module):
  """Stock NNX code: the attention class is the only thing a user changes."""

  def __init__(self, attention_cls=nnx.MultiHeadAttention, **attention_kwargs):
    rngs = nnx.Rngs(0)
    self.embed = nnx.Linear(F, F, rngs=rngs)
    self.attn = attention_cls(num_heads=HEADS, in_features=F, num_kv_heads=KV_HEADS,
                              decode=True, rngs=nnx.Rngs(1), **attention_kwargs)
    self.head = nnx.Linear(F, 8, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attn(self.embed(x)))


def decode_all(model, xs):
  model.attn.init_cache((B, T, F))

  @nnx.jit
  def step(m, x):
    return m(x)

  return jnp.concatenate([step(model, xs[:, t:t + 1]) for t in range(xs.shape[1])], axis=1)


def cos(a, b):
  a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_nnx_drop_in_matches_stock_layer(rng):
  xs = jnp.asarray(rng.standard_normal((B, T, F)), jnp.float32)
  stock = decode_all(TinyDecoder(), xs)
  ours = decode_all(TinyDecoder(TurboQuantMultiHeadAttention, kv_config=EXACT), xs)
  np.testing.assert_allclose(ours, stock, rtol=1e-4, atol=1e-5)
  four = decode_all(TinyDecoder(TurboQuantMultiHeadAttention, kv_config=FOUR_BITS), xs)
  assert cos(four, stock) > 0.99


def test_nnx_same_parameters_and_non_decode_path(rng):
  stock, ours = TinyDecoder(), TinyDecoder(TurboQuantMultiHeadAttention)
  s_params = nnx.state(stock, nnx.Param)
  o_params = nnx.state(ours, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, s_params, o_params)
  x = jnp.asarray(rng.standard_normal((B, 5, F)), jnp.float32)
  np.testing.assert_allclose(ours.attn(x, decode=False), stock.attn(x, decode=False), atol=1e-6)


def test_nnx_errors(rng):
  model = TinyDecoder(TurboQuantMultiHeadAttention)
  x = jnp.ones((B, 1, F))
  with pytest.raises(ValueError, match="init_cache"):
    model(x)
  model.attn.init_cache((B, 2, F))
  with pytest.raises(ValueError, match="mask=None"):
    model.attn(x, mask=jnp.ones((B, 1, 1, 2), bool))
  model(x)
  model(x)
  with pytest.raises(ValueError, match="cache full"):
    model(x)


class LinenDecoder(nn.Module):
  attention_cls: type = nn.MultiHeadDotProductAttention
  kv_config: TurboQuantConfig | None = None
  decode: bool = True

  @nn.compact
  def __call__(self, x):
    extra = {} if self.kv_config is None else {"kv_config": self.kv_config}
    x = nn.Dense(F)(x)
    x = self.attention_cls(num_heads=HEADS, decode=self.decode, name="attn", **extra)(x)
    return nn.Dense(8)(x)


def linen_decode_all(model, xs):
  variables = model.init(jax.random.PRNGKey(0), xs)  # shapes the cache for T tokens
  params, cache = variables["params"], variables["cache"]

  @jax.jit
  def step(cache, x):
    out, mutated = model.apply({"params": params, "cache": cache}, x, mutable=["cache"])
    return mutated["cache"], out

  outs = []
  for t in range(xs.shape[1]):
    cache, out = step(cache, xs[:, t:t + 1])
    outs.append(out)
  return params, jnp.concatenate(outs, axis=1)


def test_linen_drop_in_matches_stock_layer(rng):
  xs = jnp.asarray(rng.standard_normal((B, T, F)), jnp.float32)
  s_params, stock = linen_decode_all(LinenDecoder(), xs)
  o_params, ours = linen_decode_all(
      LinenDecoder(TurboQuantMultiHeadDotProductAttention, EXACT), xs)
  jax.tree.map(np.testing.assert_array_equal, s_params, o_params)
  np.testing.assert_allclose(ours, stock, rtol=1e-4, atol=1e-5)
  _, four = linen_decode_all(LinenDecoder(TurboQuantMultiHeadDotProductAttention, FOUR_BITS), xs)
  assert cos(four, stock) > 0.99
  # Outside decode mode it is the stock layer.
  plain = LinenDecoder(TurboQuantMultiHeadDotProductAttention, EXACT, decode=False)
  np.testing.assert_allclose(plain.apply({"params": s_params}, xs),
                             LinenDecoder(decode=False).apply({"params": s_params}, xs),
                             atol=1e-6)


def test_drop_ins_refuse_prerotated_values():
  """Their projections are the stock ones, not folded: a prerotated cache would return
  attention in the values' rotated domain."""
  pre = TurboQuantConfig(key_bits=3, value_bits=3, values_prerotated=True)
  with pytest.raises(ValueError, match="values_prerotated"):
    TinyDecoder(TurboQuantMultiHeadAttention, kv_config=pre)
  xs = jnp.ones((B, T, F))
  with pytest.raises(ValueError, match="values_prerotated"):
    LinenDecoder(TurboQuantMultiHeadDotProductAttention, pre).init(jax.random.PRNGKey(0), xs)
