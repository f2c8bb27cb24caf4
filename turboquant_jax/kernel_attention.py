"""`TurboQuantKVCache.attend` through the fused decode kernels.

The cache side of the kernels: what a kernel needs from a cache (rotated and sketched
queries per channel group, the key-centering offsets, the compressed range of each row),
the kernel's split-K partials or their jnp reference, and the merge of those partials
with the exact window and sinks in one softmax, each value group rotated back once. The
kernels themselves take arrays and static specs only: `pallas_kernels.decode_attention`
(Triton, bit-plane codes) and `pallas_kernels.decode_attention_mgpu` (Mosaic GPU, Hopper,
the tiles layout of `tile_codes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode_attention as kernel
from pallas_kernels import decode_attention_mgpu as mosaic
from pallas_kernels import decode_prologue
from pallas_kernels import merge_exact
from turboquant_jax import attention
from turboquant_jax import rope as rope_lib
from turboquant_jax import tile_codes
from turboquant_jax.channel_split import permute_channels, unpermute_channels

Array = jax.Array

_NEG = -1e30
_HIGHEST = jax.lax.Precision.HIGHEST


def query_parts(cache, qf: Array) -> tuple[list[tuple[Array, Array | None]], Array]:
  """Per key group (Π·q, S·Π·q or None), and q·μ for plain centering (zeros otherwise).
  qf: [B, H, M, D]."""
  parts = []
  for t in cache.key_quantizer.transform_queries(permute_channels(qf, cache.key_perm)):
    parts.append(t if isinstance(t, tuple) else (t, None))
  return parts, plain_offsets(cache, qf)


def plain_offsets(cache, qf: Array) -> Array:
  """q·μ [B, H, M] for keys centred after RoPE (zeros otherwise: keys centred before RoPE
  take their offsets per position, `rope_coefficients`). qf: [B, H, M, D]."""
  if cache.key_mean is not None and cache.rope is None:
    return cache.query_offsets(qf)[..., 0]
  return jnp.zeros(qf.shape[:3], jnp.float32)


def rope_coefficients(cache, qf: Array) -> tuple[Array, Array]:
  """(A, B) [B, H, M, D/2]: per RoPE pair p, q·R(θ)·μ = Σ_p A_p cos θ_p + B_p sin θ_p with
  A = q_a μ_a + q_b μ_b and B = q_b μ_a - q_a μ_b (keys centred before RoPE)."""
  spec, mu = cache.rope, cache.key_mean
  q_a, q_b = spec.pairs(qf)
  m_a, m_b = spec.pairs(mu[:, :, None, :])
  return q_a * m_a + q_b * m_b, q_b * m_a - q_a * m_b


def rope_offset_inputs(cache, qf: Array) -> list[Array]:
  """The Triton kernel's inputs for q·R(t)·μ when keys are centred before RoPE (`rope.py`).

  The angle at token h + l (h a multiple of `rope.SPLIT`, l below it) is θ_h + φ_l: A and
  B [B, H, M, D/2] (`rope_coefficients`), ω [D/2], and the tables cos φ_l and sin φ_l
  [D/2, SPLIT]; all but A and B are the same for every row (broadcast: the kernel maps
  every operand). The kernel's blocks divide SPLIT (it checks), so a block shares one h.
  """
  freq = cache.rope.frequencies(qf.shape[-1])
  angles = freq[:, None] * jnp.arange(rope_lib.SPLIT, dtype=jnp.float32)[None, :]
  lead = qf.shape[:2]
  shared = [freq, jnp.cos(angles), jnp.sin(angles)]
  return (list(rope_coefficients(cache, qf))
          + [jnp.broadcast_to(x, (*lead, *x.shape)) for x in shared])


def _compressed_range(cache) -> tuple[Array, Array]:
  b, h = cache.batch, cache.num_kv_heads
  lo = jnp.full((b, h), cache.config.num_sinks, jnp.int32)
  hi = jnp.broadcast_to(cache.exact_window_start()[:, None], (b, h))
  return lo, hi


def compressed_partials(cache, qf: Array, q_positions: Array, *, scale: float,
                        soft_cap: float | None = None, sliding_window: int | None = None,
                        block_k: int | None = None, num_splits: int | None = None,
                        **kernel_kwargs):
  """Split-K partial softmax results over the compressed tokens, from the kernel.

  Args:
    cache: a `TurboQuantKVCache`.
    qf: [B, H, M, D] query rows of each kv head (q heads × query tokens), float32.
    q_positions: [B, M] position of each row (-1 for a row that sees nothing).
    **kernel_kwargs: num_warps, num_stages, compute_dtype, interpret, poison, decode.

  Returns:
    (o, l, m): o a tuple with one [B, H, splits, M, d_g] per value group (rotated,
    unnormalised), l and m [B, H, splits, M].
  """
  b, h, rows, _ = qf.shape
  block_k, num_splits = kernel.choose_blocks(cache.max_len, b * h, block_k, num_splits)
  q_parts, qoff = query_parts(cache, qf)
  rope = cache.key_mean is not None and cache.rope is not None
  lo, hi = _compressed_range(cache)
  return kernel.decode_partials(
      lo, hi, jnp.broadcast_to(q_positions[:, None, :], (b, h, rows)), qoff, q_parts,
      cache.key_codes, cache.value_codes,
      key_specs=kernel.group_specs(cache.key_quantizer),
      value_specs=kernel.group_specs(cache.value_quantizer),
      rope_inputs=rope_offset_inputs(cache, qf) if rope else (),
      scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, block_k=block_k,
      num_splits=num_splits, **kernel_kwargs)


def odd_levels(quantizer) -> tuple[float, ...] | None:
  """The odd coefficients (c₁, c₃[, c₅]) of the quantizer's levels as a polynomial of the
  centred index u (the fewest that fit exactly), or None where no quintic fits them
  (Lloyd-Max levels above 2 bits)."""
  centroids = np.asarray(quantizer.static_codebook().centroids, np.float64)
  u = np.arange(centroids.size) - (centroids.size - 1) / 2
  for terms in (2, 3):
    basis = np.stack([u ** (2 * i + 1) for i in range(terms)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, centroids, rcond=None)
    if np.max(np.abs(basis @ coef - centroids)) <= 1e-6 * np.max(np.abs(centroids)):
      return tuple(float(x) for x in coef)
  return None


def byte_levels(quantizer):
  """The quantizer's levels as the int8 path's `ByteLevels` (an int8 table and a scale;
  4-bit "uniform" levels as plain nibbles, as the cache's int8 tiles store them), or
  None where no int8 table holds them exactly (levels other than "int8", "uniform")."""
  centroids = np.asarray(quantizer.static_codebook().centroids, np.float64)
  table = mosaic.byte_levels(centroids, plain=tile_codes.plain_nibbles(
      "int8", quantizer.bits, quantizer.levels))
  exact = (np.asarray(table.table, np.float64) + table.offset) * table.scale
  if not np.allclose(exact, centroids, rtol=1e-6, atol=1e-7 * abs(table.scale)):
    return None
  return table


def _int8_tiles(cache) -> bool:
  """Whether the cache's tiles are `byte_codes` tiles (the kernel's int8 path)."""
  return cache.key_codes[0].layout.operand == "int8"


def mosaic_unsupported(cache, rows: int, query_tokens: int = 1) -> str | None:
  """Why the Mosaic GPU kernel cannot serve this cache, `rows` query rows per kv head
  (q heads x query tokens) and `query_tokens` (None: it can)."""
  if cache.config.layout != "tiles":
    return "it reads the tiles layout (TurboQuantConfig(layout='tiles'))"
  if query_tokens != 1:
    return f"it takes one query token per call (decode), got {query_tokens}"
  if rows > mosaic.HEADS:
    return f"it takes at most {mosaic.HEADS} query rows (q heads x tokens) per kv head"
  for q in cache.key_quantizer.groups + cache.value_quantizer.groups:
    if jnp.dtype(q.norm_dtype) != jnp.float16:
      return f"it reads float16 norms (norm_dtype), got {jnp.dtype(q.norm_dtype).name}"
    if _int8_tiles(cache):
      if byte_levels(q) is None:
        return ("its int8 path needs levels an int8 table represents (levels='int8', "
                "or 'uniform' at 4 bits)")
      continue
    coefficients = odd_levels(q)
    if coefficients is None:
      return (f"{q.bits}-bit Lloyd-Max levels are not an odd polynomial of degree <= 5 "
              "(levels='quintic' or 'cubic')")
    try:
      mosaic.level_form(coefficients, q.bits)
    except ValueError as e:   # fp16 range or precision
      return str(e)
  return None


# How the int8 kernel's splits are counted (`_mosaic_splits`). H200, Llama-3-8B heads, K4u/V3
# int8 prerotated, the kernel alone (`kernel_sweep_*_uneven*_gpu.*`, two runs): 1 x 128K
# 49 splits (one wave, 21 steps each) 40.8-41.6 us against the divisors' 128 (three waves
# of 8) 45.2-49.2, and the whole attention 49.0-49.7 against 57.4-60.2 (the merge of 54
# splits instead of 133: 4.0 against 10.7 us); but 8 x 32K's one wave (6 splits of 43
# steps) 82.6-83.8 against 16's 79.2-80.3, and the counts between (11-13) 85-89; 8 x 4K
# and 64 x 4K: every count within 1-2 us but 8 x 4K's 8 splits, 18.3-18.4 against 4's
# 20.6-20.7 (after the softmax, two waves: a divisor the waves model passes over).
# "fill" takes the one-wave count only where the divisors' grid runs over more than one
# wave and the one wave's splits are at most FILL_MAX_STEPS long (1 x 128K, not 8 x 32K).
# Then, where that grid is short of a wave, the most divisor splits of one more CTA per SM
# whose splits keep at least FILL_MIN_STEPS steps (a second wave of at most a third of
# the first: its CTAs' few steps cost less than the idle slots do). Re-run 2026-12-03
# (`kernel_sweep_*_{head,underwave}_gpu.json`): 8 x 4K 8 splits 18.7 us against 4's 20.3
# (the third run to agree), 1 x 32K 64 splits 15.7 against 32's 18.5; SmolLM2's 8 x 32K
# keeps its 16 (384 CTAs: 26.5 us, 32 splits 28.5); 1 x 128K 49 -> 64 (41.7 us against
# 41.9; the attention call 49.3 against 50.2). Where they stop: 32 x 4K's one wave (1
# split of 32 steps) 66.3 us and 2 splits 57.7 against the divisors' 4 (2.6 waves) 54.2,
# hence one-wave splits of at most 24 steps; 1 x 8K's 64 one-step splits 9.4 us against
# 32's 8.7, hence at least 4 steps.
SPLITS_RULES = ("divisors", "any", "fill")
DEFAULT_SPLITS_RULE = "fill"
FILL_MAX_STEPS = 24
FILL_MIN_STEPS = 4


def _mosaic_splits(steps: int, rows: int, ctas_per_sm: int | None = None,
                   sms: int = 132, rule: str | None = None) -> int:
  """Splits of `steps` 128-token steps over `rows` kv-head rows.

  rule (with ctas_per_sm; None: `DEFAULT_SPLITS_RULE`): "divisors", the counts that
  divide the steps; "any", every count up to the steps (runs differing by one step:
  `decode_attention_mgpu.split_steps`), by the same waves x (longest run + 2); "fill",
  the divisors' count, or the most splits one wave holds where the divisors' grid takes
  more than one wave and that one wave's splits are at most `FILL_MAX_STEPS` steps;
  then, where that grid is short of one wave, the most splits among the larger divisors
  that take at most ctas_per_sm + 1 CTAs per SM and keep `FILL_MIN_STEPS` steps each.

  ctas_per_sm None: the largest divisor with at most 512 CTAs. Measured
  (`mosaic_attend_splits_gpu.json`, H200, fp16 path, K3/V3 keys centred before RoPE, two
  CTAs per SM, the whole attention): 8 x 4K 0.061-0.065 ms with 4-8 splits against
  0.084-0.088 with 32; 8 x 32K 0.196 with 4, 0.209 with 32; 1 x 4K flat.

  ctas_per_sm given (CTAs resident per SM; `sms` multiprocessors): the divisor with the
  fewest waves x (steps per split + 2), a split's prologue and epilogue costing about two
  steps; ties go to fewer splits (fewer partials to merge). The int8 path passes three,
  the K4/V3 kernel's occupancy at 159 registers (`mosaic_splits_int8_159regs_gpu.json`,
  H200: 8 x 32K, the kernel alone 0.127 ms with 16 splits against 0.134-0.136 with 8, 512
  CTAs in 1.3 waves; the whole attention 0.153 against 0.161; 8 x 4K 0.050 with 4 against
  0.053 with 8). At 128 registers (the sign-magnitude 4-bit decode, four CTAs per SM)
  three still fits best at 8 x 32K (`mosaic_splits_int8_gpu.json`: 16 splits 0.146 ms
  against 0.153 with 8; the kernel alone ties); at 8 x 4K and 1 x 32K the two runs
  disagree within their noise (±10-15%)."""
  divisors = [s for s in range(1, steps + 1) if steps % s == 0]
  if ctas_per_sm is None:
    return max([s for s in divisors if rows * s <= 512] or [1])
  rule = DEFAULT_SPLITS_RULE if rule is None else rule
  if rule not in SPLITS_RULES:
    raise ValueError(f"rule must be one of {SPLITS_RULES}, got {rule!r}")
  slots = ctas_per_sm * sms
  counts = range(1, steps + 1) if rule == "any" else divisors
  best = min(counts, key=lambda s: (-(-rows * s // slots) * (-(-steps // s) + 2), s))
  if rule != "fill":
    return best
  one_wave = min(steps, slots // rows)
  if rows * best > slots and one_wave >= 1 and -(-steps // one_wave) <= FILL_MAX_STEPS:
    best = one_wave
  if rows * best < slots:   # short of a wave: up to one more CTA per SM
    best = max((s for s in divisors if s > best and rows * s <= (ctas_per_sm + 1) * sms
                and steps // s >= FILL_MIN_STEPS), default=best)
  return best


def _multiprocessors() -> int:
  """The default GPU's multiprocessors (132 on the H100 and H200 SXM; 132 off the GPU)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 132


