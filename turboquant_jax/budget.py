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
at 2.86 stored bits, uniform 3 bits +2.10% at 3.06.) With `key_weight` it tries every
(key, value) start instead and keeps the choice the codebooks' D_mse, keys weighted, rate
best: keys may then sit a whole bit or more above values (SmolLM2 at 3.5: K4/V2.5).

`measured_layer_bits` chooses from what the sequence's own prompt shows instead (no
calibration data, no offline pass): per layer, side and width the attention-output error
of the prompt's queries with that side read from a cache of that width (`width_errors`),
then the steps that remove the most error per stored bit while they fit (`allocate_bits`).

Either choice is static (made when the caches are created: buffer shapes are fixed under
jit) and lives in each layer's `TurboQuantConfig`, so `cache.config.key_bits` and
`memory_report` show it:

    layer_bits = budget_layer_bits(3.5, cfg.num_layers, cfg.head_dim,
                                   layer_window=cfg.layer_window)
    make = turboquant_per_layer(TurboQuantConfig(), layer_bits=layer_bits)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.channel_split import CACHE_BITS, group_layout
from turboquant_jax.codebook import lloyd_max_codebook
from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.layer_policy import turboquant_per_layer, window_rings
from turboquant_jax.ring_cache import RingKVCache
from turboquant_jax.turboquant_cache import WINDOW, TurboQuantConfig, TurboQuantKVCache

Array = jax.Array


# The widths a plain budget chooses from unless told: 5 bits (a cache width since the ring
# budget's measurements) is opt-in there, so the committed budget results keep their
# choices; beside rings the globals may take it by default (`_ring_widths`).
BUDGET_WIDTHS = (2, 2.5, 3, 3.5, 4)

# How much more a key's D_mse costs than a value's, for `budget_layer_bits(key_weight=)`:
# from SmolLM2's splits at 3.5 stored bits (GPL-3 and Python source, 3 seeds), K4/V2.5
# beats K3.5/V3 (w > 3.3 by the codebooks' D_mse) and K3.5/V3 beats K3/V3.5 (w > 1).
KEY_WEIGHT = 4.0


def _widths(config: TurboQuantConfig, widths: Sequence[float] | None) -> list[float]:
  """The widths to choose from, sorted: by default `BUDGET_WIDTHS`, or the integer ones
  among them for tiles."""
  if widths is None:
    widths = [b for b in BUDGET_WIDTHS
              if config.layout != "tiles" or float(b).is_integer()]
  if not widths or any(b not in CACHE_BITS for b in widths):
    raise ValueError(f"widths must be a non-empty subset of {CACHE_BITS}, got {widths}")
  return sorted(set(widths))


def _costs(config: TurboQuantConfig, widths: Sequence[float], head_dim: int) -> np.ndarray:
  """float [W, 2]: stored bits of each width on keys (column 0) and values (1)."""
  return np.array([stored_bits(dataclasses.replace(config, key_bits=b, value_bits=b),
                               head_dim) for b in widths])


@functools.lru_cache(maxsize=None)
def stored_bits(config: TurboQuantConfig, head_dim: int) -> tuple[float, float]:
  """(keys, values): bits stored per coordinate for each further token, from the buffers
  of a small cache of this config (codes, norms, QJL signs and residual norms)."""
  cache = TurboQuantKVCache.create(1, 256, 1, head_dim, config=config)
  rep = cache.memory_report()
  per_token = lambda side: sum(rep[f"{side}_{part}"] for part in (  # noqa: E731
      "codes", "norms", "qjl_signs", "residual_norms")) / cache.max_len
  return per_token("key") * 8 / head_dim, per_token("value") * 8 / head_dim


def width_distortion(widths: Sequence[float], head_dim: int) -> np.ndarray:
  """float64 [W]: D_mse of a unit vector at each width, from the Lloyd-Max codebooks of
  its channel groups (a fractional width: the mean over its two halves' codebooks)."""
  out = []
  for b in widths:
    groups = group_layout(head_dim, b)
    dim = lambda c: head_dim if len(groups) == 1 else c  # noqa: E731 - a group's own d
    out.append(sum(c * lloyd_max_codebook(dim(c), int(g)).mse for c, g in groups) / head_dim)
  return np.array(out)


