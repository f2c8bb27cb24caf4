"""Hugging Face checkpoints the tests write themselves, loaded back."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from models import Decoder, DecoderConfig  # noqa: E402
from models.safetensors_loader import LAYER_NAMES, load_safetensors  # noqa: E402

from test_decoder import TINY  # noqa: E402


def to_hf_halves(w, heads):
  """llama.cpp permutes Q/K rows (interleaved RoPE); Hugging Face rotates halves. Undo it:
  rows (h, i, 2) -> (h, 2, i)."""
  out_dim = w.shape[0]
  return w.reshape(heads, out_dim // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_checkpoint(model, family, hf_config, directory, *, norm_offset, unpermute):
  cfg = model.cfg
  tensors = {"model.embed_tokens.weight": np.asarray(model.embed.embedding[...]),
             "model.norm.weight": np.asarray(model.final_norm.weight[...]) - norm_offset}
  for i, block in enumerate(model.layers):
    for name, (dotted, attr) in LAYER_NAMES[family].items():
      m = block
      for part in dotted.split("."):
        m = getattr(m, part)
      value = np.asarray(getattr(m, attr)[...])
      if attr == "kernel":
        value = value.T  # [in, out] -> [out, in]
        if unpermute and dotted in ("attn.q_proj", "attn.k_proj"):
          heads = cfg.num_heads if dotted == "attn.q_proj" else cfg.num_kv_heads
          value = to_hf_halves(value, heads)
      else:
        value = value - norm_offset
      tensors[f"model.layers.{i}.{name}"] = np.ascontiguousarray(value)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(hf_config, fh)


def hf_config(cfg, model_type, **extra):
  return {"model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "intermediate_size": cfg.ffn_dim, "rope_theta": cfg.rope_base,
          "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": True, **extra}


def test_llama_from_gguf_layout_to_hf_and_back(tmp_path):
  # A model in llama.cpp's layout (interleaved RoPE), written as a Hugging Face checkpoint
  # (halves), must give the same logits: this pins down the Q/K permutation.
  model = Decoder(TINY["llama"], rngs=nnx.Rngs(0))
  write_checkpoint(model, "llama", hf_config(model.cfg, "llama"), str(tmp_path),
                   norm_offset=0.0, unpermute=True)
  loaded = load_safetensors(str(tmp_path))
  assert not loaded.cfg.rope_interleaved
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, model.cfg.vocab_size)
  np.testing.assert_allclose(loaded(tokens)[0], model(tokens)[0], rtol=1e-4, atol=1e-4)


def test_gemma3_round_trip_with_the_plus_one_norms(tmp_path):
  # The source model holds 1 + w (GGUF's convention, offset 0); the checkpoint holds w.
  cfg = DecoderConfig(**{**TINY["gemma"].__dict__, "attn_soft_cap": None,
                         "final_soft_cap": None, "norm_offset": 0.0})
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  for block in model.layers:  # non-trivial norms, so a lost +1 shows
    block.input_norm.weight[...] = block.input_norm.weight[...] + 0.3
  extra = {"rope_local_base_freq": cfg.rope_base_local, "sliding_window": cfg.sliding_window,
           "sliding_window_pattern": cfg.global_every, "query_pre_attn_scalar": cfg.head_dim}
  write_checkpoint(model, "gemma3", hf_config(cfg, "gemma3_text", **extra), str(tmp_path),
                   norm_offset=1.0, unpermute=False)
  loaded = load_safetensors(str(tmp_path))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, cfg.vocab_size)
  np.testing.assert_allclose(loaded(tokens)[0], model(tokens)[0], rtol=1e-4, atol=1e-4)


def test_mismatched_checkpoint_is_refused(tmp_path):
  model = Decoder(TINY["llama"], rngs=nnx.Rngs(0))
  bad = hf_config(model.cfg, "llama")
  bad["intermediate_size"] = 80
  write_checkpoint(model, "llama", bad, str(tmp_path), norm_offset=0.0, unpermute=True)
  with pytest.raises(ValueError, match="checkpoint shape"):
    load_safetensors(str(tmp_path))
