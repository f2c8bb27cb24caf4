"""The quality harness (models.evaluation) pinned on tiny models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import forward
from models import Decoder, evaluation
from models.generate import generate
from tests.test_decoder import TINY
from turboquant_jax import (DenseKVCache, TurboQuantConfig, TurboQuantKVCache, UniformConfig,
                            UniformKVCache)

T = 40


def tiny(name="llama", seed=0):
  model = Decoder(TINY[name], rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, T), 0, TINY[name].vocab_size)
  return model, tokens


def forward_nll(model, tokens):
  """[B, T-1] losses of tokens[:, 1:] from the full forward pass (no cache)."""
  logits, _ = forward(model, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
  model, tokens = tiny()
  model.embed.embedding[...] = jnp.zeros_like(model.embed.embedding[...])  # logits all 0
  nll = evaluation.decode_nll(model, tokens, DenseKVCache.create)
  assert nll.shape == (2, T - 1)
  np.testing.assert_allclose(evaluation.perplexity(nll), TINY["llama"].vocab_size, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_decode_nll_with_a_dense_cache_is_the_full_forward_nll(name):
  model, tokens = tiny(name)
  want = forward_nll(model, tokens)
  np.testing.assert_allclose(evaluation.decode_nll(model, tokens, DenseKVCache.create), want,
                             rtol=1e-4, atol=1e-4)


def test_compressed_caches_cost_perplexity_and_more_bits_cost_less():
  """More bits stay closer to the dense cache's per-token losses. (Not the net perplexity:
  on a tiny random model it nets signed per-token swings, and both widths happen to lower
  it; the distance per token is what the bits buy.)"""
  model, tokens = tiny()
  dense = np.asarray(evaluation.decode_nll(model, tokens, DenseKVCache.create))
  base = evaluation.perplexity(dense)
  distance, ppl = {}, {}
  for bits in (2, 4):
    make = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
        key_bits=bits, value_bits=bits, window=4, num_sinks=1))
    nll = evaluation.decode_nll(model, tokens, make)
    distance[bits] = float(np.mean(np.abs(np.asarray(nll) - dense)))
    ppl[bits] = evaluation.perplexity(nll)
  assert 0 < distance[4] < 0.5 * distance[2]
  assert ppl[2] != base


def test_variants_equal_separate_runs():
  model, tokens = tiny()
  makes = [functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
      key_bits=2, value_bits=2, window=4, num_sinks=1, seed=s)) for s in (0, 1)]
  both = evaluation.decode_nll_variants(model, tokens, makes)
  for i, make in enumerate(makes):
    np.testing.assert_allclose(both[i], evaluation.decode_nll(model, tokens, make),
                               rtol=2e-4, atol=2e-4)
  assert not np.allclose(both[0], both[1])


def test_bytes_per_token_leaves_out_rings():
  """A sliding-window layer's ring is a per-sequence constant, not a per-token cost."""
  from turboquant_jax.ring_cache import RingKVCache
  dense = DenseKVCache.create(1, 256, 2, 16, jnp.bfloat16)
  ring = RingKVCache.create(1, 256, 2, 16, jnp.bfloat16, window=32)
  per_dense = evaluation.bytes_per_token([dense])
  assert per_dense == 2 * 2 * 16 * 2                       # K and V, 2 heads, bf16
  assert evaluation.bytes_per_token([dense, ring]) == per_dense


def test_needle_passkey_depends_only_on_the_trial():
  keys = {(n, d): evaluation.needle_passkey(n, d) for n in (2048, 4096, 8192)
          for d in (0.1, 0.5, 0.9)}
  assert all(len(k) == 5 and k.isdigit() for k in keys.values())
  assert len(set(keys.values())) == len(keys)           # every trial its own passkey
  # Asked alone or after other trials, a trial's passkey is the same.
  assert evaluation.needle_passkey(8192, 0.5) == keys[8192, 0.5]


