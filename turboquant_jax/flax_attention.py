"""Drop-in Flax attention layers whose decode mode reads a compressed KV cache.

- `TurboQuantMultiHeadAttention` replaces `flax.nnx.MultiHeadAttention`: same constructor
  arguments plus `kv_config` and `layer`; `init_cache(input_shape)` allocates a
  `TurboQuantKVCache` in an `nnx.Cache` variable; with `decode=True` each call appends its
  tokens and attends over the cache. Parameters are the stock ones, so weights carry over.
- `TurboQuantMultiHeadDotProductAttention` replaces Linen's
  `nn.MultiHeadDotProductAttention`: the cache lives in the "cache" collection, created
  by `init` on an input of shape [batch, max_len, features], as in the stock layer.

Outside decode mode both are the stock layers. In decode mode the cache masks by
position (causal), so an extra `mask` is refused rather than ignored, and attention
dropout is not applied (decoding is deterministic).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

Array = jax.Array


def _refuse_prerotated(config: TurboQuantConfig) -> None:
  # The stock layers' projections are not folded: their decode would return rotated values.
  if config.values_prerotated:
    raise ValueError("values_prerotated needs the value rotation folded into the value and "
                     "output projections (as models.decoder.fold_value_rotations does for "
                     "its decoders); these drop-ins keep the stock projections")


def _refuse_mask(mask: Any) -> None:
  if mask is not None:
    raise ValueError("decode mode masks by position inside the compressed cache; "
                     "pass mask=None")


class TurboQuantMultiHeadAttention(nnx.MultiHeadAttention):
  """`nnx.MultiHeadAttention` with a TurboQuant-compressed decode cache."""

  def __init__(self, *args, kv_config: TurboQuantConfig = TurboQuantConfig(), layer: int = 0,
               **kwargs):
    _refuse_prerotated(kv_config)
    super().__init__(*args, **kwargs)
    self.kv_config = kv_config
    self.layer = layer
    self.kv_cache: nnx.Cache | None = nnx.data(None)

  def init_cache(self, input_shape, dtype=jnp.float32):
    """Allocates the compressed cache for inputs of shape [batch, max_len, features]."""
    if len(input_shape) != 3:
      raise ValueError(f"input_shape must be [batch, max_len, features], got {input_shape}")
    batch, max_len, _ = input_shape
    self.kv_cache = nnx.Cache(TurboQuantKVCache.create(
        batch, max_len, self.num_kv_heads, self.head_dim, dtype, config=self.kv_config,
        layer=self.layer))

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None,
               rngs=None, sow_weights=False, decode=None, **kwargs):
    decode = self.decode if decode is None else decode
    if not decode:
      return super().__call__(inputs_q, inputs_k, inputs_v, mask=mask,
                              deterministic=deterministic, rngs=rngs,
                              sow_weights=sow_weights, decode=False, **kwargs)
    if self.kv_cache is None:
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    _refuse_mask(mask)
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    query, key, value = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)
    cache = self.kv_cache.get_value().update(key, value)
    self.kv_cache.set_value(cache)
    return self.out(cache.attend(query))


class TurboQuantMultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """Linen `nn.MultiHeadDotProductAttention` with a TurboQuant-compressed decode cache."""

  kv_config: TurboQuantConfig = TurboQuantConfig()
  layer: int = 0

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               deterministic=None, dropout_rng=None, sow_weights=False, **kwargs):
    if not self.decode:
      return super().__call__(inputs_q, inputs_k, inputs_v, mask=mask,
                              deterministic=deterministic, dropout_rng=dropout_rng,
                              sow_weights=sow_weights, **kwargs)
    _refuse_mask(mask)
    _refuse_prerotated(self.kv_config)
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    head_dim = qkv_features // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731  (the stock layer's projections)
        axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
        features=(self.num_heads, head_dim), kernel_init=self.kernel_init,
        bias_init=self.bias_init, use_bias=self.use_bias, precision=self.precision,
        name=name)
    query, key, value = dense("query")(inputs_q), dense("key")(inputs_k), dense("value")(inputs_v)
    if self.normalize_qk:
      ln = lambda name: nn.LayerNorm(name=name, use_bias=False, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype)
      query, key = ln("query_ln")(query), ln("key_ln")(key)
    is_initialized = self.has_variable("cache", "kv_cache")
    batch, length = inputs_q.shape[0], inputs_q.shape[-2]
    cache_var = self.variable("cache", "kv_cache", lambda: TurboQuantKVCache.create(
        batch, length, self.num_heads, head_dim, key.dtype, config=self.kv_config,
        layer=self.layer))
    if is_initialized:
      cache = cache_var.value.update(key, value)
      cache_var.value = cache
      x = cache.attend(query)
    else:
      # Initialisation only shapes the cache, as in the stock layer; the output's value is
      # not used.
      x = query
    return nn.DenseGeneral(
        features=features, axis=(-2, -1),
        kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        name="out")(x)
