"""The KV-cache protocol, the update logic every cache shares, and the dense cache.

A cache is an immutable pytree that lives inside `jax.jit`. Two calls make a decode step:

    cache = cache.update(k, v)        # k, v: [batch, new_tokens, kv_heads, head_dim]
    out = cache.attend(q)             # q: [batch, q_len, q_heads, head_dim] -> same shape

`update(k, v, positions=None, num_tokens=None)` writes the new tokens of row b at
positions[b] (default: its current length) and counts num_tokens[b] of them (default:
all), so a batch holds sequences of different lengths and padded prompts stay out.
Writes are scatters of the new tokens only: O(new tokens), whatever max_len is.

A decode loop over many layers may run each cache's rare append work (TurboQuant's
calibration and block coding) for all layers at once after the step: `deferring(caches)`
before the model, `flush_caches(caches)` after it, one conditional instead of one per layer.
Or, for up to `lazy_code_steps(caches)` appends in which `skip_rare_work` holds (no row
calibrates), no conditional at all: the work dropped, then `code_completed` once.

A full cache never wraps or drops tokens silently. Eagerly (concrete arrays) an update
past max_len raises ValueError. Under `jit` nothing can raise: the row's update is not
applied, its `overflowed` flag is set, and from then on `attend` returns NaN for that
row, so the error shows in the output instead of hiding in it.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import attention

Array = jax.Array


class KVCache(Protocol):
  """What a decoder needs from a cache (see the module docstring)."""

  lengths: Array

  def update(self, k: Array, v: Array, positions: Array | None = None,
             num_tokens: Array | None = None) -> "KVCache":
    ...

  def attend(self, q: Array, *, q_positions: Array | None = None, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None) -> Array:
    ...

  def memory_report(self) -> dict[str, Any]:
    ...


def deferring(caches: Sequence[Any]) -> list[Any]:
  """The caches, those that can (a `deferring` method) set to leave their single-token
  appends' rare work to `flush_caches`."""
  return [c.deferring() if hasattr(c, "deferring") else c for c in caches]


def flush_caches(caches: Sequence[Any]) -> list[Any]:
  """Does the work the caches' last appends deferred, all under one conditional (skipped
  in the steps where no cache has any), and stops their deferring. Caches that cannot
  defer pass through."""
  out = drop_deferred(caches)
  at = [i for i, c in enumerate(caches) if getattr(c, "pending", None) is not None]
  if not at:
    return out
  due = jnp.any(jnp.stack([caches[i].flush_due for i in at]))
  done = jax.lax.cond(due, _flush_grouped, lambda cs: [c.skip_flush() for c in cs],
                      [caches[i] for i in at])
  for i, c in zip(at, done):
    out[i] = c
  return out


def _flush_grouped(caches: Sequence[Any]) -> list[Any]:
  """Each cache's `flush`, where caches of one structure (a decoder's layers: same type,
  static fields and shapes) go together through their class's `flush_together`: one
  compiled copy of the work for the group, not one per cache."""
  groups: dict[Any, list[int]] = {}
  for i, c in enumerate(caches):
    leaves, treedef = jax.tree.flatten(c)
    groups.setdefault((type(c), treedef, tuple((x.shape, x.dtype) for x in leaves)),
                      []).append(i)
  out = list(caches)
  for group in groups.values():
    together = getattr(type(caches[group[0]]), "flush_together", None)
    done = (together([caches[i] for i in group]) if together and len(group) > 1 else
            [caches[i].flush() for i in group])
    for i, c in zip(group, done):
      out[i] = c
  return out


def drop_deferred(caches: Sequence[Any]) -> list[Any]:
  """The caches with their last appends' deferred work dropped (`skip_flush`), others as
  they are: what a step with nothing due, or a lazy run (`code_completed` after it), keeps."""
  return [c.skip_flush() if hasattr(c, "skip_flush") else c for c in caches]


def lazy_code_steps(caches: Sequence[Any]) -> int | None:
  """Single-token appends every cache can take before its completed blocks need codes
  (`lazy_code_steps` of those that code lazily; 0 if one cannot wait), or None when no
  cache has rare append work."""
  steps = [c.lazy_code_steps for c in caches if hasattr(c, "lazy_code_steps")]
  return min(steps) if steps else None


def skip_rare_work(caches: Sequence[Any], num_steps: int) -> Array:
  """[] bool: whether the next num_steps single-token appends need no rare work in any
  cache but block codes (`skips_rare_work`), which `code_completed` then writes once."""
  ok = [c.skips_rare_work(num_steps) for c in caches if hasattr(c, "skips_rare_work")]
  return jnp.all(jnp.stack(ok)) if ok else jnp.ones((), bool)