def test_needle_prompt_and_score():
  encode = lambda s: [ord(c) for c in s]  # noqa: E731
  filler = list(range(1000, 1500))
  prompt = evaluation.needle_prompt(encode, filler, 300, 0.5, "12345", bos=[7])
  assert len(prompt) == 300 and prompt[0] == 7
  text = "".join(chr(t) if t < 1000 else "#" for t in prompt[1:])
  assert text.endswith(evaluation.QUESTION)
  at = text.index("The secret passkey is 12345")
  fill = text.count("#")
  assert abs(text[:at].count("#") - 0.5 * fill) <= 1
  with pytest.raises(ValueError, match="depth"):
    evaluation.needle_prompt(encode, filler, 300, 1.5, "1")
  with pytest.raises(ValueError, match="filler"):
    evaluation.needle_prompt(encode, filler, 3000, 0.5, "1")
  assert evaluation.needle_score(" 12345. Remember", "12345") == 1.0
  assert evaluation.needle_score(" 1234 or 12345", "12345") == 0.0
  assert evaluation.needle_score(" is secret", "12345") == 0.0


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_prompt_kv_and_answer_match_the_exact_forward_and_generate(name):
  model, tokens = tiny(name)
  kv = evaluation.prompt_kv(model, tokens[:, :T - 1], chunk=16)  # 39 tokens: a ragged chunk
  qkv = evaluation.layer_qkv(model, tokens[:, :T - 1])
  for (k, v), (_, k_ref, v_ref) in zip(kv, qkv):
    np.testing.assert_allclose(k, k_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-5)
  got = evaluation.answer_from_kv(model, kv, tokens[:, -1], DenseKVCache.create, num_tokens=5)
  want, _ = generate(model, tokens, None, 5, DenseKVCache.create)
  np.testing.assert_array_equal(got, want)


def test_layer_fidelity_is_one_for_dense_and_below_one_compressed():
  model, tokens = tiny()
  qkv = evaluation.layer_qkv(model, tokens)
  dense = evaluation.layer_fidelity(model, qkv, DenseKVCache.create, num_queries=8)
  assert all(np.allclose(e["attn_cos"], 1.0, atol=1e-5) for e in dense)
  for make in (functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
      key_bits=3, value_bits=3, window=4, num_sinks=1)),
               functools.partial(UniformKVCache.create, config=UniformConfig.kivi(
                   4, window=4, num_sinks=1, group_size=8))):
    report = evaluation.layer_fidelity(model, qkv, make, num_queries=8)
    assert len(report) == TINY["llama"].num_layers
    for e in report:
      assert e["compressed_tokens"] == 2 * (T - 4 - 1)  # per row: all but window and sink
      assert 0.8 < min(e["key_cos"]) < 1.0 and 0.8 < min(e["value_cos"]) < 1.0
      assert 0.9 < min(e["attn_cos"]) < 1.0


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_hidden_states_times_unembedding_are_the_logits(name):
  model, tokens = tiny(name)
  cfg = TINY[name]
  logits, _ = forward(model, tokens)
  got = evaluation.final_hidden_states(model, tokens) @ evaluation.unembedding(model).T
  if cfg.final_soft_cap is not None:
    got = cfg.final_soft_cap * jnp.tanh(got / cfg.final_soft_cap)
  np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_readback_nll_with_no_cache_is_the_full_forward_nll(name):
  model, tokens = tiny(name)
  want = forward_nll(model, tokens)
  np.testing.assert_allclose(evaluation.readback_nll(model, tokens, None), want,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_readback_nll_is_the_decode_paths_nll(name):
  """One causal pass over read-back codes gives the token-by-token decode path's losses,
  per token, for one cache and for a cache per kv head; a different seed's codes do not."""
  model, tokens = tiny(name)
  config = TurboQuantConfig(key_bits=3, value_bits=2.5, window=8, num_sinks=2)
  make = lambda seed: functools.partial(  # noqa: E731
      TurboQuantKVCache.create, config=dataclasses.replace(config, seed=seed))
  want = np.asarray(evaluation.decode_nll(model, tokens, make(0)))
  got = evaluation.readback_nll(model, tokens, make(0))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  heads = TINY[name].num_kv_heads
  np.testing.assert_allclose(
      evaluation.readback_nll(model, tokens, (make(0),) * heads), want,
      rtol=2e-4, atol=2e-4)
  other = evaluation.readback_nll(model, tokens, make(1))
  assert np.max(np.abs(other - want)) > 1e-3


def test_readback_nll_refuses_caches_it_cannot_read_back():
  model, tokens = tiny()
  with pytest.raises(ValueError, match="TurboQuant caches"):
    evaluation.readback_nll(model, tokens, DenseKVCache.create)
  with pytest.raises(ValueError, match="one maker or one per kv head"):
    evaluation.readback_nll(model, tokens, (TurboQuantKVCache.create,) * 5)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    evaluation.readback_nll(model, tokens[0], None)
