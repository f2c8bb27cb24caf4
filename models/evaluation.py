"""Quality evaluation of a KV cache on a decoder: perplexity, needle retrieval, fidelity.

Every function takes a `make_cache` (`DenseKVCache.create`, a partial of
`TurboQuantKVCache.create` or `UniformKVCache.create`, `layer_policy.per_layer(...)`), so
one harness measures every cache the same way.

- `decode_nll`: the cache is filled token by token through the decode path, as in
  generation, so every prediction past the exact window reads compressed keys and values.
- `readback_nll`: the same losses in one causal pass per layer (each layer's keys and
  values written into a cache as decoding writes them and read back; each query reads
  them exactly within its exact window, read back beyond): SmolLM2's perplexity at 8
  rotation seeds within 2e-4 of `decode_nll`'s, in 11-16 s against about 4 minutes.
- `needle_*`: a passkey hidden at some depth of a long filler text, then a question. The
  prompt is prefilled exactly (chunked, through a dense cache) once; each cache under test
  is then filled with the prompt's keys and values and decodes the last prompt token and
  the answer, so every answer token reads the compressed cache.
- `layer_fidelity`: per layer and head, cosine of the keys and values a cache returns
  against the exact ones, and of the attention output for the last queries.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.generate import greedy_scan
from turboquant_jax import attention
from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.ring_cache import RingKVCache

Array = jax.Array
MakeCache = Callable[..., Any]


def _round_up(n: int, m: int = 16) -> int:
  return -(-n // m) * m


# -- perplexity ----------------------------------------------------------------------------

@jax.jit
def _decode_nll(graphdef, state, caches, tokens):
  model = nnx.merge(graphdef, state)

  def step(caches, pair):
    token, target = pair
    logits, caches = model(token[:, None], caches=caches)
    logp = jax.nn.log_softmax(logits[:, 0], axis=-1)
    return caches, -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]

  caches, nll = jax.lax.scan(step, caches, (tokens[:, :-1].T, tokens[:, 1:].T))
  return nll.T, caches


def decode_nll(model, tokens: Array, make_cache: MakeCache, *, cache_dtype=jnp.float32,
               return_caches: bool = False):
  """Negative log-likelihood of tokens[:, 1:], the cache filled one token per step.

  Args:
    model: a `models.Decoder`.
    tokens: [B, T] int tokens (T ≥ 2).
    make_cache: the cache maker under test.

  Returns:
    nll [B, T-1] float32 (nats), and the final caches if asked.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"tokens must be [batch, T >= 2], got {tokens.shape}")
  b, t = tokens.shape
  caches = model.init_caches(b, _round_up(t), make_cache, cache_dtype)
  graphdef, state = nnx.split(model)
  nll, caches = _decode_nll(graphdef, state, caches, tokens)
  return (nll, caches) if return_caches else nll


@jax.jit
def _decode_nll_stacked(graphdef, state, stacked_caches, tokens):
  return jax.vmap(lambda c: _decode_nll(graphdef, state, c, tokens)[0])(stacked_caches)