def code_completed(caches: Sequence[Any], since: Sequence[Array | None], *,
                   when_due: bool = True) -> list[Any]:
  """Each cache's `code_completed(since)` (lengths before the appends), others as they
  are; when_due: under one conditional, skipped when no cache completed a block."""
  at = [i for i, c in enumerate(caches) if hasattr(c, "code_completed")]
  out = list(caches)
  if not at:
    return out
  # Each cache codes its own block: vmapped together like the flush, the H200's codes
  # differed from each layer's own at float rounding (`layers_together_gpu.json`; the
  # flush's were equal bit for bit), and the lazy loop is checked against the flush.
  code = lambda cs: [c.code_completed(since[i]) for c, i in zip(cs, at)]  # noqa: E731
  if when_due:
    due = jnp.any(jnp.stack([caches[i].completed_since(since[i]) for i in at]))
    done = jax.lax.cond(due, code, lambda cs: list(cs), [caches[i] for i in at])
  else:
    done = code([caches[i] for i in at])
  for i, c in zip(at, done):
    out[i] = c
  return out


def is_concrete(*xs: Any) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def check_kv_input(name: str, x: Array, batch: int, heads: int, head_dim: int) -> None:
  """Raises at trace time unless x is a float [batch, T, heads, head_dim] array."""
  if not hasattr(x, "shape") or x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (
      batch, heads, head_dim):
    raise ValueError(f"{name} must have shape [{batch}, new_tokens, {heads}, {head_dim}], "
                     f"got {getattr(x, 'shape', type(x))}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")


def check_finite(name: str, x: Array) -> None:
  """Eagerly refuses NaN/Inf (under jit the values are unknown; see the quantizers)."""
  # numpy, not jnp: under an outer trace jnp would return a tracer even for concrete x.
  if is_concrete(x) and not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise ValueError(f"{name} contains NaN or Inf; refusing to cache it")


def check_query(q: Array, batch: int, num_kv_heads: int, head_dim: int) -> None:
  if not hasattr(q, "shape") or q.ndim != 4 or q.shape[0] != batch or q.shape[3] != head_dim:
    raise ValueError(f"q must have shape [{batch}, q_len, q_heads, {head_dim}], "
                     f"got {getattr(q, 'shape', type(q))}")
  if q.shape[2] % num_kv_heads:
    raise ValueError(f"q has {q.shape[2]} heads, not a multiple of {num_kv_heads} kv heads")


@flax.struct.dataclass
class UpdatePlan:
  """Where an update's tokens go. All [B] except `indices` [B, T]."""

  positions: Array
  num_tokens: Array
  new_lengths: Array
  ok: Array
  indices: Array  # target position of each new token; max_len (dropped) if not written


def plan_update(lengths: Array, max_len: int, t: int, positions: Array | None,
                num_tokens: Array | None) -> UpdatePlan:
  """Validates an update and says where each new token is written."""
  batch = lengths.shape[0]
  pos = lengths if positions is None else jnp.broadcast_to(
      jnp.asarray(positions, jnp.int32), (batch,))
  num = jnp.full((batch,), t, jnp.int32) if num_tokens is None else jnp.broadcast_to(
      jnp.asarray(num_tokens, jnp.int32), (batch,))
  new_lengths = pos + num
  if is_concrete(lengths, positions, num_tokens):
    # numpy: these checks must not trace, even inside an outer transformation.
    n_len, n_pos, n_num = (np.broadcast_to(np.asarray(x), (batch,)) for x in (
        lengths, lengths if positions is None else positions, t if num_tokens is None
        else num_tokens))
    if np.any((n_num < 0) | (n_num > t)):
      raise ValueError(f"num_tokens must lie in [0, {t}], got {n_num}")
    if np.any(n_pos < 0) or np.any(n_pos > n_len):
      raise ValueError(f"positions must lie in [0, lengths] (no gaps), got {n_pos} "
                       f"for lengths {n_len}")
    if np.any(n_pos + n_num > max_len):
      raise ValueError(f"cache full: writing up to position {int((n_pos + n_num).max())} "
                       f"into a cache of max_len {max_len}")
  ok = new_lengths <= max_len
  i = jnp.arange(t, dtype=jnp.int32)
  written = (i[None, :] < num[:, None]) & ok[:, None]
  indices = jnp.where(written, pos[:, None] + i[None, :], max_len)
  return UpdatePlan(positions=pos, num_tokens=num, new_lengths=new_lengths, ok=ok,
                    indices=indices)


