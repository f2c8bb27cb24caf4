"""Llama- and Gemma-family decoders in Flax NNX that take the KV cache as an argument.

`Decoder(config, rngs=...)` is a tree of small modules (embedding, blocks of attention and
MLP, final norm). A call maps tokens to logits and, given one cache per layer (any object
of the `turboquant_jax.KVCache` protocol: `DenseKVCache`, `TurboQuantKVCache`, ...),
returns the updated caches: swapping caches is one argument.

    logits, caches = model(tokens, positions, caches)                 # decode / chunk
    logits, caches = model(tokens, positions, caches, prefill=True)   # prompt: exact
    logits, _ = model(tokens)                                         # no cache

With `prefill=True` attention over the prompt is exact (its own keys and values, causal),
and the cache is filled afterwards; later calls attend through the cache. Sliding-window
layers pass their window to the cache, so window semantics hold with either cache.
The model knows nothing of sampling or checkpoint formats.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import DecoderConfig
from turboquant_jax import attention
from turboquant_jax import rope

Array = jax.Array


class RMSNorm(nnx.Module):
  """x / rms(x) · (offset + weight), computed in float32."""

  def __init__(self, dim: int, eps: float, offset: float, param_dtype=jnp.float32):
    self.eps, self.offset = eps, offset
    self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: Array, positions: Array, base: float, interleaved: bool) -> Array:
  """Rotary embedding. x: [B, T, H, D], positions: [B, T]."""
  return rope.rotate(x, positions[:, :, None], rope.RopeSpec(base, interleaved))


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


class Attention(nnx.Module):
  """GQA self-attention with RoPE and optional QK-norm, reading and writing a cache."""

  def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.cfg, self.layer = cfg, layer
    hd = cfg.head_dim
    self.q_proj = _linear(cfg.d_model, cfg.num_heads * hd, rngs, dtype, param_dtype)
    self.k_proj = _linear(cfg.d_model, cfg.num_kv_heads * hd, rngs, dtype, param_dtype)
    self.v_proj = _linear(cfg.d_model, cfg.num_kv_heads * hd, rngs, dtype, param_dtype)
    self.o_proj = _linear(cfg.num_heads * hd, cfg.d_model, rngs, dtype, param_dtype)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_eps, cfg.norm_offset, param_dtype)
      self.k_norm = RMSNorm(hd, cfg.rms_eps, cfg.norm_offset, param_dtype)

  def project(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """x: [B, T, d_model] -> q [B, T, Hq, D], k, v [B, T, Hkv, D], RoPE applied."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    spec = cfg.layer_rope(self.layer)
    q = rope.rotate(q, positions[:, :, None], spec)
    k = rope.rotate(k, positions[:, :, None], spec)
    return q, k, v

  def __call__(self, x: Array, positions: Array, cache: Any, num_tokens: Array | None,
               prefill: bool) -> tuple[Array, Any]:
    cfg = self.cfg
    b, t, _ = x.shape
    q, k, v = self.project(x, positions)
    window = cfg.layer_window(self.layer)
    if cache is None or prefill:
      # Exact causal attention over these tokens alone (the prompt).
      n = jnp.full((b,), t, jnp.int32) if num_tokens is None else num_tokens
      mask = attention.key_mask(positions, positions, jnp.arange(t)[None, :] < n[:, None],
                                window)
      out = attention.dense_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                      mask, scale=cfg.scale, soft_cap=cfg.attn_soft_cap)
      if cache is not None:
        cache = cache.update(k, v, positions=positions[:, 0], num_tokens=num_tokens)
    else:
      cache = cache.update(k, v, positions=positions[:, 0], num_tokens=num_tokens)
      out = cache.attend(q, q_positions=positions, scale=cfg.scale, sliding_window=window,
                         soft_cap=cfg.attn_soft_cap)
    return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) · up(x)); SwiGLU or GeGLU."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.activation = cfg.activation
    self.gate_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs, dtype, param_dtype)
    self.up_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs, dtype, param_dtype)
    self.down_proj = _linear(cfg.ffn_dim, cfg.d_model, rngs, dtype, param_dtype)

  def __call__(self, x: Array) -> Array:
    gate = self.gate_proj(x)
    gate = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm residual block; Gemma adds norms after attention and MLP (sandwich)."""

  def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    norm = lambda: RMSNorm(cfg.d_model, cfg.rms_eps, cfg.norm_offset, param_dtype)  # noqa: E731
    self.input_norm, self.pre_mlp_norm = norm(), norm()
    self.sandwich = cfg.sandwich_norms
    if cfg.sandwich_norms:
      self.post_attn_norm, self.post_mlp_norm = norm(), norm()
    self.attn = Attention(cfg, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, positions, cache, num_tokens, prefill):
    h, cache = self.attn(self.input_norm(x), positions, cache, num_tokens, prefill)
    return self.after_attention(x, h), cache

  def after_attention(self, x: Array, h: Array) -> Array:
    """The block's output from its input x and its attention's output h ([B, T, d_model]
    each): the residual adds, the MLP and the sandwich norms."""
    if self.sandwich:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x))
    if self.sandwich:
      h = self.post_mlp_norm(h)
    return x + h


def _unembed(embed: nnx.Embed, x: Array) -> Array:
  """x [..., d] times the tied embedding [vocab, d], contracted on d: `nnx.Embed.attend`
  without its transposed operand, which XLA's CPU backend copies on every call (Gemma 3's
  vocab: a 671 MB copy per decode step, 0.33 of its 0.38 s on 2 cores)."""
  x, table = embed.promote_dtype((x, embed.embedding[...]), dtype=embed.dtype)
  return jax.lax.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))


class Decoder(nnx.Module):
  """A decoder-only transformer; see the module docstring for the call pattern."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.norm_offset, param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _linear(cfg.d_model, cfg.vocab_size, rngs, dtype, param_dtype)

  def init_caches(self, batch: int, max_len: int, make_cache: Callable[..., Any],
                  dtype=jnp.float32) -> list[Any]:
    """One cache per layer: make_cache(batch, max_len, kv_heads, head_dim, dtype, layer=i,
    rope=the layer's `RopeSpec`), so a cache can centre keys before RoPE."""
    cfg = self.cfg
    return [make_cache(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, layer=i,
                       rope=cfg.layer_rope(i))
            for i in range(cfg.num_layers)]

  def __call__(self, tokens: Array, positions: Array | None = None,
               caches: Sequence[Any] | None = None, *, num_tokens: Array | None = None,
               prefill: bool = False, logits_at: Array | None = None
               ) -> tuple[Array, list[Any] | None]:
    """tokens: [B, T] int -> (logits [B, T, vocab] float32, updated caches).

    positions ([B, T]) default to 0..T-1, or, with caches, to each sequence's length
    onwards. num_tokens ([B]) says how many of the T tokens of each row are real.
    logits_at ([B] int) computes the logits of one token per row only ([B, 1, vocab]):
    a long prompt then skips T-1 products with the (large) unembedding.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if caches is not None and len(caches) != cfg.num_layers:
      raise ValueError(f"need one cache per layer ({cfg.num_layers}), got {len(caches)}")
    if positions is None:
      start = (jnp.zeros((b,), jnp.int32) if caches is None or prefill
               else caches[0].lengths)
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x = self.embed_tokens(tokens)
    new_caches = None if caches is None else []
    for i, block in enumerate(self.layers):
      x, cache = block(x, positions, None if caches is None else caches[i], num_tokens, prefill)
      if caches is not None:
        new_caches.append(cache)
    if logits_at is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
    return self.logits(x), new_caches

  def embed_tokens(self, tokens: Array) -> Array:
    """tokens [B, T] int -> the first block's input [B, T, d_model]."""
    x = self.embed(tokens)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(self.cfg.d_model**0.5, x.dtype)
    return x

  def logits(self, x: Array) -> Array:
    """The last block's output [B, T, d_model] -> logits [B, T, vocab] float32."""
    cfg = self.cfg
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = _unembed(self.embed, x.astype(jnp.float32))
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    if cfg.final_soft_cap is not None:
      logits = cfg.final_soft_cap * jnp.tanh(logits / cfg.final_soft_cap)
    return logits