def budget_layer_bits(budget: float, num_layers: int, head_dim: int, *,
                      layer_window: Callable[[int], int | None] | None = None,
                      config: TurboQuantConfig = TurboQuantConfig(),
                      widths: Sequence[float] | None = None,
                      key_weight: float | None = None,
                      ) -> dict[int, tuple[float, float]]:
  """{layer: (key_bits, value_bits)} for every layer, the model's mean stored bits per
  cached coordinate at most `budget` (see the module docstring for the order).

  layer_window: a layer's sliding window or None (e.g. `DecoderConfig.layer_window`);
  layers with None count as global. config: everything but the widths.
  widths: the widths to choose from (a subset of `CACHE_BITS`); by default
  `BUDGET_WIDTHS`, or the integer ones for layout="tiles" (what the Mosaic GPU kernel
  serves; 2-4 bits).
  key_weight: None starts every layer at the widest uniform width that fits, then raises
  the classes in turn. A number w tries every (key, value) start that fits the same way
  and keeps the choice with the least w·ΣD(key) + ΣD(value) over the layers
  (`width_distortion`: a key's error moves every attention weight, so keys may sit more
  than a step above values): `KEY_WEIGHT` gives SmolLM2's 3.5 budget K4/V2.5 on every
  layer (float16 key / float8 value norms), where the uniform start's K3.5/V3 on 25
  layers and K3/V3 on 5 read worse on GPL-3 and Python source.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if key_weight is not None and not (np.isfinite(key_weight) and key_weight > 0):
    raise ValueError(f"key_weight must be a positive number or None, got {key_weight}")
  widths = _widths(config, widths)
  cost = _costs(config, widths, head_dim)
  pairs = [(i, j) for i in range(len(widths)) for j in range(len(widths))
           if (cost[i][0] + cost[j][1]) / 2 <= budget + 1e-9
           and (key_weight is not None or i == j)]
  if not pairs:
    raise ValueError(f"a budget of {budget} bits is below the narrowest width "
                     f"({sum(cost[0]) / 2:.3f} stored bits at {widths[0]})")
  is_global = [layer_window is None or layer_window(i) is None for i in range(num_layers)]
  classes = [[(layer, side) for layer in range(num_layers) if is_global[layer] == glob]
             for glob in (True, False) for side in (0, 1)]
  limit = budget * 2 * num_layers + 1e-9

  def raised(start):
    chosen = {(layer, side): start[side] for layer in range(num_layers) for side in (0, 1)}
    spent = (cost[start[0]][0] + cost[start[1]][1]) * num_layers
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
    return chosen

  if key_weight is None:
    chosen = raised(max(pairs))
  else:
    dist = width_distortion(widths, head_dim)
    model = lambda c: sum(key_weight * dist[i] if side == 0 else dist[i]  # noqa: E731
                          for (_, side), i in c.items())
    chosen = min((raised(p) for p in pairs), key=model)
  return {layer: (widths[chosen[layer, 0]], widths[chosen[layer, 1]])
          for layer in range(num_layers)}


def mean_stored_bits(layer_bits: dict[int, tuple[float, float]], head_dim: int,
                     config: TurboQuantConfig = TurboQuantConfig()) -> float:
  """The model's mean stored bits per cached coordinate under `layer_bits`."""
  bits = [stored_bits(dataclasses.replace(config, key_bits=kb, value_bits=vb), head_dim)
          for kb, vb in layer_bits.values()]
  bits = [k + v for k, v in bits]
  return sum(bits) / (2 * len(bits))


# -- widths from what the first window shows ----------------------------------------------

