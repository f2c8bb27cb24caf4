"""Per-layer cache choices: full-precision layers, per-layer bit widths, window rings.

A decoder makes its caches with `make_cache(batch, max_len, kv_heads, head_dim, dtype,
layer=i)` (`Decoder.init_caches`). `per_layer` builds such a function that picks a
different maker for some layers, so that a model can keep, say, its first layer exact
and its others at 3 bits:

    make = per_layer(functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig()),
                     full_precision_layers=(0,),
                     overrides={5: functools.partial(TurboQuantKVCache.create,
                                                     config=TurboQuantConfig(key_bits=4))})
    caches = model.init_caches(batch, max_len, make)

`window_rings` gives the layers that attend over a sliding window a `RingKVCache` of
their window instead (exact, and fixed in size whatever the context):

    make = window_rings(make, model.cfg.layer_window)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.ring_cache import RingKVCache
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

MakeCache = Callable[..., Any]


def _call(maker: MakeCache, batch, max_len, num_kv_heads, head_dim, dtype, layer, rope,
          **kwargs):
  args = (batch, max_len, num_kv_heads, head_dim) + (() if dtype is None else (dtype,))
  return maker(*args, layer=layer, rope=rope, **kwargs)


def per_layer(default: MakeCache, *, overrides: Mapping[int, MakeCache] | None = None,
              full_precision_layers: Iterable[int] = ()) -> MakeCache:
  """A cache maker that uses `overrides[layer]`, a `DenseKVCache` for the layers in
  `full_precision_layers`, and `default` for every other layer."""
  overrides = dict(overrides or {})
  full = frozenset(full_precision_layers)
  for layer in (*overrides, *full):
    if not isinstance(layer, int) or layer < 0:
      raise ValueError(f"layer indices must be non-negative ints, got {layer!r}")
  if full & set(overrides):
    raise ValueError(f"layers {sorted(full & set(overrides))} are both full precision and "
                     "overridden")

  def make(batch, max_len, num_kv_heads, head_dim, dtype=None, *, layer: int = 0,
           rope=None):
    maker = DenseKVCache.create if layer in full else overrides.get(layer, default)
    return _call(maker, batch, max_len, num_kv_heads, head_dim, dtype, layer, rope)

  return make


def turboquant_per_layer(config: TurboQuantConfig = TurboQuantConfig(), *,
                         layer_bits: Mapping[int, tuple[float, float]] | None = None,
                         full_precision_layers: Iterable[int] = ()) -> MakeCache:
  """`per_layer` for TurboQuant caches: layer_bits maps a layer to (key_bits, value_bits)."""
  make = lambda cfg: functools.partial(TurboQuantKVCache.create, config=cfg)  # noqa: E731
  overrides = {layer: make(dataclasses.replace(config, key_bits=kb, value_bits=vb))
               for layer, (kb, vb) in (layer_bits or {}).items()}
  return per_layer(make(config), overrides=overrides,
                   full_precision_layers=full_precision_layers)


def window_rings(default: MakeCache, layer_window: Callable[[int], int | None], *,
                 max_query: int = 1, ring_dtype=None, exact_recent: int = 0) -> MakeCache:
  """A cache maker that gives each layer with a sliding window (`layer_window(layer)` not
  None, e.g. `DecoderConfig.layer_window`) a `RingKVCache` of that window, serving up to
  `max_query` query tokens per `attend`, and `default` to the others. ring_dtype: the
  rings' storage (default: the dtype the caches are made with; jnp.int8 for 8-bit
  codes, half a bf16 ring); exact_recent: an int8 ring's latest tokens kept exact too
  (`RingKVCache.create`)."""
  def make(batch, max_len, num_kv_heads, head_dim, dtype=None, *, layer: int = 0,
           rope=None):
    window = layer_window(layer)
    shape = (batch, max_len, num_kv_heads, head_dim, dtype, layer, rope)
    if window is None:
      return _call(default, *shape)
    if ring_dtype is not None:
      shape = (*shape[:4], ring_dtype, layer, rope)
    extra = dict(exact_recent=exact_recent) if exact_recent else {}
    return _call(RingKVCache.create, *shape, window=window, max_query=max_query, **extra)

  return make