def decode_nll_variants(model, tokens: Array, make_caches: Sequence[MakeCache], *,
                        cache_dtype=jnp.float32) -> Array:
  """`decode_nll` for several makers whose caches differ only in array values (say, the
  rotation seed), run as one vmapped computation: [len(make_caches), B, T-1].

  The first maker's static configuration is kept for all (so a seed that lives in it is
  only used to draw the arrays).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  variants = [model.init_caches(b, _round_up(t), m, cache_dtype) for m in make_caches]
  treedef = jax.tree.structure(variants[0])
  leaves = [jax.tree.leaves(v) for v in variants]
  for v in variants[1:]:
    if len(jax.tree.leaves(v)) != len(leaves[0]):
      raise ValueError("the makers' caches must have the same structure")
  stacked = jax.tree.unflatten(treedef, [jnp.stack(xs) for xs in zip(*leaves)])
  graphdef, state = nnx.split(model)
  return _decode_nll_stacked(graphdef, state, stacked, tokens)


# -- perplexity in one pass per layer ------------------------------------------------------

def _attend_mixed(q, k, v, kr, vr, *, exact_window: int, scale, soft_cap, sliding_window):
  """q [B, T, Hq, D]; k, v, kr, vr [B, Hkv, T, D] (exact, read back) -> [B, T, Hq, D]:
  causal attention where key j is exact for query i when i - j < exact_window, read back
  otherwise (the read-back arrays hold the sinks exact already)."""
  t = q.shape[1]
  qg = attention.group_queries(q, k.shape[1])             # [B, Hkv, G, T, D]
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  causal = j <= i
  if sliding_window is not None:
    causal &= j > i - sliding_window
  near = (i - j) < exact_window
  s_exact = attention.scale_and_cap(attention.grouped_scores(qg, k), scale, soft_cap)
  s_read = attention.scale_and_cap(attention.grouped_scores(qg, kr), scale, soft_cap)
  s = jnp.where(near, s_exact, s_read)
  s = jnp.where(causal, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  out = (attention.grouped_values(jnp.where(near, p, 0.0), v)
         + attention.grouped_values(jnp.where(near, 0.0, p), vr))
  return attention.ungroup_output(out).astype(q.dtype)


def _read_back(cache, k: Array, v: Array, *, window: int, tail: int) -> tuple[Array, Array]:
  """k, v [B, T, Hkv, D] written into the empty `cache` (room for T + tail tokens) as
  decoding writes them (the first `window` tokens, so it calibrates on them; the rest;
  `tail` zeros after, so every real token is coded) -> read back (keys, values)
  [B, Hkv, T, D]."""
  b, t, h, d = k.shape
  first = min(window, t)
  cache = cache.update(k[:, :first], v[:, :first])
  if t > first:
    cache = cache.update(k[:, first:], v[:, first:])
  zeros = jnp.zeros((b, tail, h, d), k.dtype)
  cache = cache.update(zeros, zeros)
  keys, values = cache.reconstruct()
  return keys[:, :, :t], values[:, :, :t]


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "window", "tail"))
def _readback_layer(graphdef, state, x, positions, caches, *, layer, window, tail):
  # `layer` picks the rope and sliding window only (the caches are made outside, so that
  # layers of one config share a compiled copy).
  block = nnx.merge(graphdef, state)
  cfg = block.attn.cfg
  q, k, v = block.attn.project(block.input_norm(x), positions)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if not caches:
    kr, vr = kh, vh
  else:   # one cache per kv head or one for all: head h read back from the h-th's
    parts = [_read_back(c, k, v, window=window, tail=tail) for c in caches]
    if len(parts) == 1:
      kr, vr = parts[0]
    else:
      kr = jnp.concatenate([pk[:, h:h + 1] for h, (pk, _) in enumerate(parts)], axis=1)
      vr = jnp.concatenate([pv[:, h:h + 1] for h, (_, pv) in enumerate(parts)], axis=1)
  out = _attend_mixed(q, kh, vh, kr, vr, exact_window=window, scale=cfg.scale,
                      soft_cap=cfg.attn_soft_cap, sliding_window=cfg.layer_window(layer))
  b, t = x.shape[:2]
  return block.after_attention(x, block.attn.o_proj(out.reshape(b, t, -1)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token_nll(graphdef, state, x, tokens):
  logp = jax.nn.log_softmax(nnx.merge(graphdef, state).logits(x[:, :-1]), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def readback_nll(model, tokens: Array, make_cache: MakeCache | Sequence[MakeCache] | None
                 ) -> np.ndarray:
  """`decode_nll`'s losses in one causal pass per layer, from codes read back.

  Per layer, the text's keys and values are written into an empty cache as decoding writes
  them (the first window's tokens, so the cache calibrates on them as decoding does, then
  the rest) and read back (`reconstruct`); each query attends to exact keys and values
  within the cache's exact window (its last `config.window` positions) and its sinks, to
  the read-back ones beyond. Later layers see the earlier layers' compressed attention, as
  in decoding. Memory O(T²) per layer (scores of every query pair): for texts of a few
  thousand tokens.

  Args:
    model: a `models.Decoder`.
    tokens: [B, T] int token ids.
    make_cache: a maker of `TurboQuantKVCache`s (as `decode_nll` takes; one config for
      every layer's window); a sequence of makers, one per kv head (head h read back from
      the h-th maker's cache: widths per head); or None (the exact model).

  Returns:
    float32 [B, T - 1]: the loss of each of tokens[:, 1:].
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"tokens must be [B, T] with T >= 2, got {tokens.shape}")
  b, t = tokens.shape
  cfg = model.cfg
  makers = () if make_cache is None else (
      (make_cache,) if callable(make_cache) else tuple(make_cache))
  if len(makers) not in (0, 1, cfg.num_kv_heads):
    raise ValueError(f"need one maker or one per kv head ({cfg.num_kv_heads}), got "
                     f"{len(makers)}")
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.embed_tokens(tokens)
  window = tail = 0
  if makers:   # one window for every layer: read once, with room past the text for a
    # window and a block of zeros, so that every real token is coded
    first_cache = makers[0](b, t, cfg.num_kv_heads, cfg.head_dim, jnp.float32, layer=0,
                            rope=cfg.layer_rope(0))
    if not hasattr(first_cache, "reconstruct"):
      raise ValueError("readback_nll reads codes back from TurboQuant caches; the maker "
                       f"gave a {type(first_cache).__name__}")
    window, code_block = first_cache.config.window, first_cache.code_block
    tail = _round_up(t + window + code_block, code_block) - t
  kind = {}   # layers of one rope and window share the first such layer's graph
  for i, block in enumerate(model.layers):
    first = kind.setdefault((cfg.layer_rope(i), cfg.layer_window(i)), i)
    caches = tuple(m(b, t + tail, cfg.num_kv_heads, cfg.head_dim, jnp.float32, layer=i,
                     rope=cfg.layer_rope(i)) for m in makers)
    for c in caches:
      if not hasattr(c, "reconstruct") or c.config.window != window:
        raise ValueError(f"layer {i}: readback_nll needs TurboQuant caches of one exact "
                         f"window ({window}); the maker gave a {type(c).__name__}"
                         + (f" of window {c.config.window}" if hasattr(c, "config") else ""))
    x = _readback_layer(nnx.graphdef(model.layers[first]), nnx.state(block), x, positions,
                        caches, layer=first, window=window, tail=tail)
  graphdef, state = nnx.split(model)
  return np.asarray(_next_token_nll(graphdef, state, x, tokens))