# RoPE offsets tables for splits longer than 128 tokens: 64 rows, angles composed per block.
# A 256-row table (64 KB of shared memory) leaves one CTA per SM; 128 rows, still one.
ROPE_TABLE_ROWS = 64


def exact_unsupported(cache) -> str | None:
  """Why the Mosaic kernel cannot attend over this cache's exact tokens (window ring and
  sinks) as its last splits (None: it can; `decode_attention_mgpu.ExactTokens`)."""
  dt = jnp.dtype(cache.window_keys.dtype)
  if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"it reads bfloat16 or float16 exact tokens, the cache holds {dt.name}"
  # Mosaic tiles the copied rows by 8 (the shared-memory tiling) in global memory too.
  for name, n in (("window", cache.window_keys.shape[2]), ("sinks", cache.sink_keys.shape[2])):
    if n > 8 and n % 8:
      return f"the {name} ({n} slots) is neither below 8 nor a multiple of 8"
  return None


def _limits(cache, pos: Array, sliding_window: int | None) -> tuple[Array, Array]:
  """(bounds [B, 2], limits [B, 1 + 2·parts]) int32 for a decode query at pos [B]: the
  compressed range [lo, hi) (causal, windowed) and the exact parts' `ExactTokens.limits`
  (the query position, then each part's visible range, as `cache.exact_parts`)."""
  s = cache.config.num_sinks
  start = cache.exact_window_start()
  lo = jnp.full_like(pos, s)
  if sliding_window is not None:
    lo = jnp.maximum(lo, pos - sliding_window + 1)
  hi = jnp.maximum(jnp.minimum(start, pos + 1), lo)
  cols = [pos]
  if cache.window_keys.shape[2]:
    cols += [jnp.maximum(start, s), cache.lengths]
  if cache.sink_keys.shape[2]:
    cols += [jnp.zeros_like(pos), cache.lengths]
  as_int = lambda xs: jnp.stack(xs, axis=-1).astype(jnp.int32)  # noqa: E731
  return as_int([lo, hi]), as_int(cols)


