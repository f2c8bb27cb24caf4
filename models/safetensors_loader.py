"""Loading Hugging Face Llama / Gemma 3 checkpoint directories (config.json + safetensors).

An optional extra: `pip install safetensors` (the numpy API is all we use). Hugging Face
stores Linear weights as [out, in], rotates RoPE halves (no Q/K permutation), and keeps
Gemma's norm weights without the +1 (so `norm_offset=1`).
"""

from __future__ import annotations

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.checkpoint import assign_param
from models.config import DecoderConfig
from models.decoder import Decoder

# Hugging Face names per layer -> (module path, attribute), per family.
_COMMON = {
    "self_attn.q_proj.weight": ("attn.q_proj", "kernel"),
    "self_attn.k_proj.weight": ("attn.k_proj", "kernel"),
    "self_attn.v_proj.weight": ("attn.v_proj", "kernel"),
    "self_attn.o_proj.weight": ("attn.o_proj", "kernel"),
    "mlp.gate_proj.weight": ("mlp.gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp.up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp.down_proj", "kernel"),
    "input_layernorm.weight": ("input_norm", "weight"),
}
LAYER_NAMES = {
    "llama": {**_COMMON, "post_attention_layernorm.weight": ("pre_mlp_norm", "weight")},
    "gemma3": {**_COMMON,
               "post_attention_layernorm.weight": ("post_attn_norm", "weight"),
               "pre_feedforward_layernorm.weight": ("pre_mlp_norm", "weight"),
               "post_feedforward_layernorm.weight": ("post_mlp_norm", "weight"),
               "self_attn.q_norm.weight": ("attn.q_norm", "weight"),
               "self_attn.k_norm.weight": ("attn.k_norm", "weight")},
}


def config_from_hf(hf: dict) -> tuple[str, DecoderConfig]:
  kind = hf.get("model_type", "")
  text = hf.get("text_config", hf)
  heads = text["num_attention_heads"]
  common = dict(vocab_size=text["vocab_size"], d_model=text["hidden_size"],
                num_layers=text["num_hidden_layers"], num_heads=heads,
                num_kv_heads=text.get("num_key_value_heads", heads),
                head_dim=text.get("head_dim") or text["hidden_size"] // heads,
                ffn_dim=text["intermediate_size"], rope_base=text.get("rope_theta", 10000.0),
                rms_eps=text.get("rms_norm_eps", 1e-6),
                tie_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
  if kind == "llama":
    return "llama", DecoderConfig(**common, activation="silu")
  if kind.startswith("gemma3"):
    pattern = text.get("sliding_window_pattern", 6)
    return "gemma3", DecoderConfig(
        **common, rope_base_local=text.get("rope_local_base_freq", 10000.0), norm_offset=1.0,
        activation="gelu_tanh", qk_norm=True, sandwich_norms=True, embed_scale=True,
        sliding_window=text.get("sliding_window"), global_every=pattern,
        query_scale=text.get("query_pre_attn_scalar", common["head_dim"]) ** -0.5,
        attn_soft_cap=text.get("attn_logit_softcapping"),
        final_soft_cap=text.get("final_logit_softcapping"))
  raise ValueError(f"unsupported model_type {kind!r} (llama and gemma3 are)")


def load_safetensors(directory: str, param_dtype=jnp.float32) -> Decoder:
  """A `Decoder` from a Hugging Face directory (config.json and *.safetensors)."""
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError("loading safetensors needs `pip install safetensors`") from e
  with open(os.path.join(directory, "config.json")) as fh:
    family, cfg = config_from_hf(json.load(fh))
  weights = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    weights.update(load_file(path))
  if not weights:
    raise FileNotFoundError(f"no .safetensors file in {directory}")
  weights = {k.removeprefix("language_model."): v for k, v in weights.items()}
  model = Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)
  used = set()

  def take(name):
    used.add(name)
    return np.asarray(weights[name], np.float32)

  model.embed.embedding[...] = jnp.asarray(take("model.embed_tokens.weight"), param_dtype)
  model.final_norm.weight[...] = jnp.asarray(take("model.norm.weight"), param_dtype)
  if not cfg.tie_embeddings:
    assign_param(model, "lm_head", "kernel", take("lm_head.weight"), param_dtype)
  for i in range(cfg.num_layers):
    for name, (dotted, attr) in LAYER_NAMES[family].items():
      assign_param(model.layers[i], dotted, attr, take(f"model.layers.{i}.{name}"), param_dtype)
  unused = set(weights) - used - {"lm_head.weight"}
  if unused:
    raise ValueError(f"checkpoint tensors the model has no place for: {sorted(unused)[:5]}")
  return model