def readback_errors(q: Array, k: Array, v: Array, configs: Sequence[TurboQuantConfig], *,
                    layer: int = 0, rope=None, scale: float | None = None,
                    sliding_window: int | None = None, soft_cap: float | None = None,
                    num_queries: int | None = None, both: bool = False) -> np.ndarray:
  """Attention-output error of one layer with its keys or values read back from caches.

  q [B, T, Hq, D], k, v [B, T, Hkv, D]: what entered the layer's attention on the first
  tokens a sequence holds (its prompt). For each config a cache (layer index `layer`,
  which draws its rotations) reconstructs the keys and values; an error is the relative
  squared error of the attention output of the last `num_queries` queries (default half
  of T) against exact keys and values: with reconstructed keys and exact values, the
  other way round, and (`both`) with both reconstructed.

  Returns float64 [len(configs), 2 (or 3 with both)]: keys, values(, both).
  """
  b, t, hkv, d = k.shape
  n = t // 2 if num_queries is None else min(num_queries, t)
  qpos = jnp.broadcast_to(jnp.arange(t - n, t, dtype=jnp.int32), (b, n))
  kw = dict(q_positions=qpos, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)

  def attend(keys, values):   # keys, values head-major [B, H, T, D]
    dense = DenseKVCache.create(b, t, hkv, d).update(
        jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2))
    return dense.attend(q[:, t - n:], **kw).astype(jnp.float32)

  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
  exact_k, exact_v = jnp.swapaxes(k32, 1, 2), jnp.swapaxes(v32, 1, 2)
  ref = attend(exact_k, exact_v)
  denom = max(float(jnp.sum(ref**2)), 1e-30)
  out = np.zeros((len(configs), 3 if both else 2))
  for i, cfg in enumerate(configs):
    cache = TurboQuantKVCache.create(b, t, hkv, d, config=cfg, layer=layer,
                                     rope=rope).update(k32, v32)
    keys, values = cache.reconstruct()
    pairs = ((keys, exact_v), (exact_k, values)) + (((keys, values),) if both else ())
    out[i] = [float(jnp.sum((attend(*kv) - ref) ** 2)) / denom for kv in pairs]
  return out


def width_errors(q: Array, k: Array, v: Array, *, config: TurboQuantConfig,
                 widths: Sequence[float], rope=None, scale: float | None = None,
                 sliding_window: int | None = None, soft_cap: float | None = None,
                 num_queries: int | None = None) -> np.ndarray:
  """Attention-output error of one layer per side and width, from its own tokens
  (`readback_errors` of caches of each width with no exact window, sinks kept).

  Returns float64 [2, len(widths)]: row 0 keys, row 1 values.
  """
  configs = [dataclasses.replace(config, key_bits=w, value_bits=w, window=0) for w in widths]
  return readback_errors(q, k, v, configs, rope=rope, scale=scale,
                         sliding_window=sliding_window, soft_cap=soft_cap,
                         num_queries=num_queries).T


def allocate_bits(errors: Mapping[int, np.ndarray], costs: np.ndarray, budget: float,
                  widths: Sequence[float]) -> dict[int, tuple[float, float]]:
  """{layer: (key_bits, value_bits)} that spend at most `budget` mean stored bits per
  cached coordinate where the measured errors fall most.

  errors: per layer float [2, W] (keys, values) error at each width (`width_errors`,
  weighted as the caller sees fit); costs: float [W, 2] stored bits per coordinate of
  each width on keys and values (`stored_bits`). Every side starts at the narrowest
  width; then, greedily, the step (one side of one layer to any wider width) with the
  largest error removed per stored bit that still fits is taken, until none that removes
  error fits. Layers count equally (same head size and kv heads).
  """
  costs = np.asarray(costs, np.float64)
  layers = sorted(errors)
  if not layers:
    raise ValueError("errors must hold at least one layer")
  if costs.shape != (len(widths), 2):
    raise ValueError(f"costs must be [{len(widths)}, 2], got {costs.shape}")
  if costs[0].sum() / 2 > budget + 1e-9:
    raise ValueError(f"a budget of {budget} bits is below the narrowest width "
                     f"({costs[0].sum() / 2:.3f} stored bits at {widths[0]})")
  errors = {layer: np.asarray(errors[layer], np.float64) for layer in layers}
  for layer, e in errors.items():
    if e.shape != (2, len(widths)) or not np.all(np.isfinite(e)):
      raise ValueError(f"layer {layer}: errors must be finite [2, {len(widths)}], got "
                       f"{e.shape}")
  chosen = {(layer, side): 0 for layer in layers for side in (0, 1)}
  limit = budget * 2 * len(layers) + 1e-9
  spent = costs[0].sum() * len(layers)
  while True:
    best, best_rate = None, 0.0
    for (layer, side), i in chosen.items():
      e = errors[layer][side]
      for j in range(i + 1, len(widths)):
        step = costs[j, side] - costs[i, side]
        gain = e[i] - e[j]
        if spent + step <= limit and gain > 0 and gain / step > best_rate:
          best, best_rate = ((layer, side), j, step), gain / step
    if best is None:
      break
    item, j, step = best
    chosen[item], spent = j, spent + step
  return {layer: (widths[chosen[layer, 0]], widths[chosen[layer, 1]]) for layer in layers}