def scatter_tokens(buffer: Array, new: Array, indices: Array) -> Array:
  """Writes new[b, :, i] to buffer[b, :, indices[b, i]]; indices out of range are dropped.

  buffer: [B, H, L, ...], new: [B, H, T, ...], indices: [B, T].
  """
  def one(buf, upd, idx):
    return buf.at[:, idx].set(upd.astype(buf.dtype), mode="drop")
  return jax.vmap(one)(buffer, new, indices)


def to_head_major(x: Array) -> Array:
  """[B, T, H, D] -> [B, H, T, D]."""
  return x.transpose(0, 2, 1, 3)


def leaf_bytes(tree: Any) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def check_update(k: Array, v: Array, batch: int, heads: int, head_dim: int) -> None:
  """The checks every cache's `update` makes: shapes, dtypes, equal k/v, finite values."""
  check_kv_input("k", k, batch, heads, head_dim)
  check_kv_input("v", v, batch, heads, head_dim)
  if v.shape != k.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  check_finite("k", k)
  check_finite("v", v)


def finish_report(report: dict[str, Any], cache: Any, per_token_bytes: int) -> dict[str, Any]:
  """Adds the totals every memory report has: all buffers, bytes per token per head
  (`per_token_bytes` is what the tokens themselves take), and the ratio against bf16."""
  total = leaf_bytes(cache)
  tokens = cache.batch * cache.num_kv_heads * cache.max_len
  report["total"] = total
  report["bytes_per_token_per_head"] = per_token_bytes / tokens
  report["bytes_per_token_per_head_all_buffers"] = total / tokens
  report["bf16_total"] = tokens * cache.head_dim * 2 * 2
  report["compression_vs_bf16"] = report["bf16_total"] / total
  return report


class HeadMajorShape:
  """batch, num_kv_heads and head_dim of a cache from one of its head-major buffers
  [B, Hkv, slots, D]: the field named by `_shape_buffer` (`keys` unless a cache says)."""

  _shape_buffer = "keys"

  @property
  def batch(self) -> int:
    return getattr(self, self._shape_buffer).shape[0]

  @property
  def num_kv_heads(self) -> int:
    return getattr(self, self._shape_buffer).shape[1]

  @property
  def head_dim(self) -> int:
    return getattr(self, self._shape_buffer).shape[3]


@flax.struct.dataclass
class DenseKVCache(HeadMajorShape):
  """Full-precision KV cache, head-major, preallocated for max_len tokens.

  Attributes:
    keys, values: [B, Hkv, max_len, D] in fp32 or bf16.
    lengths: [B] int32 tokens held per sequence.
    overflowed: [B] bool, set when an update under jit did not fit.
  """

  keys: Array
  values: Array
  lengths: Array
  overflowed: Array

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, layer: int = 0, rope: Any = None) -> "DenseKVCache":
    """An empty cache. `layer` and `rope` are accepted, and unused, so that every cache is
    created the same way (`Decoder.init_caches`)."""
    del layer, rope
    _check_dims(batch, max_len, num_kv_heads, head_dim)
    shape = (batch, num_kv_heads, max_len, head_dim)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32), overflowed=jnp.zeros((batch,), bool))

  @property
  def max_len(self) -> int:
    return self.keys.shape[2]

  def update(self, k: Array, v: Array, positions: Array | None = None,
             num_tokens: Array | None = None) -> "DenseKVCache":
    """Writes k, v ([B, T, Hkv, D]) at `positions` (default: the current lengths)."""
    check_update(k, v, self.batch, self.num_kv_heads, self.head_dim)
    plan = plan_update(self.lengths, self.max_len, k.shape[1], positions, num_tokens)
    return _dense_update(self, k, v, plan)

  def attend(self, q: Array, *, q_positions: Array | None = None, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None,
             implementation: str | None = None) -> Array:
    """Causal attention of q ([B, Tq, Hq, D]) over the cached tokens.

    q_positions ([B, Tq]) default to the last Tq positions of each sequence.
    implementation: "reference" (jnp, float32), "cudnn" (cuDNN's fused attention, GPU,
    bf16/fp16 caches, no soft cap), or None: cuDNN where it applies, else the reference.
    """
    check_query(q, self.batch, self.num_kv_heads, self.head_dim)
    if implementation is None:
      implementation = "cudnn" if self.cudnn_supported(soft_cap) else "reference"
    if implementation == "cudnn":
      if not self.cudnn_supported(soft_cap):
        raise ValueError("cuDNN attention needs a GPU, a bf16 or fp16 cache and no soft cap")
      return _cudnn_attend(self, q, q_positions, scale=scale, sliding_window=sliding_window)
    if implementation != "reference":
      raise ValueError(f"implementation must be 'reference', 'cudnn' or None, "
                       f"got {implementation!r}")
    return _dense_attend(self, q, q_positions, scale=scale, sliding_window=sliding_window,
                         soft_cap=soft_cap)

  def cudnn_supported(self, soft_cap: float | None = None) -> bool:
    return (jax.default_backend() == "gpu" and soft_cap is None
            and self.keys.dtype in (jnp.bfloat16, jnp.float16))

  def memory_report(self) -> dict[str, Any]:
    kv = int(self.keys.nbytes + self.values.nbytes)
    total = leaf_bytes(self)
    tokens = self.batch * self.num_kv_heads * self.max_len
    bf16 = tokens * self.head_dim * 2 * 2
    return {"keys_values": kv, "bookkeeping": total - kv, "total": total,
            "bytes_per_token_per_head": kv / tokens, "bf16_total": bf16,
            "compression_vs_bf16": bf16 / total}


