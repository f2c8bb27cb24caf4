"""`UniformKVCache`: the integer KV quantization users already have, as a baseline.

Two schemes, in the same cache protocol as `DenseKVCache` and `TurboQuantKVCache`:

- Symmetric, llama.cpp style (`UniformConfig.llama_cpp(bits)`): per token, groups of 32
  channels, one float16 scale per group. q8_0: x ≈ d·q, q ∈ [-127, 127], d = amax/127.
  q4_0 (and 2/3 bits the same way): d = m / -2^(b-1), with m the group's value of
  largest magnitude, q + 2^(b-1) ∈ [0, 2^b) stored.
- Asymmetric min-max (`UniformConfig.kivi(bits)`, after KIVI): x ≈ lo + s·q with a float16
  scale and minimum per group. Values are grouped per token (channels in groups of
  `group_size`); keys per channel over `group_size` consecutive tokens, since keys have
  outlier channels. A key group is quantized once all its tokens have arrived; until
  then its tokens stay in a full-precision staging buffer [B, H, group_size, D].

Both keep the same exact tokens as TurboQuant (`exact_tokens`: a window of recent
tokens and attention sinks; defaults 128 and 4), so that comparisons are at equal
footing. Codes of 2-4 bits are packed in bit-planes (`packing`), 8-bit codes are bytes.

Attention decodes the whole cache to float and runs dense attention: this cache is a
quality baseline, not a fast path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from turboquant_jax import attention
from turboquant_jax import exact_tokens
from turboquant_jax import kv_cache
from turboquant_jax import packing

Array = jax.Array

UNIFORM_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class UniformConfig:
  """Static configuration of a `UniformKVCache`.

  Attributes:
    key_bits, value_bits: bits per stored integer, one of 2, 3, 4, 8.
    symmetric: scale only (llama.cpp q8_0/q4_0) or scale and minimum (asymmetric).
    key_axis: "token" (groups of `group_size` channels of one token) or "channel" (one
      channel over `group_size` consecutive tokens; asymmetric only).
    group_size: elements per group; must divide head_dim (values are grouped per token).
    window, num_sinks: exact recent / first tokens, as in `TurboQuantConfig`.
    scale_dtype: storage dtype of scales and minima.
  """

  key_bits: int = 4
  value_bits: int = 4
  symmetric: bool = False
  key_axis: str = "channel"
  group_size: int = 32
  window: int = 128
  num_sinks: int = 4
  scale_dtype: Any = jnp.float16

  def __post_init__(self):
    for name in ("key_bits", "value_bits"):
      if getattr(self, name) not in UNIFORM_BITS:
        raise ValueError(f"{name} must be one of {UNIFORM_BITS}, got {getattr(self, name)!r}")
    if self.key_axis not in ("token", "channel"):
      raise ValueError(f"key_axis must be 'token' or 'channel', got {self.key_axis!r}")
    if self.symmetric and self.key_axis == "channel":
      raise ValueError("symmetric quantization groups per token: use key_axis='token'")
    for name, low in (("group_size", 1), ("window", 0), ("num_sinks", 0)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

  @classmethod
  def llama_cpp(cls, bits: int, **kw) -> "UniformConfig":
    """q8_0 / q4_0-style symmetric per-token groups of 32, for keys and values."""
    return cls(key_bits=bits, value_bits=bits, symmetric=True, key_axis="token", **kw)

  @classmethod
  def kivi(cls, bits: int, **kw) -> "UniformConfig":
    """Asymmetric: keys per channel over 32 tokens, values per token in groups of 32."""
    return cls(key_bits=bits, value_bits=bits, symmetric=False, key_axis="channel", **kw)


@flax.struct.dataclass
class IntCodes:
  """Integer codes of one tensor and their group parameters.

  codes: packed planes ([..., D·w/8] uint8 each) for 2-4 bits, or ([..., D] uint8,) at 8.
  scales, minima: float per group; minima is None for symmetric codes.
  """

  codes: tuple[Array, ...]
  scales: Array
  minima: Array | None


def _levels(bits: int) -> int:
  return (1 << bits) - 1


def _pack(q: Array, bits: int) -> tuple[Array, ...]:
  q = q.astype(jnp.uint8)
  return (q,) if bits == 8 else packing.pack_codes(q, bits)


def _unpack(codes: tuple[Array, ...], bits: int) -> Array:
  return codes[0] if bits == 8 else packing.unpack_codes(codes, bits)


def quantize_groups(x: Array, bits: int, symmetric: bool, axis: int, scale_dtype
                    ) -> tuple[Array, Array, Array | None]:
  """Integer codes of x with one (scale, minimum) per slice along `axis`.

  Returns (q uint8 like x, scales, minima) with `axis` reduced to size 1 in the latter.
  The stored (rounded) scale and minimum are the ones used to quantize, so decoding is
  exactly `dequantize_groups`.
  """
  x = x.astype(jnp.float32)
  if symmetric:
    if bits == 8:
      d = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
      d = d.astype(scale_dtype).astype(jnp.float32)
      q = jnp.clip(jnp.round(x / jnp.where(d == 0, 1.0, d)), -127, 127) + 128
    else:
      half = 1 << (bits - 1)
      idx = jnp.argmax(jnp.abs(x), axis=axis, keepdims=True)
      m = jnp.take_along_axis(x, idx, axis=axis)
      d = (m / -half).astype(scale_dtype).astype(jnp.float32)
      q = jnp.clip(jnp.round(x / jnp.where(d == 0, 1.0, d)) + half, 0, _levels(bits))
    return q.astype(jnp.uint8), d.astype(scale_dtype), None
  lo = jnp.min(x, axis=axis, keepdims=True).astype(scale_dtype).astype(jnp.float32)
  hi = jnp.max(x, axis=axis, keepdims=True)
  s = ((hi - lo) / _levels(bits)).astype(scale_dtype).astype(jnp.float32)
  q = jnp.clip(jnp.round((x - lo) / jnp.where(s == 0, 1.0, s)), 0, _levels(bits))
  return q.astype(jnp.uint8), s.astype(scale_dtype), lo.astype(scale_dtype)


def dequantize_groups(q: Array, scales: Array, minima: Array | None, bits: int) -> Array:
  """Inverse of `quantize_groups` (scales, minima broadcast against q)."""
  s = scales.astype(jnp.float32)
  if minima is None:
    offset = 128 if bits == 8 else 1 << (bits - 1)
    return (q.astype(jnp.float32) - offset) * s
  return minima.astype(jnp.float32) + q.astype(jnp.float32) * s


def _token_quantize(x: Array, bits: int, symmetric: bool, group: int, scale_dtype) -> IntCodes:
  """x: [..., D] -> codes with one group per `group` channels: scales [..., D/group]."""
  d = x.shape[-1]
  xg = x.reshape(*x.shape[:-1], d // group, group)
  q, s, m = quantize_groups(xg, bits, symmetric, -1, scale_dtype)
  return IntCodes(codes=_pack(q.reshape(x.shape), bits), scales=s[..., 0],
                  minima=None if m is None else m[..., 0])


def _token_dequantize(c: IntCodes, bits: int, group: int) -> Array:
  q = _unpack(c.codes, bits)
  d = q.shape[-1]
  qg = q.reshape(*q.shape[:-1], d // group, group)
  x = dequantize_groups(qg, c.scales[..., None],
                        None if c.minima is None else c.minima[..., None], bits)
  return x.reshape(q.shape)


def _channel_dequantize(c: IntCodes, bits: int, group: int) -> Array:
  """Codes [B, H, L, ...], scales [B, H, L/group, D] -> [B, H, L, D]."""
  q = _unpack(c.codes, bits)
  b, h, length, d = q.shape
  qg = q.reshape(b, h, length // group, group, d)
  x = dequantize_groups(qg, c.scales[:, :, :, None], c.minima[:, :, :, None], bits)
  return x.reshape(q.shape)


def _empty_token_codes(lead: tuple[int, ...], d: int, bits: int, symmetric: bool, group: int,
                       scale_dtype) -> IntCodes:
  shapes = jax.eval_shape(
      lambda x: _token_quantize(x, bits, symmetric, group, scale_dtype),
      jax.ShapeDtypeStruct((*lead, d), jnp.float32))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@flax.struct.dataclass
class UniformKVCache(kv_cache.HeadMajorShape):
  """Integer-quantized KV cache; see the module docstring.

  Attributes:
    key_codes, value_codes: `IntCodes`, leaves [B, H, L, ...]; for channel-grouped keys
      the scales and minima are [B, H, L/group_size, D].
    staging: [B, H, group_size, D] keys of the key group still being filled (channel
      grouping only, else None); it holds positions [group_start, length).
    window_*, sink_*: the exact tokens (see `exact_tokens`).
    lengths: [B] int32. overflowed: [B] bool (see `kv_cache`).
    config: the `UniformConfig` (static).
  """

  key_codes: IntCodes
  value_codes: IntCodes
  staging: Array | None
  window_keys: Array
  window_values: Array
  window_positions: Array
  sink_keys: Array
  sink_values: Array
  lengths: Array
  overflowed: Array
  config: UniformConfig = flax.struct.field(pytree_node=False)

  _shape_buffer = "window_keys"   # [B, H, W, D], present even when W = 0

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, config: UniformConfig = UniformConfig(),
             layer: int = 0, rope: Any = None) -> "UniformKVCache":
    """An empty cache; `dtype` is that of the exact parts and the staging buffer.

    With channel-grouped keys the capacity is max_len rounded up to a whole number of
    key groups.
    """
    del layer, rope
    kv_cache._check_dims(batch, max_len, num_kv_heads, head_dim)
    g = config.group_size
    channel = config.key_axis == "channel"
    if head_dim % g:
      raise ValueError(f"group_size {g} must divide head_dim {head_dim} (values, and keys "
                       "grouped per token, group channels)")
    if channel:
      max_len = -(-max_len // g) * g  # whole key groups: capacity rounds up, never down
    config = dataclasses.replace(config, window=min(config.window, max_len),
                                 num_sinks=min(config.num_sinks, max_len))
    lead = (batch, num_kv_heads, max_len)
    cfg = config
    value_codes = _empty_token_codes(lead, head_dim, cfg.value_bits, cfg.symmetric, g,
                                     cfg.scale_dtype)
    if channel:
      q_shape = (*lead, head_dim)
      codes = jax.eval_shape(lambda: _pack(jnp.zeros(q_shape, jnp.uint8), cfg.key_bits))
      group_shape = (batch, num_kv_heads, max_len // g, head_dim)
      key_codes = IntCodes(codes=tuple(jnp.zeros(c.shape, c.dtype) for c in codes),
                           scales=jnp.zeros(group_shape, cfg.scale_dtype),
                           minima=jnp.zeros(group_shape, cfg.scale_dtype))
      staging = jnp.zeros((batch, num_kv_heads, g, head_dim), dtype)
    else:
      key_codes = _empty_token_codes(lead, head_dim, cfg.key_bits, cfg.symmetric, g,
                                     cfg.scale_dtype)
      staging = None
    exact = lambda n: jnp.zeros((batch, num_kv_heads, n, head_dim), dtype)  # noqa: E731
    return cls(key_codes=key_codes, value_codes=value_codes, staging=staging,
               window_keys=exact(config.window), window_values=exact(config.window),
               window_positions=jnp.full((batch, config.window), -1, jnp.int32),
               sink_keys=exact(config.num_sinks), sink_values=exact(config.num_sinks),
               lengths=jnp.zeros((batch,), jnp.int32), overflowed=jnp.zeros((batch,), bool),
               config=config)

  @property
  def max_len(self) -> int:
    return self.value_codes.scales.shape[2]

  def update(self, k: Array, v: Array, positions: Array | None = None,
             num_tokens: Array | None = None) -> "UniformKVCache":
    """Appends k, v ([B, T, Hkv, D]); see `kv_cache` for positions and num_tokens."""
    kv_cache.check_update(k, v, self.batch, self.num_kv_heads, self.head_dim)
    plan = kv_cache.plan_update(self.lengths, self.max_len, k.shape[1], positions, num_tokens)
    return _update(self, k, v, plan)

  def _update(self, k: Array, v: Array, plan: kv_cache.UpdatePlan) -> "UniformKVCache":
    cfg = self.config
    kh, vh = kv_cache.to_head_major(k), kv_cache.to_head_major(v)
    write = lambda buf, new: kv_cache.scatter_tokens(buf, new, plan.indices)  # noqa: E731
    value_codes = jax.tree.map(write, self.value_codes, _token_quantize(
        vh, cfg.value_bits, cfg.symmetric, cfg.group_size, cfg.scale_dtype))
    if self.staging is None:
      key_codes = jax.tree.map(write, self.key_codes, _token_quantize(
          kh, cfg.key_bits, cfg.symmetric, cfg.group_size, cfg.scale_dtype))
      staging = None
    else:
      key_codes, staging = self._update_channel_groups(kh, plan)
    window_keys, window_values, window_positions = exact_tokens.update_window(
        self.window_keys, self.window_values, self.window_positions, kh, vh, plan)
    sink_keys, sink_values = exact_tokens.update_sinks(self.sink_keys, self.sink_values,
                                                       kh, vh, plan)
    return self.replace(
        key_codes=key_codes, value_codes=value_codes, staging=staging,
        window_keys=window_keys, window_values=window_values,
        window_positions=window_positions, sink_keys=sink_keys, sink_values=sink_values,
        lengths=jnp.where(plan.ok, plan.new_lengths, self.lengths),
        overflowed=self.overflowed | ~plan.ok)

  def _update_channel_groups(self, kh: Array, plan: kv_cache.UpdatePlan):
    """Quantizes every key group the update completes; stages the unfinished one."""
    cfg, g, length = self.config, self.config.group_size, self.max_len
    b, h, t, d = kh.shape
    n_groups = -(-(g + t) // g)  # groups the staged part plus the new tokens can span
    e = n_groups * g
    g0 = (plan.positions // g) * g                 # [B] first position of the first group
    off = plan.positions - g0
    staged_start = (self.lengths // g) * g
    # The first group's earlier tokens: staged, or (after a rewind into a finished group)
    # decoded from its codes.
    start = jnp.minimum(g0, length - g)
    group = jax.vmap(lambda c, t0: jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, t0, g, 1), c.codes))(self.key_codes, start)
    params = jax.vmap(lambda c, t0: jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, t0 // g, 1, 1), (c.scales, c.minima)))(
            self.key_codes, start)
    decoded = _channel_dequantize(IntCodes(group, *params), cfg.key_bits, g)
    head = jnp.where((g0 == staged_start)[:, None, None, None],
                     self.staging.astype(jnp.float32), decoded)
    i = jnp.arange(e, dtype=jnp.int32)[None, :]                       # [1, E]
    from_new = jnp.take_along_axis(
        kh.astype(jnp.float32), jnp.clip(i - off[:, None], 0, t - 1)[:, None, :, None], axis=2)
    from_head = jnp.take_along_axis(head, jnp.clip(i, 0, g - 1)[:, None, :, None], axis=2)
    ext = jnp.where((i < off[:, None])[:, None, :, None], from_head, from_new)  # [B,H,E,D]
    groups = ext.reshape(b, h, n_groups, g, d)
    q, s, m = quantize_groups(groups, cfg.key_bits, False, 3, cfg.scale_dtype)
    gi = jnp.arange(n_groups, dtype=jnp.int32)
    complete = ((g0[:, None] + (gi[None, :] + 1) * g) <= plan.new_lengths[:, None]) & (
        plan.ok[:, None])                                              # [B, n_groups]
    group_idx = jnp.where(complete, g0[:, None] // g + gi[None, :], length // g)
    tok_idx = jnp.where(jnp.repeat(complete, g, axis=1), g0[:, None] + i, length)
    codes = tuple(kv_cache.scatter_tokens(buf, new, tok_idx) for buf, new in zip(
        self.key_codes.codes, _pack(q.reshape(b, h, e, d), cfg.key_bits)))
    scales = kv_cache.scatter_tokens(self.key_codes.scales, s[:, :, :, 0], group_idx)
    minima = kv_cache.scatter_tokens(self.key_codes.minima, m[:, :, :, 0], group_idx)
    # The group holding position new_length is the one left unfinished.
    last = (plan.new_lengths - g0) // g
    new_staging = jnp.take_along_axis(
        groups, jnp.clip(last, 0, n_groups - 1)[:, None, None, None, None], axis=2)[:, :, 0]
    staging = jnp.where(plan.ok[:, None, None, None], new_staging.astype(self.staging.dtype),
                        self.staging)
    return IntCodes(codes=codes, scales=scales, minima=minima), staging

  # -- reading ---------------------------------------------------------------------------

  def exact_parts(self) -> list[tuple[Array, Array, Array, Array]]:
    return exact_tokens.exact_parts(self.window_keys, self.window_values,
                                    self.window_positions, self.sink_keys, self.sink_values,
                                    self.lengths)

  def reconstruct(self) -> tuple[Array, Array]:
    """(keys, values) [B, H, max_len, D] float32: what attention reads at each position."""
    cfg, g = self.config, self.config.group_size
    values = _token_dequantize(self.value_codes, cfg.value_bits, g)
    if self.staging is None:
      keys = _token_dequantize(self.key_codes, cfg.key_bits, g)
    else:
      keys = _channel_dequantize(self.key_codes, cfg.key_bits, g)
      start = (self.lengths // g) * g
      pos = start[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :]
      visible = pos < self.lengths[:, None]
      keys = exact_tokens.overlay(keys, [(self.staging, pos, visible)])
    parts = self.exact_parts()
    keys = exact_tokens.overlay(keys, [(k, p, vis) for k, _, p, vis in parts])
    values = exact_tokens.overlay(values, [(v, p, vis) for _, v, p, vis in parts])
    return keys, values

  def attend(self, q: Array, *, q_positions: Array | None = None, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None) -> Array:
    """Causal attention of q ([B, Tq, Hq, D]) over the decoded cache (dense, in jnp)."""
    kv_cache.check_query(q, self.batch, self.num_kv_heads, self.head_dim)
    return _attend(self, q, q_positions, scale=scale, sliding_window=sliding_window,
                   soft_cap=soft_cap)

  def _attend(self, q, q_positions, scale, sliding_window, soft_cap):
    if q_positions is None:
      q_positions = attention.default_query_positions(self.lengths, q.shape[1])
    keys, values = self.reconstruct()
    k_pos = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32),
                             (self.batch, self.max_len))
    mask = attention.key_mask(q_positions, k_pos, k_pos < self.lengths[:, None],
                              sliding_window)
    out = attention.dense_attention(q.astype(jnp.float32), keys, values, mask, scale=scale,
                                    soft_cap=soft_cap)
    return jnp.where(self.overflowed[:, None, None, None], jnp.nan, out).astype(q.dtype)

  # -- memory ----------------------------------------------------------------------------

  def memory_report(self) -> dict[str, Any]:
    """Bytes of every buffer, bytes per token per head, and the ratio against bf16."""
    report = {}
    for side, c in (("key", self.key_codes), ("value", self.value_codes)):
      report[f"{side}_codes"] = kv_cache.leaf_bytes(c.codes)
      report[f"{side}_scales"] = kv_cache.leaf_bytes((c.scales, c.minima))
    compressed = sum(report.values())
    report["staging"] = kv_cache.leaf_bytes(self.staging)
    report["window"] = int(self.window_keys.nbytes + self.window_values.nbytes)
    report["sinks"] = int(self.sink_keys.nbytes + self.sink_values.nbytes)
    report["bookkeeping"] = kv_cache.leaf_bytes(
        (self.window_positions, self.lengths, self.overflowed))
    return kv_cache.finish_report(report, self, compressed)


_update = jax.jit(UniformKVCache._update)
_attend = jax.jit(UniformKVCache._attend,
                  static_argnames=("scale", "sliding_window", "soft_cap"))