def _exact_tokens(cache, qf: Array, limits: Array, exact_blocks=None
                  ) -> tuple[mosaic.ExactTokens | None, tuple[int, ...]]:
  """The kernel's `ExactTokens` from qf [B, H, 8, D] (rows padded) and `_limits`, with
  the tokens per exact split of each part; (None, ()) for a cache with neither window
  nor sinks. The cache's arrays go as they are (no copies): the ring with its positions
  per batch entry, the sinks unpadded (slot t holds position t).

  exact_blocks: None picks 128 tokens for a window of 256-token tiles (fractional widths:
  the compressed pipeline's shared memory leaves room, and half the CTAs) and 64
  otherwise, and for int8 tiles (there 128-token blocks take the kernel from 106 to
  116 KB of shared memory at 3.5 bits with RoPE offsets: one CTA per SM)."""
  b, h, rows, d = qf.shape
  keys, values, positions = [], [], []
  w, s = cache.window_keys.shape[2], cache.sink_keys.shape[2]
  if w:
    keys.append(cache.window_keys.reshape(b * h, w, d))
    values.append(cache.window_values.reshape(b * h, w, d))
    positions.append(cache.window_positions.astype(jnp.int32))
  if s:
    keys.append(cache.sink_keys.reshape(b * h, s, d))
    values.append(cache.sink_values.reshape(b * h, s, d))
    positions.append(None)
  if not keys:
    return None, ()
  if exact_blocks is None:
    wide = (cache.key_codes[0].layout.tokens > 128 and w >= 2 * mosaic.EXACT_BLOCK
            and not _int8_tiles(cache))
    exact_blocks = ((2 * mosaic.EXACT_BLOCK if wide else mosaic.EXACT_BLOCK,) if w else ()
                    ) + ((mosaic.EXACT_BLOCK,) if s else ())
  exact = mosaic.ExactTokens(qf.reshape(b * h, rows, d).astype(keys[0].dtype), limits,
                             tuple(keys), tuple(values), tuple(positions))
  return exact, mosaic.exact_block_sizes(exact, exact_blocks)


def _key_groups(cache) -> tuple[decode_prologue.KeyGroup, ...]:
  starts = np.cumsum([0] + [c.layout.spec.cols for c in cache.key_codes[:-1]])
  return tuple(decode_prologue.KeyGroup(int(at), c.layout.spec.cols, lv.offset)
               for at, c, lv in zip(starts, cache.key_codes,
                                    (byte_levels(g) for g in cache.key_quantizer.groups)))


def prologue_unsupported(cache, prologue: str = "all") -> str | None:
  """Why `decode_prologue` cannot make the int8 kernel's inputs for this cache in mode
  `prologue` ("query" or "all", `_mosaic_partials_padded`; None: it can)."""
  if not _int8_tiles(cache):
    return "it serves the int8 tiles only"
  if cache.key_mean is not None and cache.rope is not None:
    return "keys centred before RoPE take their offsets per position (`rope_offsets`)"
  everything = prologue == "all"
  return decode_prologue.unsupported(cache.head_dim, _key_groups(cache),
                                     cache.window_keys.shape[2] if everything else 0)


