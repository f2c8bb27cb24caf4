"""Decode attention over register-layout codes: a Mosaic GPU (Hopper) Pallas kernel.

The codes of a tile are stored in the order the tensor cores take them from registers
(`pallas_kernels.register_codes`), so a warpgroup decodes them into wgmma's A operand
with a few bit operations per pair of codes and no shuffles:

- keys: scores^T [tokens, heads] = K·q^T, the decoded key tile [tokens, D] as A and the
  rotated queries of one kv head ([heads ≤ 8, D] in shared memory) as B;
- values: out^T [D, heads] = V^T·p^T, the decoded value tile [D, tokens] as A and the
  tile's probabilities (times the value norms), stored transposed in shared memory, as B.

Levels are an odd cubic of the centred code u (`codebook.cubic_codebook`): the kernel
decodes u and u³ and folds the two coefficients into the query operands (keys) and into
two accumulators combined after the kernel (values), so no level table is read.

`decode_partials` returns FlashDecoding split-K partials (o, l, m) per kv head and split,
merged with the exact tokens outside; `decode_partials_reference` computes the same in
jnp. Kernels here take arrays and static specs only.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import register_codes

Array = jax.Array

HEADS = 8  # wgmma's smallest N: the q heads of one kv head, padded


def _f16x2_bits(x: float) -> int:
  h = int(np.array(x, np.float16).view(np.uint16))
  return h | (h << 16)


def tile_decoder(spec: register_codes.TileSpec, variant: str = "affine", count: int = 1):
  """Returns f(words) -> decoded tiles, to call inside a Mosaic GPU kernel.

  words: int32 [count·64, C] in `plgpu.Layout.WGMMA` (`count` code tiles stacked, loaded
  as stored); the result stacks the decoded tiles along rows, [count·rows, cols].
  variant:
    "affine": u = n - (2^b - 1)/2, fp16 [rows, cols] in the WGMMA layout (wgmma's A);
    "cubic": (u, u³), two such tiles, for levels a·u + c·u³;
    "raw": the words reinterpreted as fp16 pairs, no decode (a speed probe only).
  """
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm

  ops = register_codes.program(spec)
  per_half = register_codes.words_per_half(spec)
  out_shape = (count * spec.rows, spec.cols)
  tile_mts = spec.rows // 64
  half_cols = spec.cols // 8
  out_type = plgpu.ShapeDtypeStruct(out_shape, jnp.float16, layout=plgpu.Layout.WGMMA)
  n_out = 2 if variant == "cubic" else 1

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                     return_type=(out_type,) * n_out if n_out > 1 else out_type)
  def decode(ctx, words):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    def c(v):  # an i32 constant from an unsigned 32-bit pattern
      return arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))
    layout = mgpu.WGMMA_LAYOUT
    regs_shape = layout.registers_shape(out_shape)
    outs = [np.empty(regs_shape, dtype=object) for _ in range(n_out)]
    for tile, rh in itertools.product(range(count), range(2)):
      thread_words = []
      for k in range(per_half):
        vec = words.registers[tile, k // 2, 0, 0, rh, 0, 0, 0, 0]
        thread_words.append(mgpu_utils.bitcast(
            mgpu_utils.vector_slice(vec, slice(k % 2, k % 2 + 1)), i32))
      shifted = {}

      def source(k, s):
        if (k, s) not in shifted:
          w = thread_words[k]
          shifted[(k, s)] = (arith.shli(w, c(s)) if s > 0 else
                             arith.shrui(w, c(-s)) if s < 0 else w)
        return shifted[(k, s)]

      for g, op in enumerate(ops):
        mt, ct = divmod(g, half_cols)
        idx = (tile * tile_mts + mt, ct, 0, 0, rh, 0, 0, 0, 0)
        if variant == "raw":
          outs[0][idx] = mgpu_utils.bitcast(thread_words[g % per_half], f16x2)
          continue
        # One LOP3 per source ((a & mask) | c, 0xEA) and one HFMA2, written out: left to
        # itself ptxas splits the and/or into two LOP3s.
        scale, bias = register_codes.fma_constants(spec, op)
        consts = [c(op.a_mask), c(op.const), c(_f16x2_bits(scale)), c(_f16x2_bits(bias))]
        if op.b_word >= 0:
          u = llvm.inline_asm(
              i32, [source(op.a_word, op.a_shift), source(op.b_word, op.b_shift),
                    c(op.b_mask), *consts],
              "{ .reg .b32 t0, t1; lop3.b32 t0, $1, $4, $5, 0xEA;"
              " lop3.b32 t1, $2, $3, t0, 0xEA; fma.rn.f16x2 $0, t1, $6, $7; }",
              "=r,r,r,r,r,r,r,r")
        else:
          u = llvm.inline_asm(
              i32, [source(op.a_word, op.a_shift), *consts],
              "{ .reg .b32 t0; lop3.b32 t0, $1, $2, $3, 0xEA; fma.rn.f16x2 $0, t0, $4, $5; }",
              "=r,r,r,r,r,r")
        u = mgpu_utils.bitcast(u, f16x2)
        outs[0][idx] = u
        if variant == "cubic":
          outs[1][idx] = arith.mulf(arith.mulf(u, u), u)
    arrays = [mgpu.FragmentedArray(_registers=r, _layout=layout, _is_signed=None)
              for r in outs]
    return tuple(arrays) if n_out > 1 else arrays[0]

  return decode


# -- the decode kernel: keys and values ----------------------------------------------------

def _load_words(ref, spec):
  # Mosaic finds no bank-conflict-free plan for [64, 32] words; the plain load is fine.
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=spec.words_per_row <= 24)


def q_transforms():
  """Shared-memory tiling of an fp16 [8, n·64] wgmma B operand (queries, probabilities),
  read transposed: 128-byte swizzle, the only one wgmma takes for these rows."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _check(name, x, shape, dtype):
  if tuple(x.shape) != shape or x.dtype != dtype:
    raise ValueError(f"{name} must be {jnp.dtype(dtype).name} {list(shape)}, "
                     f"got {x.dtype} {list(x.shape)}")


def decode_partials(k_words: Array, k_norms: Array, v_words: Array, v_norms: Array,
                    q_lin: Array, q_cub: Array, bounds: Array, qoff: Array, *,
                    key_spec, value_spec, num_splits: int, scale: float,
                    soft_cap: float | None = None, max_concurrent_steps: int = 2):
  """Split-K partial softmax results of one query token per kv head over register codes.

  Per kv-head row i (batch × kv heads, flattened) and split j, over the compressed tokens
  [bounds[i, 0], bounds[i, 1]) that fall in the split, with key levels a·u + c·u³ folded
  into two query operands and value levels likewise folded into two accumulators:

    s_t = scale·(‖k_t‖·(q_lin·u_t + q_cub·u_t³) + qoff)   (soft-capped if asked)
    m = max_t s_t,  l = Σ_t e^(s_t - m),  o_lin/o_cub = Σ_t e^(s_t - m)·‖v_t‖·(u_t, u_t³)

  Args:
    k_words: int32 [R, tiles·64, Ck], key tiles [tokens, D] by `register_codes.pack_tile`.
    k_norms: float16 [R, T]. v_words: int32 [R, tiles·64, Cv], value tiles [D, tokens].
    v_norms: float16 [R, T].
    q_lin, q_cub: float16 [R, 8, D], the rotated queries of each kv head (q heads beyond
      the real ones zero) times the key levels' linear and cubic coefficients.
    bounds: int32 [R, 2], the compressed range [lo, hi) of each row.
    qoff: float32 [R, 8], added to every score before the scale (the key-centering term).
  Returns:
    (o_lin, o_cub) float32 [R, splits, D, 8] (transposed: channel rows, head columns),
    l, m float32 [R, splits, 8]. Rows of a split with no token: l = 0, m = -1e30, o = 0.
  """
  d = key_spec.cols
  tt = key_spec.rows                              # tokens per tile
  if value_spec.cols != tt or value_spec.rows != d:
    raise ValueError(f"value tiles {value_spec} must be [{d}, {tt}] to match {key_spec}")
  r, t_len = k_norms.shape
  if t_len % (tt * num_splits):
    raise ValueError(f"{t_len} tokens do not split into {num_splits} x {tt}-token tiles")
  words = t_len // tt * register_codes.WORD_ROWS
  _check("k_words", k_words, (r, words, key_spec.words_per_row), jnp.int32)
  _check("v_words", v_words, (r, words, value_spec.words_per_row), jnp.int32)
  _check("k_norms", k_norms, (r, t_len), jnp.float16)
  _check("v_norms", v_norms, (r, t_len), jnp.float16)
  _check("q_lin", q_lin, (r, HEADS, d), jnp.float16)
  _check("q_cub", q_cub, (r, HEADS, d), jnp.float16)
  _check("bounds", bounds, (r, 2), jnp.int32)
  _check("qoff", qoff, (r, HEADS), jnp.float32)
  ck = key_spec.words_per_row
  split_tiles = t_len // tt // num_splits
  cv = value_spec.words_per_row
  decode_k = tile_decoder(key_spec, "cubic")
  decode_v = tile_decoder(value_spec, "cubic")
  wr = register_codes.WORD_ROWS
  neg = -1e30

  def kernel(kw_gmem, kn_gmem, vw_gmem, vn_gmem, ql_gmem, qc_gmem, bounds_gmem, qoff_gmem,
             ol_gmem, oc_gmem, l_gmem, m_gmem,
             ql_smem, qc_smem, p_smem, o_smem, lm_smem, barriers):
    i, j = jax.lax.axis_index("row"), jax.lax.axis_index("split")
    plgpu.copy_gmem_to_smem(ql_gmem.at[i], ql_smem, barriers.at[0])
    plgpu.copy_gmem_to_smem(qc_gmem.at[i], qc_smem, barriers.at[1])
    lo, hi = bounds_gmem[i, 0], bounds_gmem[i, 1]
    # The tiles of this split that hold tokens of [lo, hi).
    split_start = j * split_tiles
    first = jnp.clip(lo // tt, split_start, split_start + split_tiles)
    last = jnp.clip((hi + tt - 1) // tt, first, split_start + split_tiles)
    qoff_v = plgpu.load(qoff_gmem.at[i], (), layout=plgpu.Layout.WGMMA.reduce(0),
                        optimized=False)
    for b in range(2):
      plgpu.barrier_wait(barriers.at[b])

    def body(idx, kw_smem, kn_smem, vw_smem, vn_smem, carry):
      o_lin, o_cub, l_prev, m_prev = carry
      start = (first + idx[0]) * tt
      uk, uk3 = decode_k(_load_words(kw_smem, key_spec))

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, uk, plgpu.transpose_ref(ql_smem, (1, 0)))
        plgpu.wgmma(acc_ref, uk3, plgpu.transpose_ref(qc_smem, (1, 0)))
        return acc_ref[...]
      s = pl.run_scoped(scores, plgpu.ACC((tt, HEADS), jnp.float32))
      kn = plgpu.load(kn_smem, (), layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
      s = s * jax.lax.broadcast_in_dim(kn, s.shape, [0])
      s = (s + jax.lax.broadcast_in_dim(qoff_v, s.shape, [1])) * scale
      if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
      pos = start + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
      valid = (pos >= lo) & (pos < hi)
      s = jnp.where(valid, s, neg)
      m_next = jnp.maximum(m_prev, s.max(axis=0))
      alpha = jnp.exp(m_prev - m_next)
      p = jnp.where(valid, jnp.exp(s - jax.lax.broadcast_in_dim(m_next, s.shape, [1])), 0.0)
      l_next = alpha * l_prev + p.sum(axis=0)
      vn = plgpu.load(vn_smem, (), layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
      pv = (p * jax.lax.broadcast_in_dim(vn, p.shape, [0])).astype(jnp.float16)
      # wgmma's B needs a 128-byte swizzle, so p^T [tokens, 8] is stored as p [8, tokens]
      # (one shuffle per register into the transposed layout) and read transposed.
      plgpu.transpose_ref(p_smem, (1, 0))[...] = plgpu.layout_cast(
          pv, plgpu.Layout.WGMMA_TRANSPOSED)
      plgpu.commit_smem()
      uv, uv3 = decode_v(_load_words(vw_smem, value_spec))
      a = jax.lax.broadcast_in_dim(alpha, o_lin.shape, [1])

      def values(refs):
        lin_ref, cub_ref = refs
        plgpu.wgmma(lin_ref, uv, plgpu.transpose_ref(p_smem, (1, 0)))
        plgpu.wgmma(cub_ref, uv3, plgpu.transpose_ref(p_smem, (1, 0)))
      o_lin, o_cub = pl.run_state(values)((plgpu.ACC.init(o_lin * a),
                                           plgpu.ACC.init(o_cub * a)))
      return o_lin, o_cub, l_next, m_next

    zeros = lambda shape, layout: plgpu.layout_cast(  # noqa: E731
        jnp.zeros(shape, jnp.float32), layout)
    init = (zeros((d, HEADS), plgpu.Layout.WGMMA), zeros((d, HEADS), plgpu.Layout.WGMMA),
            zeros((HEADS,), plgpu.Layout.WGMMA.reduce(0)),
            plgpu.layout_cast(jnp.full((HEADS,), neg, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(0)))
    pipeline = plgpu.emit_pipeline(
        body, grid=(last - first,),
        in_specs=[plgpu.BlockSpec((wr, ck), lambda t: (first + t, 0)),
                  plgpu.BlockSpec((tt,), lambda t: (first + t,)),
                  plgpu.BlockSpec((wr, cv), lambda t: (first + t, 0)),
                  plgpu.BlockSpec((tt,), lambda t: (first + t,))],
        max_concurrent_steps=max_concurrent_steps, init_carry=init)
    o_lin, o_cub, l, m = pipeline(kw_gmem.at[i], kn_gmem.at[i], vw_gmem.at[i], vn_gmem.at[i])
    o_smem.at[0][...] = o_lin
    o_smem.at[1][...] = o_cub
    lm_smem.at[0][...] = l
    lm_smem.at[1][...] = m
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[0], ol_gmem.at[i, j])
    plgpu.copy_smem_to_gmem(o_smem.at[1], oc_gmem.at[i, j])
    plgpu.copy_smem_to_gmem(lm_smem.at[0], l_gmem.at[i, j])
    plgpu.copy_smem_to_gmem(lm_smem.at[1], m_gmem.at[i, j])
    plgpu.wait_smem_to_gmem(0)

  f32 = jnp.float32
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((r, num_splits, d, HEADS), f32),
                jax.ShapeDtypeStruct((r, num_splits, d, HEADS), f32),
                jax.ShapeDtypeStruct((r, num_splits, HEADS), f32),
                jax.ShapeDtypeStruct((r, num_splits, HEADS), f32)),
      grid=(r, num_splits), grid_names=("row", "split"),
      scratch_types=[plgpu.SMEM((HEADS, d), jnp.float16, transforms=q_transforms()),
                     plgpu.SMEM((HEADS, d), jnp.float16, transforms=q_transforms()),
                     plgpu.SMEM((HEADS, tt), jnp.float16, transforms=q_transforms()),
                     plgpu.SMEM((2, d, HEADS), f32),
                     plgpu.SMEM((2, HEADS), f32),
                     plgpu.Barrier(num_arrivals=1, num_barriers=2)],
  )(k_words, k_norms, v_words, v_norms, q_lin, q_cub, bounds, qoff)


def decode_partials_reference(k_codes: Array, k_norms: Array, v_codes: Array,
                              v_norms: Array, q_lin: Array, q_cub: Array, bounds: Array,
                              qoff: Array, *, bits_k: int, bits_v: int, num_splits: int,
                              scale: float, soft_cap: float | None = None):
  """`decode_partials` in float32 jnp, from level indices k_codes, v_codes [R, T, D]."""
  uk = k_codes.astype(jnp.float32) - ((1 << bits_k) - 1) / 2
  uv = v_codes.astype(jnp.float32) - ((1 << bits_v) - 1) / 2
  hi_ = jax.lax.Precision.HIGHEST
  f = lambda x: x.astype(jnp.float32)  # noqa: E731
  dots = (jnp.einsum("rtd,rhd->rth", uk, f(q_lin), precision=hi_)
          + jnp.einsum("rtd,rhd->rth", uk**3, f(q_cub), precision=hi_))
  s = (dots * f(k_norms)[..., None] + qoff[:, None, :]) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  r, t, _ = s.shape
  pos = jnp.arange(t)[None, :, None]
  valid = (pos >= bounds[:, 0, None, None]) & (pos < bounds[:, 1, None, None])
  s = jnp.where(valid, s, -1e30).reshape(r, num_splits, t // num_splits, HEADS)
  valid = valid.reshape(r, num_splits, t // num_splits, 1)
  m = s.max(axis=2)
  p = jnp.where(valid, jnp.exp(s - m[:, :, None]), 0.0)
  l = p.sum(axis=2)
  pv = p * f(v_norms).reshape(r, num_splits, t // num_splits, 1)
  uv = uv.reshape(r, num_splits, t // num_splits, -1)
  o_lin = jnp.einsum("rstd,rsth->rsdh", uv, pv, precision=hi_)
  o_cub = jnp.einsum("rstd,rsth->rsdh", uv**3, pv, precision=hi_)
  return o_lin, o_cub, l, m
