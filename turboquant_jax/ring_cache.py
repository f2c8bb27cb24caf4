"""A full-precision ring of the most recent tokens, for sliding-window attention layers.

A layer that attends over a sliding window of `window` tokens (Gemma 3's local layers:
512) never reads a key older than that, so its cache need not grow with the context: a
ring of `capacity` slots holds the latest tokens, token t in slot t mod capacity, and the
position each slot holds. Memory and attention time stay fixed at any context length, in
the bf16 baseline and beside compressed global layers alike.

The decoders attend after writing (`update`, then `attend`), so the queries of an update
of q_len tokens need keys back to (first query - window + 1): a ring must hold
window + q_len - 1 tokens for them (`capacity = window + max_query - 1`). `attend` refuses
more query tokens than the ring can serve; `update` accepts any number of tokens (a prefill
that attends on its own, as `models.decoder` does, keeps only the last `capacity`).

`dtype=jnp.int8` stores the ring as 8-bit codes, q8_0-style (one float16 scale per 32
channels of a token: 8.5 bits per coordinate): half a bf16 ring, for contexts so short
that the ring is a large part of the cache (at Gemma 3's 512-token window and 2,048
tokens, a quarter). `exact_recent=n` keeps the latest n tokens in bfloat16 besides (a
second ring of n slots read in place of their codes): on Gemma 3, 8-bit codes on every
token of its local layers cost +0.32% perplexity, and llama.cpp's q8_0 with no exact
tokens +0.34%, where the same q8_0 with 128 exact recent tokens and 4 sinks costs +0.01%.

The protocol is `kv_cache`'s: `update(k, v, positions=None, num_tokens=None)` appends at
the current length or rewrites from an earlier position; a write past `max_len`, or a
rewrite from a position whose window the ring no longer holds, raises eagerly and under
jit sets `overflowed` (NaN outputs), never a silently wrong answer.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import attention
from turboquant_jax import kv_cache
from turboquant_jax import uniform_cache

Array = jax.Array

INT8_GROUP = 32   # channels per scale of an int8 ring (q8_0's block), else one per token


def _int8_group(head_dim: int) -> int:
  return INT8_GROUP if head_dim % INT8_GROUP == 0 else head_dim


def _quantize(x: Array) -> tuple[Array, Array]:
  """[..., D] -> (codes uint8 [..., D], scales float16 [..., D/group])."""
  group = _int8_group(x.shape[-1])
  xg = x.reshape(*x.shape[:-1], -1, group)
  q, d, _ = uniform_cache.quantize_groups(xg, 8, True, -1, jnp.float16)
  return q.reshape(x.shape), d[..., 0]


def _dequantize(codes: Array, scales: Array) -> Array:
  group = _int8_group(codes.shape[-1])
  qg = codes.reshape(*codes.shape[:-1], -1, group)
  return uniform_cache.dequantize_groups(qg, scales[..., None], None, 8).reshape(codes.shape)


@flax.struct.dataclass
class RingKVCache(kv_cache.HeadMajorShape):
  """The last `capacity` tokens of each sequence, head-major, for a sliding-window layer.

  Attributes:
    keys, values: [B, Hkv, capacity, D] in fp32 or bf16, token t in slot t mod capacity;
      uint8 codes (q + 128) for an int8 ring.
    key_scales, value_scales: [B, Hkv, capacity, D/32] float16 for an int8 ring (one per
      32 channels; per token if D is not a multiple of 32), else None.
    recent_keys, recent_values: [B, Hkv, n, D] bfloat16, the latest n tokens of an int8
      ring created with exact_recent=n (token t in slot t mod n), else None.
    recent_positions: [B, n] int32, the position each recent slot holds (-1: empty).
    slot_positions: [B, capacity] int32, the position each slot holds (-1: empty).
    lengths: [B] int32 tokens written per sequence (all positions, not only those held).
    overflowed: [B] bool, set when an update under jit could not be applied.
    window: the sliding window the ring serves (static).
    max_len: the longest sequence accepted, as for the other caches (static).
  """

  keys: Array
  values: Array
  slot_positions: Array
  lengths: Array
  overflowed: Array
  key_scales: Array | None = None
  value_scales: Array | None = None
  recent_keys: Array | None = None
  recent_values: Array | None = None
  recent_positions: Array | None = None
  window: int = flax.struct.field(pytree_node=False, default=1)
  max_len: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, window: int, max_query: int = 1, exact_recent: int = 0,
             layer: int = 0, rope: Any = None) -> "RingKVCache":
    """An empty ring for a layer with a sliding window of `window` tokens, serving
    `attend` calls of up to `max_query` query tokens (1: decode). dtype: float32,
    bfloat16 or float16 (stored as given), or int8 (8-bit codes with float16 scales; see
    the module docstring). exact_recent: with int8, the latest tokens also kept in
    bfloat16 and read in place of their codes (0: none). `layer` and `rope` are
    accepted, and unused, so that every cache is created the same way."""
    del layer, rope
    kv_cache._check_dims(batch, max_len, num_kv_heads, head_dim)
    for name, value in (("window", window), ("max_query", max_query)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    dtype = jnp.dtype(dtype)
    if dtype != jnp.int8 and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"a ring stores float32, bfloat16, float16 or int8, got {dtype}")
    if not isinstance(exact_recent, int) or exact_recent < 0:
      raise ValueError(f"exact_recent must be an int >= 0, got {exact_recent!r}")
    if exact_recent and dtype != jnp.int8:
      raise ValueError("exact_recent is for int8 rings (a float ring is exact already)")
    capacity = min(window + max_query - 1, max_len)
    shape = (batch, num_kv_heads, capacity, head_dim)
    scales = recent = recent_positions = None
    if dtype == jnp.int8:
      dtype = jnp.uint8
      scales = jnp.zeros((*shape[:3], head_dim // _int8_group(head_dim)), jnp.float16)
    if exact_recent:
      n = min(exact_recent, capacity)
      recent = jnp.zeros((batch, num_kv_heads, n, head_dim), jnp.bfloat16)
      recent_positions = jnp.full((batch, n), -1, jnp.int32)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               key_scales=scales, value_scales=scales, recent_keys=recent,
               recent_values=recent, recent_positions=recent_positions,
               slot_positions=jnp.full((batch, capacity), -1, jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32), overflowed=jnp.zeros((batch,), bool),
               window=window, max_len=max_len)

  @property
  def capacity(self) -> int:
    return self.keys.shape[2]

  @property
  def quantized(self) -> bool:
    """Whether the ring holds int8 codes and scales."""
    return self.key_scales is not None

  @property
  def max_query(self) -> int:
    """The most query tokens one `attend` can serve with the full window."""
    return self.capacity - self.window + 1 if self.capacity < self.max_len else self.max_len

  def update(self, k: Array, v: Array, positions: Array | None = None,
             num_tokens: Array | None = None) -> "RingKVCache":
    """Writes k, v ([B, T, Hkv, D]) at `positions` (default: the current lengths)."""
    kv_cache.check_update(k, v, self.batch, self.num_kv_heads, self.head_dim)
    plan = kv_cache.plan_update(self.lengths, self.max_len, k.shape[1], positions,
                                num_tokens)
    # A rewrite needs the window before its first token still in the ring.
    if kv_cache.is_concrete(self.lengths, positions):
      needed = np.maximum(np.asarray(plan.positions) - self.window + 1, 0)
      if np.any(needed < np.asarray(self.lengths) - self.capacity):
        raise ValueError(
            f"cannot rewrite from positions {np.asarray(plan.positions)}: the ring of "
            f"{self.capacity} slots no longer holds the {self.window}-token window before "
            f"them (lengths {np.asarray(self.lengths)})")
    return _ring_update(self, k, v, plan)

  def attend(self, q: Array, *, q_positions: Array | None = None, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None,
             implementation: str | None = None) -> Array:
    """Causal attention of q ([B, Tq, Hq, D]) over the window, in float32 jnp.

    sliding_window: None or the ring's window (the layer's); q_positions default to the
    last Tq positions of each sequence, and must be among the written ones.
    """
    kv_cache.check_query(q, self.batch, self.num_kv_heads, self.head_dim)
    if implementation not in (None, "reference"):
      raise ValueError(f"implementation must be 'reference' or None, got {implementation!r}")
    if sliding_window not in (None, self.window):
      raise ValueError(f"this ring serves a sliding window of {self.window} tokens, "
                       f"got sliding_window={sliding_window}")
    if q.shape[1] > self.max_query:
      raise ValueError(f"{q.shape[1]} query tokens need a ring of {self.window} + "
                       f"{q.shape[1]} - 1 slots, this one has {self.capacity} "
                       f"(RingKVCache.create(max_query=...))")
    return _ring_attend(self, q, q_positions, scale=scale, soft_cap=soft_cap)

  def memory_report(self) -> dict[str, Any]:
    kv = int(sum(x.nbytes for x in (self.keys, self.values, self.key_scales,
                                     self.value_scales, self.recent_keys,
                                     self.recent_values) if x is not None))
    total = kv_cache.leaf_bytes(self)
    tokens = self.batch * self.num_kv_heads * self.capacity
    # Against a bf16 cache of the whole context (max_len), which is what the ring replaces.
    bf16 = self.batch * self.num_kv_heads * self.max_len * self.head_dim * 2 * 2
    return {"keys_values": kv, "bookkeeping": total - kv, "total": total,
            "capacity": self.capacity, "bytes_per_token_per_head": kv / tokens,
            "bf16_total": bf16, "compression_vs_bf16": bf16 / total}


def _ring_slots(slot_positions: Array, plan: kv_cache.UpdatePlan, ok: Array, max_len: int
                ) -> tuple[Array, Array]:
  """Where the plan's tokens land in a ring of slot_positions.shape[1] slots: the slots
  ([B, T], capacity = dropped) and the updated slot positions."""
  c = slot_positions.shape[1]
  written = (plan.indices < max_len) & ok[:, None]
  # Of the tokens written, only the last `capacity` land (earlier ones would be
  # overwritten in the same scatter, in an unspecified order).
  last = plan.positions + plan.num_tokens
  written &= plan.indices >= (last - c)[:, None]
  slots = jnp.where(written, plan.indices % c, c)                     # c: dropped
  pos = jnp.where(written, plan.indices, -1)
  # Slots holding positions at or after the rewrite point are stale once it lands.
  stale = slot_positions >= jnp.where(ok, plan.positions, jnp.iinfo(jnp.int32).max)[:, None]
  slot_positions = jnp.where(stale, -1, slot_positions)
  slot_positions = jax.vmap(lambda s, i, p: s.at[i].set(p, mode="drop"))(
      slot_positions, slots, pos)
  return slots, slot_positions


@jax.jit
def _ring_update(cache: RingKVCache, k: Array, v: Array, plan: kv_cache.UpdatePlan
                 ) -> RingKVCache:
  c = cache.capacity
  # A rewrite whose window left the ring cannot be served: refuse it (flag, as overflow).
  ok = plan.ok & (jnp.maximum(plan.positions - cache.window + 1, 0) >= cache.lengths - c)
  slots, slot_positions = _ring_slots(cache.slot_positions, plan, ok, cache.max_len)
  kh, vh = kv_cache.to_head_major(k), kv_cache.to_head_major(v)
  if cache.recent_positions is not None:
    recent_slots, recent_positions = _ring_slots(cache.recent_positions, plan, ok,
                                                 cache.max_len)
    cache = cache.replace(
        recent_keys=kv_cache.scatter_tokens(cache.recent_keys, kh, recent_slots),
        recent_values=kv_cache.scatter_tokens(cache.recent_values, vh, recent_slots),
        recent_positions=recent_positions)
  if cache.quantized:
    (kh, k_scales), (vh, v_scales) = _quantize(kh), _quantize(vh)
    cache = cache.replace(
        key_scales=kv_cache.scatter_tokens(cache.key_scales, k_scales, slots),
        value_scales=kv_cache.scatter_tokens(cache.value_scales, v_scales, slots))
  return cache.replace(
      keys=kv_cache.scatter_tokens(cache.keys, kh, slots),
      values=kv_cache.scatter_tokens(cache.values, vh, slots),
      slot_positions=slot_positions,
      lengths=jnp.where(ok, plan.new_lengths, cache.lengths),
      overflowed=cache.overflowed | ~ok,
  )


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap"))
def _ring_attend(cache: RingKVCache, q: Array, q_positions: Array | None, *, scale,
                 soft_cap) -> Array:
  if q_positions is None:
    q_positions = attention.default_query_positions(cache.lengths, q.shape[1])
  k_pos = cache.slot_positions
  valid = (k_pos >= 0) & (k_pos < cache.lengths[:, None])
  mask = attention.key_mask(q_positions, k_pos, valid, cache.window)
  keys, values = cache.keys, cache.values
  if cache.quantized:
    keys = _dequantize(keys, cache.key_scales)
    values = _dequantize(values, cache.value_scales)
  if cache.recent_positions is not None:
    # A slot whose position the recent ring holds reads the exact copy.
    n = cache.recent_positions.shape[1]
    at = jnp.where(k_pos >= 0, k_pos % n, 0)
    exact = (jnp.take_along_axis(cache.recent_positions, at, axis=1) == k_pos) & (k_pos >= 0)
    pick = lambda full, recent: jnp.where(  # noqa: E731
        exact[:, None, :, None],
        jnp.take_along_axis(recent, at[:, None, :, None], axis=2).astype(jnp.float32), full)
    keys, values = pick(keys, cache.recent_keys), pick(values, cache.recent_values)
  out = attention.dense_attention(q, keys, values, mask, scale=scale, soft_cap=soft_cap)
  return jnp.where(cache.overflowed[:, None, None, None], jnp.nan, out).astype(q.dtype)