def measured_layer_bits(budget: float, layer_qkv: Sequence[tuple[Array, Array, Array]], *,
                        config: TurboQuantConfig = TurboQuantConfig(),
                        widths: Sequence[float] | None = None,
                        layer_window: Callable[[int], int | None] | None = None,
                        layer_rope: Callable[[int], object] | None = None,
                        scale: float | None = None, soft_cap: float | None = None,
                        ) -> tuple[dict[int, tuple[float, float]], dict[int, np.ndarray]]:
  """Widths per layer chosen from the sequence's own first tokens, within `budget`.

  layer_qkv: per layer (q, k, v) of the prompt (`models.evaluation.layer_qkv`); the choice
  uses nothing else (no calibration data, no offline pass) and is made once: the caches
  are then created with it (their shapes are static). A sliding-window layer's errors are
  weighted by the share of its window that is read from codes once the context is long,
  (window - exact window) / window; a global layer's by 1.

  Returns ({layer: (key_bits, value_bits)}, {layer: weighted errors [2, W]}).
  """
  widths = _widths(config, widths)
  costs = _costs(config, widths, layer_qkv[0][1].shape[-1])
  exact = config.window if config.window is not None else WINDOW
  errors = {}
  for layer, (q, k, v) in enumerate(layer_qkv):
    window = layer_window(layer) if layer_window is not None else None
    rope = layer_rope(layer) if layer_rope is not None else None
    e = width_errors(q, k, v, config=config, widths=widths, rope=rope, scale=scale,
                     sliding_window=window, soft_cap=soft_cap)
    weight = 1.0 if window is None else max(window - exact, 0) / window
    errors[layer] = e * weight
  return allocate_bits(errors, costs, budget, widths), errors


# -- rings for sliding-window layers, within the budget at a capacity ----------------------

RING_KINDS = ("bfloat16", "int8 exact", "int8")   # most precise first


@dataclasses.dataclass(frozen=True)
class RingBudget:
  """What `budget_with_rings` chose: the sliding-window layers' ring (`rings`: one of
  `RING_KINDS`, or None for TurboQuant caches like the global layers), the int8 ring's
  exact recent tokens, every TurboQuant layer's (key_bits, value_bits), and the model's
  stored bits per coordinate of a full-context cache at `max_len` tokens."""

  rings: str | None
  exact_recent: int
  layer_bits: Mapping[int, tuple[float, float]]
  bits_at_capacity: float
  max_len: int


def _ring_storage(kind: str, exact_recent: int) -> tuple[object, int]:
  """(ring dtype, exact recent tokens) of a ring kind: the one place kinds are read."""
  if kind not in RING_KINDS:
    raise ValueError(f"kind must be one of {RING_KINDS}, got {kind!r}")
  return (jnp.bfloat16, 0) if kind == "bfloat16" else (
      jnp.int8, exact_recent if kind == "int8 exact" else 0)


@functools.lru_cache(maxsize=None)
def ring_bits(kind: str, window: int, max_len: int, head_dim: int, *,
              exact_recent: int = 0, max_query: int = 1) -> float:
  """Bits a ring of `kind` stores per coordinate of a full-context cache of `max_len`
  tokens (its codes, scales and exact tokens: the ring's keys and values buffers)."""
  dtype, recent = _ring_storage(kind, exact_recent)
  ring = RingKVCache.create(1, max_len, 1, head_dim, dtype, window=window,
                            max_query=max_query, exact_recent=recent)
  return ring.memory_report()["keys_values"] * 8 / (max_len * 2 * head_dim)


def _ring_widths(config: TurboQuantConfig, widths: Sequence[float] | None) -> list[float]:
  """The global layers' widths beside rings: by default every cache width the config
  serves (5 bits included, measured there; up to 4 for tiles, int8 levels, prod keys),
  the integer ones for tiles."""
  if widths is None:
    widest = 4 if (config.layout == "tiles" or "int8" in config.levels_pair
                   or "uniform" in config.levels_pair
                   or config.key_quantizer == "prod") else 5
    widths = [b for b in CACHE_BITS if b <= widest
              and (config.layout != "tiles" or float(b).is_integer())]
  return _widths(config, widths)