PROLOGUES = ("off", "query", "all")
# "all": in the decode loop (CUDA graphs) within noise of the jnp glue (Llama-3-8B shapes,
# K4/V3, H200, paired: 8 x 4K 0.979 / 0.959 / 1.040 of its step time in three runs, 8 x 32K
# 0.989) with half the attention's kernels (18 -> 9 per layer, 49.2 -> 45.1 us of device
# time at 8 x 4K): `decode_prologue_gpu.json`, `decode_e2e_paired_prologue_*_gpu.json`.
DEFAULT_PROLOGUE = "all"
# The int8 kernel's p·‖v‖ parts as one value operand (`_mosaic_partials_padded`). H200,
# Llama-3-8B shapes, K4/V3 (`int8_packed_gpu.json`): the kernel at 8 x 32K 0.110-0.113 ->
# 0.096-0.100 ms, the whole attention 0.141-0.144 -> 0.127; the decode step 1.20x -> 1.33x
# bf16 at 8 x 32K (paired), 8 x 4K and 1 x 4K within noise
# (`decode_e2e_paired_packed_*_gpu.json`).
DEFAULT_PACK_P_PARTS = True
# With them, the query's int8 parts as one key operand too: H200, K4/V3
# (`int8_packed_q_gpu.json`), the kernel at 8 x 32K 2-4% faster (16 and 32 steps per
# split), at 8 x 4K 2-3% slower (4-8 steps per split: the shuffle sits on each step's
# critical path); the decode step at 8 x 32K 9.89 -> 9.42 ms, median of 6 paired rounds
# (bimodal, `decode_e2e_paired_packed_q_8x32k_gpu.json`), at 8 x 4K 6.87 -> 6.92. Default
# from this many steps per split of the cache's capacity.
PACK_Q_MIN_STEPS = 16
# Where the prologue's query is rotated: "dot", Triton's dot inside it (float32 FMAs);
# "xla", an XLA gemm before it (the prologue then takes the query's real rows and repeats
# and packs them for the packed operands itself). H200, Llama-3-8B shapes, K4/V3: in one
# layer's attention the prologue drops 8.5-9.8 -> 2.0-2.4 us, but the gemm, its split-K
# sum and a convert add 3.5-6 us in three more kernels (attention 1 x 4K 22.8 -> 19.6 us,
# 8 x 4K 44.9 -> 42.6, 8 x 32K 118.8 -> 115.8, `step_profile_prologue_rotation_*_gpu.json`),
# and in the whole step the kernels' sum is the same (8 x 4K 601.7 / 601.9 us per two
# layers, 1 x 4K 627.5 / 626.3) and the decode loop no faster (paired, 1 x 4K 7.19 /
# 7.24 ms; 8 x 4K bimodal, `decode_e2e_paired_prologue_rotation_4k_gpu.json`): "dot" stayed.
# (Broadcast products summed in the prologue instead of the dot took 16-26 us; bfloat16
# tensor-core products of a 16-row query in it, 11.3-12.7 us against the dot's 8.8-9.6,
# `step_profile_prologue_mma_*_gpu.json`.)
# Nor did a Pallas kernel before it, each program rotating 32 channels of a row (R x D/32
# programs against the dot's R): the same step, paired (1 x 4K 0.935x bf16 against the
# dot's 0.941x, 8 x 4K 0.961x against 0.950x, `decode_e2e_paired_rotcolumns_4k_gpu.json`;
# the kernel, `decode_prologue.rotate_queries`, was removed again: see commit c2a0bba).
# "kernel": the Mosaic kernel rotates the query itself (`decode_partials(q_rotation=)`,
# one wgmma per CTA against U in float16) and the prologue keeps q·μ and the ranges
# (parts "none"); one key group only.
# Measured (H200, Llama-3-8B shapes, K4u/V3 int8 prerotated, the decode step paired with
# bf16, `decode_e2e_paired_rotating_*_gpu.json`): 1 x 4K 0.955x -> 1.033x bf16 (queued
# 0.967 -> 1.009), 8 x 4K 0.990 -> 1.007 (0.987 -> 1.032), 8 x 32K 1.586 -> 1.576 (1.604
# -> 1.609); one layer's attention at 8 x 32K 115-116 -> 113 us
# (`decode_prologue_rotation_kernel_gpu.json`): the default where it serves, else "dot".
# U reaches the kernel as the key quantizer keeps it in float16 (`blocks_f16`): the cast
# per call was one more XLA kernel, 1.2-1.6 us (one layer's attention at 1 x 4K 16.2-16.6
# -> 15.0 us, `kernel_check_float16_u_llama3_8b_gpu.json`). SmolLM2's heads (d = 64), the
# attention call 1 x 4K 12.1 us, 8 x 32K 38.5 (the dot rotation's 14.1-14.9 and 41.1 on
# 2026-12-01, `kernel_check_float16_u_smollm2_gpu.json`); its decode step, paired, 4
# rounds, against the dot rotation in the same rounds: 1 x 4K 0.83x / 0.88x bf16 a call
# at a time, 0.94x / 0.91x queued; 8 x 32K 1.16x / 1.17x, 1.26x / 1.24x queued
# (`decode_e2e_paired_smollm2_rotating_gpu.json`: within the rounds' spread).
PROLOGUE_ROTATIONS = ("dot", "xla", "kernel")
DEFAULT_PROLOGUE_ROTATION = "kernel"
# ... up to this head dim: U takes d² float16 bytes of a CTA's shared memory (32 KB at 128,
# within the pipeline's; 128 KB at 256, one CTA per SM at most).
KERNEL_ROTATION_MAX_HEAD_DIM = 128
# `attend(fused_merge=None)` ends in `merge_exact` at head dims up to this. H200, SmolLM2
# heads (9 q / 3 kv of 64), K4/V3 int8, one layer's attention in device time
# (`kernel_sweep_smollm2_135m_gpu.json`): 8 x 32K 44.8 -> 42.1 us, 8 x 4K 22.2 -> 20.0,
# 1 x 4K 16.5 either way, one kernel fewer; the decode loop, paired, 8 x 32K 0.87x -> 0.94x
# bf16, 1 x 4K 0.82x -> 0.85x (`decode_e2e_paired_smollm2_fused_default_gpu.json`). At
# Llama-3-8B heads (128) it loses: 1 x 4K 22.7 -> 26.0 us, 8 x 4K 43.5 -> 47.4
# (`step_profile_merge_kernel_*`). With prerotated values (no unrotation to fuse) XLA's
# merge is as fast or faster at every head dim: SmolLM2 1 x 4K 14.9 us with the kernel
# against 14.1 without, 8 x 32K 41.1 / 41.2; Llama-3-8B 1 x 4K 23.8 / 21.1; Gemma 3 (256,
# fits once unrotated) 1 x 4K 23.6 / 19.6, 8 x 32K 67.1 / 57.9
# (`kernel_sweep_*_prerotated_gpu.json`): then the jnp merge.
FUSED_MERGE_MAX_HEAD_DIM = 64
# Where the kernel's splits are merged when `merge_exact` is not used: "xla" (jnp: a max,
# a reduce and a convert, three XLA kernels) or "kernel" (`merge_exact.merge_splits`, one
# Triton launch gridded over rows and channel blocks), where it serves
# (`split_merge_unsupported`). H200, Llama-3-8B heads, K4u/V3 int8 prerotated, one layer's
# attention in device time (`kernel_sweep_split_merge_llama3_8b_gpu.json`): 1 x 4K 15.3 ->
# 13.5 us, 8 x 32K 99.5 -> 97.1, 8 x 4K 28.4 -> 29.2 (GPU check 1.5e-3); the decode step,
# paired, 4 rounds (`decode_e2e_paired_split_merge_gpu.json`): 1 x 4K 0.978x -> 0.993x bf16
# a call at a time (queued 0.981x -> 0.997x), 8 x 32K 1.587x -> 1.609x (1.609x -> 1.638x).
SPLIT_MERGES = ("xla", "kernel")
DEFAULT_SPLIT_MERGE = "kernel"
# CTAs of the int8 kernel resident per SM, which its splits are chosen for (`_mosaic_splits`).
INT8_CTAS_PER_SM = 3


def int8_overlap_values(ctas: int, sms: int) -> bool:
  """Whether the int8 kernel decodes a step's value tile under the key wgmma
  (`decode_partials(overlap_values=True)`) rather than after the softmax: where the grid
  is one wave or less (at most `INT8_CTAS_PER_SM` per SM), each CTA's own chain is the
  time and the overlap shortens it; with more waves the SMs are full and decoding after
  the softmax, fewer registers live at once, goes faster. H200, Llama-3-8B heads, K4u/V3
  int8 prerotated, the kernel alone (`kernel_sweep_late_values_*_gpu.json`): 8 x 32K
  (1,024 CTAs) 85.0 -> 78.7 us after the softmax, the decode step paired 1.614x -> 1.658x
  bf16; 8 x 4K (256 CTAs) 20.3 -> 23.0 us (worse), 1 x 4K (256) 6.3 -> 6.4; SmolLM2
  heads 8 x 32K (384) 26.4 -> 27.1. The rule, checked where it had not been measured:
  64 x 4K (1,024) 103.4 -> 98.2 us, step 1.427x -> 1.453x; 1 x 128K (1,024) 48.2 -> 45.3
  us, step 1.260x -> 1.288x (`*_late_values_rule_*_gpu.json`). The fp16 path keeps the
  overlap: Gemma 3's heads lose after the softmax even on two waves (8 x 32K 39.6 -> 40.3
  us, 8 x 128K 130.2 -> 135.5; `kernel_sweep_late_values_gemma3_270m_gpu.json`)."""
  return ctas <= INT8_CTAS_PER_SM * sms


def _prologue_inputs(cache, qf: Array, pos: Array, sliding_window: int | None, *,
                     everything: bool, interpret: bool, num_warps: int = 4,
                     rotation: str = "dot", parts: str = "rows") -> decode_prologue.Prologue:
  """`decode_prologue` of qf [B, H, n, D] (rows padded: n = 8, or 4 for parts "repeat"
  and "packed") for a decode query at pos [B]: the query's parts, offsets and q·μ;
  everything: the ranges too (the value bound is the cache's own, `_value_bound`).
  rotation: `PROLOGUE_ROTATIONS` ("dot": parts "rows" only)."""
  b, h, rows, d = qf.shape
  q = permute_channels(qf, cache.key_perm).reshape(b * h, rows, d)
  mean = None
  if cache.key_mean is not None:
    mean = permute_channels(cache.key_mean[:, :, None], cache.key_perm).reshape(b * h, d)
  ranges = decode_prologue.Ranges(
      cache.lengths, pos, cache.window_positions, cache.config.num_sinks,
      cache.sink_keys.shape[2], sliding_window) if everything else None
  if rotation == "kernel":
    return decode_prologue.decode_prologue(
        q, None, heads=h, key_groups=_key_groups(cache), key_mean=mean, ranges=ranges,
        parts="none", interpret=interpret, num_warps=num_warps)
  unrotation = cache.key_quantizer.unrotation_matrix()
  rotated = None
  if rotation == "xla":
    rotated = jnp.einsum("rmd,ed->rme", q.astype(jnp.float32),
                         unrotation.astype(jnp.float32), precision=_HIGHEST)
    unrotation = None
  return decode_prologue.decode_prologue(
      q, unrotation, heads=h, key_groups=_key_groups(cache), key_mean=mean, ranges=ranges,
      rotated=rotated, parts=parts, interpret=interpret, num_warps=num_warps)