def perplexity(nll: Array) -> float:
  """exp(mean nll) over every predicted token."""
  return float(np.exp(np.mean(np.asarray(nll, np.float64))))


def bytes_per_token(caches: Sequence[Any]) -> float:
  """K+V bytes each further token costs, over all layers and kv heads (codes, norms,
  scales; not the per-sequence constants such as the window, nor a sliding-window
  layer's ring, whose size does not grow with the context)."""
  return float(sum(c.memory_report()["bytes_per_token_per_head"] * c.num_kv_heads
                   for c in caches if not isinstance(c, RingKVCache)))


# -- needle in a haystack ------------------------------------------------------------------

NEEDLE = "The secret passkey is {key}. Remember it: the secret passkey is {key}."
QUESTION = "\n\nWhat is the secret passkey? The secret passkey is"


def needle_prompt(encode: Callable[[str], list[int]], filler_ids: Sequence[int], length: int,
                  depth: float, passkey: str, *, bos: Sequence[int] = ()) -> list[int]:
  """A prompt of exactly `length` tokens: filler with the needle at `depth` ∈ [0, 1].

  The filler is cut at `length` minus what the needle, the question and `bos` take, and
  the needle goes in at the filler token closest to `depth` of the way.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth}")
  needle = encode(" " + NEEDLE.format(key=passkey) + " ")
  question = encode(QUESTION)
  n_fill = length - len(bos) - len(needle) - len(question)
  if n_fill < 0 or n_fill > len(filler_ids):
    raise ValueError(f"cannot build a {length}-token prompt from {len(filler_ids)} filler "
                     "tokens")
  at = int(round(depth * n_fill))
  fill = list(filler_ids[:n_fill])
  return [*bos, *fill[:at], *needle, *fill[at:], *question]


def needle_passkey(length: int, depth: float) -> str:
  """The 5-digit passkey of the trial (length, depth): the same in every run, whatever
  other trials it runs (a passkey drawn in sequence put different prompts for one trial
  in one results file when runs asked different lengths)."""
  rng = np.random.default_rng([int(length), int(round(depth * 1000))])
  return str(rng.integers(10000, 100000))


def needle_score(answer: str, passkey: str) -> float:
  """1.0 if the first number in the answer is the passkey, else 0.0 (exact match)."""
  numbers = re.findall(r"\d+", answer)
  return float(bool(numbers) and numbers[0] == passkey)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "length"))
def _prefill_dense(graphdef, state, caches, tokens, *, chunk, length):
  model = nnx.merge(graphdef, state)
  b, n = tokens.shape[0], tokens.shape[1] // chunk

  def step(caches, xs):
    piece, start = xs
    num = jnp.full((b,), jnp.clip(length - start, 0, chunk), jnp.int32)
    _, caches = model(piece.T, caches=caches, num_tokens=num,
                      logits_at=jnp.zeros((b,), jnp.int32))
    return caches, None

  pieces = tokens.reshape(b, n, chunk).transpose(1, 2, 0)  # [n, chunk, B]
  caches, _ = jax.lax.scan(step, caches, (pieces, jnp.arange(n, dtype=jnp.int32) * chunk))
  return caches


def prompt_kv(model, prompt: Array, *, chunk: int = 256) -> list[tuple[Array, Array]]:
  """Exact keys and values ([B, T, Hkv, D] per layer) of a prompt, prefilled in chunks
  through a dense cache (memory O(chunk · T), not O(T²))."""
  prompt = jnp.asarray(prompt, jnp.int32)
  b, t = prompt.shape
  padded = _round_up(t, chunk)
  tokens = jnp.pad(prompt, ((0, 0), (0, padded - t)))
  caches = model.init_caches(b, padded, DenseKVCache.create)
  graphdef, state = nnx.split(model)
  caches = _prefill_dense(graphdef, state, caches, tokens, chunk=chunk, length=t)
  return [(c.keys[:, :, :t].transpose(0, 2, 1, 3), c.values[:, :, :t].transpose(0, 2, 1, 3))
          for c in caches]


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _greedy(graphdef, state, caches, token, *, num_tokens):
  # Not donated (unlike decode_steps): the prompt's caches are shared by every variant.
  return greedy_scan(nnx.merge(graphdef, state), token, caches, num_tokens)[0]


def answer_from_kv(model, kv: Sequence[tuple[Array, Array]], last_token: Array,
                   make_cache: MakeCache, num_tokens: int = 8, *, cache_dtype=jnp.float32
                   ) -> Array:
  """Fills caches with the prompt's kv (all but its last token), decodes the last prompt
  token and then `num_tokens` greedy tokens through them. Returns [B, num_tokens]."""
  b, t = kv[0][0].shape[:2]
  caches = model.init_caches(b, _round_up(t + num_tokens + 1), make_cache, cache_dtype)
  caches = [c.update(k, v) for c, (k, v) in zip(caches, kv)]
  graphdef, state = nnx.split(model)
  return _greedy(graphdef, state, caches, jnp.asarray(last_token, jnp.int32),
                 num_tokens=num_tokens)


# -- per-layer fidelity --------------------------------------------------------------------

def layer_qkv(model, tokens: Array) -> list[tuple[Array, Array, Array]]:
  """(q [B, T, Hq, D], k, v [B, T, Hkv, D]) entering each layer's attention, exact
  forward pass with no cache."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  @nnx.jit
  def run(model, tokens):
    x = model.embed_tokens(tokens)
    out = []
    for block in model.layers:
      out.append(block.attn.project(block.input_norm(x), positions))
      x, _ = block(x, positions, None, None, False)
    return out

  return run(model, tokens)


