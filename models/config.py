"""Static configuration of the decoders: one frozen dataclass, presets per model."""

from __future__ import annotations

import dataclasses

from turboquant_jax.rope import RopeSpec


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Llama- or Gemma-family decoder.

  Attributes:
    vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim, ffn_dim: sizes.
    rope_base: RoPE base of global layers; rope_base_local that of sliding-window layers.
    rope_interleaved: rotate pairs (2i, 2i+1) (llama.cpp's layout of Llama Q/K) instead
      of halves (i, i + head_dim/2) (Hugging Face's, and Gemma's in both).
    rms_eps: RMSNorm epsilon.
    norm_offset: RMSNorm scales by (offset + weight): Gemma's raw weights need 1, GGUF
      files already hold 1 + weight.
    activation: "silu" (SwiGLU, Llama) or "gelu_tanh" (GeGLU, Gemma).
    qk_norm: RMSNorm on q and k per head (Gemma 3).
    sandwich_norms: norms after attention and MLP too (Gemma 2/3).
    embed_scale: multiply embeddings by √d_model (Gemma).
    tie_embeddings: logits from the embedding matrix.
    sliding_window: window of local layers (None: all global).
    global_every: with a sliding window, layer i is global when (i + 1) % global_every == 0.
    query_scale: attention score scale (default head_dim**-0.5).
    attn_soft_cap, final_soft_cap: logit soft-caps (None: off).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_base: float = 10000.0
  rope_base_local: float | None = None
  rope_interleaved: bool = False
  rms_eps: float = 1e-5
  norm_offset: float = 0.0
  activation: str = "silu"
  qk_norm: bool = False
  sandwich_norms: bool = False
  embed_scale: bool = False
  tie_embeddings: bool = True
  sliding_window: int | None = None
  global_every: int = 1
  query_scale: float | None = None
  attn_soft_cap: float | None = None
  final_soft_cap: float | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {self.activation!r}")

  def is_local(self, layer: int) -> bool:
    return self.sliding_window is not None and (layer + 1) % self.global_every != 0

  def layer_window(self, layer: int) -> int | None:
    return self.sliding_window if self.is_local(layer) else None

  def layer_rope_base(self, layer: int) -> float:
    if self.is_local(layer) and self.rope_base_local is not None:
      return self.rope_base_local
    return self.rope_base

  def layer_rope(self, layer: int) -> RopeSpec:
    """The RoPE of a layer's queries and keys (Gemma's local layers have their own base)."""
    return RopeSpec(self.layer_rope_base(layer), self.rope_interleaved)

  @property
  def scale(self) -> float:
    return self.head_dim**-0.5 if self.query_scale is None else self.query_scale


def smollm2_135m(**overrides) -> DecoderConfig:
  """SmolLM2-135M (Llama architecture)."""
  return DecoderConfig(**{**dict(
      vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
      ffn_dim=1536, rope_base=100000.0, rms_eps=1e-5, activation="silu",
      tie_embeddings=True), **overrides})


def gemma3_270m(**overrides) -> DecoderConfig:
  """Gemma 3 270M: QK-norm, sandwich norms, 5 local (512) : 1 global layers, GeGLU."""
  return DecoderConfig(**{**dict(
      vocab_size=262144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1,
      head_dim=256, ffn_dim=2048, rope_base=1_000_000.0, rope_base_local=10000.0,
      rms_eps=1e-6, norm_offset=1.0, activation="gelu_tanh", qk_norm=True,
      sandwich_norms=True, embed_scale=True, tie_embeddings=True, sliding_window=512,
      global_every=6, query_scale=256**-0.5), **overrides})


def llama3_8b(**overrides) -> DecoderConfig:
  """Llama 3 8B's shapes: 32 layers, 32 q / 8 kv heads of 128, untied 128K vocabulary."""
  return DecoderConfig(**{**dict(
      vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
      head_dim=128, ffn_dim=14336, rope_base=500000.0, rms_eps=1e-5, activation="silu",
      tie_embeddings=False), **overrides})
