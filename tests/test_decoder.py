"""Tiny random Llama and Gemma decoders: the cache is one argument."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import forward
from models import Decoder, DecoderConfig, apply_rope
from models.decoder import fold_value_rotations
from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache, value_rotation

TINY = {
    "llama": DecoderConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=32, ffn_dim=96, rope_base=10000.0, rope_interleaved=True),
    # Gemma 3 shape: QK-norm, sandwich norms, embedding scale, GeGLU, local layers with a
    # 5-token window and their own RoPE base, one global layer in three, soft-caps.
    "gemma": DecoderConfig(vocab_size=97, d_model=64, num_layers=3, num_heads=2, num_kv_heads=1,
                           head_dim=32, ffn_dim=96, rope_base=1e6, rope_base_local=1e4,
                           rms_eps=1e-6, norm_offset=1.0, activation="gelu_tanh", qk_norm=True,
                           sandwich_norms=True, embed_scale=True, sliding_window=5,
                           global_every=3, attn_soft_cap=50.0, final_soft_cap=30.0),
}
B, T, MAX_LEN = 2, 12, 16


def model_and_tokens(name, seed=0):
  model = Decoder(TINY[name], rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (B, T), 0, TINY[name].vocab_size)
  return model, tokens


def rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_step_by_step_dense_decode_equals_full_forward(name):
  model, tokens = model_and_tokens(name)
  full, _ = forward(model, tokens)
  caches = model.init_caches(B, MAX_LEN, DenseKVCache.create)
  steps = []
  for t in range(T):
    logits, caches = forward(model, tokens[:, t:t + 1], caches)
    steps.append(logits)
  assert rel(jnp.concatenate(steps, axis=1), full) <= 1e-5
  # Prefill (exact over the prompt, then the cache filled) and decode the rest.
  caches = model.init_caches(B, MAX_LEN, DenseKVCache.create)
  pre, caches = forward(model, tokens[:, :7], caches, prefill=True)
  rest = [forward(model, tokens[:, t:t + 1], caches)[0] for t in range(7, 8)]
  assert rel(pre, full[:, :7]) <= 1e-5
  assert rel(rest[0], full[:, 7:8]) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_compressed_cache_stays_close_and_improves_with_bits(name):
  """Every token read from its codes (no window, no sinks). Stated bound: at 4 bits the
  decode logits are within 0.3 of the exact ones (relative to the centred logits; each
  attention output carries ~√D_mse(4) ≈ 0.1, over 2-3 layers; measured 0.15-0.21 over
  two seeds), and the error shrinks as bits grow."""
  model, tokens = model_and_tokens(name)
  full, _ = forward(model, tokens)
  centred = full - full.mean(-1, keepdims=True)
  errors = []
  for bits in (2, 3, 4):
    make = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
        key_bits=bits, value_bits=bits, window=0, num_sinks=0))
    caches = model.init_caches(B, MAX_LEN, make)
    _, caches = forward(model, tokens[:, :6], caches, prefill=True)
    worst = 0.0
    for t in range(6, T):
      logits, caches = forward(model, tokens[:, t:t + 1], caches)
      worst = max(worst, float(jnp.linalg.norm(logits[:, 0] - full[:, t])
                               / jnp.linalg.norm(centred[:, t])))
    errors.append(worst)
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] <= 0.3, errors


def test_decode_step_compiles_once():
  model, tokens = model_and_tokens("gemma")
  traces = []

  @nnx.jit
  def step(model, token, caches):
    traces.append(1)
    return model(token, caches=caches)

  caches = model.init_caches(B, MAX_LEN, TurboQuantKVCache.create)
  for t in range(4):
    _, caches = step(model, tokens[:, t:t + 1], caches)
  assert len(traces) == 1


def test_sliding_window_layers_forget_old_tokens():
  # One local layer of window 5: position 11 sees positions 7..11 only, so changing
  # token 3 changes nothing there, with the dense and the compressed cache alike; a
  # global layer does see it.
  cfg = TINY["gemma"]
  outs = {}
  for kind, every in (("local", 1000), ("global", 1)):
    model = Decoder(DecoderConfig(**{**cfg.__dict__, "num_layers": 1, "global_every": every}),
                    rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, T), 0, cfg.vocab_size)
    other = tokens.at[0, 3].set((tokens[0, 3] + 1) % cfg.vocab_size)
    for make in (DenseKVCache.create, TurboQuantKVCache.create):
      last = []
      for toks in (tokens, other):
        caches = model.init_caches(1, MAX_LEN, make)
        for t in range(T):
          logits, caches = forward(model, toks[:, t:t + 1], caches)
        last.append(logits)
      outs[kind, make] = last
  for make in (DenseKVCache.create, TurboQuantKVCache.create):
    np.testing.assert_allclose(*outs["local", make], rtol=1e-5, atol=1e-6)
    assert not np.allclose(*outs["global", make], atol=1e-4)


def test_rope_layouts_are_rotations_and_agree_up_to_permutation(rng):
  x = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
  pos = jnp.arange(5)[None]
  for interleaved in (False, True):
    y = apply_rope(x, pos, 100.0, interleaved)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
  # Interleaved pairs (2i, 2i+1) are halves (i, i + 4) after a fixed permutation.
  perm = jnp.array([0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_allclose(apply_rope(x[..., perm], pos, 100.0, True),
                             apply_rope(x, pos, 100.0, False)[..., perm], atol=1e-5)


def test_wrong_number_of_caches():
  model, tokens = model_and_tokens("llama")
  with pytest.raises(ValueError, match="one cache per layer"):
    model(tokens, caches=[None])


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_folded_value_rotations_keep_the_function(name):
  """Π folded into the value and output projections: the same logits, without a cache and
  decoding through dense caches (values and outputs live in Π's domain in between)."""
  model, tokens = model_and_tokens(name)
  full, _ = forward(model, tokens)
  cfg = TINY[name]
  rots = [value_rotation(TurboQuantConfig(key_bits=3, value_bits=3), i, cfg.head_dim)
          for i in range(cfg.num_layers)]
  folded = fold_value_rotations(model_and_tokens(name)[0], rots)
  assert not np.allclose(folded.layers[0].attn.v_proj.kernel[...],
                         model.layers[0].attn.v_proj.kernel[...])
  assert rel(forward(folded, tokens)[0], full) <= 1e-5
  caches = folded.init_caches(B, MAX_LEN, DenseKVCache.create)
  _, caches = forward(folded, tokens[:, :6], caches, prefill=True)
  logits, _ = forward(folded, tokens[:, 6:7], caches)
  assert rel(logits, full[:, 6:7]) <= 1e-5
  with pytest.raises(ValueError, match="one rotation"):
    fold_value_rotations(folded, rots[:1])
  with pytest.raises(ValueError, match="must be"):
    fold_value_rotations(folded, [jnp.eye(8)] * cfg.num_layers)


@pytest.mark.parametrize("layout", ["planes", "tiles"])
def test_prerotated_caches_on_a_folded_model_decode_as_rotating_caches(layout):
  """A folded model with values_prerotated caches quantizes the same rotated values as
  the unfolded model's caches (Π·v from the projection instead of the cache) and skips
  the inverse rotation: the same decode logits up to float rounding. Values are read from
  their codes (no window, no sinks), so a missing or doubled rotation would show."""
  cfg = DecoderConfig(**{**TINY["llama"].__dict__, "head_dim": 64})   # tiles: D >= 64
  base = dict(key_bits=3, value_bits=3, window=0, num_sinks=0, layout=layout,
              **({"levels": "quintic"} if layout == "tiles" else {}))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)

  def decode(model, config, steps=3):
    max_len = 256 if layout == "tiles" else MAX_LEN    # one 256-token tile of 3 bits
    caches = model.init_caches(B, max_len, functools.partial(TurboQuantKVCache.create,
                                                             config=config))
    _, caches = forward(model, tokens[:, :6], caches, prefill=True)
    out = []
    for t in range(6, 6 + steps):
      logits, caches = forward(model, tokens[:, t:t + 1], caches)
      out.append(logits)
    return jnp.concatenate(out, axis=1)

  plain = TurboQuantConfig(**base)
  pre = TurboQuantConfig(**base, values_prerotated=True)
  want = decode(Decoder(cfg, rngs=nnx.Rngs(0)), plain)
  folded = fold_value_rotations(Decoder(cfg, rngs=nnx.Rngs(0)), [
      value_rotation(pre, i, cfg.head_dim) for i in range(cfg.num_layers)])
  assert rel(decode(folded, pre), want) <= 1e-4
  # The same caches on the unfolded model quantize other (unrotated) values.
  assert rel(decode(Decoder(cfg, rngs=nnx.Rngs(0)), pre), want) > 1e-2


def test_caches_get_each_layers_rope():
  """init_caches hands every cache its layer's RoPE (Gemma: local and global bases)."""
  model, _ = model_and_tokens("gemma")
  make = functools.partial(TurboQuantKVCache.create,
                           config=TurboQuantConfig(center_keys="rope"))
  caches = model.init_caches(1, MAX_LEN, make)
  cfg = model.cfg
  for layer, cache in enumerate(caches):
    assert cache.rope == cfg.layer_rope(layer)
  assert len({c.rope.base for c in caches}) == (2 if cfg.rope_base_local else 1)
