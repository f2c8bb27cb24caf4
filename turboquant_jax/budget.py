"""A bit budget spread over a model's layers: key and value widths per layer.

The user gives the mean number of bits stored per cached coordinate, every per-token
buffer counted (codes, norms, QJL signs: what `memory_report` calls bytes per token);
`budget_layer_bits` picks each layer's key and value widths from `CACHE_BITS` so that the
model's mean stays within it, spending bits where the measurements put the loss: keys
before values (a key error moves every attention weight, a value error one output), the
layers that attend over the whole context (Gemma 3's global layers) before the
sliding-window ones. Starting from the widest uniform width that fits, it raises the
classes in turn (global keys, global values, local keys, local values), each as far as
it goes, one width step per layer per round (earlier layers first within a round), until
no single step fits: the budget is never exceeded and nothing more fits in it. (Gemma 3
270M, measured: its 3 global layers at 4 bits and the rest at 2.5 give +1.59% perplexity
at 2.86 stored bits, uniform 3 bits +2.10% at 3.06.)

The choice is static (made when the caches are created: buffer shapes are fixed under
jit) and lives in each layer's `TurboQuantConfig`, so `cache.config.key_bits` and
`memory_report` show it:

    layer_bits = budget_layer_bits(3.5, cfg.num_layers, cfg.head_dim,
                                   layer_window=cfg.layer_window)
    make = turboquant_per_layer(TurboQuantConfig(), layer_bits=layer_bits)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

from turboquant_jax.channel_split import CACHE_BITS
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache


@functools.lru_cache(maxsize=None)
def stored_bits(config: TurboQuantConfig, head_dim: int) -> tuple[float, float]:
  """(keys, values): bits stored per coordinate for each further token, from the buffers
  of a small cache of this config (codes, norms, QJL signs and residual norms)."""
  cache = TurboQuantKVCache.create(1, 256, 1, head_dim, config=config)
  rep = cache.memory_report()
  per_token = lambda side: sum(rep[f"{side}_{part}"] for part in (  # noqa: E731
      "codes", "norms", "qjl_signs", "residual_norms")) / cache.max_len
  return per_token("key") * 8 / head_dim, per_token("value") * 8 / head_dim


def budget_layer_bits(budget: float, num_layers: int, head_dim: int, *,
                      layer_window: Callable[[int], int | None] | None = None,
                      config: TurboQuantConfig = TurboQuantConfig(),
                      widths: Sequence[float] | None = None
                      ) -> dict[int, tuple[float, float]]:
  """{layer: (key_bits, value_bits)} for every layer, the model's mean stored bits per
  cached coordinate at most `budget` (see the module docstring for the order).

  layer_window: a layer's sliding window or None (e.g. `DecoderConfig.layer_window`);
  layers with None count as global. config: everything but the widths.
  widths: the widths to choose from (a subset of `CACHE_BITS`); by default all of them,
  or the integer ones for layout="tiles" (what the Mosaic GPU kernel serves).
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if widths is None:
    widths = [b for b in CACHE_BITS if config.layout != "tiles" or float(b).is_integer()]
  if not widths or any(b not in CACHE_BITS for b in widths):
    raise ValueError(f"widths must be a non-empty subset of {CACHE_BITS}, got {widths}")
  widths = sorted(set(widths))
  # cost[i][side]: stored bits of width widths[i] on keys (0) or values (1).
  cost = [stored_bits(dataclasses.replace(config, key_bits=b, value_bits=b), head_dim)
          for b in widths]
  fits = [i for i, c in enumerate(cost) if sum(c) / 2 <= budget + 1e-9]
  if not fits:
    raise ValueError(f"a budget of {budget} bits is below the narrowest width "
                     f"({sum(cost[0]) / 2:.3f} stored bits at {widths[0]})")
  chosen = {(layer, side): fits[-1] for layer in range(num_layers) for side in (0, 1)}
  spent = sum(cost[fits[-1]]) * num_layers
  limit = budget * 2 * num_layers + 1e-9
  is_global = [layer_window is None or layer_window(i) is None for i in range(num_layers)]
  classes = [[(layer, side) for layer in range(num_layers) if is_global[layer] == glob]
             for glob in (True, False) for side in (0, 1)]
  for members in classes:
    changed = True
    while changed:       # rounds: one step per layer of the class
      changed = False
      for item in members:
        i = chosen[item]
        if i + 1 == len(widths):
          continue
        step = cost[i + 1][item[1]] - cost[i][item[1]]
        if spent + step <= limit:
          chosen[item], spent, changed = i + 1, spent + step, True
  return {layer: (widths[chosen[layer, 0]], widths[chosen[layer, 1]])
          for layer in range(num_layers)}


def mean_stored_bits(layer_bits: dict[int, tuple[float, float]], head_dim: int,
                     config: TurboQuantConfig = TurboQuantConfig()) -> float:
  """The model's mean stored bits per cached coordinate under `layer_bits`."""
  bits = [stored_bits(dataclasses.replace(config, key_bits=kb, value_bits=vb), head_dim)
          for kb, vb in layer_bits.values()]
  bits = [k + v for k, v in bits]
  return sum(bits) / (2 * len(bits))
