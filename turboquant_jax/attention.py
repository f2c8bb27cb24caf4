"""Pure-jnp attention pieces shared by the caches: GQA grouping, masks, joint softmax.

Queries come in the Flax layout [batch, q_len, q_heads, head_dim]; caches are head-major
[batch, kv_heads, tokens, head_dim]. Grouped queries are [batch, kv_heads, group, q_len,
head_dim] with q head h = kv_head · group + g, the convention of Flax, Llama and Gemma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def group_queries(q: Array, num_kv_heads: int) -> Array:
  """[B, Tq, Hq, D] -> [B, Hkv, G, Tq, D] float32."""
  b, t, hq, d = q.shape
  if hq % num_kv_heads:
    raise ValueError(f"q has {hq} heads, not a multiple of the cache's {num_kv_heads} kv heads")
  g = hq // num_kv_heads
  return q.astype(jnp.float32).reshape(b, t, num_kv_heads, g, d).transpose(0, 2, 3, 1, 4)


def ungroup_output(o: Array) -> Array:
  """[B, Hkv, G, Tq, D] -> [B, Tq, Hkv·G, D]."""
  b, h, g, t, d = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h * g, d)


def default_query_positions(lengths: Array, q_len: int) -> Array:
  """[B, Tq]: the queries are the last q_len tokens of each sequence."""
  return lengths[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)


def key_mask(q_positions: Array, k_positions: Array, k_valid: Array,
             sliding_window: int | None = None) -> Array:
  """Which keys each query sees: causal, valid, and within the sliding window.

  Args:
    q_positions: [B, Tq] absolute positions of the queries.
    k_positions: [B, Tk] absolute positions of the keys.
    k_valid: [B, Tk] bool, keys that exist.
    sliding_window: if set, a query at p sees keys in (p - sliding_window, p].

  Returns:
    [B, 1, 1, Tq, Tk] bool, broadcastable over kv heads and groups.
  """
  qp, kp = q_positions[:, :, None], k_positions[:, None, :]
  mask = (kp <= qp) & k_valid[:, None, :]
  if sliding_window is not None:
    mask &= qp - kp < sliding_window
  return mask[:, None, None]


def scale_and_cap(scores: Array, scale: float, soft_cap: float | None) -> Array:
  scores = scores * scale
  if soft_cap is not None:
    scores = soft_cap * jnp.tanh(scores / soft_cap)
  return scores


def joint_softmax(blocks: list[tuple[Array, Array]]) -> list[Array]:
  """One softmax over several score blocks that share their leading axes.

  Args:
    blocks: (scores [..., Tk_i], mask broadcastable to scores) pairs.

  Returns:
    Probabilities per block. A row with no visible key gets all zeros, never NaN.
  """
  masked = [jnp.where(m, s, -jnp.inf) for s, m in blocks]
  row_max = masked[0].max(axis=-1)
  for s in masked[1:]:
    row_max = jnp.maximum(row_max, s.max(axis=-1))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., None]
  exps = [jnp.exp(s - row_max) for s in masked]
  total = sum(e.sum(axis=-1, keepdims=True) for e in exps)
  total = jnp.where(total > 0, total, 1.0)
  return [e / total for e in exps]


def grouped_scores(qg: Array, k: Array) -> Array:
  """qg: [B, H, G, Tq, D], k: [B, H, Tk, D] -> [B, H, G, Tq, Tk]."""
  return jnp.einsum("bhgqd,bhkd->bhgqk", qg, k.astype(jnp.float32), precision=_HIGHEST)


def grouped_values(p: Array, v: Array) -> Array:
  """p: [B, H, G, Tq, Tk], v: [B, H, Tk, D] -> [B, H, G, Tq, D]."""
  return jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32), precision=_HIGHEST)


def dense_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float | None = None,
                    soft_cap: float | None = None) -> Array:
  """Reference attention over head-major K/V.

  Args:
    q: [B, Tq, Hq, D].
    k, v: [B, Hkv, Tk, D].
    mask: broadcastable to [B, Hkv, G, Tq, Tk] (e.g. from `key_mask`).
    scale: score scale, 1/√D by default.
    soft_cap: if set, scores become soft_cap·tanh(scores/soft_cap) before the softmax.

  Returns:
    [B, Tq, Hq, D] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  qg = group_queries(q, k.shape[1])
  scores = scale_and_cap(grouped_scores(qg, k), scale, soft_cap)
  (p,) = joint_softmax([(scores, mask)])
  return ungroup_output(grouped_values(p, v)).astype(q.dtype)