def budget_with_rings(budget: float, max_len: int, num_layers: int, head_dim: int, *,
                      layer_window: Callable[[int], int | None],
                      config: TurboQuantConfig = TurboQuantConfig(),
                      widths: Sequence[float] | None = None, exact_recent: int = 128,
                      max_query: int = 1, key_weight: float | None = None) -> RingBudget:
  """A budget of stored bits per cached coordinate for a model whose sliding-window layers
  may keep a ring of their window, at a cache capacity of `max_len` tokens.

  A ring costs its window's tokens whatever the context, so its share of the budget
  shrinks as max_len grows. The sliding-window layers get the most precise ring of
  `RING_KINDS` that leaves the global layers at least `budget` bits (a ring never takes
  bits a uniform cache would give the globals); the global layers then share what is left
  (`budget_layer_bits` over `widths`: by default every cache width, 5 bits included, or
  2-4 bits for tiles). Where no ring leaves that much (short capacities: a bf16 ring of
  512 tokens at 2,048 costs 4 bits per coordinate), every layer is a TurboQuant cache
  under `budget_layer_bits` (key_weight: as there, for the global layers too). Measured
  on Gemma 3 270M (GPL-3, 2,048 tokens, keys centred before RoPE): bf16 rings and 3.5-bit
  globals -0.02% perplexity, int8 rings with 128 exact tokens +0.07%, int8 rings +0.42%;
  2.5-bit globals with int8-exact rings +0.74%. With 5 bits among the widths (the default
  here; the plain budget's `BUDGET_WIDTHS` stop at 4) the 3.5 budget's globals take 5
  bits (3.45 bits at 2K instead of 3.28; window 256, 5 seeds): GPL-3 +0.05% from
  +0.15%, Vim's manual +0.09% from +0.41%, Python source +0.12% from +0.30% (exact rings
  instead of the int8 ones with 4-bit globals: +0.52%, no better: the globals carried
  the loss).

  Returns a `RingBudget`; `ring_budget_cache` makes the caches. The budget is met at
  max_len: `bits_at_capacity` <= budget.
  """
  if layer_window is None:
    raise ValueError("layer_window is required (use budget_layer_bits without rings)")
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  local = [i for i in range(num_layers) if layer_window(i) is not None]
  glob = [i for i in range(num_layers) if layer_window(i) is None]
  if local and glob:
    for kind in RING_KINDS:
      rings = sum(ring_bits(kind, layer_window(i), max_len, head_dim,
                            exact_recent=exact_recent, max_query=max_query) for i in local)
      left = (budget * num_layers - rings) / len(glob)
      if left + 1e-9 < budget:
        continue
      bits = budget_layer_bits(left, len(glob), head_dim, config=config,
                               widths=_ring_widths(config, widths), key_weight=key_weight)
      layer_bits = {layer: bits[j] for j, layer in enumerate(glob)}
      spent = rings + mean_stored_bits(layer_bits, head_dim, config) * len(glob)
      return RingBudget(kind, _ring_storage(kind, exact_recent)[1], layer_bits,
                        spent / num_layers, max_len)
  layer_bits = budget_layer_bits(budget, num_layers, head_dim, layer_window=layer_window,
                                 config=config, widths=widths, key_weight=key_weight)
  return RingBudget(None, 0, layer_bits, mean_stored_bits(layer_bits, head_dim, config),
                    max_len)


def ring_budget_cache(choice: RingBudget, layer_window: Callable[[int], int | None], *,
                      config: TurboQuantConfig = TurboQuantConfig(), max_query: int = 1):
  """The cache maker of a `budget_with_rings` choice (for `Decoder.init_caches`, at the
  choice's max_len): TurboQuant caches of the chosen widths, and the chosen rings."""
  make = turboquant_per_layer(config, layer_bits=choice.layer_bits)
  if choice.rings is None:
    return make
  dtype, recent = _ring_storage(choice.rings, choice.exact_recent)
  return window_rings(make, layer_window, max_query=max_query, ring_dtype=dtype,
                      exact_recent=recent)
