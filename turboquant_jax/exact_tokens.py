"""The full-precision tokens a compressed cache keeps: a ring of recent tokens and sinks.

Shared by every compressed cache (`TurboQuantKVCache`, `UniformKVCache`), so that both
keep exactly the same tokens exact and comparisons between them are on equal footing.

- The window is a ring [B, H, W, D] whose slot s holds the latest position p with
  p ≡ s (mod W); `positions` [B, W] records which (-1: empty). After appends it holds
  exactly the last W tokens; after a rewind (a write at positions < length) some slots
  are stale, and `window_start` finds the trailing run it still holds exactly.
- Sinks are the first S positions of each sequence, [B, H, S, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from turboquant_jax import kv_cache

Array = jax.Array

# Rings up to this many bytes (keys or values) take a decode step's token by a select over
# the whole ring rather than a scatter (`update_window`).
RING_SELECT_BYTES = 1 << 20


def update_window(keys: Array, values: Array, positions: Array, kh: Array, vh: Array,
                  plan: kv_cache.UpdatePlan) -> tuple[Array, Array, Array]:
  """Writes new head-major tokens kh, vh ([B, H, T, D]) into the ring (keys, values [B, H,
  W, D], positions [B, W]). Slot s ends up holding the latest p < new_length, p ≡ s mod W."""
  w = keys.shape[2]
  if w == 0:
    return keys, values, positions
  t = kh.shape[2]
  if t == 1:
    # A decode step writes one slot per row. A scatter is two XLA kernels (the new token
    # or the old one, then the update); a select over the whole ring is one, with the
    # token's producer fused in: taken where the ring is small (the positions always).
    write = plan.ok & (plan.num_tokens > 0)
    slot = jnp.where(write, jnp.mod(plan.positions, w), w)              # w: dropped
    hit = jnp.arange(w, dtype=jnp.int32)[None, :] == slot[:, None]
    positions = jnp.where(hit, plan.positions[:, None].astype(positions.dtype), positions)
    if keys.size * keys.dtype.itemsize <= RING_SELECT_BYTES:
      at = hit[:, None, :, None]
      return (jnp.where(at, kh.astype(keys.dtype), keys),
              jnp.where(at, vh.astype(values.dtype), values), positions)
    return (kv_cache.scatter_tokens(keys, kh, slot[:, None]),
            kv_cache.scatter_tokens(values, vh, slot[:, None]), positions)
  slots = jnp.arange(w, dtype=jnp.int32)
  end = plan.new_lengths[:, None] - 1
  target = end - jnp.mod(end - slots[None, :], w)  # [B, W]
  i = target - plan.positions[:, None]
  take = (i >= 0) & (i < plan.num_tokens[:, None]) & plan.ok[:, None]
  gather_idx = jnp.clip(i, 0, t - 1)[:, None, :, None]
  pick = lambda new, old: jnp.where(  # noqa: E731
      take[:, None, :, None], jnp.take_along_axis(new, gather_idx, axis=2).astype(old.dtype),
      old)
  return pick(kh, keys), pick(vh, values), jnp.where(take, target, positions)


def write_sinks(keys: Array, values: Array, kh: Array, vh: Array,
                plan: kv_cache.UpdatePlan) -> tuple[Array, Array]:
  """Writes the new tokens that fall in positions [0, S) into the sinks [B, H, S, D]."""
  s = keys.shape[2]
  if s == 0:
    return keys, values
  idx = jnp.where(plan.indices < s, plan.indices, s)
  return kv_cache.scatter_tokens(keys, kh, idx), kv_cache.scatter_tokens(values, vh, idx)


def update_sinks(keys: Array, values: Array, kh: Array, vh: Array,
                 plan: kv_cache.UpdatePlan) -> tuple[Array, Array]:
  """`write_sinks` under a conditional: past the first tokens (every decode step) it writes
  nothing, and skipping it skips its kernels."""
  if keys.shape[2] == 0:
    return keys, values
  return jax.lax.cond(jnp.any(plan.indices < keys.shape[2]),
                      lambda: write_sinks(keys, values, kh, vh, plan),
                      lambda: (keys, values))


def window_start(positions: Array, lengths: Array, window: int) -> Array:
  """[B]: positions [start, length) are held exactly by the ring (a trailing run)."""
  if window == 0:
    return lengths
  pos = lengths[:, None] - window + jnp.arange(window, dtype=jnp.int32)
  held = jnp.take_along_axis(positions, jnp.mod(pos, window), axis=1)
  covered = (pos >= 0) & (held == pos)
  # The run ends at the last slot not covered: one max (a cumulative product and a
  # reverse cost three XLA kernels per decode step).
  idx = jnp.arange(window, dtype=jnp.int32)
  last_gap = jnp.max(jnp.where(covered, -1, idx[None, :]), axis=1)
  return lengths - (window - 1 - last_gap)


def exact_parts(window_keys: Array, window_values: Array, window_positions: Array,
                sink_keys: Array, sink_values: Array, lengths: Array
                ) -> list[tuple[Array, Array, Array, Array]]:
  """(keys [B, H, n, D], values, positions [B, n], visible [B, n]) of the window, sinks.

  Window slots are visible only inside the exact trailing run and past the sinks, so no
  position is counted twice.
  """
  b, s, w = lengths.shape[0], sink_keys.shape[2], window_keys.shape[2]
  parts = []
  if w:
    start = jnp.maximum(window_start(window_positions, lengths, w), s)
    visible = (window_positions >= start[:, None]) & (window_positions < lengths[:, None])
    parts.append((window_keys, window_values, window_positions, visible))
  if s:
    sp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    parts.append((sink_keys, sink_values, sp, sp < lengths[:, None]))
  return parts


def overlay(x: Array, parts_x: list[tuple[Array, Array, Array]]) -> Array:
  """Writes exact tokens over a full-length [B, H, L, D] array.

  parts_x: (tokens [B, H, n, D], positions [B, n], visible [B, n]) per part.
  """
  length = x.shape[2]
  for tokens, pos, visible in parts_x:
    x = kv_cache.scatter_tokens(x, tokens.astype(x.dtype), jnp.where(visible, pos, length))
  return x