def fold_value_rotations(model: Decoder, rotations: Sequence[Array | None]) -> Decoder:
  """Folds each layer's value rotation Π into its projections, in place; returns the model.

  The value projection then yields Π·v for each kv head and the output projection takes
  each query head's output in Π's domain (Πᵀ folded into it), so the model computes the
  same function, up to float rounding, with its values and attention outputs rotated.
  A `TurboQuantKVCache` with `values_prerotated=True` and the same Π
  (`turboquant_jax.value_rotation(config, layer, head_dim)`) then quantizes values without
  rotating them and attends without rotating the output back; any other cache attends as
  before (attention is linear in the values).

  Args:
    model: a `Decoder`.
    rotations: one per layer, an orthogonal float32 [head_dim, head_dim] or None (the
      layer is left as it is).
  """
  cfg = model.cfg
  if len(rotations) != cfg.num_layers:
    raise ValueError(f"need one rotation (or None) per layer ({cfg.num_layers}), got "
                     f"{len(rotations)}")
  d = cfg.head_dim
  for i, rot in enumerate(rotations):
    if rot is None:
      continue
    rot = jnp.asarray(rot, jnp.float32)
    if rot.shape != (d, d):
      raise ValueError(f"layer {i}: a rotation must be [{d}, {d}], got {list(rot.shape)}")
    attn = model.layers[i].attn
    wv, wo = attn.v_proj.kernel, attn.o_proj.kernel
    v = wv[...].astype(jnp.float32).reshape(cfg.d_model, cfg.num_kv_heads, d)
    o = wo[...].astype(jnp.float32).reshape(cfg.num_heads, d, cfg.d_model)
    hi = jax.lax.Precision.HIGHEST
    wv[...] = jnp.einsum("mhd,ed->mhe", v, rot, precision=hi).reshape(
        wv.shape).astype(wv.dtype)                                   # v -> Π·v
    wo[...] = jnp.einsum("ed,hdm->hem", rot, o, precision=hi).reshape(
        wo.shape).astype(wo.dtype)                                   # Π·o -> o, then W_o
  return model
