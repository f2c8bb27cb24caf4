"""`TurboQuantKVCache`: the compressed twin of `DenseKVCache`.

Storage (head-major, preallocated for max_len, every code packed):
- Key and value codes for every token (when they are written: below): per channel
  group, bit-planes [B, H, max_len, d_g·w/8] uint8, a norm per vector [B, H, max_len]
  (float16 by default) and, for QJL keys, sign planes and residual norms.
- An exact window: the last `window` tokens in full precision, a ring [B, H, W, D] whose
  slots record the position they hold ([B, W]): after appends exactly the last W tokens.
- When codes are written: attention reads a token's codes only once it has left the
  window, so when the window holds at least a block (`code_block`: 128 tokens, or the
  tiles' length) a single-token append writes no codes; the step that completes a block
  codes it from the window at once, aligned (one step in 128 quantizes 128 tokens instead
  of every step quantizing one: on a GPU the per-step quantize, pack and scatter were a
  few dozen small kernels per layer). Other updates (prefill chunks, rewrites of earlier
  positions) code the pending tokens and their own at once, so after them every position
  has its codes. Codes of the pending tokens come from the window's copy (its dtype). A
  decode loop may defer that rare work of every layer to one conditional after the step
  (`deferring`, `flush`; `kv_cache.flush_caches`), or, in runs of up to `lazy_code_steps`
  appends in which no row calibrates, drop it and code the completed blocks after the run
  while the window still holds them (`skips_rare_work`, `code_completed`;
  `models.generate.lazy_greedy_scan`): no conditional per step.
- Attention sinks: the first `num_sinks` tokens in full precision, [B, H, S, D].
- Key centering: a per-(sequence, kv head) channel mean μ, kept in float32, of the keys a
  row holds when it first holds a window's worth of tokens (a long prefill, or the first
  `window` decoded tokens; sinks left out). Causal: until then every token is exact in
  the window and no code is read; at that moment the window is re-coded with μ, and μ
  never changes again. "plain": keys are coded as k - μ and q·μ is added back to every
  compressed score. "rope" (given the decoder's `RopeSpec`): μ is the mean of the keys
  turned back by their positions, R(t)ᵀ·k, a mean from before RoPE, fixed while the mean
  after RoPE turns with the position; the key at t is coded as k - R(t)·μ and q·R(t)·μ
  is added back. Either way compressed and exact keys share one softmax on the same
  footing.
- Fractional bits: the channels are ordered outliers first by a per-(sequence, kv head)
  permutation chosen at the same moment (`channel_split.outlier_permutation`).
- layout="tiles" (MSE keys): codes stored instead in the order the Mosaic GPU kernel loads
  them, tiles of 128 tokens or more (`tile_codes`; one tile buffer per channel group, so
  fractional widths too, though the kernel reads integer widths only so far); norms as
  above.

Which tokens attention reads where: positions [0, S) from the sinks, the trailing run of
positions the window holds exactly, and everything else from the codes, all in one
softmax. Scores come from the rotated query and the codes; values are summed in each
channel group's rotated domain and rotated back once per query.

Defaults follow `benchmarks/quality.py` on SmolLM2-135M and Gemma 3 270M (README):
MSE keys (QJL keys cost +16% perplexity at 3 bits: softmax amplifies their variance),
a 256-token window (better than 128 on both models over four texts: `WINDOW`), 4 sinks
and keys centred before RoPE (better than after RoPE in 7 of
8 comparisons on two models and two texts; 3.5 bits: -0.08% / +0.22% perplexity against
+0.60% / +0.46%); 3.5 bits for K and V (K4/V3 is better on one model and worse on the
other). A cache created without the decoder's `RopeSpec` centres after RoPE.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import tile_quantize
from turboquant_jax import attention
from turboquant_jax import channel_split
from turboquant_jax import exact_tokens
from turboquant_jax import kv_cache
from turboquant_jax import quantizers
from turboquant_jax import rope as rope_lib
from turboquant_jax import rotation as rotation_lib
from turboquant_jax import tile_codes
from turboquant_jax.channel_split import permute_channels, unpermute_channels
from turboquant_jax.quantizers import LEVELS, NORM_FITS, ProdCodes, check_norm_dtype

Array = jax.Array


# Recent tokens kept exact by default (`TurboQuantConfig.window`). 256 rather than 128: at
# 3.5 bits (Lloyd-Max, keys centred before RoPE; 3 seeds, GPL-3 5) the perplexity change
# over four texts went from mean +0.40% / worst +0.62% to +0.16% / +0.34% on SmolLM2-135M
# and from +0.82% / +1.71% to +0.57% / +0.69% on Gemma 3 270M (README), for 128 more
# exact tokens per head (64 KB at d = 128 in bf16, 3.4% of a 32K-token 3.5-bit cache).
WINDOW = 256


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig:
  """Static configuration of a `TurboQuantKVCache`.

  Attributes:
    key_bits, value_bits: bits per coordinate, one of 2, 2.5, 3, 3.5, 4, 5 (5: "mse"
      keys, planes layout).
    key_quantizer: "mse" (Algorithm 1) or "prod" (Algorithm 2, QJL residual) for keys;
      values always use "mse".
    window: recent tokens kept exact (0 for none); None (the default): `WINDOW` (256), or
      two tiles where tiles are longer than 128 tokens. A window of
      at least a block lets decode steps leave their codes to the step completing the
      block (`defers_codes`); a shorter one re-quantizes and re-packs a whole tile every
      step (H200, Llama-3-8B shapes 8x32K, 3.5 bits: 0.75x bf16 tokens/s with 128 tokens,
      README). Two blocks let a decode loop code them lazily, with no conditional per step
      (`lazy_code_steps`; H200, SmolLM2-135M shapes, 256-token tiles, 1 x 4K: 0.77x bf16
      tokens/s with 512 tokens against 0.56x with 256 side by side). The
      longer window costs memory: a per-sequence constant (SmolLM2 at 3.5 bits: +20% at
      4K tokens, +3% at 32K), the cache's `memory_report` counts it.
    calibration_tokens: tokens a row holds when it chooses its key mean and channel orders
      (at most the window); None (the default): the window's length.
    num_sinks: first tokens kept exact (0 for none).
    center_keys: subtract a per-head channel mean from keys before quantizing: "rope" (the
      mean before RoPE, turned to each key's position; needs the decoder's `RopeSpec`,
      without one it centres as "plain"), "plain" or True (the mean after RoPE), False.
    rotation: "haar" or "hadamard".
    norm_dtype: storage dtype of the per-vector norms (`quantizers.NORM_DTYPES`; the
      Mosaic kernel reads float16), or a (keys, values) pair: a key norm's error scales
      its whole logit while value norms' errors average out (SmolLM2's code text, 3.5
      bits: float8_e4m3fn norms on both sides +0.43% perplexity, float16 key norms with
      float8 value norms +0.04%, README).
    seed: rotations and sketches come from PRNGKey(seed) folded with the layer index.
    levels: "lloyd_max", "quintic", "cubic", "int8" or "uniform" reconstruction levels
      (`MSEQuantizer.create`), or a (keys, values) pair; the polynomials are what the
      Mosaic GPU kernel's fp16 path decodes without a table (quintic: Lloyd-Max's D_mse
      within 0.16%), "int8" Lloyd-Max on an int8 grid (within 0.1%) what its int8 path
      looks up (`tile_operand`), "uniform" (evenly spaced, D_mse +18-21% at 4 bits) what
      it decodes at 4 bits without a lookup: ("uniform", "int8") with 4-bit keys, H200
      Llama-3-8B shapes 8 x 32K, the kernel 90 -> 79 us, the decode step 1.49x -> 1.54x
      bf16 (`kernel_sweep_llama3_8b_k4uv3_int8_prerotated_gpu.json`, README).
    center_values: subtract a per-head channel mean from values before quantizing (chosen
      with the key mean) and add it back to the compressed tokens' share of the output
      (off: at 3.5 bits it helped SmolLM2 and hurt Gemma 3 on the Debian manual, README).
    layout: "planes" (bit-planes per token, read by the Triton kernel and the reference)
      or "tiles" (`tile_codes`: the Mosaic GPU kernel's order; MSE keys; the reference
      reads it too).
    append_kernel: write the tiles of appended runs that start on a tile boundary (a
      prefill chunk, a deferred block) through the fused Pallas append kernel
      (`pallas_kernels.tile_quantize`: the same codes as jnp's up to float rounding at
      level boundaries); None (the default): on GPUs, where the codes allow it
      (`append_kernel_unsupported`), for writes of at least `FUSED_APPEND_TOKENS` tokens
      over the batch (where it measured faster); True: every aligned run, also on the
      CPU in interpret mode (bit-exact with jnp there; slow: for tests); False: never.
    tile_operand: what the Mosaic kernel decodes the tiles into: "fp16" (`register_codes`
      tiles, levels a polynomial: levels="cubic" or "quintic") or "int8" (`byte_codes`
      tiles looked up by byte permutes into int8 tensor-core operands: head_dim 128, both
      widths integer or both fractional, levels="int8", the jnp writer; H200, 8 x 32K,
      3 bits centred after RoPE: attention 0.129 ms against the fp16 path's 0.150, decode
      step 1.30x bf16; at 3.5 bits slower than fp16 quintic, 0.314 against 0.241 ms,
      README).
    values_prerotated: values arrive already rotated, because the decoder folded the
      value quantizer's rotation into its value and output projections (`value_rotation`
      gives the matrix; `models.decoder.fold_value_rotations` folds it): the cache
      quantizes values as they come and attention returns its output in that rotated
      domain, so no decode step pays the inverse rotation (a [D, D] product per layer
      after the kernel). Integer value_bits only: fractional widths order each row's
      channels from its data, which no weight can hold.
    norm_fit: what a stored norm is (`MSEQuantizer.create(norm_fit=)`), one or a (keys,
      values) pair: "exact" (the paper's ‖x‖), "projected" (‖x‖ over the codes'
      projection on x: a key's logits keep their scale instead of shrinking by 1 - D_mse)
      or "matched" (the reconstruction keeps x's norm). None (the default): projected
      keys (exact for QJL keys, whose sketch keeps them unbiased) and projected values:
      attention averages the values' errors across tokens, so their noise shrinks in the
      output and a shrinkage bias does not (SmolLM2's key-weighted 3.5 bits, Python
      source: exact norms +0.54%, matched values +0.41% at 8 seeds; projected against
      matched values over 16 seeds +0.28% against +0.36%, lower on 13 of 16; README).
      Free: only the stored number changes, every reader (and the fused append kernel,
      which writes it) takes it as is.
  """

  key_bits: float = 3.5
  value_bits: float = 3.5
  key_quantizer: str = "mse"
  window: int | None = None
  num_sinks: int = 4
  center_keys: bool | str = "rope"
  rotation: str = "haar"
  norm_dtype: Any = jnp.float16
  seed: int = 0
  levels: Any = "lloyd_max"
  layout: str = "planes"
  center_values: bool = False
  append_kernel: bool | None = None
  tile_operand: str = "fp16"
  calibration_tokens: int | None = None
  values_prerotated: bool = False
  norm_fit: Any = None

  @property
  def norm_dtypes(self) -> tuple[Any, Any]:
    """(keys', values') norm storage dtypes (`norm_dtype`, one or a pair)."""
    if isinstance(self.norm_dtype, (tuple, list)):
      if len(self.norm_dtype) != 2:
        raise ValueError(f"norm_dtype must be a dtype or a (keys, values) pair, got "
                         f"{self.norm_dtype!r}")
      return tuple(self.norm_dtype)
    return self.norm_dtype, self.norm_dtype

  @property
  def norm_fits(self) -> tuple[str, str]:
    """(keys', values') `norm_fit` (one or a pair; None: projected MSE keys, exact QJL
    keys, projected values)."""
    if self.norm_fit is None:
      return ("projected" if self.key_quantizer == "mse" else "exact"), "projected"
    if isinstance(self.norm_fit, tuple):
      return self.norm_fit
    return self.norm_fit, self.norm_fit

  @property
  def levels_pair(self) -> tuple[str, str]:
    """(keys', values') levels (`levels`, one or a pair)."""
    if isinstance(self.levels, tuple):
      return self.levels
    return self.levels, self.levels

  def __post_init__(self):
    for name in ("key_bits", "value_bits"):
      if getattr(self, name) not in channel_split.CACHE_BITS:
        raise ValueError(f"{name} must be one of {channel_split.CACHE_BITS}, "
                         f"got {getattr(self, name)!r}")
    if self.center_keys not in (True, False, "plain", "rope"):
      raise ValueError(f"center_keys must be 'rope', 'plain', True or False, "
                       f"got {self.center_keys!r}")
    if isinstance(self.levels, list):   # a static field: hashable
      object.__setattr__(self, "levels", tuple(self.levels))
    if isinstance(self.levels, tuple) and len(self.levels) != 2:
      raise ValueError(f"levels must be one of {LEVELS} or a (keys, values) pair, got "
                       f"{self.levels!r}")
    for lv in self.levels_pair:
      if lv not in LEVELS:
        raise ValueError(f"levels must be one of {LEVELS} (or a pair), got {self.levels!r}")
    if isinstance(self.norm_fit, list):   # a static field: hashable
      object.__setattr__(self, "norm_fit", tuple(self.norm_fit))
    if (isinstance(self.norm_fit, tuple) and len(self.norm_fit) != 2) or any(
        f not in NORM_FITS for f in self.norm_fits):
      raise ValueError(f"norm_fit must be one of {NORM_FITS} or a (keys, values) pair, "
                       f"got {self.norm_fit!r}")
    if self.key_quantizer == "prod" and self.norm_fits[0] != "exact":
      raise ValueError("norm_fit for keys is for MSE keys (key_quantizer='mse'), got "
                       f"{self.norm_fit!r} with QJL keys")
    if isinstance(self.norm_dtype, list):   # a static field: hashable
      object.__setattr__(self, "norm_dtype", tuple(self.norm_dtype))
    for dtype in self.norm_dtypes:
      check_norm_dtype(dtype)
    if self.layout not in ("planes", "tiles"):
      raise ValueError(f"layout must be 'planes' or 'tiles', got {self.layout!r}")
    if self.layout == "tiles" and self.key_quantizer != "mse":
      raise ValueError(f"layout='tiles' needs MSE keys, got {self.key_quantizer!r}")
    # 5 bits: planes of 4 and 1 bits, MSE codes with float levels only.
    wide = [f"{n}={getattr(self, n)}" for n in ("key_bits", "value_bits")
            if getattr(self, n) > 4]
    if wide and self.layout == "tiles":
      raise ValueError(f"layout='tiles' serves 2-4 bits per side, got {', '.join(wide)}")
    for n, lv in zip(("key_bits", "value_bits"), self.levels_pair):
      if lv in ("int8", "uniform") and getattr(self, n) > 4:
        raise ValueError(f"levels={lv!r} serves 1-4 bits, got {n}={getattr(self, n)}")
    if self.key_bits > 4 and self.key_quantizer == "prod":
      raise ValueError(f"key_quantizer='prod' serves up to 4 bits, got key_bits="
                       f"{self.key_bits}")
    if self.append_kernel not in (None, True, False):
      raise ValueError(f"append_kernel must be None, True or False, got "
                       f"{self.append_kernel!r}")
    if self.append_kernel and self.layout != "tiles":
      raise ValueError("append_kernel=True writes the tiles layout; set layout='tiles'")
    if self.tile_operand not in tile_codes.OPERANDS:
      raise ValueError(f"tile_operand must be one of {tile_codes.OPERANDS}, got "
                       f"{self.tile_operand!r}")
    if self.tile_operand == "int8":
      widths = (self.key_bits, self.value_bits)
      # An int8 table holds Lloyd-Max's levels ("int8"), and evenly spaced ones at 4 bits.
      levels_ok = all(lv == "int8" or (lv == "uniform" and b == 4)
                      for lv, b in zip(self.levels_pair, widths))
      if (self.layout != "tiles" or not levels_ok
          or len({float(b).is_integer() for b in widths}) > 1):
        raise ValueError("tile_operand='int8' takes layout='tiles', levels 'int8' (or "
                         "'uniform' on a 4-bit side) and both widths integer or both "
                         f"fractional (one tile length), got layout={self.layout!r}, "
                         f"levels={self.levels!r}, widths {widths}")
    if self.key_quantizer not in ("mse", "prod"):
      raise ValueError(f"key_quantizer must be 'mse' or 'prod', got {self.key_quantizer!r}")
    for name in ("window", "num_sinks", "calibration_tokens"):
      value = getattr(self, name)
      if name != "num_sinks" and value is None:
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if self.values_prerotated not in (True, False):
      raise ValueError(f"values_prerotated must be a bool, got {self.values_prerotated!r}")
    if self.values_prerotated and not float(self.value_bits).is_integer():
      raise ValueError("values_prerotated takes integer value_bits (one channel group, "
                       f"one rotation to fold), got value_bits={self.value_bits}")
    if self.calibration_tokens is not None and not (
        1 <= self.calibration_tokens <= (WINDOW if self.window is None else self.window)):
      raise ValueError(f"calibration_tokens must lie in [1, window]: tokens leave the window "
                       f"for their codes only after calibration; got "
                       f"{self.calibration_tokens} for window {self.window}")


def _quantizers(config: TurboQuantConfig, layer: int, head_dim: int
                ) -> tuple[channel_split.SplitQuantizer, channel_split.SplitQuantizer]:
  """(key, value) quantizers of a layer's cache, from PRNGKey(config.seed) and the layer;
  the value quantizer rotates values itself (values_prerotated aside)."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), layer)
  k_key, v_key = jax.random.split(key)
  make = lambda k, bits, kind, norms, levels, **kw: channel_split.SplitQuantizer.create(  # noqa: E731
      k, head_dim, bits, kind, rotation=config.rotation, norm_dtype=norms, levels=levels, **kw)
  key_norms, value_norms = config.norm_dtypes
  key_levels, value_levels = config.levels_pair
  key_fit, value_fit = config.norm_fits
  # The int8 Mosaic kernel rotates the query itself against U in float16 (kept, not cast
  # per call).
  return (make(k_key, config.key_bits, config.key_quantizer, key_norms, key_levels,
               float16_blocks=config.tile_operand == "int8", norm_fit=key_fit),
          make(v_key, config.value_bits, "mse", value_norms, value_levels,
               norm_fit=value_fit))


def value_rotation(config: TurboQuantConfig, layer: int, head_dim: int) -> Array:
  """float32 [head_dim, head_dim], Π: the rotation a layer's cache applies to each value v
  (Π·v) before quantizing it. A decoder that folds Π into its projections (Π·v from the
  value projection, Πᵀ before the output projection) and runs caches with
  values_prerotated=True computes the same attention with the same quantization, less
  one inverse rotation per decode step. Integer value_bits (one rotation)."""
  if not float(config.value_bits).is_integer():
    raise ValueError(f"one value rotation needs integer value_bits, got {config.value_bits}")
  return _quantizers(config, layer, head_dim)[1].groups[0].rotation.as_matrix()


def _empty_codes(quantizer: channel_split.SplitQuantizer, lead: tuple[int, ...],
                 tiles: int | None = None, values: bool = False,
                 operand: str = "fp16") -> Any:
  """Zeroed code buffers of the right shapes, without quantizing anything; `tiles`:
  tokens per tile of the tiles layout (None: bit-planes), `operand` their decode."""
  if tiles is not None:
    return tuple(tile_codes.empty(
        lead, tile_codes.TileLayout(g.bits, g.dim, tiles, values, operand,
                                    tile_codes.plain_nibbles(operand, g.bits, g.levels)),
        g.norm_dtype)
        for g in quantizer.groups)
  shapes = jax.eval_shape(quantizer.quantize,
                          jax.ShapeDtypeStruct((*lead, quantizer.dim), jnp.float32))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# The append kernel's default use: writes of at least this many tokens over the batch.
# H200, Llama-3-8B shapes, one layer (`append_prefill_gpu.json`): 8 x 4096 tokens 1.61x
# (3 bits) and 1.79x (3.5) the jnp writer's speed, 1 x 4096 1.06x and 0.95x (the writes
# around the kernel cost about what it saves there).
FUSED_APPEND_TOKENS = 32768


def append_kernel_unsupported(quantizer: channel_split.SplitQuantizer,
                              codes: tuple[Any, ...]) -> str | None:
  """Why the fused append kernel (`pallas_kernels.tile_quantize`) cannot write these
  codes (None: it can)."""
  if not (codes and isinstance(codes[0], tile_codes.TileCodes)):
    return "it writes the tiles layout only"
  if codes[0].layout.operand != "fp16":
    return "it packs register_codes (fp16) tiles, not int8 byte tiles"
  for g, c in zip(quantizer.groups, codes):
    if not isinstance(g.rotation, rotation_lib.HaarRotation):
      return "it takes dense (Haar) rotations"
    why = tile_quantize.unsupported(c.layout.spec, g.dim)
    if why is not None:
      return why
  return None


def _write_tiles_fused(quantizer: channel_split.SplitQuantizer, codes: tuple[Any, ...],
                       x: Array, start: Array, count: Array) -> tuple[Any, ...]:
  """`_write_codes` for runs that start on a tile boundary, through the append kernel."""
  b, h, t, _ = x.shape
  tt = codes[0].layout.tokens
  pad = -t % tt
  interpret = jax.default_backend() == "cpu"
  out = []
  for g, c, part in zip(quantizer.groups, codes, quantizer._split(x)):
    part = jnp.pad(part, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else part
    words, norms = tile_quantize.quantize_tiles(
        part.reshape(b * h, t + pad, g.dim), g.rotation.matrix.T, g.boundaries,
        bits=g.bits, tokens=tt, transposed=c.layout.transposed, interpret=interpret,
        # Interpret mode computes as the jnp writer does; on the GPU float32 products run
        # on the tensor cores (codes differ from jnp's only at boundary ties).
        precision="highest" if interpret else "tf32x3", num_warps=8,
        centroids=g.centroids, norm_fit=g.norm_fit)
    words = words.reshape(b, h, *words.shape[1:])
    norms = quantizers.store_norms(norms.reshape(b, h, t + pad), g.norm_dtype)
    out.append(tile_codes.write_tiles(c, words, norms, start, count))
  return tuple(out)


def _write_codes(quantizer: channel_split.SplitQuantizer, codes: tuple[Any, ...], x: Array,
                 indices: Array, start: Array, count: Array, fused: bool = False
                 ) -> tuple[Any, ...]:
  """Codes of x [B, H, T, d] (channels in the quantizer's order) written at `indices`
  [B, T] (bit-planes; out of range: dropped) or, for tiles, as the run of `count` [B]
  tokens from `start` [B] (the same positions). `fused`: runs that start on a tile
  boundary in every row go through the append kernel (the same codes), others through
  jnp."""
  unfused = lambda: _apply_codes(codes, _new_codes(quantizer, codes, x), indices,  # noqa: E731
                                 start, count)
  if not fused or not (codes and isinstance(codes[0], tile_codes.TileCodes)):
    return unfused()
  tt, length = codes[0].layout.tokens, codes[0].norms.shape[-1]
  span = -(-x.shape[2] // tt) * tt
  aligned = jnp.all((count == 0) | ((start % tt == 0) & (start + span <= length)))
  return jax.lax.cond(aligned, lambda: _write_tiles_fused(quantizer, codes, x, start, count),
                      unfused)


def _new_codes(quantizer: channel_split.SplitQuantizer, codes: tuple[Any, ...], x: Array
               ) -> Any:
  """What `_write_codes` writes for x [B, H, T, d] (no fused kernel): per channel group
  (levels, norms) for tiles, the quantizer's codes for bit-planes. codes: the buffers they
  go into (only their layout is read)."""
  if codes and isinstance(codes[0], tile_codes.TileCodes):
    return tuple(g.quantize_levels(part) for g, part in zip(quantizer.groups,
                                                              quantizer._split(x)))
  return quantizer.quantize(x)


def _apply_codes(codes: tuple[Any, ...], new: Any, indices: Array, start: Array,
                 count: Array) -> tuple[Any, ...]:
  """`_new_codes` written into codes (as `_write_codes` places them)."""
  if codes and isinstance(codes[0], tile_codes.TileCodes):
    return tuple(tile_codes.write_run(c, levels, norms, start, count)
                 for c, (levels, norms) in zip(codes, new))
  return jax.tree.map(lambda buf, n: kv_cache.scatter_tokens(buf, n, indices), codes, new)


@flax.struct.dataclass
class TurboQuantKVCache(kv_cache.HeadMajorShape):
  """Compressed KV cache; see the module docstring for the layout.

  Attributes:
    key_quantizer, value_quantizer: `SplitQuantizer`s (rotations, sketches, codebooks).
    key_codes, value_codes: one codes pytree per channel group, leaves [B, H, L, ...]
      (`tile_codes.TileCodes` in the tiles layout).
    window_keys, window_values: [B, H, W, D], the most recent tokens, exact.
    window_positions: [B, W] int32, the position each ring slot holds (-1: empty).
    sink_keys, sink_values: [B, H, S, D], the first tokens, exact.
    key_mean: [B, H, D] float32 centering mean, or None.
    value_mean: [B, H, D] float32 value centering mean, or None.
    key_perm, value_perm: [B, H, D] int32 outliers-first channel orders, or None.
    calibrated: [B] bool, whether the row's mean and permutations are set.
    lengths: [B] int32. overflowed: [B] bool (see `kv_cache`).
    config: the `TurboQuantConfig` (static).
    rope: the decoder's `RopeSpec` when keys are centred before RoPE, else None (static).
    defer: whether single-token appends leave their rare work (calibration, the codes of a
      completed block) to `flush` (static; `deferring`, `kv_cache.flush_caches`).
    pending: that work's inputs after such an append (`PendingWork`), else None.
    sinks_held: every row holds its sinks and appends go past them (static; `holding_sinks`):
      appends write no sinks.
  """

  key_quantizer: channel_split.SplitQuantizer
  value_quantizer: channel_split.SplitQuantizer
  key_codes: tuple[Any, ...]
  value_codes: tuple[Any, ...]
  window_keys: Array
  window_values: Array
  window_positions: Array
  sink_keys: Array
  sink_values: Array
  key_mean: Array | None
  value_mean: Array | None
  key_perm: Array | None
  value_perm: Array | None
  calibrated: Array
  lengths: Array
  overflowed: Array
  config: TurboQuantConfig = flax.struct.field(pytree_node=False)
  rope: rope_lib.RopeSpec | None = flax.struct.field(pytree_node=False, default=None)
  defer: bool = flax.struct.field(pytree_node=False, default=False)
  pending: PendingWork | None = None
  sinks_held: bool = flax.struct.field(pytree_node=False, default=False)

  _shape_buffer = "window_keys"   # [B, H, W, D], present even when W = 0

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, config: TurboQuantConfig = TurboQuantConfig(),
             layer: int = 0, rope: rope_lib.RopeSpec | None = None) -> "TurboQuantKVCache":
    """An empty cache. `dtype` is that of the exact parts (window, sinks): fp32 or bf16.
    `rope` is the layer's RoPE (decoders pass it), used by center_keys="rope"."""
    kv_cache._check_dims(batch, max_len, num_kv_heads, head_dim)
    kq, vq = _quantizers(config, layer, head_dim)
    if config.values_prerotated:   # values come as Π·v: the identity rotates no further
      eye = rotation_lib.HaarRotation(jnp.eye(head_dim, dtype=jnp.float32))
      vq = vq.replace(groups=(vq.groups[0].replace(rotation=eye),))
    lead = (batch, num_kv_heads, max_len)
    tiles = None
    if config.layout == "tiles":
      tiles = tile_codes.tile_tokens(tuple((g.dim, g.bits) for g in kq.groups + vq.groups))
    window = config.window
    if window is None:
      window = max(WINDOW, 2 * tiles if tiles and tiles > tile_codes.TILE_TOKENS else 0)
    # A ring longer than the cache, or sinks past its end, would only cost memory.
    config = dataclasses.replace(config, window=min(window, max_len),
                                 num_sinks=min(config.num_sinks, max_len))
    w, s = config.window, config.num_sinks
    exact = lambda n: jnp.zeros((batch, num_kv_heads, n, head_dim), dtype)  # noqa: E731
    # A fresh array per field: one buffer shared by two fields cannot be donated.
    identity = lambda: jnp.tile(jnp.arange(head_dim, dtype=jnp.int32),  # noqa: E731
                                (batch, num_kv_heads, 1))
    cache = cls(
        key_quantizer=kq, value_quantizer=vq,
        key_codes=_empty_codes(kq, lead, tiles, operand=config.tile_operand),
        value_codes=_empty_codes(vq, lead, tiles, values=True, operand=config.tile_operand),
        window_keys=exact(w), window_values=exact(w),
        window_positions=jnp.full((batch, w), -1, jnp.int32),
        sink_keys=exact(s), sink_values=exact(s),
        key_mean=(jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32)
                  if config.center_keys else None),
        value_mean=(jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32)
                    if config.center_values else None),
        key_perm=identity() if kq.is_split else None,
        value_perm=identity() if vq.is_split else None,
        calibrated=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        overflowed=jnp.zeros((batch,), bool),
        config=config,
        rope=rope if config.center_keys == "rope" else None,
    )
    if config.append_kernel:
      for q, c in ((kq, cache.key_codes), (vq, cache.value_codes)):
        why = append_kernel_unsupported(q, c)
        if why is not None:
          raise ValueError(f"append_kernel=True cannot write this cache: {why}")
    return cache

  @property
  def max_len(self) -> int:
    c = self.key_codes[0]
    return (c.norms if isinstance(c, tile_codes.TileCodes) else jax.tree.leaves(c)[0]).shape[2]

  def code_planes(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(key codes, value codes) as bit-plane codes whatever the layout: what the jnp
    reference paths read (the tiles layout is unpacked, a copy)."""
    planes = lambda codes: tuple(  # noqa: E731
        tile_codes.to_planes(c) if isinstance(c, tile_codes.TileCodes) else c for c in codes)
    return planes(self.key_codes), planes(self.value_codes)

  def key_offsets(self, key_mean: Array, positions: Array) -> Array:
    """What centering took from the key at each position: [B, H, T, D] float32 for
    positions [B, T] (μ everywhere, or R(t)·μ when centred before RoPE)."""
    mean = key_mean[:, :, None, :]
    if self.rope is None:
      return jnp.broadcast_to(mean, (*mean.shape[:2], positions.shape[1], mean.shape[3]))
    return rope_lib.rotate_split(mean, positions[:, None, :], self.rope, self.rope_split)

  # -- writing ---------------------------------------------------------------------------

  def update(self, k: Array, v: Array, positions: Array | None = None,
             num_tokens: Array | None = None) -> "TurboQuantKVCache":
    """Appends k, v ([B, T, Hkv, D]); see `kv_cache` for positions and num_tokens."""
    kv_cache.check_update(k, v, self.batch, self.num_kv_heads, self.head_dim)
    if self.pending is not None:
      raise ValueError("this cache holds the deferred work of its last append: flush() it "
                       "before the next update (kv_cache.flush_caches)")
    plan = kv_cache.plan_update(self.lengths, self.max_len, k.shape[1], positions, num_tokens)
    return _update(self, k, v, plan, defer=self.defer)

  def deferring(self) -> "TurboQuantKVCache":
    """This cache with single-token appends deferring their rare work to `flush`.

    Calibration and the codes of a completed block (or of a rewritten position, the last
    token after its update) touch only tokens still in the window, which attention reads
    exactly, so they can wait until after the step's attention; sinks are still written at
    once. Every update must be flushed before the next one. A decode step then holds one
    conditional for all layers (`kv_cache.flush_caches`) instead of one per layer. On a
    GPU each conditional is a CUDA-graph node the next kernels wait for (H200, Llama-3-8B
    shapes, 8 x 32K, K4/V3 int8: 16-33 µs per layer; one after the layers about 340 µs
    with the loop's own step), and the step went from 10.44 to 9.96 ms (README)."""
    return self.replace(defer=True)

  def holding_sinks(self, held: bool = True) -> "TurboQuantKVCache":
    """This cache with its appends known (by the caller, e.g. from the host's copy of the
    lengths) to fall past the sinks in every row, so they write none: a decode step then
    drops the sinks' two scatters per layer (on an H200 each is a kernel of the step's CUDA
    graph, ~2 us at batch 1). held=False undoes it. It is the caller's promise: an append
    at a sink position under it is not written to the sinks."""
    return self.replace(sinks_held=held)

  @property
  def flush_due(self) -> Array:
    """[] bool: whether `flush` has work to do (False without pending work)."""
    if self.pending is None:
      return jnp.zeros((), bool)
    return jnp.any(self.pending.first | self.pending.due)

  def flush(self) -> "TurboQuantKVCache":
    """Does the pending work of the last deferred append (every row, masked: call it under
    a conditional on `flush_due`) and stops deferring; the cache then equals the one the
    append would have built without deferring."""
    if self.pending is None:
      return self.skip_flush()
    return self._flushed(_pending_work(self))

  def _flushed(self, fields: dict[str, Any]) -> "TurboQuantKVCache":
    """This cache with its pending work's results (`_RARE_FIELDS`) in, deferring no more."""
    return self.replace(**fields, calibrated=self.calibrated | self.pending.first,
                        pending=None, defer=False)

  def skip_flush(self) -> "TurboQuantKVCache":
    """`flush` where `flush_due` is False: drops the (empty) pending work."""
    return self.replace(pending=None, defer=False)

  @staticmethod
  def flush_together(caches: Sequence["TurboQuantKVCache"]) -> list["TurboQuantKVCache"]:
    """`flush` of caches of one structure (a decoder's layers) with one vmapped copy of
    the work for all (`kv_cache.flush_caches` groups them): the same caches as flushing
    each, one copy of the rare work to compile instead of one per layer."""
    return _flush_together(caches)

  @property
  def lazy_code_steps(self) -> int:
    """Single-token appends after which a completed block still needs no codes: the window
    keeps it exact until its first token leaves, window - code_block appends later (and at
    most one block completes in code_block appends). 0 where codes cannot wait."""
    if not self.defers_codes:
      return 0
    return min(self.config.window - self.code_block, self.code_block)

  def skips_rare_work(self, num_steps: int) -> Array:
    """[] bool: whether the next num_steps single-token appends, each at its row's length,
    need no rare work but the codes of completed blocks: no row calibrates among them
    (every row is calibrated, or still short of `calibration_length` after them). Then a
    decode loop may append them with the work dropped (`deferring` + `skip_flush`) and code
    the completed blocks after every lazy_code_steps of them (`code_completed`)."""
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return jnp.all(self.calibrated | (self.lengths + num_steps < self.calibration_length))

  def lazy_constants(self, *, codes: bool, lengths: np.ndarray | None = None
                     ) -> tuple[str, ...]:
    """Fields that appends under `skips_rare_work` (no row calibrates) leave as they are:
    the quantizers and the calibration (means, channel orders, flags); the sinks too when
    every row already holds them (`lengths` [B], the rows' lengths as the host knows them),
    and the codes when no block is coded (codes=False). A decode loop passes them to its
    jitted call undonated and gets back only the other fields: at 30 layers an output
    buffer less per field and layer, each of which costs the call's dispatch."""
    fields = ["key_quantizer", "value_quantizer", "key_mean", "value_mean", "key_perm",
              "value_perm", "calibrated"]
    if lengths is not None and np.min(lengths) >= self.config.num_sinks:
      fields += ["sink_keys", "sink_values"]
    if not codes:
      fields += ["key_codes", "value_codes"]
    return tuple(fields)

  def completed_since(self, since: Array) -> Array:
    """[] bool: whether appends since lengths `since` [B] completed a block in some row."""
    n = self.code_block
    return jnp.any(self.lengths - self.lengths % n > since - since % n)

  def code_completed(self, since: Array) -> "TurboQuantKVCache":
    """Codes the block that single-token appends since lengths `since` [B] completed, from
    the window (no code otherwise): what their dropped rare work would have written, when
    `skips_rare_work` held for them and they were at most lazy_code_steps."""
    n = self.code_block
    start = jnp.maximum(since - since % n, self.exact_window_start())
    count = jnp.clip(self.lengths - self.lengths % n - start, 0, n)
    centring = (self.key_mean, self.value_mean, self.key_perm, self.value_perm)
    key_codes, value_codes = self._code_from_window(
        self.key_codes, self.value_codes, self.window_keys, self.window_values, start, count,
        centring)
    return self.replace(key_codes=key_codes, value_codes=value_codes)

  @property
  def code_block(self) -> int:
    """Tokens a decode step codes together: the tiles' length, or 128 for bit-planes."""
    c = self.key_codes[0]
    return c.layout.tokens if isinstance(c, tile_codes.TileCodes) else tile_codes.TILE_TOKENS

  @property
  def rope_split(self) -> int:
    """The period at which centering before RoPE splits positions (`rope.rotate_split`):
    the tiles' length (the Mosaic kernel's step: one angle per step), else `rope.SPLIT`
    (the Triton kernel's blocks divide it)."""
    return self.code_block if self.config.layout == "tiles" else rope_lib.SPLIT

  @property
  def fused_append(self) -> bool:
    """Whether tile-aligned runs may be coded by the fused append kernel (`append_kernel`;
    by default only runs of at least `FUSED_APPEND_TOKENS` tokens over the batch)."""
    if self.config.append_kernel is False:
      return False
    ok = all(append_kernel_unsupported(q, c) is None for q, c in (
        (self.key_quantizer, self.key_codes), (self.value_quantizer, self.value_codes)))
    if self.config.append_kernel:
      return ok
    return ok and jax.default_backend() == "gpu"

  def _fused_for(self, tokens: int) -> bool:
    """`fused_append` for a write of `tokens` tokens per row (static)."""
    if not self.fused_append:
      return False
    return bool(self.config.append_kernel) or self.batch * tokens >= FUSED_APPEND_TOKENS

  @property
  def defers_codes(self) -> bool:
    """Whether single-token appends leave their codes to the step that completes a block
    (the window must hold a whole block)."""
    return self.config.window >= self.code_block

  @property
  def calibration_length(self) -> int:
    """Tokens a row holds when it chooses its key mean and channel orders: the window's
    length, or `calibration_tokens`."""
    if self.config.calibration_tokens is not None:
      return min(self.config.calibration_tokens, max(self.config.window, 1))
    return max(self.config.window, 1)

  def _update(self, k: Array, v: Array, plan: kv_cache.UpdatePlan, defer: bool = False
              ) -> "TurboQuantKVCache":
    t = k.shape[1]
    kh = kv_cache.to_head_major(k)
    vh = kv_cache.to_head_major(v)
    valid = (jnp.arange(t)[None, :] < plan.num_tokens[:, None]) & plan.ok[:, None]  # [B, T]
    # A row calibrates once it holds a window's worth of tokens. Until then all its tokens
    # are exact in the window, so no code of it is read yet; calibration re-codes them.
    first = (~self.calibrated & plan.ok & jnp.any(valid, axis=1)
             & (plan.new_lengths >= self.calibration_length))
    stored = tuple(getattr(self, f) for f in _RARE_FIELDS)

    window_keys, window_values, window_positions = exact_tokens.update_window(
        self.window_keys, self.window_values, self.window_positions, kh, vh, plan)
    lengths = jnp.where(plan.ok, plan.new_lengths, self.lengths)
    windowed = self.replace(window_keys=window_keys, window_values=window_values,
                            window_positions=window_positions, lengths=lengths)
    n = self.code_block
    if self.defers_codes and t == 1:
      # Appends write no codes (the token waits in the window); the append that completes
      # a block codes it, a rewrite of an earlier position codes that token. Calibration,
      # sinks and those codes share one conditional (or, deferred, one for every layer
      # after the step): a decode step needs none of them.
      appended = plan.ok & (plan.num_tokens > 0)
      completes = lengths % n == 0
      due = appended & (completes | (plan.positions < self.lengths))
      # A cache holding its sinks has no sink to write (no reason to run the conditional).
      to_sinks = (plan.indices[:, 0] < self.config.num_sinks) & (not self.sinks_held)
      if defer:
        # The sinks now: attention reads positions below num_sinks from them only.
        sink_keys, sink_values = self._sinks_after(kh, vh, plan)
        return windowed.replace(
            sink_keys=sink_keys, sink_values=sink_values,
            overflowed=self.overflowed | ~plan.ok,
            pending=PendingWork(kh=kh, vh=vh, valid=valid, plan=plan, first=first, due=due,
                                completes=completes))

      def rare():
        fields = _rare_work(windowed, kh, vh, valid, plan, first, due, completes)
        sinks = self._sinks_after(kh, vh, plan)
        return (*(fields[f] for f in _RARE_FIELDS), *sinks)

      (key_mean, value_mean, key_perm, value_perm, key_codes, value_codes, sink_keys,
       sink_values) = jax.lax.cond(jnp.any(first | due | to_sinks), rare,
                                   lambda: (*stored, self.sink_keys, self.sink_values))
    else:
      # t == 1 (a window shorter than a block) calibrates from the updated window, so the
      # old one need not outlive the in-place update (XLA copied both every decode step).
      calibrate = functools.partial(_calibration, windowed if t == 1 else self, kh, vh, valid,
                                    plan, first, updated_window=t == 1)
      key_mean, value_mean, key_perm, value_perm, key_codes, value_codes = (
          jax.lax.cond(jnp.any(first), calibrate, lambda: stored)
          if _calibrates(self) else stored)
      centring = (key_mean, value_mean, key_perm, value_perm)
      if self.defers_codes:
        # Tokens earlier appends left uncoded: [block start, length), all in the window.
        start = jnp.maximum(self.lengths - self.lengths % n, self.exact_window_start())
        count = jnp.where(plan.ok, jnp.maximum(jnp.minimum(self.lengths, plan.positions)
                                               - start, 0), 0)
        key_codes, value_codes = self._code_from_window(
            key_codes, value_codes, self.window_keys, self.window_values, start, count,
            centring)
      new_pos = plan.positions[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      key_codes, value_codes = self._code_tokens(
          key_codes, value_codes, kh, vh, new_pos, jnp.where(plan.ok, plan.num_tokens, 0),
          centring)
      sink_keys, sink_values = self._sinks_after(kh, vh, plan, conditional=True)

    return self.replace(
        key_codes=key_codes, value_codes=value_codes,
        window_keys=window_keys, window_values=window_values,
        window_positions=window_positions,
        sink_keys=sink_keys, sink_values=sink_values,
        key_mean=key_mean, value_mean=value_mean, key_perm=key_perm, value_perm=value_perm,
        calibrated=self.calibrated | first,
        lengths=lengths,
        overflowed=self.overflowed | ~plan.ok,
    )

  def _sinks_after(self, kh: Array, vh: Array, plan: kv_cache.UpdatePlan,
                   conditional: bool = False) -> tuple[Array, Array]:
    """(sink keys, values) after an append of kh, vh: as they are where `sinks_held`,
    else written (conditional: under a conditional of their own, `update_sinks`)."""
    if self.sinks_held:
      return self.sink_keys, self.sink_values
    write = exact_tokens.update_sinks if conditional else exact_tokens.write_sinks
    return write(self.sink_keys, self.sink_values, kh, vh, plan)

  def _code_tokens(self, key_codes, value_codes, keys: Array, values: Array,
                   positions: Array, count: Array, centring, write=None
                   ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Codes of keys, values [B, H, T, D] at positions [B, T] (a run per row), centred and
    channel-ordered by centring = (key_mean, value_mean, key_perm, value_perm); the first
    count [B] tokens of each row are written into key_codes and value_codes."""
    key_mean, value_mean, key_perm, value_perm = centring
    kc, vc = keys.astype(jnp.float32), values.astype(jnp.float32)
    if key_mean is not None:
      kc = kc - self.key_offsets(key_mean, positions)
    if value_mean is not None:
      vc = vc - value_mean[:, :, None, :]
    j = jnp.arange(positions.shape[1], dtype=jnp.int32)[None, :]
    indices = jnp.where(j < count[:, None], positions, self.max_len)
    start = positions[:, 0]
    fused = self._fused_for(positions.shape[1])
    write = write or _write_codes
    key_codes = write(self.key_quantizer, key_codes, permute_channels(kc, key_perm),
                      indices, start, count, fused)
    value_codes = write(self.value_quantizer, value_codes, permute_channels(vc, value_perm),
                        indices, start, count, fused)
    return key_codes, value_codes

  def _code_from_window(self, key_codes, value_codes, ring_keys: Array, ring_values: Array,
                        start: Array, count: Array, centring, write=None
                        ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """`_code_tokens` of the ring's tokens at positions start + j, j < count ([B], at most
    one block; the ring must hold them). write: what writes the codes (`_write_codes`)."""
    pos = start[:, None] + jnp.arange(self.code_block, dtype=jnp.int32)[None, :]   # [B, n]
    take = lambda x: jnp.take_along_axis(  # noqa: E731
        x, jnp.mod(pos, x.shape[2])[:, None, :, None], axis=2)
    return self._code_tokens(key_codes, value_codes, take(ring_keys), take(ring_values),
                             pos, count, centring, write)

  def _calibrate(self, kh: Array, vh: Array, valid: Array, plan: kv_cache.UpdatePlan,
                 first: Array, window: tuple[Array, Array, Array] | None = None,
                 write=None):
    """Key and value means and channel orders of the rows in `first`, from every token they hold
    (the window before this update, then the new tokens), sinks left out since they are
    never read from codes; the window's tokens are re-coded with them. window: (keys,
    values, positions) to read instead of the cache's (a ring already holding the new
    tokens: only its slots before plan.positions count)."""
    s, w = self.config.num_sinks, self.config.window
    window_keys, window_values, wp = window or (self.window_keys, self.window_values,
                                                self.window_positions)
    held = (wp >= 0) & (wp < plan.positions[:, None])                  # [B, W]
    new_pos = plan.positions[:, None] + jnp.arange(kh.shape[2], dtype=jnp.int32)[None, :]
    tokens_k = jnp.concatenate([window_keys.astype(jnp.float32),
                                kh.astype(jnp.float32)], axis=2)       # [B, H, W+T, D]
    tokens_v = jnp.concatenate([window_values.astype(jnp.float32),
                                vh.astype(jnp.float32)], axis=2)
    counted = jnp.concatenate([held, valid], axis=1)
    past_sinks = counted & (jnp.concatenate([wp, new_pos], axis=1) >= s)
    # A row with nothing past its sinks (a short cache) uses what it has.
    counted = jnp.where(jnp.any(past_sinks, axis=1, keepdims=True), past_sinks, counted)

    key_mean = self.key_mean
    if key_mean is not None:
      pos = jnp.concatenate([wp, new_pos], axis=1)                     # [B, W+T]
      c = counted[:, None, :, None].astype(jnp.float32)
      before_rope = (tokens_k if self.rope is None else
                     rope_lib.unrotate_split(tokens_k, pos[:, None, :], self.rope,
                                             self.rope_split))
      mean = jnp.sum(before_rope * c, axis=2) / jnp.maximum(jnp.sum(c, axis=2), 1.0)
      key_mean = jnp.where(first[:, None, None], mean, key_mean)
      tokens_k = tokens_k - self.key_offsets(key_mean, pos)
    value_mean = self.value_mean
    if value_mean is not None:
      c = counted[:, None, :, None].astype(jnp.float32)
      mean = jnp.sum(tokens_v * c, axis=2) / jnp.maximum(jnp.sum(c, axis=2), 1.0)
      value_mean = jnp.where(first[:, None, None], mean, value_mean)
      tokens_v = tokens_v - value_mean[:, :, None, :]

    def choose(perm, quantizer, x):
      if perm is None:
        return None
      new = channel_split.outlier_permutation(x, counted[:, None, :], quantizer.sizes[0])
      return jnp.where(first[:, None, None], new, perm)
    key_perm = choose(self.key_perm, self.key_quantizer, tokens_k)
    value_perm = choose(self.value_perm, self.value_quantizer, tokens_v)

    # Re-code the tokens the window held before this update (the new ones follow).
    key_codes, value_codes = self.key_codes, self.value_codes
    if w:
      rewrite = first[:, None] & held
      # Ring slots in position order: the held positions are one run (for the tiles).
      order = jnp.argsort(jnp.where(rewrite, wp, self.max_len), axis=1)
      idx = jnp.take_along_axis(jnp.where(rewrite, wp, self.max_len), order, axis=1)
      take = lambda x: jnp.take_along_axis(x, order[:, None, :, None], axis=2)  # noqa: E731
      count = jnp.sum(rewrite, axis=1).astype(jnp.int32)
      start = jnp.where(count > 0, idx[:, 0], 0)
      write = write or _write_codes
      key_codes = write(self.key_quantizer, key_codes,
                        permute_channels(take(tokens_k[:, :, :w]), key_perm),
                        idx, start, count, self._fused_for(w))
      value_codes = write(self.value_quantizer, value_codes,
                          permute_channels(take(tokens_v[:, :, :w]), value_perm),
                          idx, start, count, self._fused_for(w))
    return key_mean, value_mean, key_perm, value_perm, key_codes, value_codes

  # -- reading ---------------------------------------------------------------------------

  def _all_positions(self) -> Array:
    return jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (self.batch, self.max_len))

  def query_offsets(self, qf: Array) -> Array:
    """q·(what centering took from each key): [B, H, M, 1] ("plain": one q·μ per row) or
    [B, H, M, max_len] (before RoPE: q·R(t)·μ per position). qf: [B, H, M, D]."""
    hi = jax.lax.Precision.HIGHEST
    if self.rope is None:
      return jnp.einsum("bhqd,bhd->bhq", qf, self.key_mean, precision=hi)[..., None]
    offsets = self.key_offsets(self.key_mean, self._all_positions())
    return jnp.einsum("bhqd,bhld->bhql", qf, offsets, precision=hi)

  def exact_window_start(self) -> Array:
    """[B]: positions [start, length) are held exactly by the window (a trailing run)."""
    return exact_tokens.window_start(self.window_positions, self.lengths, self.config.window)

  def exact_parts(self) -> list[tuple[Array, Array, Array, Array]]:
    """(keys [B, H, n, D], values, positions [B, n], visible [B, n]) of the window, sinks."""
    return exact_tokens.exact_parts(self.window_keys, self.window_values,
                                    self.window_positions, self.sink_keys, self.sink_values,
                                    self.lengths)

  def reconstruct(self) -> tuple[Array, Array]:
    """(keys, values) [B, H, max_len, D] float32: what attention reads at each position.

    Codes decoded (channel order and key mean restored), exact tokens written over them.
    Positions at or past a row's length hold garbage. For analysis and tests; attention
    never materializes this.
    """
    key_codes, value_codes = self.code_planes()
    keys = unpermute_channels(self.key_quantizer.dequantize(key_codes), self.key_perm)
    if self.key_mean is not None:
      keys = keys + self.key_offsets(self.key_mean, self._all_positions())
    values = unpermute_channels(self.value_quantizer.dequantize(value_codes), self.value_perm)
    if self.value_mean is not None:
      values = values + self.value_mean[:, :, None, :]
    parts = self.exact_parts()
    keys = exact_tokens.overlay(keys, [(k, p, vis) for k, _, p, vis in parts])
    values = exact_tokens.overlay(values, [(v, p, vis) for _, v, p, vis in parts])
    return keys, values

  def attend(self, q: Array, *, q_positions: Array | None = None, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None,
             implementation: str | None = None, **kernel_kwargs) -> Array:
    """Causal attention of q ([B, Tq, Hq, D]) over sinks, compressed tokens and window.

    Args:
      q: [B, Tq, Hq, D] queries.
      q_positions: [B, Tq] positions of the queries; default the last Tq of each sequence.
      scale: score scale, 1/√D by default.
      sliding_window: a query at p sees keys in (p - sliding_window, p].
      soft_cap: scores become soft_cap·tanh(scores / soft_cap).
      implementation: "reference" (pure jnp, the ground truth); "triton" (or "pallas"):
        the fused kernel of `pallas_kernels.decode_attention` (bit-plane layout; interpret
        mode off the GPU); "mosaic": the Mosaic GPU kernel of
        `pallas_kernels.decode_attention_mgpu` (Hopper GPUs, layout="tiles", one query
        token); None: Mosaic on a Hopper GPU where it applies, else Triton on a GPU where
        it applies, else the reference.
      **kernel_kwargs: for Triton block_k, num_splits, num_warps, num_stages,
        compute_dtype; for Mosaic num_splits (or, for int8 tiles, splits_rule),
        max_concurrent_steps, overlap_values, fused_merge, exact_in_kernel, exact_blocks
        (`kernel_attention.attend`).
    """
    kv_cache.check_query(q, self.batch, self.num_kv_heads, self.head_dim)
    on_gpu = jax.default_backend() == "gpu"
    from turboquant_jax import kernel_attention  # it imports the kernels
    # Why the Mosaic kernel cannot serve this call, asked only where it could be chosen.
    hopper = on_gpu and _is_hopper()
    why = "it runs on Hopper GPUs only (no interpret mode: its decode is inline PTX)"
    if implementation == "mosaic" or (implementation is None and hopper):
      rows, tq = q.shape[1] * (q.shape[2] // self.num_kv_heads), q.shape[1]
      why = kernel_attention.mosaic_unsupported(self, rows, tq) or (None if hopper else why)
    if implementation is None:
      if why is None:
        implementation = "mosaic"
      elif on_gpu and self.kernel_supported():
        implementation = "triton"
      else:
        implementation = "reference"
    if implementation == "reference":
      return _attend(self, q, q_positions, scale=scale, sliding_window=sliding_window,
                     soft_cap=soft_cap)
    if implementation == "mosaic":
      if why is not None:
        raise ValueError(f"implementation='mosaic' cannot serve this call: {why}")
      return kernel_attention.attend_jit(self, q, q_positions, scale=scale,
                                         sliding_window=sliding_window, soft_cap=soft_cap,
                                         mosaic=True, **kernel_kwargs)
    if implementation not in ("triton", "pallas"):
      raise ValueError(f"implementation must be 'reference', 'triton', 'mosaic' or None, "
                       f"got {implementation!r}")
    if not self.kernel_supported():
      raise ValueError("the Triton kernel needs the planes layout, a power-of-two head_dim "
                       f">= 32 and max_len divisible by 16; got layout {self.config.layout!r}, "
                       f"head_dim {self.head_dim}, max_len {self.max_len}")
    kernel_kwargs.setdefault("interpret", not on_gpu)
    if kernel_kwargs["interpret"]:
      kernel_kwargs.setdefault("compute_dtype", jnp.float32)
    return kernel_attention.attend_jit(self, q, q_positions, scale=scale,
                                       sliding_window=sliding_window, soft_cap=soft_cap,
                                       **kernel_kwargs)

  def kernel_supported(self) -> bool:
    """Whether the Triton kernel can read this cache."""
    d = self.head_dim
    return (self.config.layout == "planes" and d >= 32 and d & (d - 1) == 0
            and self.max_len % 16 == 0)

  def _attend(self, q: Array, q_positions: Array | None, scale: float | None,
              sliding_window: int | None, soft_cap: float | None) -> Array:
    b, h, d = self.batch, self.num_kv_heads, self.head_dim
    scale = d**-0.5 if scale is None else scale
    if q_positions is None:
      q_positions = attention.default_query_positions(self.lengths, q.shape[1])
    s = self.config.num_sinks
    qg = attention.group_queries(q, h)  # [B, H, G, Tq, D]
    g, tq = qg.shape[2], qg.shape[3]
    qf = qg.reshape(b, h, g * tq, d)
    window_start = self.exact_window_start()

    # Compressed keys: scores from the rotated (and permuted) query and the codes.
    kq = self.key_quantizer
    key_codes, value_codes = self.code_planes()
    scores_c = kq.scores(kq.transform_queries(permute_channels(qf, self.key_perm)), key_codes)
    if self.key_mean is not None:
      scores_c = scores_c + self.query_offsets(qf)
    scores_c = scores_c.reshape(b, h, g, tq, self.max_len)
    pos_c = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (b, self.max_len))
    blocks = [(attention.scale_and_cap(scores_c, scale, soft_cap),
               attention.key_mask(q_positions, pos_c,
                                  (pos_c >= s) & (pos_c < window_start[:, None]),
                                  sliding_window))]
    exact = self.exact_parts()
    for keys, _, pos, visible in exact:
      blocks.append((attention.scale_and_cap(attention.grouped_scores(qg, keys), scale,
                                             soft_cap),
                     attention.key_mask(q_positions, pos, visible, sliding_window)))
    probs = attention.joint_softmax(blocks)

    # Compressed values: weighted sums in the rotated domain, one inverse rotation.
    vq = self.value_quantizer
    p_c = probs[0].reshape(b, h, g * tq, self.max_len)
    out = self.unrotate_values(vq.weighted_sums_rotated(p_c, value_codes))
    out = unpermute_channels(out, self.value_perm)
    if self.value_mean is not None:   # the compressed tokens' share of the mean
      out = out + p_c.sum(axis=-1, keepdims=True) * self.value_mean[:, :, None, :]
    out = out.reshape(b, h, g, tq, d)
    for p, (_, values, _, _) in zip(probs[1:], exact):
      out = out + attention.grouped_values(p, values)
    out = jnp.where(self.overflowed[:, None, None, None, None], jnp.nan, out)
    return attention.ungroup_output(out).astype(q.dtype)

  def unrotate_values(self, parts: tuple[Array, ...]) -> Array:
    """[..., D]: the value groups' rotated-domain sums (`SplitQuantizer.unrotate`'s parts)
    in the output's domain: rotated back, or as they are for values_prerotated (the
    decoder's output projection rotates them back)."""
    if self.config.values_prerotated:
      return parts[0]
    return self.value_quantizer.unrotate(parts)

  # -- memory ----------------------------------------------------------------------------

  def memory_report(self) -> dict[str, Any]:
    """Bytes of every buffer, bytes per token per head, and the ratio against bf16."""
    report = {}
    for side, codes in (("key", self.key_codes), ("value", self.value_codes)):
      parts = {"codes": 0, "norms": 0, "qjl_signs": 0, "residual_norms": 0}
      for c in codes:
        mse = c
        if isinstance(c, tile_codes.TileCodes):
          parts["codes"] += int(c.words.nbytes)
          parts["norms"] += int(c.norms.nbytes + c.norm_max.nbytes)
          continue
        if isinstance(c, ProdCodes):
          parts["qjl_signs"] += int(c.signs.nbytes)
          parts["residual_norms"] += int(c.residual_norms.nbytes)
          mse = c.mse
        if mse is not None:
          parts["codes"] += sum(int(p.nbytes) for p in mse.planes)
          parts["norms"] += int(mse.norms.nbytes)
      report.update({f"{side}_{k}": v for k, v in parts.items()})
    compressed = sum(report.values())
    report["window"] = int(self.window_keys.nbytes + self.window_values.nbytes)
    report["sinks"] = int(self.sink_keys.nbytes + self.sink_values.nbytes)
    report["key_mean"] = kv_cache.leaf_bytes(self.key_mean)
    report["value_mean"] = kv_cache.leaf_bytes(self.value_mean)
    report["channel_perms"] = kv_cache.leaf_bytes((self.key_perm, self.value_perm))
    report["rotations_and_sketches"] = kv_cache.leaf_bytes(
        (self.key_quantizer, self.value_quantizer))
    report["bookkeeping"] = kv_cache.leaf_bytes(
        (self.window_positions, self.calibrated, self.lengths, self.overflowed))
    return kv_cache.finish_report(report, self, compressed)


def _is_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  device = jax.devices()[0]
  return str(getattr(device, "compute_capability", "")).startswith("9")


@flax.struct.dataclass
class PendingWork:
  """What a deferred single-token append left to `TurboQuantKVCache.flush`: its new
  tokens kh, vh [B, H, 1, D], valid [B, 1], its plan, and the rows that calibrate (first),
  code tokens (due) and complete a block (completes), [B] bool each."""

  kh: Array
  vh: Array
  valid: Array
  plan: kv_cache.UpdatePlan
  first: Array
  due: Array
  completes: Array


_RARE_FIELDS = ("key_mean", "value_mean", "key_perm", "value_perm", "key_codes",
                "value_codes")


def _calibrates(cache: TurboQuantKVCache) -> bool:
  """Whether the cache chooses anything when it calibrates (a mean or channel orders)."""
  return any(getattr(cache, f) is not None for f in _RARE_FIELDS[:4])


def _calibration(cache: TurboQuantKVCache, kh: Array, vh: Array, valid: Array,
                 plan: kv_cache.UpdatePlan, first: Array, *, updated_window: bool,
                 write=None) -> tuple[Any, ...]:
  """The `_RARE_FIELDS` after the rows in `first` calibrate (the cache's own where it
  chooses nothing). updated_window: the cache's window already holds the new tokens kh,
  vh (one per row): its slot for them held no token before their position, or none
  calibration counts (the row is not yet calibrated)."""
  if not _calibrates(cache):
    return tuple(getattr(cache, f) for f in _RARE_FIELDS)
  window = ((cache.window_keys, cache.window_values, cache.window_positions)
            if updated_window else None)
  return cache._calibrate(kh, vh, valid, plan, first, window, write)


def _rare_work(cache: TurboQuantKVCache, kh: Array, vh: Array, valid: Array,
               plan: kv_cache.UpdatePlan, first: Array, due: Array, completes: Array,
               write=None) -> dict[str, Any]:
  """A single-token append's rare work on `cache` (after the append's window and length
  updates): calibration of the rows in `first`, then the codes of the `due` rows' pending
  tokens (the completed block, or a rewritten position), read from the window. Returns
  the `_RARE_FIELDS`."""
  out = dict(zip(_RARE_FIELDS, _calibration(cache, kh, vh, valid, plan, first,
                                             updated_window=True, write=write)))
  n, lengths = cache.code_block, cache.lengths
  held_from = exact_tokens.window_start(cache.window_positions, lengths, cache.config.window)
  start = jnp.where(completes, jnp.maximum(lengths - n, held_from), plan.positions)
  out["key_codes"], out["value_codes"] = cache._code_from_window(
      out["key_codes"], out["value_codes"], cache.window_keys, cache.window_values, start,
      jnp.where(due, lengths - start, 0), tuple(out[f] for f in _RARE_FIELDS[:4]), write)
  return out


def _pending_work(cache: TurboQuantKVCache, write=None) -> dict[str, Any]:
  """`_rare_work` of the cache's deferred append (`pending`)."""
  p = cache.pending
  return _rare_work(cache, p.kh, p.vh, p.valid, p.plan, p.first, p.due, p.completes,
                    write=write)


def _records_writes(cache: TurboQuantKVCache) -> bool:
  """Whether `_flush_together` can take this cache: none of its flush's writes (a window's
  re-code, a block) goes through the fused append kernel."""
  return not (cache._fused_for(cache.config.window) or cache._fused_for(cache.code_block))


# At most this many bytes of the layers' stacked small inputs per vmapped copy: the stack
# is a temporary of the step's program (Llama-3-8B shapes at 64 x 4K: 67 MB of windows per
# layer, 2.1 GB for all 32), so wide batches take several copies.
FLUSH_TOGETHER_BYTES = 256 * 2**20


def _small_bytes(cache: TurboQuantKVCache) -> int:
  """Bytes of what `_flush_together` stacks per cache: all but the code buffers."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      cache.replace(key_codes=(), value_codes=())))


def _flush_together(caches: Sequence[TurboQuantKVCache]) -> list[TurboQuantKVCache]:
  """`flush` of each of caches of one structure (a decoder's layers), the work traced once
  and vmapped over them instead of once per cache: a decode step then compiles one copy
  (tiny Llama's `model_step`, lowered and compiled on 2 cores: 2 layers 3.6-3.9 ->
  2.5-2.9 s, 8 layers 12.4-15.9 -> 6.8-7.6 s). Only the small inputs are stacked
  (windows, quantizers, means, the pending tokens), not the code buffers: the work's
  writes (its `write`, in place of `_write_codes`) are recorded, their codes computed
  under the vmap and written into each cache's own buffers after it, in order. The same
  caches as flushing each (bit for bit on the CPU and, `layers_together_gpu.json`, on the
  H200)."""
  if len(caches) < 2 or any(c.pending is None for c in caches) or not _records_writes(
      caches[0]):
    return [c.flush() for c in caches]
  chunk = max(1, FLUSH_TOGETHER_BYTES // max(1, _small_bytes(caches[0])))
  if len(caches) > chunk:
    return [c for i in range(0, len(caches), chunk)
            for c in _flush_together(caches[i:i + chunk])]
  template = caches[0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[c.replace(key_codes=(), value_codes=()) for c in caches])
  sides: list[str] = []

  def one(small):
    # The template's buffers stand in for every cache's: the work reads only their layout.
    cache = small.replace(key_codes=template.key_codes, value_codes=template.value_codes)
    writes = []

    def write(quantizer, codes, x, indices, start, count, fused=False):
      assert not fused, "a fused write cannot be recorded (see _records_writes)"
      if len(sides) <= len(writes):
        sides.append("key" if quantizer is cache.key_quantizer else "value")
      writes.append((_new_codes(quantizer, codes, x), indices, start, count))
      return codes
    fields = _pending_work(cache, write)
    return {f: fields[f] for f in _RARE_FIELDS[:4]}, writes

  fields, writes = jax.vmap(one)(stacked)
  out = []
  for i, c in enumerate(caches):
    at = functools.partial(jax.tree.map, lambda x: x[i])
    codes = {"key": c.key_codes, "value": c.value_codes}
    for side, (new, indices, start, count) in zip(sides, writes):
      codes[side] = _apply_codes(codes[side], at(new), indices[i], start[i], count[i])
    out.append(c._flushed({**at(fields), "key_codes": codes["key"],
                           "value_codes": codes["value"]}))
  return out


# The bodies run jitted even when called eagerly: one compilation per shape instead of one
# per primitive. Under an outer jit they inline.
_update = jax.jit(TurboQuantKVCache._update, static_argnames=("defer",))
_attend = jax.jit(TurboQuantKVCache._attend,
                  static_argnames=("scale", "sliding_window", "soft_cap"))