def _cosine(a: Array, b: Array, axis: int = -1) -> Array:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.sum(a * b, axis) / jnp.maximum(
      jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis), 1e-30)


def layer_fidelity(model, qkv: Sequence[tuple[Array, Array, Array]], make_cache: MakeCache,
                   *, num_queries: int = 64) -> list[dict[str, list[float]]]:
  """Per layer: mean cosine per kv head of the keys and values the cache returns against
  the exact ones (over positions read from codes, i.e. not exact in the cache), and mean
  cosine per q head of the attention output of the last `num_queries` queries.

  Layers with no compressed position (a dense cache) report cosine 1 for keys/values.
  """
  cfg = model.cfg
  report = []
  for layer, (q, k, v) in enumerate(qkv):
    b, t, hkv, d = k.shape
    cache = make_cache(b, t, hkv, d, jnp.float32, layer=layer,
                       rope=cfg.layer_rope(layer)).update(k, v)
    dense = DenseKVCache.create(b, t, hkv, d).update(k, v)
    entry = {}
    if hasattr(cache, "reconstruct"):
      keys, values = cache.reconstruct()
      # Positions whose key differs from the exact one are the compressed ones.
      exact_k, exact_v = dense.keys, dense.values
      compressed = jnp.any(keys != exact_k, axis=(1, 3))  # [B, T]
      w = compressed[:, None, :].astype(jnp.float32)
      denom = jnp.maximum(jnp.sum(w, axis=(0, 2)), 1.0)
      entry["key_cos"] = (jnp.sum(_cosine(keys, exact_k) * w, axis=(0, 2)) / denom).tolist()
      entry["value_cos"] = (jnp.sum(_cosine(values, exact_v) * w, axis=(0, 2))
                            / denom).tolist()
      entry["compressed_tokens"] = int(jnp.sum(compressed))
    else:
      entry["key_cos"] = entry["value_cos"] = [1.0] * hkv
      entry["compressed_tokens"] = 0
    n = min(num_queries, t)
    qpos = jnp.broadcast_to(jnp.arange(t - n, t, dtype=jnp.int32), (b, n))
    kw = dict(q_positions=qpos, scale=cfg.scale, sliding_window=cfg.layer_window(layer),
              soft_cap=cfg.attn_soft_cap)
    out = cache.attend(q[:, t - n:], **kw)
    ref = dense.attend(q[:, t - n:], **kw)
    entry["attn_cos"] = jnp.mean(_cosine(out, ref), axis=(0, 1)).tolist()
    report.append(entry)
  return report


# -- vectors for search --------------------------------------------------------------------

def final_hidden_states(model, tokens: Array) -> Array:
  """[B, T, d_model] float32: the final-norm outputs whose products with the unembedding
  are the logits (so next-token prediction is inner-product search over it)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)

  @nnx.jit
  def run(model, tokens):
    x = model.embed_tokens(tokens)
    for block in model.layers:
      x, _ = block(x, positions, None, None, False)
    return model.final_norm(x).astype(jnp.float32)

  return run(model, tokens)


def unembedding(model) -> Array:
  """[vocab, d_model] float32: the matrix the logits are inner products with."""
  if model.cfg.tie_embeddings:
    return model.embed.embedding[...].astype(jnp.float32)
  return model.lm_head.kernel[...].T.astype(jnp.float32)
