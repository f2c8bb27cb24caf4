"""`TurboQuantKVCache.attend` through the fused decode kernel.

The cache side of the kernel: what the kernel needs from a cache (rotated and sketched
queries per channel group, the key-centering offsets, the compressed range of each row),
the kernel's split-K partials or their jnp reference, and the merge of those partials
with the exact window and sinks in one softmax, each value group rotated back once. The
kernel itself (`pallas_kernels.decode_attention`) takes arrays and static specs only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention as kernel
from turboquant_jax import attention
from turboquant_jax import rope as rope_lib
from turboquant_jax.channel_split import permute_channels, unpermute_channels

Array = jax.Array

_NEG = -1e30
_HIGHEST = jax.lax.Precision.HIGHEST


def query_parts(cache, qf: Array) -> tuple[list[tuple[Array, Array | None]], Array]:
  """Per key group (Π·q, S·Π·q or None), and q·μ for plain centering (zeros otherwise).
  qf: [B, H, M, D]."""
  parts = []
  for t in cache.key_quantizer.transform_queries(permute_channels(qf, cache.key_perm)):
    parts.append(t if isinstance(t, tuple) else (t, None))
  qoff = jnp.zeros(qf.shape[:3], jnp.float32)
  if cache.key_mean is not None and cache.rope is None:
    qoff = cache.query_offsets(qf)[..., 0]
  return parts, qoff


def rope_offset_inputs(cache, qf: Array, block_k: int) -> list[Array]:
  """The kernel's inputs for q·R(t)·μ when keys are centred before RoPE (`rope.py`).

  Per pair p, q·R(θ)·μ = A_p cos θ + B_p sin θ with A = q_a μ_a + q_b μ_b and
  B = q_b μ_a - q_a μ_b, and the angle at token h + l (h a multiple of 16) is θ_h + φ_l:
  A and B [B, H, M, D/2], ω [D/2], the tables cos φ_l and sin φ_l [D/2, 16], and the 0/1
  matrices that place sub-block s's 16 columns in a block [block_k/16, 16, block_k]; all
  but A and B are the same for every row (broadcast: the kernel maps every operand).
  """
  spec, mu = cache.rope, cache.key_mean
  q_a, q_b = spec.pairs(qf)
  m_a, m_b = spec.pairs(mu[:, :, None, :])
  freq = spec.frequencies(qf.shape[-1])
  angles = freq[:, None] * jnp.arange(rope_lib.SPLIT, dtype=jnp.float32)[None, :]  # [D/2, 16]
  place = jnp.eye(block_k, dtype=jnp.float32).reshape(block_k // rope_lib.SPLIT,
                                                      rope_lib.SPLIT, block_k)
  lead = qf.shape[:2]
  shared = [freq, jnp.cos(angles), jnp.sin(angles), place]
  return ([q_a * m_a + q_b * m_b, q_b * m_a - q_a * m_b]
          + [jnp.broadcast_to(x, (*lead, *x.shape)) for x in shared])


def _compressed_range(cache) -> tuple[Array, Array]:
  b, h = cache.batch, cache.num_kv_heads
  lo = jnp.full((b, h), cache.config.num_sinks, jnp.int32)
  hi = jnp.broadcast_to(cache.exact_window_start()[:, None], (b, h))
  return lo, hi


def compressed_partials(cache, qf: Array, q_positions: Array, *, scale: float,
                        soft_cap: float | None = None, sliding_window: int | None = None,
                        block_k: int | None = None, num_splits: int | None = None,
                        **kernel_kwargs):
  """Split-K partial softmax results over the compressed tokens, from the kernel.

  Args:
    cache: a `TurboQuantKVCache`.
    qf: [B, H, M, D] query rows of each kv head (q heads × query tokens), float32.
    q_positions: [B, M] position of each row (-1 for a row that sees nothing).
    **kernel_kwargs: num_warps, num_stages, compute_dtype, interpret, poison, decode.

  Returns:
    (o, l, m): o a tuple with one [B, H, splits, M, d_g] per value group (rotated,
    unnormalised), l and m [B, H, splits, M].
  """
  b, h, rows, _ = qf.shape
  block_k, num_splits = kernel.choose_blocks(cache.max_len, b * h, block_k, num_splits)
  q_parts, qoff = query_parts(cache, qf)
  rope = cache.key_mean is not None and cache.rope is not None
  lo, hi = _compressed_range(cache)
  return kernel.decode_partials(
      lo, hi, jnp.broadcast_to(q_positions[:, None, :], (b, h, rows)), qoff, q_parts,
      cache.key_codes, cache.value_codes,
      key_specs=kernel.group_specs(cache.key_quantizer),
      value_specs=kernel.group_specs(cache.value_quantizer),
      rope_inputs=rope_offset_inputs(cache, qf, block_k) if rope else (),
      scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, block_k=block_k,
      num_splits=num_splits, **kernel_kwargs)


def compressed_partials_reference(cache, qf: Array, q_positions: Array, *, scale: float,
                                  soft_cap: float | None = None,
                                  sliding_window: int | None = None, num_splits: int = 1,
                                  **unused):
  """The same partials as `compressed_partials`, in plain jnp and float32."""
  del unused
  b, h, rows, _ = qf.shape
  length = cache.max_len
  q_parts, _ = query_parts(cache, qf)
  kq, vq = cache.key_quantizer, cache.value_quantizer
  scores = kq.scores([p if s is None else (p, s) for p, s in q_parts], cache.key_codes)
  if cache.key_mean is not None:
    scores = scores + cache.query_offsets(qf)
  scores = attention.scale_and_cap(scores, scale, soft_cap)
  pos = jnp.arange(length, dtype=jnp.int32)
  lo, hi = cache.config.num_sinks, cache.exact_window_start()
  mask = (pos >= lo)[None, :] & (pos[None, :] < hi[:, None])  # [B, L]
  mask = mask[:, None, None, :] & (pos[None, None, :] <= q_positions[:, :, None])[:, None]
  if sliding_window is not None:
    mask &= (q_positions[:, :, None] - pos[None, None, :] < sliding_window)[:, None]
  scores = jnp.where(mask, scores, _NEG).reshape(b, h, rows, num_splits, length // num_splits)
  mask = mask.reshape(b, 1, rows, num_splits, length // num_splits)
  m = scores.max(axis=-1)
  p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
  l = p.sum(axis=-1)
  o = []
  for group, codes in zip(vq.groups, cache.value_codes):
    vals = group.rotated_values(codes).reshape(b, h, num_splits, length // num_splits, -1)
    o.append(jnp.einsum("bhqsk,bhskd->bhsqd", p, vals, precision=_HIGHEST))
  return tuple(o), jnp.moveaxis(l, 3, 2), jnp.moveaxis(m, 3, 2)


def attend(cache, q: Array, q_positions: Array | None = None, *, scale: float | None = None,
           sliding_window: int | None = None, soft_cap: float | None = None,
           use_kernel: bool = True, **kernel_kwargs) -> Array:
  """`TurboQuantKVCache.attend` through the fused kernel: [B, Tq, Hq, D] -> same.

  The exact window and sinks are one more partial of the same softmax, merged with the
  kernel's split partials; each value group's sum is rotated back once.
  """
  b, h, d = cache.batch, cache.num_kv_heads, cache.head_dim
  scale = d**-0.5 if scale is None else scale
  if q_positions is None:
    q_positions = attention.default_query_positions(cache.lengths, q.shape[1])
  qg = attention.group_queries(q, h)                       # [B, H, G, Tq, D]
  g, tq = qg.shape[2], qg.shape[3]
  qf = qg.reshape(b, h, g * tq, d)
  row_pos = jnp.tile(q_positions, (1, g))                  # [B, G·Tq], rows are (g, t)
  partials = compressed_partials if use_kernel else compressed_partials_reference
  o_c, l_c, m_c = partials(cache, qf, row_pos, scale=scale, soft_cap=soft_cap,
                           sliding_window=sliding_window, **kernel_kwargs)
  m_all = m_c.max(axis=2)                                  # [B, H, M]
  exact_scores, exact_values = [], []
  for keys, values, pos, visible in cache.exact_parts():
    s = attention.scale_and_cap(
        jnp.einsum("bhqd,bhkd->bhqk", qf, keys.astype(jnp.float32), precision=_HIGHEST),
        scale, soft_cap)
    mask = attention.key_mask(row_pos, pos, visible, sliding_window)[:, :, 0]
    s = jnp.where(mask, s, _NEG)
    exact_scores.append((s, mask))
    exact_values.append(values)
    m_all = jnp.maximum(m_all, s.max(axis=-1))
  weight = jnp.exp(m_c - m_all[:, :, None])                # [B, H, S, M]
  l_total = jnp.sum(l_c * weight, axis=2)
  rotated = tuple(jnp.sum(o * weight[..., None], axis=2) for o in o_c)
  out = unpermute_channels(cache.value_quantizer.unrotate(rotated), cache.value_perm)
  for (s, mask), values in zip(exact_scores, exact_values):
    p = jnp.where(mask, jnp.exp(s - m_all[..., None]), 0.0)
    l_total = l_total + p.sum(axis=-1)
    out = out + jnp.einsum("bhqk,bhkd->bhqd", p, values.astype(jnp.float32),
                           precision=_HIGHEST)
  out = out / jnp.where(l_total > 0, l_total, 1.0)[..., None]
  out = jnp.where(cache.overflowed[:, None, None, None], jnp.nan, out)
  return attention.ungroup_output(out.reshape(b, h, g, tq, d)).astype(q.dtype)


attend_jit = jax.jit(attend, static_argnames=(
    "scale", "sliding_window", "soft_cap", "use_kernel", "block_k", "num_splits", "num_warps",
    "num_stages", "compute_dtype", "interpret", "poison", "decode"))