# The bodies run jitted even when called eagerly: one compilation per shape instead of one
# per primitive. Under an outer jit they inline.
@jax.jit
def _dense_update(cache: DenseKVCache, k: Array, v: Array, plan: UpdatePlan) -> DenseKVCache:
  return cache.replace(
      keys=scatter_tokens(cache.keys, to_head_major(k), plan.indices),
      values=scatter_tokens(cache.values, to_head_major(v), plan.indices),
      lengths=jnp.where(plan.ok, plan.new_lengths, cache.lengths),
      overflowed=cache.overflowed | ~plan.ok,
  )


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap"))
def _dense_attend(cache: DenseKVCache, q: Array, q_positions: Array | None, *, scale,
                  sliding_window, soft_cap) -> Array:
  if q_positions is None:
    q_positions = attention.default_query_positions(cache.lengths, q.shape[1])
  k_pos = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32),
                           (cache.batch, cache.max_len))
  mask = attention.key_mask(q_positions, k_pos, k_pos < cache.lengths[:, None], sliding_window)
  out = attention.dense_attention(q, cache.keys, cache.values, mask, scale=scale,
                                  soft_cap=soft_cap)
  return jnp.where(cache.overflowed[:, None, None, None], jnp.nan, out).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def _cudnn_attend(cache: DenseKVCache, q: Array, q_positions: Array | None, *, scale,
                  sliding_window) -> Array:
  """cuDNN flash attention on the head-major cache as it lies (layout BNTH, no copy).

  One query per row without a window (decode) is a padding mask: the row sees its first
  q_position + 1 keys. Anything else is an additive mask; a row that sees no key gets a
  uniform average instead of the reference's zeros (a decoder never asks for one).
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
  b, tq, _, d = q.shape
  scale = d**-0.5 if scale is None else scale
  if q_positions is None:
    q_positions = attention.default_query_positions(cache.lengths, tq)
  qh = q.astype(cache.keys.dtype).transpose(0, 2, 1, 3)   # [B, Hq, Tq, D]
  if tq == 1 and sliding_window is None:
    kv_len = jnp.clip(q_positions[:, 0] + 1, 0, cache.lengths).astype(jnp.int32)
    out = cudnn.dot_product_attention(
        qh, cache.keys, cache.values, q_seqlen=jnp.ones((b,), jnp.int32), kv_seqlen=kv_len,
        scale=scale, mask_type=cudnn.MaskType.PADDING, qkv_layout="BNTH")
  else:
    k_pos = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32),
                             (b, cache.max_len))
    mask = attention.key_mask(q_positions, k_pos, k_pos < cache.lengths[:, None],
                              sliding_window)[:, 0]     # [B, 1, Tq, Tk]
    bias = jnp.where(mask, 0.0, -1e30).astype(qh.dtype)
    out = cudnn.dot_product_attention(qh, cache.keys, cache.values, bias=bias, scale=scale,
                                      qkv_layout="BNTH")
  out = out.transpose(0, 2, 1, 3)
  return jnp.where(cache.overflowed[:, None, None, None], jnp.nan, out).astype(q.dtype)


def _check_dims(batch: int, max_len: int, num_kv_heads: int, head_dim: int) -> None:
  for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
