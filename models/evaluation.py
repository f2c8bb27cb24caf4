"""Quality evaluation of a KV cache on a decoder: perplexity, needle retrieval, fidelity.

Every function takes a `make_cache` (`DenseKVCache.create`, a partial of
`TurboQuantKVCache.create` or `UniformKVCache.create`, `layer_policy.per_layer(...)`), so
one harness measures every cache the same way.

- `decode_nll`: the cache is filled token by token through the decode path, as in
  generation, so every prediction past the exact window reads compressed keys and values.
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
    x = model.embed(tokens)
    if model.cfg.embed_scale:
      x = x * jnp.asarray(model.cfg.d_model**0.5, x.dtype)
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
    x = model.embed(tokens)
    if model.cfg.embed_scale:
      x = x * jnp.asarray(model.cfg.d_model**0.5, x.dtype)
    for block in model.layers:
      x, _ = block(x, positions, None, None, False)
    return model.final_norm(x).astype(jnp.float32)

  return run(model, tokens)


def unembedding(model) -> Array:
  """[vocab, d_model] float32: the matrix the logits are inner products with."""
  if model.cfg.tie_embeddings:
    return model.embed.embedding[...].astype(jnp.float32)
  return model.lm_head.kernel[...].T.astype(jnp.float32)
