"""Per-layer cache choices."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import forward
from models import Decoder
from tests.test_decoder import TINY
from turboquant_jax import (DenseKVCache, TurboQuantConfig, TurboQuantKVCache, UniformConfig,
                            UniformKVCache, per_layer, turboquant_per_layer)


def test_per_layer_picks_each_layers_cache():
  make = per_layer(functools.partial(UniformKVCache.create, config=UniformConfig.kivi(4)),
                   full_precision_layers=[0],
                   overrides={2: functools.partial(TurboQuantKVCache.create)})
  caches = [make(1, 64, 2, 32, jnp.float32, layer=i) for i in range(3)]
  assert [type(c) for c in caches] == [DenseKVCache, UniformKVCache, TurboQuantKVCache]


def test_turboquant_per_layer_bits_and_a_decoder_runs_with_mixed_caches():
  make = turboquant_per_layer(TurboQuantConfig(key_bits=3, value_bits=3, window=4),
                              layer_bits={1: (4, 2.5)}, full_precision_layers=(2,))
  model = Decoder(TINY["gemma"], rngs=nnx.Rngs(0))
  caches = model.init_caches(2, 32, make)
  assert (caches[0].config.key_bits, caches[1].config.key_bits) == (3, 4)
  assert caches[1].config.value_bits == 2.5 and isinstance(caches[2], DenseKVCache)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, TINY["gemma"].vocab_size)
  logits, caches = forward(model, tokens, caches)
  logits, caches = forward(model, tokens[:, :1], caches)
  assert logits.shape == (2, 1, TINY["gemma"].vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
  assert [int(c.lengths[0]) for c in caches] == [11, 11, 11]


def test_bad_layer_choices():
  with pytest.raises(ValueError, match="non-negative"):
    per_layer(DenseKVCache.create, full_precision_layers=[-1])
  with pytest.raises(ValueError, match="both"):
    per_layer(DenseKVCache.create, full_precision_layers=[1], overrides={1: DenseKVCache.create})