def _value_bound(cache) -> Array:
  """float32 [B x H, value groups]: the int8 kernel's bound of each row's value norms,
  kept by the cache on append (`tile_codes.TileCodes.norm_max`) rather than reduced over
  every slot each step. H200, Llama-3-8B shapes, K4/V3 packed, 8 x 32K: the prologue 14.7
  -> 9.8 us, one layer's attention 125.5 -> 119.3 us (`step_profile_cache_bound_8x32k_gpu
  .json`), the decode step 1.33x -> 1.38x bf16 (`decode_e2e_paired_cache_bound_*`)."""
  return jnp.stack([c.norm_max.reshape(-1) for c in cache.value_codes], axis=1)


def _mosaic_partials_padded(cache, qf: Array, q_positions: Array, *, scale: float,
                            soft_cap: float | None = None,
                            sliding_window: int | None = None,
                            num_splits: int | None = None,
                            rope_table_rows: int | None = None,
                            exact_in_kernel: bool = False, exact_blocks=None,
                            prologue: str | None = None,
                            prologue_interpret: bool | None = None,
                            prologue_warps: int = 4,
                            prologue_rotation: str | None = None,
                            pack_p_parts: bool | None = None,
                            pack_q_parts: bool | None = None, query_parts: int = 2,
                            splits_rule: str | None = None, **kernel_kwargs):
  """The Mosaic kernel's own outputs: o [R, S, D, 8] (transposed), l, m [R, S, 8], with
  R = B x kv heads and the query rows padded to the kernel's 8 columns. rope_table_rows:
  the RoPE offsets' table length (`decode_attention_mgpu.rope_offsets`; default the
  cache's split if it is 128 tokens, else `ROPE_TABLE_ROWS`: two CTAs per SM instead of
  one, 0.373 -> 0.253 ms at 8x32K, 3.5 bits, H200, `mosaic_attend_sub_steps_gpu.json`).
  exact_in_kernel: the exact tokens as more splits, the last of S, one per block of each
  part (when the cache has any; `exact_unsupported` must be None); exact_blocks: the
  blocks' tokens (`_exact_tokens`). prologue: the int8 kernel's inputs from
  `pallas_kernels.decode_prologue` where it applies (`prologue_unsupported`): "query",
  the query's int8 parts, offsets and q·μ (one launch for six XLA kernels); "all", the
  ranges too; "off": all in jnp; None: `DEFAULT_PROLOGUE` where it applies, else "off".
  The value bound of the int8 kernel's p·‖v‖ scale is the cache's (`_value_bound`).
  prologue_interpret: its interpret mode (default: off the GPU); prologue_warps: its
  `num_warps`; prologue_rotation: where the query is rotated (`PROLOGUE_ROTATIONS`;
  None: `DEFAULT_PROLOGUE_ROTATION` where it serves the cache (one key group, head dim
  up to `KERNEL_ROTATION_MAX_HEAD_DIM`), else "dot").
  splits_rule: how int8 tiles' splits are counted when num_splits is None
  (`SPLITS_RULES`; None: `DEFAULT_SPLITS_RULE`; the fp16 path keeps its own rule).
  pack_p_parts: the int8 kernel's p·‖v‖ parts as one value operand
  (`decode_attention_mgpu.decode_partials`), the query's rows repeated instead of
  zero-padded; None: `DEFAULT_PACK_P_PARTS` where it applies (int8 tiles, at most 4
  query rows per kv head). pack_q_parts: with them, the query's int8 parts as one key
  operand; None: where the p parts are packed and a split holds at least
  `PACK_Q_MIN_STEPS` steps. query_parts: with prologue_rotation "kernel", the float16
  parts of the unrotated query the kernel takes: 1 where the caller's query was 16-bit
  (`attend` passes it: a bfloat16 query is float16's within its range), else 2 (its
  float16 rounding and the remainder). The int8 kernel's overlap_values defaults to
  `int8_overlap_values` of its grid.

  Returns (o, l, m, e): e of the S splits are the exact tokens' (0 without them)."""
  b, h, rows, d = qf.shape
  why = mosaic_unsupported(cache, rows)
  if why is not None:
    raise ValueError(f"the Mosaic GPU kernel cannot attend over this cache: {why}")
  kcs, vcs = cache.key_codes, cache.value_codes  # a TileCodes per channel group
  tt = kcs[0].layout.tokens
  steps = cache.max_len // tt
  int8 = _int8_tiles(cache)
  if num_splits is None:   # int8 tiles: waves of three CTAs per SM (measured, above)
    num_splits = _mosaic_splits(steps, b * h, **(
        dict(ctas_per_sm=INT8_CTAS_PER_SM, sms=_multiprocessors(),
             rule=splits_rule) if int8 else {}))
  packable = int8 and rows <= mosaic.HEADS // 2
  if pack_p_parts is None:
    pack_p_parts = DEFAULT_PACK_P_PARTS and packable
  elif pack_p_parts and not packable:
    raise ValueError("pack_p_parts needs int8 tiles and at most "
                     f"{mosaic.HEADS // 2} query rows per kv head, got {rows}")
  if pack_q_parts is None:
    pack_q_parts = bool(pack_p_parts) and steps // num_splits >= PACK_Q_MIN_STEPS
  elif pack_q_parts and not pack_p_parts:
    raise ValueError("pack_q_parts needs the p parts packed (pack_p_parts)")
  if pack_p_parts:   # rows 4-7 repeat rows 0-3 (zero rows up to 4 first)
    q_rows = jnp.pad(qf, ((0, 0), (0, 0), (0, mosaic.HEADS // 2 - rows), (0, 0)))
    qf = jnp.broadcast_to(q_rows[:, :, None], (b, h, 2, *q_rows.shape[2:])).reshape(
        b, h, mosaic.HEADS, d)
  else:   # zero query rows up to wgmma's N = 8, once here (their transforms are zeros)
    qf = q_rows = jnp.pad(qf, ((0, 0), (0, 0), (0, mosaic.HEADS - rows), (0, 0)))
  # The groups' rotated queries side by side, one array: the kernel reads each group's
  # columns (no slices after the product).
  if prologue not in (None, *PROLOGUES):
    raise ValueError(f"prologue must be one of {PROLOGUES} or None, got {prologue!r}")
  if prologue_rotation not in (None, *PROLOGUE_ROTATIONS):
    raise ValueError(f"prologue_rotation must be one of {PROLOGUE_ROTATIONS}, got "
                     f"{prologue_rotation!r}")
  if prologue not in (None, "off"):
    why = prologue_unsupported(cache, prologue)
    if why is not None:
      raise ValueError(f"decode_prologue cannot serve this cache: {why}")
  elif prologue is None:
    prologue = (DEFAULT_PROLOGUE if DEFAULT_PROLOGUE == "off"
                or prologue_unsupported(cache, DEFAULT_PROLOGUE) is None else "off")
  if prologue_rotation is None:   # the kernel's own where it serves (one key group)
    prologue_rotation = (DEFAULT_PROLOGUE_ROTATION if DEFAULT_PROLOGUE_ROTATION != "kernel"
                         or (prologue != "off" and len(kcs) == 1
                             and d <= KERNEL_ROTATION_MAX_HEAD_DIM) else "dot")
  if prologue == "off" and prologue_rotation == "kernel":
    raise ValueError("prologue_rotation='kernel' needs a prologue ('query' or 'all'): "
                     "the int8 kernel's own rotation replaces the prologue's")
  if prologue != "off":
    if prologue_interpret is None:
      prologue_interpret = jax.default_backend() != "gpu"
    everything = prologue == "all"
    parts, q_in = "rows", qf
    if prologue_rotation == "kernel" and len(kcs) != 1:
      raise ValueError("prologue_rotation='kernel' takes one key channel group, got "
                       f"{len(kcs)}")
    if prologue_rotation == "xla" and pack_p_parts:
      parts, q_in = ("packed" if pack_q_parts else "repeat"), q_rows
    pro = _prologue_inputs(cache, q_in, q_positions[:, 0], sliding_window,
                           everything=everything, interpret=prologue_interpret,
                           num_warps=prologue_warps, rotation=prologue_rotation,
                           parts=parts)
    q, qoff = pro.q, pro.qoff
    if prologue_rotation == "kernel":   # unrotated float16 parts; U for the kernel's wgmma
      q_perm = permute_channels(qf, cache.key_perm).reshape(b * h, mosaic.HEADS, d)
      if query_parts not in (1, 2):
        raise ValueError(f"query_parts must be 1 or 2, got {query_parts}")
      q_hi = q_perm.astype(jnp.float16)
      q = (q_hi[:, None] if query_parts == 1 else jnp.stack(
          [q_hi, (q_perm.astype(jnp.float32) - q_hi.astype(jnp.float32)).astype(jnp.float16)],
          axis=1))
      kernel_kwargs = dict(kernel_kwargs, q_rotation=cache.key_quantizer.unrotation_matrix(
          jnp.float16))
    if everything:
      bounds, limits = pro.bounds, pro.limits
    else:   # cache-only work: XLA runs it beside the query's projection
      bounds, limits = _limits(cache, q_positions[:, 0], sliding_window)
    kernel_kwargs = dict(kernel_kwargs, operand="int8",
                         **({"q_scale": pro.scale} if pro.scale is not None else {}),
                         **({"key_offsets": pro.key_offsets}
                            if pro.key_offsets is not None else {}))
    levels = byte_levels
  else:
    q = cache.key_quantizer.rotated_queries(permute_channels(qf, cache.key_perm))
    if int8:   # two int8 parts and a scale per row (about 14 bits)
      q, q_scale = mosaic.quantize_query_s8(q.reshape(b * h, mosaic.HEADS, d))
      kernel_kwargs = dict(kernel_kwargs, operand="int8", q_scale=q_scale)
      levels = byte_levels
    else:
      q = q.reshape(b * h, mosaic.HEADS, d).astype(jnp.float16)
      levels = odd_levels
    qoff = plain_offsets(cache, qf).reshape(b * h, mosaic.HEADS)
    # One position per batch entry (decode): the compressed range, causal and windowed,
    # and the exact parts' visible ranges, read by each row as i // h in the kernel.
    bounds, limits = _limits(cache, q_positions[:, 0], sliding_window)
  if int8:
    kernel_kwargs = dict(dict(overlap_values=int8_overlap_values(
        b * h * num_splits, _multiprocessors())), **kernel_kwargs)
  if int8 and kernel_kwargs.get("p_scale", "bound") == "bound":
    kernel_kwargs = dict(kernel_kwargs, value_bound=_value_bound(cache))
  flat = lambda x: x.reshape(b * h, *x.shape[2:])  # noqa: E731
  rope = None
  if cache.key_mean is not None and cache.rope is not None:
    coef_a, coef_b = rope_coefficients(cache, qf)
    # One angle per kernel step: the cache split its centering offsets the same way.
    if rope_table_rows is None and cache.rope_split > 128:
      rope_table_rows = ROPE_TABLE_ROWS
    with jax.ensure_compile_time_eval():   # the angle tables become constants
      freq = cache.rope.frequencies(d)
    # int8: fp16 coefficients and angles, 8 KB less shared memory at 3.5 bits (two CTAs
    # per SM instead of one).
    rope = mosaic.rope_offsets(flat(coef_a), flat(coef_b), freq, cache.max_len,
                               cache.rope_split, table_rows=rope_table_rows,
                               dtype=jnp.float16 if int8 else jnp.float32)
  exact, blocks = (_exact_tokens(cache, qf, limits, exact_blocks) if exact_in_kernel
                   else (None, ()))
  o, l, m = mosaic.decode_partials(
      tuple(flat(c.words) for c in kcs), tuple(flat(c.norms) for c in kcs),
      tuple(flat(c.words) for c in vcs), tuple(flat(c.norms) for c in vcs), q, bounds,
      qoff.astype(jnp.float32),
      key_spec=tuple(c.layout.spec for c in kcs),
      value_spec=tuple(c.layout.spec for c in vcs),
      key_levels=tuple(levels(g) for g in cache.key_quantizer.groups),
      value_levels=tuple(levels(g) for g in cache.value_quantizer.groups),
      num_splits=num_splits, scale=scale, soft_cap=soft_cap, rope=rope, exact=exact,
      **(dict(exact_blocks=blocks) if exact is not None else {}),
      sliding_window=sliding_window, **kernel_kwargs,
      **({"pack_p_parts": True} if pack_p_parts else {}),
      **({"pack_q_parts": True} if pack_q_parts else {}))
  return o, l, m, (mosaic.exact_splits(exact, blocks) if exact is not None else 0)


def compressed_partials_mosaic(cache, qf: Array, q_positions: Array, *, scale: float,
                               soft_cap: float | None = None,
                               sliding_window: int | None = None,
                               num_splits: int | None = None, **kernel_kwargs):
  """`compressed_partials` from the Mosaic GPU kernel, for one query token: every row of
  a batch entry has the position q_positions[:, 0] (`attend` checks it).

  kernel_kwargs: max_concurrent_steps, overlap_values, tokens_per_step, serial_groups,
    sub_steps (`decode_attention_mgpu.decode_partials`), rope_table_rows.
  """
  o, l, m, _ = mosaic_partials(cache, qf, q_positions, scale=scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, num_splits=num_splits,
                               exact_in_kernel=False, **kernel_kwargs)
  return o, l, m


def mosaic_partials(cache, qf: Array, q_positions: Array, *, scale: float,
                    soft_cap: float | None = None, sliding_window: int | None = None,
                    num_splits: int | None = None, exact_in_kernel: bool = True,
                    **kernel_kwargs):
  """`compressed_partials_mosaic`, and the exact tokens' partial from the same launch.

  Returns (o, l, m, exact): o, l, m as `compressed_partials`; exact the exact tokens'
  partials (o [B, H, E, M, D] in the output's channel order, l, m [B, H, E, M]) when
  exact_in_kernel and the cache has exact tokens, else None (the caller attends over
  them itself).
  """
  b, h, rows, d = qf.shape
  o, l, m, e = _mosaic_partials_padded(
      cache, qf, q_positions, scale=scale, soft_cap=soft_cap,
      sliding_window=sliding_window, num_splits=num_splits,
      exact_in_kernel=exact_in_kernel, **kernel_kwargs)
  splits = o.shape[1]
  o = jnp.swapaxes(o, -1, -2)[:, :, :rows].reshape(b, h, splits, rows, d)
  unpad = lambda x: x[..., :rows].reshape(b, h, splits, rows)  # noqa: E731
  l, m = unpad(l), unpad(m)
  exact = None
  if e:   # the last splits, already in the tokens' channel order
    s = splits - e
    exact = o[:, :, s:], l[:, :, s:], m[:, :, s:]
    o, l, m = o[:, :, :s], l[:, :, :s], m[:, :, :s]
  # The value groups' channels, in order (each in its own rotated domain).
  return tuple(cache.value_quantizer._split(o)), l, m, exact


def exact_partial(cache, qf: Array, q_positions: Array, *, scale: float,
                  soft_cap: float | None = None, sliding_window: int | None = None):
  """The exact tokens' (window ring, sinks) partial softmax result in jnp, float32:
  (o [B, H, 1, M, D] unnormalised, l, m [B, H, 1, M]), or None for a cache with neither."""
  parts = cache.exact_parts()
  if not parts:
    return None
  scored = []
  m = None
  for keys, values, pos, visible in parts:
    s = attention.scale_and_cap(
        jnp.einsum("bhqd,bhkd->bhqk", qf, keys.astype(jnp.float32), precision=_HIGHEST),
        scale, soft_cap)
    mask = attention.key_mask(q_positions, pos, visible, sliding_window)[:, :, 0]
    s = jnp.where(mask, s, _NEG)
    scored.append((s, mask, values))
    m = s.max(axis=-1) if m is None else jnp.maximum(m, s.max(axis=-1))
  o, l = 0.0, 0.0
  for s, mask, values in scored:
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    l = l + p.sum(axis=-1)
    o = o + jnp.einsum("bhqk,bhkd->bhqd", p, values.astype(jnp.float32), precision=_HIGHEST)
  return o[:, :, None], l[:, :, None], m[:, :, None]


def compressed_partials_reference(cache, qf: Array, q_positions: Array, *, scale: float,
                                  soft_cap: float | None = None,
                                  sliding_window: int | None = None, num_splits: int = 1,
                                  **unused):
  """The same partials as `compressed_partials`, in plain jnp and float32."""
  del unused
  b, h, rows, _ = qf.shape
  length = cache.max_len
  q_parts, _ = query_parts(cache, qf)
  kq, vq = cache.key_quantizer, cache.value_quantizer
  key_codes, value_codes = cache.code_planes()
  scores = kq.scores([p if s is None else (p, s) for p, s in q_parts], key_codes)
  if cache.key_mean is not None:
    scores = scores + cache.query_offsets(qf)
  scores = attention.scale_and_cap(scores, scale, soft_cap)
  pos = jnp.arange(length, dtype=jnp.int32)
  lo, hi = cache.config.num_sinks, cache.exact_window_start()
  mask = (pos >= lo)[None, :] & (pos[None, :] < hi[:, None])  # [B, L]
  mask = mask[:, None, None, :] & (pos[None, None, :] <= q_positions[:, :, None])[:, None]
  if sliding_window is not None:
    mask &= (q_positions[:, :, None] - pos[None, None, :] < sliding_window)[:, None]
  scores = jnp.where(mask, scores, _NEG).reshape(b, h, rows, num_splits, length // num_splits)
  mask = mask.reshape(b, 1, rows, num_splits, length // num_splits)
  m = scores.max(axis=-1)
  p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
  l = p.sum(axis=-1)
  o = []
  for group, codes in zip(vq.groups, value_codes):
    vals = group.rotated_values(codes).reshape(b, h, num_splits, length // num_splits, -1)
    o.append(jnp.einsum("bhqsk,bhskd->bhsqd", p, vals, precision=_HIGHEST))
  return tuple(o), jnp.moveaxis(l, 3, 2), jnp.moveaxis(m, 3, 2)


def merge_unsupported(cache, rows: int, exact: bool = True) -> str | None:
  """Why `merge_exact` cannot finish a Mosaic call with `rows` query rows per kv head
  over this cache (None: it can); exact=False: the kernel attended the exact tokens."""
  sizes = tuple(n for n in (cache.window_keys.shape[2], cache.sink_keys.shape[2])
                if n and exact)
  return merge_exact.unsupported(decode_prologue.pow2_at_least(rows), cache.head_dim, sizes,
                                 rotated=not cache.config.values_prerotated)


def split_merge_unsupported(cache, rows: int, exact_in_kernel: bool) -> str | None:
  """Why `merge_exact.merge_splits` cannot finish this Mosaic call (None: it can)."""
  if not cache.config.values_prerotated:
    return "it rotates nothing back (values_prerotated caches only)"
  if cache.value_perm is not None:
    return "it takes one value channel group"
  if not exact_in_kernel and cache.exact_parts():
    return "it merges the kernel's splits only (exact_in_kernel)"
  if rows & (rows - 1) or rows > mosaic.HEADS:
    return f"{rows} query rows per kv head is not a power of two up to {mosaic.HEADS}"
  return None


def _attend_mosaic_split_merge(cache, qf: Array, row_pos: Array, *, out_dtype,
                               merge_interpret: bool | None, **kwargs) -> Array:
  """[B, H, M, D] out_dtype: the Mosaic kernel's partials merged by `merge_splits`."""
  b, h, rows, d = qf.shape
  o, l, m, e = _mosaic_partials_padded(cache, qf, row_pos, **kwargs)
  if merge_interpret is None:
    merge_interpret = jax.default_backend() != "gpu"
  mean = None if cache.value_mean is None else cache.value_mean.reshape(b * h, d)
  out = merge_exact.merge_splits(o, l, m, rows=rows, heads=h, value_mean=mean,
                                 exact_splits=e, poison=cache.overflowed,
                                 out_dtype=out_dtype, interpret=merge_interpret)
  return out.reshape(b, h, rows, d)


def _attend_mosaic_fused(cache, qf: Array, row_pos: Array, *, scale: float,
                         soft_cap: float | None, sliding_window: int | None,
                         use_kernel: bool, merge_interpret: bool | None,
                         exact_in_kernel: bool, **kernel_kwargs) -> Array:
  """[B, H, M, D] float32: the Mosaic kernel's partials finished by `merge_exact` (the
  split merge, the inverse rotation, the value mean and, unless the kernel attended
  them (exact_in_kernel), the exact window and sinks, in one kernel). use_kernel=False
  takes the partials from their jnp reference instead (and the exact tokens' partial
  from `exact_partial` as the kernel's unrotated last split, with exact_in_kernel)."""
  b, h, rows, d = qf.shape
  common = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
  if use_kernel:
    o, l, m, e = _mosaic_partials_padded(cache, qf, row_pos, **common,
                                         exact_in_kernel=exact_in_kernel, **kernel_kwargs)
    cols = o.shape[-1]                              # the kernel's 8 padded rows
  else:
    (o,), l, m = compressed_partials_reference(cache, qf, row_pos, **common, **kernel_kwargs)
    part = exact_partial(cache, qf, row_pos, **common) if exact_in_kernel else None
    e = 0
    if part is not None:   # the exact split after the compressed ones, as the kernel's
      o = jnp.concatenate([o, part[0]], axis=2)
      l, m = (jnp.concatenate([x, y], axis=2) for x, y in zip((l, m), part[1:]))
      e = 1
    splits, cols = o.shape[2], decode_prologue.pow2_at_least(rows)
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, cols - rows)])  # noqa: E731
    o = pad(jnp.swapaxes(o, -1, -2).reshape(b * h, splits, d, rows))
    l, m = (pad(x.reshape(b * h, splits, rows)) for x in (l, m))
  q = jnp.pad(qf, ((0, 0), (0, 0), (0, cols - rows), (0, 0))).reshape(b * h, cols, d)
  qpos = jnp.pad(row_pos, ((0, 0), (0, cols - rows)), mode="edge")
  exact = () if exact_in_kernel else tuple(
      (k.reshape(b * h, -1, d), v.reshape(b * h, -1, d),
       jnp.where(visible, pos, merge_exact.HIDDEN))
      for k, v, pos, visible in cache.exact_parts())
  mean = None if cache.value_mean is None else cache.value_mean.reshape(b * h, d)
  if merge_interpret is None:
    merge_interpret = jax.default_backend() != "gpu"
  perm = None if cache.value_perm is None else cache.value_perm.reshape(b * h, d)
  unrotation = (None if cache.config.values_prerotated
                else cache.value_quantizer.unrotation_matrix())
  out = merge_exact.merge_exact(
      q, o, l, m, qpos, unrotation, exact, heads=h,
      value_mean=mean, value_perm=perm, unrotated_splits=e, interpret=merge_interpret,
      **common)
  return jnp.swapaxes(out, 1, 2)[:, :rows].reshape(b, h, rows, d)


def attend(cache, q: Array, q_positions: Array | None = None, *, scale: float | None = None,
           sliding_window: int | None = None, soft_cap: float | None = None,
           use_kernel: bool = True, mosaic: bool = False, fused_merge: bool | None = None,
           merge_interpret: bool | None = None, exact_in_kernel: bool | None = None,
           split_merge: str | None = None, **kernel_kwargs) -> Array:
  """`TurboQuantKVCache.attend` through a fused kernel: [B, Tq, Hq, D] -> same.

  mosaic: the Mosaic GPU kernel (tiles layout) instead of the Triton one; use_kernel=False:
  the kernel's jnp reference partials (tests the merge).
  fused_merge: with mosaic, finish in `pallas_kernels.merge_exact` where it applies
  (`merge_unsupported`; with exact_in_kernel it merges the kernel's exact splits as
  unrotated ones), else in jnp; merge_interpret: its interpret mode (default: off the
  GPU). None: at head dims up to `FUSED_MERGE_MAX_HEAD_DIM` (one launch fewer pays
  there; at 128 the kernel's 7.5-8 us lose to XLA's merge), unless values are
  prerotated (`TurboQuantConfig.values_prerotated`: nothing to rotate back, and XLA's
  merge is faster).

  exact_in_kernel: with mosaic, the Mosaic kernel attends over the exact window and sinks
  as more splits of its launch, one per 64- or 128-token block (`_exact_tokens`; bf16
  or fp16 tokens by TMA, wgmma with the unrotated query rounded to their dtype, p
  rounded to it as cuDNN does);
  None: where it can (`exact_unsupported`), else in jnp (float32 products).

  split_merge: with mosaic and no fused_merge, where the splits are merged
  (`SPLIT_MERGES`): "kernel", `merge_exact.merge_splits` (values prerotated, the exact
  tokens in the kernel, a power of two of query rows: `split_merge_unsupported`), "xla"
  in jnp; None: `DEFAULT_SPLIT_MERGE` where it serves, else "xla".

  The exact window and sinks are more partials of the same softmax, merged with the
  kernel's split partials; each value group's sum is rotated back once.
  """
  b, h, d = cache.batch, cache.num_kv_heads, cache.head_dim
  scale = d**-0.5 if scale is None else scale
  if q_positions is None:
    q_positions = attention.default_query_positions(cache.lengths, q.shape[1])
  qg = attention.group_queries(q, h)                       # [B, H, G, Tq, D]
  g, tq = qg.shape[2], qg.shape[3]
  if mosaic and use_kernel and tq != 1:
    raise ValueError(f"the Mosaic GPU kernel takes one query token per call, got {tq}")
  qf = qg.reshape(b, h, g * tq, d)
  if mosaic and use_kernel:   # for the kernel's own rotation: qf is float32 from here on
    kernel_kwargs = dict(kernel_kwargs, query_parts=1 if q.dtype in (
        jnp.float16, jnp.bfloat16) else 2)
  row_pos = jnp.tile(q_positions, (1, g))                  # [B, G·Tq], rows are (g, t)
  common = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
  why = exact_unsupported(cache) if mosaic and use_kernel else "no Mosaic kernel"
  if exact_in_kernel is None:
    exact_in_kernel = why is None
  if mosaic and use_kernel and exact_in_kernel and why is not None:
    raise ValueError(f"the Mosaic kernel cannot attend over the exact tokens: {why}")
  if fused_merge is None:
    fused_merge = d <= FUSED_MERGE_MAX_HEAD_DIM and not cache.config.values_prerotated
  if (mosaic and fused_merge
      and merge_unsupported(cache, g * tq, exact=not exact_in_kernel) is None):
    out = _attend_mosaic_fused(cache, qf, row_pos, **common, use_kernel=use_kernel,
                               merge_interpret=merge_interpret,
                               exact_in_kernel=exact_in_kernel, **kernel_kwargs)
    out = jnp.where(cache.overflowed[:, None, None, None], jnp.nan, out)
    return attention.ungroup_output(out.reshape(b, h, g, tq, d)).astype(q.dtype)
  if split_merge not in (None, *SPLIT_MERGES):
    raise ValueError(f"split_merge must be one of {SPLIT_MERGES} or None, got "
                     f"{split_merge!r}")
  if mosaic and use_kernel:
    why = split_merge_unsupported(cache, g * tq, exact_in_kernel)
    if split_merge == "kernel" and why is not None:
      raise ValueError(f"split_merge='kernel' cannot finish this call: {why}")
    if split_merge is None:
      split_merge = DEFAULT_SPLIT_MERGE if why is None else "xla"
    if split_merge == "kernel":
      out = _attend_mosaic_split_merge(cache, qf, row_pos, out_dtype=q.dtype,
                                       merge_interpret=merge_interpret, **common,
                                       exact_in_kernel=exact_in_kernel, **kernel_kwargs)
      return attention.ungroup_output(out.reshape(b, h, g, tq, d))
  if mosaic and use_kernel and exact_in_kernel:
    o_c, l_c, m_c, exact = mosaic_partials(cache, qf, row_pos, exact_in_kernel=True,
                                           **common, **kernel_kwargs)
  else:
    partials = (compressed_partials_reference if not use_kernel else
                compressed_partials_mosaic if mosaic else compressed_partials)
    o_c, l_c, m_c = partials(cache, qf, row_pos, **common, **kernel_kwargs)
    exact = exact_partial(cache, qf, row_pos, **common)
  m_all = m_c.max(axis=2)                                  # [B, H, M]
  if exact is not None:
    m_all = jnp.maximum(m_all, exact[2].max(axis=2))
  weight = jnp.exp(m_c - m_all[:, :, None])                # [B, H, S, M]
  l_total = jnp.sum(l_c * weight, axis=2)
  rotated = tuple(jnp.sum(o * weight[..., None], axis=2) for o in o_c)
  out = unpermute_channels(cache.unrotate_values(rotated), cache.value_perm)
  if cache.value_mean is not None:   # the compressed tokens' share of the mean
    out = out + l_total[..., None] * cache.value_mean[:, :, None, :]
  if exact is not None:
    o_e, l_e, m_e = exact                                  # E partials each
    w_e = jnp.exp(m_e - m_all[:, :, None])
    out = out + jnp.sum(o_e * w_e[..., None], axis=2)
    l_total = l_total + jnp.sum(l_e * w_e, axis=2)
  out = out / jnp.where(l_total > 0, l_total, 1.0)[..., None]
  out = jnp.where(cache.overflowed[:, None, None, None], jnp.nan, out)
  return attention.ungroup_output(out.reshape(b, h, g, tq, d)).astype(q.dtype)


attend_jit = jax.jit(attend, static_argnames=(
    "scale", "sliding_window", "soft_cap", "use_kernel", "mosaic", "block_k", "num_splits",
    "num_warps", "num_stages", "compute_dtype", "interpret", "poison", "decode",
    "max_concurrent_steps", "overlap_values", "tokens_per_step", "serial_groups",
    "sub_steps", "rope_table_rows", "fused_merge", "merge_interpret", "exact_in_kernel",
    "exact_blocks", "p_scale", "prologue", "prologue_interpret", "prologue_warps",
    "prologue_rotation", "pack_p_parts", "pack_q_parts", "split_merge", "splits_rule"))
