"""Decode attention over register-layout codes: a Mosaic GPU (Hopper) Pallas kernel.

The codes of a tile are stored in the order the tensor cores take them from registers
(`pallas_kernels.register_codes`), so a warpgroup decodes them into wgmma's A operand
with a few bit operations per pair of codes and no shuffles:

- keys: scores^T [tokens, heads] = K·q^T, the decoded key tile [tokens, D] as A and the
  rotated queries of one kv head ([heads ≤ 8, D] in shared memory) as B;
- values: out^T [D, heads] = V^T·p^T, the decoded value tile [D, tokens] as A and the
  tile's probabilities (times the value norms), stored transposed in shared memory, as B.

Levels are an odd polynomial of the centred code u, so no level table is read and each
tile takes one wgmma: a cubic (`codebook.cubic_codebook`), a·u + c·u³ = c·u·(u² + a/c),
decoded as u·(u² + a/c) in fp16 (one FMA and one multiply per pair of codes after the
bit decode), or a quintic (`codebook.polynomial_codebook`, Lloyd-Max's D_mse within
0.002% at 3 bits and 0.16% at 4), v·((v² + α)² + β) with v = u/2^s (three ops); the
leading coefficient is folded into the scores (keys) or the output (values).

Keys centred before RoPE (the cache subtracted R(t)·μ from the key at position t) need
q·R(t)·μ added to every score. Per RoPE pair p it is A_p cos θ + B_p sin θ (A, B from q and
μ); with t = h + l, h a multiple of the step (128 tokens, or the 256 of fractional
widths' tiles), the angle adds: per step one small [D, heads] matrix W (A, B turned by
the angles at h) and a fixed [step, D] table of cos φ_l | sin φ_l give the offsets of the
whole step as one more wgmma, table · W (`RopeOffsets`, `rope_offsets`). The table may be
shorter than the step (`rope_offsets(table_rows=)`: one W and one wgmma per table block,
angles composed R(θ_h)·R(φ_b)): a 256-row table is 64 KB of shared memory, which leaves
one CTA per SM at 3.5 bits; 64 rows fit two.

Fractional widths come as channel groups (`channel_split`: halves of the channels at two
widths, each with its own rotation, norm and levels): each key group takes its own wgmma
into its own accumulator, scaled by its norms before the groups are summed; each value
group its own probabilities × norms in shared memory and its own output rows. With one
group the kernel is the one it was before groups (its lowered module is identical).

The int8 path (`operand="int8"`) feeds the value wgmma p·‖v‖ as two int8 parts (about
14 bits). With at most 4 query heads per kv head the query's rows 4-7 repeat rows 0-3, so
both parts fit one [8, tokens] operand (high parts in rows 0-3, low in 4-7): one value
wgmma and accumulator per step instead of two, folded back after the loop by one
butterfly shuffle per register (`pack_p_parts`; H200, K4/V3 at 8 x 32K: 0.110 -> 0.097 ms).

`decode_partials` returns FlashDecoding split-K partials (o, l, m) per kv head and split;
`decode_partials_reference` computes the same in jnp. The tokens a cache keeps exact (its
window ring and sinks, bf16) may come too (`ExactTokens`): each 64-token block of them is
one more split of the same launch, one TMA round trip and two small wgmmas against the
unrotated query, so the merge after the kernel is a few elementwise XLA kernels and no
exact-token matmul (H200, whole attention at 3.5 bits: 8 x 4K 84 -> 72 us, 1 x 4K 53 ->
40, `mosaic_attend_exact_gpu.json`). The cache's arrays go in as they are: the ring with
its positions per batch entry and the sinks unpadded (TMA fills a block's missing rows
with zeros), each row finding its batch entry's limits as i // heads. Kernels here take
arrays and static specs only.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import byte_codes, decode_prologue, register_codes

Array = jax.Array

HEADS = 8  # wgmma's smallest N: the q heads of one kv head, padded
ROPE_BLOCK = 128  # default tokens per RoPE angle: positions split as h + l, h a multiple


def _f16x2_bits(x: float) -> int:
  h = int(np.array(x, np.float16).view(np.uint16))
  return h | (h << 16)


class LevelForm(NamedTuple):
  """How the kernel decodes a group's levels: level(u) = factor · P(v), v = u·2^-shift
  (exact: the decode's fp16 constants are halved), in fp16 after the bit decode:

  "linear": P = v (no op); "cubic": P = v·(v² + k₀) (2 ops per pair of codes);
  "quintic": P = v·((v² + k₀)² + k₁) (3 ops), a·v + b·v³ + c·v⁵ with the square completed.
  The factor is folded into the scores (keys) or the output (values).
  """

  kind: str
  k: tuple[float, ...]
  factor: float
  shift: int = 0


def level_form(levels, bits: int) -> LevelForm:
  """The `LevelForm` of the odd polynomial L(u) = c₁·u + c₃·u³ [+ c₅·u⁵] of the centred
  code u = n - (2^bits - 1)/2, from levels = (c₁, c₃[, c₅]) (trailing zeros dropped).

  Raises ValueError where fp16 would overflow or lose the levels."""
  c = [float(x) for x in levels]
  if not 1 <= len(c) <= 3:
    raise ValueError(f"levels must be 1 to 3 odd coefficients (u, u³, u⁵), got {levels!r}")
  while len(c) > 1 and c[-1] == 0.0:
    c.pop()
  if len(c) == 1:
    form = LevelForm("linear", (), c[0])
  elif len(c) == 2:
    form = LevelForm("cubic", (c[0] / c[1],), c[1])
  else:
    # v = u·2^-shift under 2 keeps the quartic's terms in fp16's range at any width.
    shift = max(0, int(np.floor(np.log2(2.0 ** (bits - 1) - 0.5))))
    s = 2.0 ** shift
    c1, c3, c5 = c[0] * s, c[1] * s**3, c[2] * s**5
    alpha = c3 / (2 * c5)
    form = LevelForm("quintic", (alpha, c1 / c5 - alpha * alpha), c5, shift)
  exact = _levels(np.arange(1 << bits), bits, c)
  got = form_levels_fp16(form, bits)
  spacing = np.min(np.diff(np.sort(exact))) if bits > 0 else 1.0
  if not (np.all(np.isfinite(got)) and np.max(np.abs(got / form.factor)) <= 3e4
          and np.max(np.abs(got - exact)) <= 0.02 * spacing):
    raise ValueError(f"levels {tuple(c)} overflow fp16 at {bits} bits (or lose precision)")
  return form


def _levels(codes, bits: int, coefficients) -> np.ndarray:
  u = np.asarray(codes, np.float64) - ((1 << bits) - 1) / 2
  return sum(ck * u ** (2 * i + 1) for i, ck in enumerate(coefficients))


def form_levels_fp16(form: LevelForm, bits: int) -> np.ndarray:
  """The levels of codes 0..2^bits - 1 as the kernel computes them: one fp16 rounding
  per op (fma rounds once), times the factor in float64."""
  with np.errstate(over="ignore", invalid="ignore"):
    h = lambda x: np.asarray(x, np.float64).astype(np.float16).astype(np.float64)  # noqa: E731
    v = h((np.arange(1 << bits) - ((1 << bits) - 1) / 2) * 2.0 ** -form.shift)
    k = [h(x) for x in form.k]
    if form.kind == "linear":
      p = v
    elif form.kind == "cubic":
      p = h(h(v * v + k[0]) * v)
    else:
      t = h(v * v + k[0])
      p = h(h(t * t + k[1]) * v)
    return p * form.factor


def tile_decoder(spec: register_codes.TileSpec, variant: str = "affine", count: int = 1,
                 form: LevelForm | None = None, rows: tuple[int, int] | None = None,
                 cols: tuple[int, int] | None = None):
  """Returns f(words) -> decoded tiles, to call inside a Mosaic GPU kernel.

  words: int32 [count·64, C] in `plgpu.Layout.WGMMA` (`count` code tiles stacked, loaded
  as stored); the result stacks the decoded tiles along rows, [count·rows, cols].
  rows, cols: (start, size) to decode only that part of each tile (multiples of 64 rows,
  of 8 columns); the result is then [count·size, cols] or [rows, size].
  variant:
    "affine": u = n - (2^b - 1)/2, fp16 [rows, cols] in the WGMMA layout (wgmma's A);
    "levels": the level polynomial P(v) of `form` (`LevelForm`) over its factor; u alone
      when form is None;
    "cubic": (u, u³), two such tiles, for levels a·u + c·u³;
    "raw": the words reinterpreted as fp16 pairs, no decode (a speed probe only).
  """
  if variant == "levels" and (form is None or form.kind == "linear"):
    variant = "affine"
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm

  ops = register_codes.program(spec)
  per_half = register_codes.words_per_half(spec)
  r0, nr = rows if rows is not None else (0, spec.rows)
  c0, nc = cols if cols is not None else (0, spec.cols)
  if r0 % 64 or nr % 64 or c0 % 8 or nc % 8 or r0 + nr > spec.rows or c0 + nc > spec.cols:
    raise ValueError(f"part rows {rows}, cols {cols} do not cut {spec} at whole fragments")
  out_shape = (count * nr, nc)
  tile_mts = nr // 64
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
        mt, ct = mt - r0 // 64, ct - c0 // 8
        if not (0 <= mt < tile_mts and 0 <= ct < nc // 8):
          continue
        idx = (tile * tile_mts + mt, ct, 0, 0, rh, 0, 0, 0, 0)
        if variant == "raw":
          outs[0][idx] = mgpu_utils.bitcast(thread_words[g % per_half], f16x2)
          continue
        # One LOP3 per source ((a & mask) | c, 0xEA) and one HFMA2, written out: left to
        # itself ptxas splits the and/or into two LOP3s.
        scale, bias = register_codes.fma_constants(spec, op)
        if variant == "levels" and form.shift:   # v = u·2^-shift, still exact
          scale, bias = scale * 2.0 ** -form.shift, bias * 2.0 ** -form.shift
        consts = [c(op.a_mask), c(op.const), c(_f16x2_bits(scale)), c(_f16x2_bits(bias))]
        if op.b_word >= 0:
          srcs = [source(op.a_word, op.a_shift), source(op.b_word, op.b_shift),
                  c(op.b_mask), *consts]
          asm = ("lop3.b32 t0, $1, $4, $5, 0xEA; lop3.b32 t1, $2, $3, t0, 0xEA;"
                 " fma.rn.f16x2 u, t1, $6, $7;")
        else:
          srcs = [source(op.a_word, op.a_shift), *consts]
          asm = "lop3.b32 t1, $1, $2, $3, 0xEA; fma.rn.f16x2 u, t1, $4, $5;"
        if variant == "levels" and form.kind == "cubic":
          asm += f" fma.rn.f16x2 t0, u, u, ${len(srcs) + 1}; mul.rn.f16x2 $0, t0, u;"
          srcs.append(c(_f16x2_bits(form.k[0])))
        elif variant == "levels":     # quintic: v·((v² + k₀)² + k₁)
          n = len(srcs)
          asm += (f" fma.rn.f16x2 t0, u, u, ${n + 1}; fma.rn.f16x2 t0, t0, t0, ${n + 2};"
                  " mul.rn.f16x2 $0, t0, u;")
          srcs += [c(_f16x2_bits(form.k[0])), c(_f16x2_bits(form.k[1]))]
        else:
          asm += " mov.b32 $0, u;"
        u = llvm.inline_asm(i32, srcs, "{ .reg .b32 t0, t1, u; " + asm + " }",
                            ",".join(["=r"] + ["r"] * len(srcs)))
        u = mgpu_utils.bitcast(u, f16x2)
        outs[0][idx] = u
        if variant == "cubic":
          outs[1][idx] = arith.mulf(arith.mulf(u, u), u)
    arrays = [mgpu.FragmentedArray(_registers=r, _layout=layout, _is_signed=None)
              for r in outs]
    return tuple(arrays) if n_out > 1 else arrays[0]

  return decode


# -- the decode kernel: keys and values ----------------------------------------------------

class ByteLevels(NamedTuple):
  """A side's levels for the int8 operand path (`decode_partials(operand="int8")`): level
  n is (table[n] + offset)·scale, table 2^bits int8 integers in level-index order; at 4
  bits sign-magnitude with offset 1/2 (`byte_codes.level_pools`), or evenly spaced levels
  as plain nibbles: table 0..15, offset -15/2 (`PLAIN_TABLE`); else offset 0."""

  table: tuple[int, ...]
  scale: float
  offset: float = 0.0


PLAIN_TABLE = tuple(range(16))   # 4-bit plain nibbles: the bytes are the level indices
PLAIN_OFFSET = -7.5


def is_plain(levels: ByteLevels) -> bool:
  """Whether the levels are 4-bit plain nibbles' (decoded by masks, no table)."""
  return tuple(levels.table) == PLAIN_TABLE and levels.offset == PLAIN_OFFSET


def byte_levels(levels, plain: bool = False) -> ByteLevels:
  """`ByteLevels` nearest to the float levels [2^bits] (increasing): 2-3 bits integers
  times max|L|/127; 16 levels symmetric (the mean of each level and its mirror's
  negation) half-integers times max|L|/(T + 1/2), T the largest magnitude in 127 down to
  64 that puts every level on the grid (`codebook.int8_codebook`'s), else 127. Exact only
  for levels on such a grid. plain: 16 evenly spaced levels (n - 15/2)·Δ as
  `PLAIN_TABLE` and Δ (`codebook.uniform_codebook`'s; exact for evenly spaced levels)."""
  lv = np.asarray(levels, np.float64)
  if plain:
    if lv.shape != (16,):
      raise ValueError(f"plain nibbles take 16 levels, got {levels!r}")
    step = float(np.mean(np.diff(lv)))
    if not (np.isfinite(step) and step > 0):
      raise ValueError(f"plain nibbles take increasing levels, got {levels!r}")
    return ByteLevels(PLAIN_TABLE, step, PLAIN_OFFSET)
  peak = float(np.max(np.abs(lv))) if lv.size else 0.0
  if not np.isfinite(peak) or peak <= 0:
    raise ValueError(f"levels must be finite and not all zero, got {levels!r}")
  if lv.size != 16:
    scale = peak / 127.0
    return ByteLevels(tuple(int(x) for x in np.round(lv / scale)), scale)
  half = (lv[8:] - lv[7::-1]) / 2
  for top in list(range(127, 63, -1)) + [127]:
    scale = peak / (top + 0.5)
    y = half / scale - 0.5
    if np.allclose(y, np.round(y), rtol=0, atol=1e-6):
      break
  t = np.clip(np.round(half / scale - 0.5), 0, 127).astype(int)
  return ByteLevels(tuple(int(x) for x in np.concatenate([-t[::-1] - 1, t])), scale, 0.5)


def quantize_query_s8(q: Array) -> tuple[Array, Array]:
  """q float [R, 8, D] -> (int8 [R, 2, 8, D], float32 [R, 8]): q ≈ scale·(hi + lo/127),
  scale = max|q|/127 per row and head (about 14 bits: the int8 path's queries; halves
  round away from zero, as `decode_prologue`'s kernel rounds them)."""
  hi, lo, scale = decode_prologue.quantize_rotated(q.astype(jnp.float32))
  return jnp.stack([hi, lo], axis=1).astype(jnp.int8), scale


def byte_decoder(bits: int, table, raw: bool = False,
                 shape: tuple[int, int] = (byte_codes.ROWS, byte_codes.COLS)):
  """Returns f(words) -> int8 [rows, cols] (`shape`, one of `byte_codes.SHAPES`) in
  `plgpu.Layout.WGMMA_8BIT`, to call inside a Mosaic GPU kernel: the levels `table`
  (2^bits integers in [-127, 127]) of the codes of a `byte_codes` tile, words int32
  [64, 8·bits] loaded in `plgpu.Layout.WGMMA`, by byte permutes (`byte_codes.decode_words`
  is the same in numpy), or at 4 bits with table `PLAIN_TABLE` from plain nibbles by two
  masks; raw: the words' bytes reinterpreted (a speed probe's floor)."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm

  out_shape = byte_codes.check_shape(shape)
  out_type = plgpu.ShapeDtypeStruct(out_shape, jnp.int8, layout=plgpu.Layout.WGMMA_8BIT)
  plain = bits == 4 and tuple(table) == PLAIN_TABLE
  pools = () if plain else byte_codes.level_pools(table, bits)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=out_type)
  def decode(ctx, words):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i8x4 = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))

    def c(v):
      return arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))

    def asm(text, args):
      return llvm.inline_asm(i32, args, text, ",".join(["=r"] + ["r"] * len(args)))

    layout = mgpu.WGMMA_LAYOUT_8BIT
    regs_shape = layout.registers_shape(out_shape)
    out = np.empty(regs_shape, dtype=object)
    flat_out = list(np.ndindex(*regs_shape))
    tw = [mgpu_utils.bitcast(mgpu_utils.vector_slice(vec, slice(k, k + 1)), i32)
          for vec in words.registers.flat for k in range(2)]
    if len(tw) != byte_codes.thread_words(bits) or len(flat_out) != byte_codes.REGISTERS:
      raise ValueError(f"{len(tw)} words per thread do not make a {bits}-bit byte tile")
    p = [c(x) for x in pools]
    m3, m7, m1, m2, m4 = (c(0x33333333), c(0x77777777), c(0x11111111), c(0x22222222),
                          c(0x44444444))
    outs = []
    if raw:
      outs = [tw[n % len(tw)] for n in range(byte_codes.REGISTERS)]
    elif plain:   # register 2k + h: nibbles h, h + 2, h + 4, h + 6 of word k
      mask = c(byte_codes.PLAIN_MASK)
      for w in tw:
        outs.append(asm("and.b32 $0, $1, $2;", [w, mask]))
        outs.append(asm("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, $2; }", [w, mask]))
    else:
      sels = []       # `byte_codes.selectors`, in the same order
      if bits == 2:
        for w in tw:
          sels += [(asm("and.b32 $0, $1, $2;", [w, m3]),),
                   (asm("{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, $2; }", [w, m3]),)]
      elif bits == 3:
        for g in range(0, len(tw), 3):
          w = tw[g:g + 3]
          sels += [(asm("and.b32 $0, $1, $2;", [x, m7]),) for x in w]
          sels.append((asm(
              "{ .reg .b32 t0, t1, t2; shr.b32 t0, $1, 3; shr.b32 t1, $2, 2;"
              " shr.b32 t2, $3, 1; and.b32 t0, t0, $4;"
              " lop3.b32 t0, t1, $5, t0, 0xEA; lop3.b32 $0, t2, $6, t0, 0xEA; }",
              [*w, m1, m2, m4]),))
      else:   # the magnitudes' selector, and w << 4 (the even codes' signs at bit 7)
        for w in tw:
          sels.append((asm("and.b32 $0, $1, $2;", [w, m7]), w,
                       asm("shl.b32 $0, $1, 4;", [w])))
      for sel in sels:
        for half in range(2):
          shift = "" if half == 0 else "shr.b32 m, m, 16;"
          if bits < 4:
            outs.append(asm("{ .reg .b32 m; mov.b32 m, $3; " + shift
                            + " prmt.b32 $0, $1, $2, m; }", [p[0], p[1], sel[0]]))
          else:   # T[m], then ~T[m] where the sign byte is 0xFF
            outs.append(asm(
                "{ .reg .b32 m, t, k; mov.b32 m, $3; " + shift
                + " prmt.b32 t, $1, $2, m; prmt.b32 k, $4, $5, $6; xor.b32 $0, t, k; }",
                [p[0], p[1], sel[0], sel[1], sel[2],
                 c(byte_codes.SIGN_SELECTORS[half])]))
    for n, r in enumerate(outs):
      out[flat_out[n]] = mgpu_utils.bitcast(r, i8x4)
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=True)

  return decode


def _partner_columns(x):
  """Inside a Mosaic GPU kernel: x float32 [rows, 8] in `plgpu.Layout.WGMMA` -> y with
  y[:, c] = x[:, c ^ 4] (thread 4·r + k holds columns 2k, 2k + 1: one butterfly shuffle
  across lanes k and k ^ 2 per register)."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import llvm

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                     return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32,
                                                        layout=plgpu.Layout.WGMMA))
  def shuffle(ctx, arr):
    del ctx
    i64 = ir.IntegerType.get_signless(64)
    out = np.empty(arr.registers.shape, dtype=object)
    for idx, vec in np.ndenumerate(arr.registers):
      r = llvm.inline_asm(
          i64, [mgpu_utils.bitcast(vec, i64)],
          "{ .reg .b32 a, b; mov.b64 {a, b}, $1;"
          " shfl.sync.bfly.b32 a, a, 2, 0x1f, 0xffffffff;"
          " shfl.sync.bfly.b32 b, b, 2, 0x1f, 0xffffffff; mov.b64 $0, {a, b}; }", "=l,l",
          has_side_effects=True)
      out[idx] = mgpu_utils.bitcast(r, vec.type)
    return mgpu.FragmentedArray(_registers=out, _layout=arr.layout, _is_signed=None)
  return shuffle(x)


def fold_p_parts(o) -> Array:
  """Inside the kernel: o float32 [rows, 8] (WGMMA layout) with the high parts' sums in
  columns 0-3 and the low parts' in 4-7 (`pack_p_parts`; the scores' too with
  `pack_q_parts`) -> o[:, :4] + o[:, 4:] / 127 in both halves (the unpacked kernel's o
  with its query rows repeated)."""
  y = _partner_columns(o)
  col = plgpu.broadcasted_iota(jnp.int32, o.shape, 1, layout=plgpu.Layout.WGMMA)
  return jnp.where(col < HEADS // 2, o + y * (1 / 127), y + o * (1 / 127))


COLUMN_MAX_SCRATCH = 32   # float32 words of SMEM `column_max` takes: 4 column pairs x 4 warps x 2


def column_max(x, scratch) -> Array:
  """Inside a Mosaic GPU kernel: x float32 [rows, 8] in `plgpu.Layout.WGMMA` -> its max
  over the rows, float32 [8] in `plgpu.Layout.WGMMA.reduce(0)` (what ``x.max(axis=0)``
  gives), through `scratch` (float32 [COLUMN_MAX_SCRATCH], SMEM) with one warpgroup
  barrier where Mosaic's cross-warp reduction takes two: its second keeps the scratch
  until every warp has read it, which the caller must do instead, by a warpgroup barrier
  (a `plgpu.commit_smem`) before the next call on the same scratch.

  Lanes 4·r + k of a warp hold columns 2k, 2k + 1 (of rows r, r + 8 of each 64-row tile's
  16): a register max, three butterfly shuffles (lanes 4, 8, 16 apart), one vector store
  per lane of the warp's pair to [k][warp], the barrier, and one 32-byte load of the four
  warps' pairs."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, vector

  out_type = plgpu.ShapeDtypeStruct((HEADS,), jnp.float32,
                                    layout=plgpu.Layout.WGMMA.reduce(0))

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=out_type)
  def reduce(ctx, arr, ref):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    c = lambda v: arith.constant(i32, v)                # noqa: E731
    at = lambda v: arith.index_cast(index, v)           # noqa: E731
    acc = functools.reduce(arith.maximumf, list(arr.registers.flat))
    for lanes in (4, 8, 16):
      acc = arith.maximumf(acc, mgpu_utils.shfl_bfly(acc, lanes))
    tid = arith.remui(mgpu_utils.thread_idx(), c(128))
    warp, pair = arith.divui(tid, c(32)), arith.remui(tid, c(4))
    vector.store(acc, ref, [at(arith.addi(arith.muli(pair, c(8)), arith.muli(warp, c(2))))])
    mgpu_utils.warpgroup_barrier()
    row = vector.load(ir.VectorType.get((8,), ir.F32Type.get()), ref,
                      [at(arith.muli(pair, c(8)))])
    out = functools.reduce(arith.maximumf, [mgpu_utils.vector_slice(row, slice(k, k + 2))
                                            for k in range(0, 8, 2)])
    layout = mgpu.WGMMA_LAYOUT.reduce((0,))
    regs = np.empty(layout.registers_shape((HEADS,)), dtype=object)
    if regs.size != 1:
      raise ValueError(f"{layout} holds {regs.size} registers per thread, not one")
    regs.flat[0] = out
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

  return reduce(x, scratch)


def warpgroup_sync() -> None:
  """Inside a Mosaic GPU kernel: a warpgroup barrier (no memory fence), where the kernel
  places its own barriers (``unsafe_no_auto_barriers``)."""
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu()
  def sync(ctx):
    del ctx
    mgpu_utils.warpgroup_barrier()

  sync()


def s8_transforms(cols: int = 128):
  """Shared-memory tiling of an int8 [8, cols] wgmma B operand, read as K-major (int8
  wgmma takes no transposed operands): a swizzle of the row's bytes, up to 128."""
  width = min(cols, 128)
  return (plgpu.TilingTransform((8, width)), plgpu.SwizzleTransform(width))


def store_s8_parts(x, refs, packed: bool) -> tuple[Array, Array]:
  """Inside the kernel: x float32 [rows, 8] (WGMMA layout, |x| <= 127) as two int8 parts
  hi = round(x), lo = round((x - hi)·127) (about 14 bits), stored transposed into the
  [8, rows] wgmma B operands `refs`: two, or with `packed` one holding the high parts in
  columns 0-3 and the low in 4-7 (columns 4-7 repeating heads 0-3). Returns (hi, lo)."""
  hi = jnp.round(x)
  lo = jnp.round((x - hi) * 127.0)
  if packed:
    col = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=plgpu.Layout.WGMMA)
    parts = [(refs[0], jnp.where(col < HEADS // 2, hi, lo))]
  else:
    parts = zip(refs, (hi, lo))
  for ref, y in parts:
    # Mosaic transposes 16-bit registers only: in fp16 (exact, |y| <= 127).
    plgpu.transpose_ref(ref, (1, 0))[...] = plgpu.layout_cast(
        y.astype(jnp.float16), plgpu.Layout.WGMMA_TRANSPOSED).astype(jnp.int8)
  return hi, lo


def _load_words(ref, spec):
  # Mosaic finds no bank-conflict-free plan for [64, 32] words; the plain load is fine.
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=spec.words_per_row <= 24)


def q_transforms():
  """Shared-memory tiling of an fp16 [8, n·64] wgmma B operand (queries, probabilities),
  read transposed: 128-byte swizzle, the only one wgmma takes for these rows."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


class RopeOffsets(NamedTuple):
  """The operands of q·R(t)·μ for keys centred before RoPE (built by `rope_offsets`).

  coef: float32 (or float16) [R, 2, D, 8], per row the columns of [A | B] and [B | -A]
    (pairs on the first D/2 and second D/2 rows, query rows as columns) over `scale`;
  scale: float32 [R, 8], the largest |A|, |B| of each query row (keeps W in fp16 range);
  trig: float32 (or float16, as coef) [T/m, 2, D], [cos θ | cos θ] and [sin θ | sin θ] at
    the first position of each m-token table block: θ_h = h·ω at the split block's start
    h (rounded in float32 as `rope.rotate`), composed with φ_b = b·ω for a table block b
    tokens into it;
  table: float16 [m, D], cos φ_l | sin φ_l at the offsets l < m (φ_l = l·ω).
  The split block n (128, or the tiles' 256 tokens) is the kernel's step and the cache's
  `rope.rotate_split` period, so both split every angle the same way; the table may be
  shorter (m = n/k rows, k W operands per step: less shared memory).
  """

  coef: Array
  scale: Array
  trig: Array
  table: Array


def rope_offsets(coef_a: Array, coef_b: Array, freq: Array, t_len: int,
                 block: int = ROPE_BLOCK, table_rows: int | None = None,
                 dtype=jnp.float32) -> RopeOffsets:
  """`RopeOffsets` from coef_a, coef_b [R, 8, D/2] float32 (q·R(θ)·μ = Σ_p A_p cos θ_p +
  B_p sin θ_p) and the RoPE frequencies ω [D/2], for T = t_len cache slots (position =
  slot), angles split at multiples of `block`; the table `table_rows` long (a divisor of
  block, default block), the angle of a table block composed as R(θ_h)·R(φ_b) in float32,
  within ~1e-7 of the cache's θ_h + φ_(b+l) for the small φ. dtype: coef's and trig's;
  float16 halves their shared memory (4 + 4 KB at D = 128, 256-token steps) for roundings
  of 2^-11 of their scale, the size of W's own fp16 rounding."""
  table_rows = block if table_rows is None else table_rows
  if t_len % block or block % table_rows or table_rows % 64:
    raise ValueError(f"{t_len} cache slots must split into {block}-token blocks of "
                     f"{table_rows}-row tables (a multiple of 64)")
  scale = jnp.maximum(jnp.max(jnp.abs(coef_a), -1), jnp.max(jnp.abs(coef_b), -1))
  scale = jnp.where(scale > 0, scale, 1.0)
  a, b = coef_a / scale[..., None], coef_b / scale[..., None]
  coef = jnp.stack([jnp.concatenate([a, b], -1), jnp.concatenate([b, -a], -1)], 1)
  trig, table = _rope_tables(freq, t_len, block, table_rows)
  return RopeOffsets(jnp.swapaxes(coef, -1, -2).astype(dtype),
                     scale.astype(jnp.float32), trig.astype(dtype), table)


@jax.ensure_compile_time_eval()
def _rope_tables(freq: Array, t_len: int, block: int, table_rows: int) -> tuple[Array, Array]:
  # Constants under jit when freq is (no sine or cosine kernels per call; XLA left the
  # [T/64, D/2] tables of a 32K cache to run every call).
  starts = jnp.arange(0, t_len, block, dtype=jnp.float32)[:, None] * freq[None, :]
  cos, sin = jnp.cos(starts), jnp.sin(starts)
  if table_rows < block:   # [T/block, 1, D/2] x [1, block/m, D/2]: every table block
    into = jnp.arange(0, block, table_rows, dtype=jnp.float32)[:, None] * freq[None, :]
    cb, sb = jnp.cos(into)[None], jnp.sin(into)[None]
    cos, sin = (cos[:, None] * cb - sin[:, None] * sb, sin[:, None] * cb + cos[:, None] * sb)
    cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
  trig = jnp.stack([jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)], 1)
  offsets = jnp.arange(table_rows, dtype=jnp.float32)[:, None] * freq[None, :]
  table = jnp.concatenate([jnp.cos(offsets), jnp.sin(offsets)], -1).astype(jnp.float16)
  return trig, table


def rope_offsets_dense(rope: RopeOffsets) -> Array:
  """q·R(t)·μ [R, T, 8] float32 from the kernel's operands, as the kernel sums them (W in
  float32, where the kernel rounds it to fp16; the fp16 table as given)."""
  hi_ = jax.lax.Precision.HIGHEST
  w = (rope.coef[:, None, 0] * rope.trig[None, :, 0, :, None]
       + rope.coef[:, None, 1] * rope.trig[None, :, 1, :, None])      # [R, blocks, D, 8]
  off = jnp.einsum("ld,rbdh->rblh", rope.table.astype(jnp.float32), w, precision=hi_)
  r, blocks = off.shape[:2]
  return off.reshape(r, blocks * rope.table.shape[0], HEADS) * rope.scale[:, None, :]


EXACT_BLOCK = 64      # exact tokens per wgmma: one A tile of keys, one B tile of p


class ExactTokens(NamedTuple):
  """The tokens a cache keeps exact (its window ring, its sinks), as more splits of
  `decode_partials` (one per block of a part's slots, `exact_blocks`): bf16 (or fp16) keys
  and values read by TMA, scored and summed by wgmma against the unrotated query in the
  same base-2 softmax, so the merge after the kernel has no exact-token products, masks
  or softmax of its own.

  q: [R, 8, D] the query rows of each kv head, unrotated (the tokens' channel order), in
    the keys' dtype (bfloat16 or float16);
  limits: int32 [B, 1 + 2·P] (more columns are ignored), per batch entry (R = B x kv
    heads, rows in batch-major order; or B = R, per row: `decode_prologue`'s): the query
    token's position p, then each part's visible range [lo, hi). A
    query sees a slot of part k at position t when lo_k <= t < hi_k and t <= p (and, with
    a sliding window w, t > p - w);
  keys, values: one [R, n, D] per part (n below 8 or a multiple of 8: the last block's
    slots past n are read as zeros, TMA's out-of-bounds fill, and never seen);
  positions: one per part, int32 [B, n] (each batch entry's slot positions: a ring's), or
    None: slot t holds position t (sinks).
  """

  q: Array
  limits: Array
  keys: tuple
  values: tuple
  positions: tuple


def _exact_args(exact: ExactTokens) -> list[Array]:
  args = [exact.q, exact.limits]
  for k, v, p in zip(exact.keys, exact.values, exact.positions):
    args += [k, v] + ([] if p is None else [p])
  return args


def _check_exact(exact: ExactTokens, r: int, d: int) -> None:
  dt = exact.q.dtype
  if dt not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"exact tokens must be bfloat16 or float16, got {dt}")
  _check("exact.q", exact.q, (r, HEADS, d), dt)
  parts = len(exact.keys)
  if not (len(exact.values) == len(exact.positions) == parts >= 1):
    raise ValueError("exact tokens need keys, values and positions for each part (>= 1)")
  b, width = exact.limits.shape if exact.limits.ndim == 2 else (0, 0)
  if b < 1 or r % b or width < 1 + 2 * parts or exact.limits.dtype != jnp.int32:
    raise ValueError(f"exact.limits must be int32 [B, {1 + 2 * parts}] (or wider) with B "
                     f"dividing the {r} rows, got {exact.limits.dtype} "
                     f"{list(exact.limits.shape)}")
  for k, (keys, values, pos) in enumerate(zip(exact.keys, exact.values, exact.positions)):
    n = keys.shape[1] if keys.ndim == 3 else -1
    if n <= 0 or (n > 8 and n % 8):   # Mosaic tiles the copied rows by 8 in HBM too
      raise ValueError(f"exact part {k} must hold [R, n, D] keys with n below 8 or a "
                       f"multiple of 8, got {list(keys.shape)}")
    _check(f"exact.keys[{k}]", keys, (r, n, d), dt)
    _check(f"exact.values[{k}]", values, (r, n, d), dt)
    if pos is not None:   # per batch entry (limits may be per row)
      bp = pos.shape[0] if pos.ndim == 2 else 0
      if bp < 1 or r % bp:
        raise ValueError(f"exact.positions[{k}] must be int32 [B, {n}] with B dividing the "
                         f"{r} rows, got {pos.dtype} {list(pos.shape)}")
      _check(f"exact.positions[{k}]", pos, (bp, n), jnp.int32)


def _batch_entry(i, rows_per_entry: int):
  """The batch entry of kv-head row i (rows are batch-major: rows_per_entry per entry)."""
  return i if rows_per_entry == 1 else i // rows_per_entry


def _write_partial(l, m, o_smem, lm_smem, outs, i, j):
  """Writes split j of row i: o (already in o_smem), l and m (base 2, back to natural-log
  units; rows with no token keep the sentinel)."""
  neg = -1e30
  o_gmem, l_gmem, m_gmem = outs
  lm_smem.at[0][...] = l
  lm_smem.at[1][...] = jnp.where(m > neg / 2, m * float(np.log(2.0)), neg)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[i, j])
  plgpu.copy_smem_to_gmem(lm_smem.at[0], l_gmem.at[i, j])
  plgpu.copy_smem_to_gmem(lm_smem.at[1], m_gmem.at[i, j])
  plgpu.wait_smem_to_gmem(0)


def exact_block_sizes(exact: ExactTokens, exact_blocks) -> tuple[int, ...]:
  """Tokens per exact split of each part: `exact_blocks` (one int for all, or one per
  part), each a multiple of `EXACT_BLOCK`, at most 128."""
  parts = len(exact.keys)
  sizes = ((exact_blocks,) * parts if isinstance(exact_blocks, int) else tuple(exact_blocks))
  if len(sizes) != parts or any(n % EXACT_BLOCK or not 0 < n <= 2 * EXACT_BLOCK
                                for n in sizes):
    raise ValueError(f"exact_blocks {exact_blocks!r} must give each of the {parts} parts "
                     f"{EXACT_BLOCK} or {2 * EXACT_BLOCK} tokens per split")
  return sizes


def exact_splits(exact: ExactTokens, exact_blocks=EXACT_BLOCK) -> int:
  """Splits the exact tokens take: one per block (`exact_blocks` tokens) of each part."""
  return sum(-(-k.shape[1] // n)
             for k, n in zip(exact.keys, exact_block_sizes(exact, exact_blocks)))


def split_steps(steps: int, num_splits: int) -> np.ndarray:
  """int [S + 1]: split j of a row runs its steps [b[j], b[j + 1]), b[j] = ⌊j·steps / S⌋.

  Any S from 1 to steps: runs differ by at most one step, so the grid can be sized to
  fill whole waves of CTAs rather than to divide the steps (H200, int8 tiles, three CTAs
  per SM: `kernel_attention._mosaic_splits`)."""
  if not 1 <= num_splits <= steps:
    raise ValueError(f"num_splits must lie in [1, {steps}] (the steps), got {num_splits}")
  return np.arange(num_splits + 1) * steps // num_splits


def _exact_split(i, j, refs, o_gmem, l_gmem, m_gmem, o_smem, lm_smem, *, first: int,
                 blocks: tuple[int, ...], position_heads: tuple[int | None, ...],
                 heads: int,
                 dot_scale: float,
                 soft_cap: float | None, sliding_window: int | None):
  """Split j >= first of row i: one block of exact tokens (`ExactTokens`), in the
  orientation of the compressed splits (scores^T = K·q^T, out^T = V^T·p^T).

  One block per CTA: every copy is issued at once and waited on once, so a row's exact
  tokens cost the latency of one block, not of a loop over the window (at batch 1 a
  looping split was the launch's last CTA to finish)."""
  qe_gmem, lim_gmem = refs[:2]
  d, dtype = qe_gmem.shape[-1], qe_gmem.dtype
  neg, log2e = -1e30, float(np.log2(np.e))
  bcast = jax.lax.broadcast_in_dim
  b = _batch_entry(i, heads)       # limits' row (per batch entry, or per row)

  def block(part, k_gmem, v_gmem, p_gmem, c, n, qe_smem, k_smem, v_smem, *rest):
    *pos_smem, pe_smem, barrier = rest
    slots = k_gmem.shape[1]
    rows = pl.ds(c * n, n)
    plgpu.copy_gmem_to_smem(qe_gmem.at[i], qe_smem, barrier)
    # Past the part's last slot TMA fills zeros: finite scores, masked below.
    plgpu.copy_gmem_to_smem(k_gmem.at[i, rows], k_smem, barrier)
    plgpu.copy_gmem_to_smem(v_gmem.at[i, rows], v_smem, barrier)
    if p_gmem is not None:
      bp = _batch_entry(i, position_heads[part])
      plgpu.copy_gmem_to_smem(p_gmem.at[bp, rows], pos_smem[0], barrier)
    qpos = lim_gmem[b, 0]
    lo, hi = lim_gmem[b, 1 + 2 * part], lim_gmem[b, 2 + 2 * part]
    plgpu.barrier_wait(barrier)

    def scores(acc_ref):
      plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(qe_smem, (1, 0)))
      return acc_ref[...]
    s = pl.run_scoped(scores, plgpu.ACC((n, HEADS), jnp.float32)) * dot_scale
    if soft_cap is not None:
      s = (soft_cap * log2e) * jnp.tanh(s / soft_cap)
    slot = c * n + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
    if p_gmem is None:
      kpos = slot
    else:
      kpos = bcast(plgpu.load(pos_smem[0], (), layout=plgpu.Layout.WGMMA.reduce(1)),
                   s.shape, [0])
    valid = (kpos >= lo) & (kpos < hi) & (kpos <= qpos)
    if slots % n:
      valid = valid & (slot < slots)
    if sliding_window is not None:
      valid = valid & (kpos > qpos - sliding_window)
    s = jnp.where(valid, s, neg)
    m = s.max(axis=0)
    p = jnp.where(valid, jnp.exp2(s - bcast(m, s.shape, [1])), 0.0)
    plgpu.transpose_ref(pe_smem, (1, 0))[...] = plgpu.layout_cast(
        p.astype(dtype), plgpu.Layout.WGMMA_TRANSPOSED)
    plgpu.commit_smem()

    def values(acc_ref):
      plgpu.wgmma(acc_ref, plgpu.transpose_ref(v_smem, (1, 0)),
                  plgpu.transpose_ref(pe_smem, (1, 0)))
      return acc_ref[...]
    o_smem[...] = pl.run_scoped(values, plgpu.ACC((d, HEADS), jnp.float32))
    _write_partial(p.sum(axis=0), m, o_smem, lm_smem, (o_gmem, l_gmem, m_gmem), i, j)

  start = first
  refs = list(refs[2:])
  for part, (n, has_pos) in enumerate(zip(blocks, position_heads)):  # a branch per part
    k_gmem, v_gmem = refs.pop(0), refs.pop(0)
    p_gmem = refs.pop(0) if has_pos is not None else None
    count = -(-k_gmem.shape[1] // n)
    scratch = [plgpu.SMEM((HEADS, d), dtype, transforms=q_transforms()),
               plgpu.SMEM((n, d), dtype, transforms=q_transforms()),
               plgpu.SMEM((n, d), dtype, transforms=q_transforms())]
    scratch += [plgpu.SMEM((n,), jnp.int32)] if p_gmem is not None else []
    scratch += [plgpu.SMEM((HEADS, n), dtype, transforms=q_transforms()),
                plgpu.Barrier(num_arrivals=4 if p_gmem is not None else 3)]

    @pl.when((j >= start) & (j < start + count))
    def _(part=part, k_gmem=k_gmem, v_gmem=v_gmem, p_gmem=p_gmem, start=start, n=n,
          scratch=scratch):
      pl.run_scoped(functools.partial(block, part, k_gmem, v_gmem, p_gmem, j - start, n),
                    *scratch)
    start += count


def _check(name, x, shape, dtype):
  if tuple(x.shape) != shape or x.dtype != dtype:
    raise ValueError(f"{name} must be {jnp.dtype(dtype).name} {list(shape)}, "
                     f"got {x.dtype} {list(x.shape)}")


def _groups(x) -> tuple:
  """One channel group's operand, or a tuple of them, as a tuple."""
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _level_groups(levels) -> tuple:
  """(a, c), or one (a, c) per group, as a tuple of pairs."""
  return (tuple(levels),) if np.ndim(levels[0]) == 0 else tuple(tuple(x) for x in levels)


def _s8_levels(levels) -> tuple:
  """One `ByteLevels`, or one per group, as a tuple."""
  return (levels,) if isinstance(levels, ByteLevels) else tuple(levels)


def _check_s8(key_specs, value_specs, key_levels, value_levels, q, q_scale, tokens_per_step,
              sub_steps, rotate: bool = False) -> None:
  if len(q) != 1:
    raise ValueError("operand='int8' takes one query array (the groups' columns side by "
                     "side)")
  for side, specs, levels in (("key", key_specs, key_levels),
                              ("value", value_specs, value_levels)):
    if len(levels) != len(specs):
      raise ValueError(f"operand='int8' takes one ByteLevels per {side} group, got "
                       f"{len(levels)} for {len(specs)}")
    for spec, lv in zip(specs, levels):
      if (spec.rows, spec.cols) not in byte_codes.SHAPES:
        raise ValueError(f"operand='int8' reads byte tiles of {byte_codes.SHAPES}, got "
                         f"{side} tiles {spec}")
      if not isinstance(lv, ByteLevels) or len(lv.table) != 1 << spec.bits:
        raise ValueError(f"operand='int8' takes ByteLevels of {1 << spec.bits} levels for "
                         f"the {side}s, got {lv!r}")
      if spec.bits == 4 and is_plain(lv):
        continue
      byte_codes.level_pools(lv.table, spec.bits)   # int8 (4 bits: sign-magnitude)
      if lv.offset != (0.5 if spec.bits == 4 else 0.0):
        raise ValueError(f"operand='int8' takes {spec.bits}-bit levels with offset "
                         f"{0.5 if spec.bits == 4 else 0.0} (or 4-bit plain nibbles' "
                         f"{PLAIN_OFFSET}), got {lv!r}")
  if q_scale is None and not rotate:   # with q_rotation the kernel makes it
    raise ValueError("operand='int8' needs q_scale (see quantize_query_s8)")
  if tokens_per_step > key_specs[0].rows or sub_steps not in (None, 1):
    raise ValueError("operand='int8' steps one tile at a time (tokens_per_step at most "
                     "the tile's, sub_steps 1)")


def decode_partials(k_words, k_norms, v_words, v_norms, q, bounds: Array, qoff: Array, *,
                    key_spec, value_spec, key_levels, value_levels,
                    num_splits: int, scale: float, soft_cap: float | None = None,
                    max_concurrent_steps: int = 2, overlap_values: bool = True,
                    serial_groups: bool | None = None, sub_steps: int | None = None,
                    tokens_per_step: int = 128, rope: RopeOffsets | None = None,
                    exact: ExactTokens | None = None, exact_blocks=EXACT_BLOCK,
                    sliding_window: int | None = None, operand: str = "fp16",
                    q_scale: Array | None = None, p_scale: str = "bound",
                    value_bound: Array | None = None, key_offsets: Array | None = None,
                    pack_p_parts: bool = False, pack_q_parts: bool = False,
                    auto_barriers: bool = False, mask_edges_only: bool = True,
                    q_rotation: Array | None = None):
  """Split-K partial softmax results of one query token per kv head over register codes.

  Per kv-head row i (batch × kv heads, flattened) and split j, over the compressed tokens
  [bounds[i, 0], bounds[i, 1]) that fall in the split, with the odd polynomial levels
  L(u) = c₁·u + c₃·u³ [+ c₅·u⁵] of the centred codes u (`key_levels`, `value_levels`):

    s_t = scale·(‖k_t‖·(q·L(u_t)) + qoff + q·R(t)·μ)   (soft-capped if asked)
    m = max_t s_t,  l = Σ_t e^(s_t - m),  o = Σ_t e^(s_t - m)·‖v_t‖·L(u_t)

  Channel groups (fractional widths: `channel_split`): keys and values may each come as
  a tuple of groups, each with its own tiles, norms, levels (and, for keys, its own query
  part): the score sums the groups' ‖k_g‖·(q_g·L_g(u)), each value group adds its own
  rows to o. One group: the arrays themselves (or 1-tuples).

  Args:
    k_words: int32 [R, tiles·64, Ck], key tiles [tokens, D] by `register_codes.pack_tile`.
    k_norms: float16 [R, T]. v_words: int32 [R, tiles·64, Cv], value tiles [D, tokens].
    v_norms: float16 [R, T].
    q: float16 [R, 8, D], the rotated queries of each kv head (q heads beyond the real
      ones zero); with key groups a tuple of one [R, 8, D_g] per group, or one array of
      the groups' columns side by side.
    bounds: int32 [R', 2], the compressed range [lo, hi) of each row, or of each batch
      entry (R' = B dividing R: rows i·R/B to (i + 1)·R/B share entry i).
    qoff: float32 [R, 8], added to every score before the scale (the key-centering term).
    num_splits: splits per row, each a run of whole steps (`split_steps`: S need not
      divide the steps).
    key_spec, value_spec: the `register_codes.TileSpec` of the tiles (a tuple per group).
    key_levels, value_levels: (c₁, c₃[, c₅]) (a tuple of them per group; `level_form`).
    overlap_values: decode the value tile while the key wgmma runs (else after softmax).
    serial_groups: with channel groups, decode each group's tile after the previous
      group's wgmma is done (one decoded tile live at a time); None: with two or more
      key groups and the RoPE offsets (where holding them all spills registers; int8,
      3.5 bits, 8 x 32K: 0.314 against 0.330 ms).
    sub_steps: passes per pipeline step (one tile): each decodes, scores and accumulates
      1/sub_steps of the tile's tokens (keys: rows, values: columns), so a 256-token tile
      takes the registers of a 128-token one; None: 128-token passes where a step is one
      tile (H200, 3.5 bits at 8 x 32K: 215 registers and no spill against 255 and 280
      bytes, 0.220 against 0.231 ms).
    tokens_per_step: tokens per pipeline step, a multiple of the tile's (fewer steps:
      fewer barriers and copies per token).
    rope: q·R(t)·μ for keys centred before RoPE (`rope_offsets`), or None (no such term);
      its table's rows must divide the step's tokens (each pass holding whole table
      blocks: one W operand and one offsets wgmma per block).
    exact: the tokens kept exact (`ExactTokens`), attended by `exact_splits(exact,
      exact_blocks)` more splits per row (after the compressed ones, one block each), whose
      o is in the tokens' own channel domain (not rotated); or None.
    exact_blocks: tokens per exact split, 64 or 128 (one for all parts, or one per part):
      128 halves the splits and takes 2 x 16 KB more shared memory (at D = 128) in a scope
      the compressed pipeline's buffers share.
    sliding_window: with `exact`, a query at p sees exact tokens at t > p - window (the
      compressed range comes windowed in `bounds`).
    operand: "fp16" (the above), or "int8": the tiles are `byte_codes` tiles (2-4 bits;
      [128, 128], or [256, 64] keys / [64, 256] values for 64-channel groups; the specs
      give their shapes), decoded by byte permutes into int8 wgmma operands;
      key_levels / value_levels are `ByteLevels` (one per group; 4-bit groups in
      sign-magnitude with offset 1/2, added as 1/2·Σq to the dots and 1/2·Σp·‖v‖ to the
      output); q is int8 [R, 2, 8, D],
      the groups' columns side by side, two parts with q = q_scale·(q[:, 0] +
      q[:, 1]/127) (`quantize_query_s8`); q_scale float32 [R, 8]. Each step's p·‖v‖ (per
      value group) goes to the value wgmma as two int8 parts (about 14 bits; p_scale).
      One step per tile (sub_steps 1).
    p_scale: int8 only: the scale of p·‖v‖'s int8 parts: "bound", value_bound/127 for
      every step (p <= 1 after the running max, so p·‖v‖ <= max ‖v‖: no reduction in the
      loop; H200, 8 x 32K: K4/V4 0.125 -> 0.115 ms, K4/V3 0.111 -> 0.109 at 16 splits),
      or "step", each step's largest entry per head (a cross-warp max per step; finer
      where a few tokens' ‖v‖ dwarf the rest: 1.1e-4 against 2.5e-4 relative error with
      every 97th norm x 300).
    value_bound: float32 [R, value groups], an upper bound of each row's value norms
      (with p_scale="bound"; None: their max over all T slots, one XLA reduction).
    key_offsets: int8 only: float32 [R, key groups, 8], each 4-bit group's 1/2·Σq over
      its columns in q_scale units (`decode_prologue` computes it with the query); None:
      computed here from q.
    pack_p_parts: int8 only, for at most 4 query heads per kv head with q's rows 4-7
      repeating rows 0-3: p·‖v‖'s two int8 parts go to one value wgmma as the columns of
      one operand (0-3 the high parts, 4-7 the low), not to two: one value wgmma and one
      accumulator per step instead of two; after the loop one butterfly shuffle per
      register folds the halves back (`fold_p_parts`): the outputs are as without it.
    pack_q_parts: with pack_p_parts, the query's two int8 parts go to one key wgmma the
      same way (columns 0-3 the high parts' dots, 4-7 the low parts'; one butterfly
      shuffle per score register adds them): one key wgmma and accumulator per step and
      group instead of two. The operand is made here from q (one XLA fusion), or q comes
      as it: int8 [R, 1, 8, D] (`decode_prologue` parts="packed"; key_offsets given).
    auto_barriers: Pallas's own warpgroup barriers (before and after every SMEM store,
      before every TMA copy: 9 per step at K4/V3 int8, 6 of them for the stores and the
      pipeline's four copies), else the kernel's: every pass commits its SMEM (one
      barrier) after its last read of the step's buffers, so the pipeline's next copy into
      them waits on nothing more, and the per-step max (`column_max`, one barrier) sits
      between a pass's value wgmma and the next pass's store of p; a step whose values are
      decoded after the commit (overlap_values=False, serial groups) ends on one more
      barrier.
    mask_edges_only: mask the scores outside [lo, hi) only on the steps that hold such
      tokens (a range's first and last), under a branch uniform over the warpgroup;
      interior steps skip the iota, compares and selects (H200, Llama-3-8B shapes,
      `mask_edges_probe_gpu.json`: K4u/V3 8 x 32K 76.6-76.8 -> 76.5 us, 8 x 4K
      21.4-21.6 -> 21.1, K4/V3 8 x 32K 87.0-87.4 -> 86.3).
    q_rotation: int8 with one key group only: float16 [D, D], the key quantizer's
      unrotation U (the rotated query is q·U^T); q then comes unrotated as float16
      [R, P, 8, D], P = 1 or 2 parts summing to the query (its float16 rounding and the
      remainder, for float32 queries), and q_scale and key_offsets are None: each CTA
      rotates its row's query itself (one [D, D] x [D, 8] wgmma per part, U copied into
      memory the pipeline's buffers take later), takes the scale per head by `column_max`
      and stores the int8 parts as `quantize_query_s8` makes them (rounding halves to
      even), so no kernel before this one rotates the query.
  Returns:
    o float32 [R, splits, D, 8] (transposed: channel rows, head columns; value groups'
    rows in order), l, m float32 [R, splits, 8]; splits = num_splits (+ the exact ones).
    Rows of a split with no token: l = 0, m = -1e30, o = 0.
  """
  if operand not in ("fp16", "int8"):
    raise ValueError(f"operand must be 'fp16' or 'int8', got {operand!r}")
  if p_scale not in ("step", "bound"):
    raise ValueError(f"p_scale must be 'step' or 'bound', got {p_scale!r}")
  s8 = operand == "int8"
  p_bound = s8 and p_scale == "bound"
  if pack_p_parts and not s8:
    raise ValueError("pack_p_parts is for operand='int8' only")
  packed = bool(pack_p_parts)
  if pack_q_parts and not packed:
    raise ValueError("pack_q_parts needs pack_p_parts (the query's rows 4-7 repeating 0-3)")
  qparts = 1 if pack_q_parts else 2    # int8: key operands per group
  given_koff = key_offsets       # the name is reused below for the groups' offsets
  rotate = q_rotation is not None
  if rotate and not s8:
    raise ValueError("q_rotation is for operand='int8' only")
  if rotate and (q_scale is not None or key_offsets is not None):
    raise ValueError("with q_rotation the kernel makes q_scale and key_offsets itself: "
                     "pass None")
  k_words, k_norms, q = _groups(k_words), _groups(k_norms), _groups(q)
  v_words, v_norms = _groups(v_words), _groups(v_norms)
  key_specs, value_specs = _groups(key_spec), _groups(value_spec)
  if s8:
    key_levels, value_levels = _s8_levels(key_levels), _s8_levels(value_levels)
    _check_s8(key_specs, value_specs, key_levels, value_levels, q, q_scale, tokens_per_step,
              sub_steps, rotate)
    sub_steps = 1
  else:
    key_levels, value_levels = _level_groups(key_levels), _level_groups(value_levels)
  gk, gv = len(key_specs), len(value_specs)
  nq = len(q)          # one query part per key group, or one [R, 8, D] for all of them
  if not (len(k_words) == len(k_norms) == len(key_levels) == gk and nq in (1, gk)
          and len(v_words) == len(v_norms) == len(value_levels) == gv):
    raise ValueError(f"{gk} key and {gv} value groups need as many words, norms, levels "
                     "(and query parts for keys)")
  d = sum(s.cols for s in key_specs)
  tt = key_specs[0].rows                          # tokens per tile
  if any(s.rows != tt for s in key_specs) or any(s.cols != tt for s in value_specs):
    raise ValueError(f"key tiles {key_specs} and value tiles {value_specs} must all hold "
                     f"{tt} tokens")
  if sum(s.rows for s in value_specs) != d:
    raise ValueError(f"value tiles {value_specs} must be [{d}, {tt}] to match {key_specs}")
  r, t_len = k_norms[0].shape
  per_step = max(tokens_per_step // tt, 1)
  st = per_step * tt                              # tokens per step
  if t_len % st or not 1 <= num_splits <= t_len // st:
    raise ValueError(f"{t_len} tokens do not split into {num_splits} runs of whole "
                     f"{st}-token steps of {per_step} tile(s)")
  words = t_len // tt * register_codes.WORD_ROWS
  name = lambda base, g, n: base if n == 1 else f"{base}[{g}]"  # noqa: E731
  for g, spec in enumerate(key_specs):
    _check(name("k_words", g, gk), k_words[g], (r, words, spec.words_per_row), jnp.int32)
    _check(name("k_norms", g, gk), k_norms[g], (r, t_len), jnp.float16)
    if nq == gk and not s8:
      _check(name("q", g, gk), q[g], (r, HEADS, spec.cols), jnp.float16)
  # int8 with pack_q_parts: q may come packed already ([R, 1, 8, D], `decode_prologue`
  # parts="packed"), else it is packed below.
  prepacked = s8 and pack_q_parts and q[0].ndim == 4 and q[0].shape[1] == 1 and not rotate
  raw_parts = q[0].shape[1] if rotate and q[0].ndim == 4 else 0   # unrotated parts
  if rotate:
    if gk != 1:
      raise ValueError(f"q_rotation takes one key group, got {gk}")
    if raw_parts not in (1, 2):
      raise ValueError(f"with q_rotation q must be float16 [R, 1 or 2, 8, D], got "
                       f"{q[0].dtype} {list(q[0].shape)}")
    _check("q", q[0], (r, raw_parts, HEADS, d), jnp.float16)
    _check("q_rotation", q_rotation, (d, d), jnp.float16)
  elif s8:
    _check("q", q[0], (r, 1 if prepacked else 2, HEADS, d), jnp.int8)
    _check("q_scale", q_scale, (r, HEADS), jnp.float32)
  elif nq != gk:
    _check("q", q[0], (r, HEADS, d), jnp.float16)
  key_starts = [int(x) for x in np.cumsum([0] + [sp.cols for sp in key_specs[:-1]])]
  # int8, 4-bit groups: levels (y + 1/2)·scale, so a key's dot gains 1/2·Σq over the group's
  # channels (in q_scale units, per row and head: an input) and a value's output 1/2·Σp·‖v‖
  # (kept per token row like l, summed once after the loop).
  key_offsets = [lv.offset for lv in key_levels] if s8 else [0.0] * gk
  value_offsets = [lv.offset for lv in value_levels] if s8 else [0.0] * gv
  offset_groups = [g for g in range(gv) if value_offsets[g]]
  koff = None
  if any(key_offsets) and given_koff is not None:
    _check("key_offsets", given_koff, (r, gk, HEADS), jnp.float32)
    koff = given_koff
  elif any(key_offsets) and rotate:   # made in the kernel, from its own parts
    pass
  elif any(key_offsets) and prepacked:
    raise ValueError("a packed q ([R, 1, 8, D]) needs its key_offsets (decode_prologue's)")
  elif any(key_offsets):
    q_units = q[0][:, 0].astype(jnp.float32) + q[0][:, 1].astype(jnp.float32) / 127.0
    koff = jnp.stack([off * q_units[..., at:at + sp.cols].sum(-1)
                      for off, at, sp in zip(key_offsets, key_starts, key_specs)], axis=1)
  elif given_koff is not None:
    raise ValueError("key_offsets is read for int8 keys with 4-bit (offset) groups only")
  if pack_q_parts and not prepacked and not rotate:   # [high parts of rows 0-3 | low of 4-7]
    rows_ = jnp.arange(HEADS)[None, :, None]
    q = (jnp.where(rows_ < HEADS // 2, q[0][:, 0], q[0][:, 1])[:, None],)
  for g, spec in enumerate(value_specs):
    _check(name("v_words", g, gv), v_words[g], (r, words, spec.words_per_row), jnp.int32)
    _check(name("v_norms", g, gv), v_norms[g], (r, t_len), jnp.float16)
  vbound = None
  if p_bound:   # one scalar per row and group, read by the kernel from GMEM
    if value_bound is None:
      value_bound = jnp.stack([jnp.max(n, axis=-1).astype(jnp.float32) for n in v_norms],
                              axis=1)
    _check("value_bound", value_bound, (r, gv), jnp.float32)
    vbound = value_bound
  elif value_bound is not None:
    raise ValueError("value_bound is read with operand='int8' and p_scale='bound' only")
  bounds_entries = bounds.shape[0] if bounds.ndim == 2 else 0
  if bounds_entries < 1 or r % bounds_entries:
    raise ValueError(f"bounds must be int32 [R or B, 2] with B dividing the {r} rows, got "
                     f"{bounds.dtype} {list(bounds.shape)}")
  _check("bounds", bounds, (bounds_entries, 2), jnp.int32)
  rows_per_entry = r // bounds_entries     # bound now: the names below are reused
  _check("qoff", qoff, (r, HEADS), jnp.float32)
  if rope is not None:
    rb = rope.table.shape[0]                   # tokens per table block (and W)
    if st % rb:
      raise ValueError(f"RoPE offsets in {rb}-token blocks need steps of a multiple of "
                       f"as many tokens, got {st}")
    rope_dtype = jnp.float16 if rope.coef.dtype == jnp.float16 else jnp.float32
    _check("rope.coef", rope.coef, (r, 2, d, HEADS), rope_dtype)
    _check("rope.scale", rope.scale, (r, HEADS), jnp.float32)
    _check("rope.trig", rope.trig, (t_len // rb, 2, d), rope_dtype)
    _check("rope.table", rope.table, (rb, d), jnp.float16)
  if exact is not None:
    _check_exact(exact, r, d)
    exact_sizes = exact_block_sizes(exact, exact_blocks)
  total_steps = t_len // st
  if sub_steps is None:
    sub_steps = st // 128 if per_step == 1 and st % 128 == 0 else 1
  if serial_groups is None:
    serial_groups = gk > 1 and rope is not None and sub_steps == 1
  serial_groups = bool(serial_groups) and max(gk, gv) > 1
  if s8:   # only the factors are used: the tables go to the byte decoders
    key_forms = [LevelForm("linear", (), lv.scale) for lv in key_levels]
    value_forms = [LevelForm("linear", (), lv.scale) for lv in value_levels]
  else:
    key_forms = [level_form(lv, s.bits) for lv, s in zip(key_levels, key_specs)]
    value_forms = [level_form(lv, s.bits) for lv, s in zip(value_levels, value_specs)]
  if sub_steps < 1 or st % (64 * sub_steps) or (sub_steps > 1 and per_step > 1):
    raise ValueError(f"sub_steps={sub_steps} must cut one tile of {st} tokens into parts "
                     "of a multiple of 64")
  sub = st // sub_steps                          # tokens per pass
  tv = tt // sub_steps                           # tokens per decoded value tile
  # RoPE: table blocks per step, and per pass (each with its own W).
  rope_blocks = st // rope.table.shape[0] if rope is not None else 1
  if rope_blocks > 1 and (sub % rope.table.shape[0]):
    raise ValueError(f"a pass of {sub} tokens must hold whole {rope.table.shape[0]}-row "
                     "RoPE table blocks")
  pass_blocks = rope_blocks // sub_steps if rope_blocks > 1 else 1
  if s8:
    decode_k = [[byte_decoder(sp.bits, lv.table, shape=(sp.rows, sp.cols))
                 for sp, lv in zip(key_specs, key_levels)]]
    decode_v = [[byte_decoder(sp.bits, lv.table, shape=(sp.rows, sp.cols))
                 for sp, lv in zip(value_specs, value_levels)]]
  elif sub_steps == 1:
    decode_k = [[tile_decoder(s, "levels", count=per_step, form=f)
                 for s, f in zip(key_specs, key_forms)]]
    decode_v = [[tile_decoder(s, "levels", form=f) for s, f in zip(value_specs, value_forms)]]
  else:
    decode_k = [[tile_decoder(s, "levels", form=f, rows=(h * sub, sub))
                 for s, f in zip(key_specs, key_forms)] for h in range(sub_steps)]
    decode_v = [[tile_decoder(s, "levels", form=f, cols=(h * sub, sub))
                 for s, f in zip(value_specs, value_forms)] for h in range(sub_steps)]
  wr = register_codes.WORD_ROWS
  neg = -1e30
  log2e = float(np.log2(np.e))
  # Scores in base 2 (exp2 is one instruction): s2 = s·log2(e).
  dot_scales = [float(f.factor * scale) * (1.0 if soft_cap is not None else log2e)
                for f in key_forms]
  off_scale = float(scale) * (1.0 if soft_cap is not None else log2e)
  value_rows = [s.rows for s in value_specs]
  value_starts = list(np.cumsum([0] + value_rows[:-1]))
  # Value tiles decoded after a pass's commit: the step needs a barrier of its own before
  # the pipeline's next copy into its buffers (without Pallas's automatic ones).
  late_reads = not auto_barriers and (not overlap_values or serial_groups)

  def kernel(*refs):
    refs = list(refs)
    max_smem = refs.pop()            # `column_max`'s scratch (the last one)
    kw_gmem, kn_gmem = refs[:gk], refs[gk:2 * gk]
    del refs[:2 * gk]
    vw_gmem, vn_gmem = refs[:gv], refs[gv:2 * gv]
    del refs[:2 * gv]
    q_gmem = refs[:nq]
    del refs[:nq]
    if s8:
      qs_gmem = refs.pop(0)      # with `rotate`: U, float16 [D, D]
      koff_gmem = refs.pop(0) if koff is not None else None
      vb_gmem = refs.pop(0) if p_bound else None
    elif nq != gk:   # each group's columns of the one query array
      q_gmem = [q_gmem[0].at[:, :, pl.ds(at, sp.cols)]
                for at, sp in zip(key_starts, key_specs)]
    bounds_gmem, qoff_gmem = refs[:2]
    del refs[:2]
    if rope is not None:
      coef_gmem, rscale_gmem, trig_gmem, table_gmem = refs[:4]
      del refs[:4]
    if exact is not None:
      count = 2 + sum(2 + (p is not None) for p in exact.positions)
      exact_refs = refs[:count]
      del refs[:count]
    o_gmem, l_gmem, m_gmem = refs[:3]
    del refs[:3]
    q_smem = refs[:qparts * gk if s8 else gk]  # int8: each group's query parts (1 or 2)
    del refs[:len(q_smem)]
    p_smem = refs[:2 * gv if s8 and not packed else gv]  # int8: p·‖v‖ in two parts
    del refs[:len(p_smem)]
    if s8:   # o and l, m: scoped after the pipeline, in its memory (below)
      o_smem = lm_smem = None
      barrier = refs.pop(0)
    else:
      o_smem, lm_smem, barrier = refs[:3]
      del refs[:3]
    if rope is not None:
      table_smem, coef_smem = refs[:2]
      w_smem, rope_barrier = refs[2:2 + pass_blocks], refs[2 + pass_blocks]
      if rope_blocks == 1:
        w_smem = w_smem[0]
      del refs[:3 + pass_blocks]
    group_barrier = refs[0] if gk > 1 and not s8 else None  # the later query parts' copies
    i, j = jax.lax.axis_index("row"), jax.lax.axis_index("split")

    def rotate_query():
      """q·U^T of row i into q_smem as int8 parts; returns (q_scale, key offsets) [8]."""
      def scoped(u_smem, *raw_smem):
        plgpu.copy_gmem_to_smem(qs_gmem, u_smem, barrier)
        for part, ref in enumerate(raw_smem):
          plgpu.copy_gmem_to_smem(q_gmem[0].at[i, part], ref, barrier)
        plgpu.barrier_wait(barrier)

        def product(acc):     # x^T [D, 8] = U·q^T, summed over the parts
          for ref in raw_smem:
            plgpu.wgmma(acc, u_smem, plgpu.transpose_ref(ref, (1, 0)))
          return acc[...]
        return pl.run_scoped(product, plgpu.ACC((d, HEADS), jnp.float32))
      x = pl.run_scoped(scoped, plgpu.SMEM((d, d), jnp.float16, transforms=q_transforms()),
                        *[plgpu.SMEM((HEADS, d), jnp.float16, transforms=q_transforms())]
                        * raw_parts)
      amax = column_max(jnp.abs(x), max_smem)
      qscale = jnp.where(amax > 0, amax * (1 / 127), 1.0)
      y = x * jax.lax.broadcast_in_dim(1.0 / qscale, x.shape, [1])
      y_hi, y_lo = store_s8_parts(y, q_smem, pack_q_parts)
      koffs = [None if not off else off * (y_hi + y_lo * (1 / 127)).sum(axis=0)
               for off in key_offsets]
      plgpu.commit_smem()   # the parts for wgmma, and column_max's barrier before its next
      return qscale, koffs

    def compressed():
      """Split j of row i over the compressed tokens."""
      if rotate:  # q·U^T here, into the int8 parts' buffers (`rotate_query`)
        qscale_v, koff_v = rotate_query()
        vb_v = [jnp.maximum(vb_gmem[i, g], 1e-30) for g in range(gv)] if p_bound else None
        vinv_v = [127.0 / v for v in vb_v] if p_bound else None
      elif s8:    # every group's parts on the one barrier (qparts·gk arrivals)
        for g, (at, sp) in enumerate(zip(key_starts, key_specs)):
          for part in range(qparts):
            src = q_gmem[0].at[i, part] if gk == 1 else q_gmem[0].at[i, part, :,
                                                                     pl.ds(at, sp.cols)]
            plgpu.copy_gmem_to_smem(src, q_smem[qparts * g + part], barrier)
        qscale_v = plgpu.load(qs_gmem.at[i], (), layout=plgpu.Layout.WGMMA.reduce(0),
                              optimized=False)
        koff_v = [None if koff_gmem is None else plgpu.load(
            koff_gmem.at[i, g], (), layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
                  for g in range(gk)]
        vb_v = [jnp.maximum(vb_gmem[i, g], 1e-30) for g in range(gv)] if p_bound else None
        vinv_v = [127.0 / v for v in vb_v] if p_bound else None
      else:
        plgpu.copy_gmem_to_smem(q_gmem[0].at[i], q_smem[0], barrier)
      for g in range(1, 1 if s8 else gk):
        plgpu.copy_gmem_to_smem(q_gmem[g].at[i], q_smem[g], group_barrier.at[g - 1])
      if rope is not None:
        plgpu.copy_gmem_to_smem(table_gmem, table_smem, rope_barrier.at[0])
        plgpu.copy_gmem_to_smem(coef_gmem.at[i], coef_smem, rope_barrier.at[1])
        rscale_v = plgpu.load(rscale_gmem.at[i], (), layout=plgpu.Layout.WGMMA.reduce(0),
                              optimized=False) * off_scale
      lo, hi = (bounds_gmem[_batch_entry(i, rows_per_entry), 0],
                bounds_gmem[_batch_entry(i, rows_per_entry), 1])
      # The steps of this split (`split_steps`) that hold tokens of [lo, hi).
      split_start = j * total_steps // num_splits
      split_end = (j + 1) * total_steps // num_splits
      first = jnp.clip(lo // st, split_start, split_end)
      last = jnp.clip((hi + st - 1) // st, first, split_end)
      qoff_v = plgpu.load(qoff_gmem.at[i], (), layout=plgpu.Layout.WGMMA.reduce(0),
                          optimized=False) * off_scale
      if not rotate:
        plgpu.barrier_wait(barrier)
      for g in range(1, 1 if s8 else gk):
        plgpu.barrier_wait(group_barrier.at[g - 1])
      if rope is not None:
        plgpu.barrier_wait(rope_barrier.at[0])
        plgpu.barrier_wait(rope_barrier.at[1])

      def rope_operand(trig_smem, blocks=(0,), w_refs=None):
        # W = [A | B]·cos θ_h + [B | -A]·sin θ_h, [D, heads], stored transposed for wgmma's B;
        # one per table block of `blocks` (the step's trig rows) into w_refs.
        bcast = lambda x: jax.lax.broadcast_in_dim(x, (d, HEADS), [0])  # noqa: E731
        vec = plgpu.Layout.WGMMA.reduce(1)
        for n, (k, w_ref) in enumerate(zip(blocks, w_refs or [w_smem])):
          cos, sin = (plgpu.load(trig_smem.at[k, c], (), layout=vec, optimized=False
                                 ).astype(jnp.float32) for c in range(2))
          if n == 0:
            ab, ba = (plgpu.load(coef_smem.at[c], (), layout=plgpu.Layout.WGMMA,
                                 optimized=False).astype(jnp.float32) for c in range(2))
          w = (ab * bcast(cos) + ba * bcast(sin)).astype(jnp.float16)
          plgpu.transpose_ref(w_ref, (1, 0))[...] = plgpu.layout_cast(
              w, plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()

      def body(idx, *refs):
        refs = list(refs)
        kw_smem, kn_smem = refs[:gk], refs[gk:2 * gk]
        del refs[:2 * gk]
        vw_smem, vn_smem = refs[:gv], refs[gv:2 * gv]
        del refs[:2 * gv]
        *trig, carry = refs
        start = (first + idx[0]) * st
        if rope is not None and rope_blocks == 1:
          rope_operand(trig[0])
        for h in range(sub_steps):
          carry = step_pass(h, start + h * sub if h else start, kw_smem, kn_smem, vw_smem,
                            vn_smem, trig, carry)
        if late_reads:   # value tiles read after the last commit: done before the next copy
          warpgroup_sync()
        return carry

      def step_pass(h, start, kw_smem, kn_smem, vw_smem, vn_smem, trig, carry):
        """Tokens [h·sub, (h + 1)·sub) of the step: decode, scores, softmax, values."""
        o, l_rows, m_prev, pv_rows = carry
        part = (lambda ref: ref) if sub_steps == 1 else (  # noqa: E731
            lambda ref: ref.at[pl.ds(h * sub, sub)])
        if rope is not None and rope_blocks > 1:   # this pass's W (the last pass is done)
          rope_operand(trig[0], range(h * pass_blocks, (h + 1) * pass_blocks),
                       w_smem)
        def decode_key(g):
          return decode_k[h][g](_load_words(kw_smem[g], key_specs[g]))

        def decode_value(g):
          return [decode_v[h][g](_load_words(vw_smem[g].at[pl.ds(k * wr, wr)], value_specs[g]))
                  for k in range(per_step)]

        # Serial groups: one decoded key (and value) tile in registers at a time, the next
        # decoded once the previous one's wgmma is done; two groups' 256-token tiles at once
        # spill (255 registers with the RoPE offsets' accumulator).
        first_keys = [decode_key(g) for g in range(1 if serial_groups else gk)]

        def scores(*acc_refs):
          nk = qparts * gk if s8 else gk
          key_accs, off_ref = acc_refs[:nk], acc_refs[nk:]
          if rope is not None and rope_blocks == 1:   # q·R(t)·μ: table [sub, D] · W
            plgpu.wgmma(off_ref[0], part(table_smem), plgpu.transpose_ref(w_smem, (1, 0)))
          elif rope is not None:                      # one table block per W
            rb = rope.table.shape[0]
            for k, w_ref in enumerate(w_smem):
              plgpu.wgmma(off_ref[0].at[pl.ds(k * rb, rb)], table_smem,
                          plgpu.transpose_ref(w_ref, (1, 0)))
          if s8:      # each group's query parts, each its own int32 accumulator
            for g in range(gk):
              if g < len(first_keys):
                u = first_keys[g]
              else:
                plgpu.wgmma_wait(0)
                u = decode_key(g)
              for n in range(qparts * g, qparts * (g + 1)):
                plgpu.wgmma(key_accs[n], u, plgpu.transpose_ref(q_smem[n], (1, 0)))
          for g, (acc_ref, q_ref) in enumerate(zip(key_accs, q_smem) if not s8 else ()):
            if g < len(first_keys):
              u = first_keys[g]
            else:
              plgpu.wgmma_wait(0)
              u = decode_key(g)
            plgpu.wgmma(acc_ref, u, plgpu.transpose_ref(q_ref, (1, 0)))
          # The value tiles do not depend on the scores: decode them while the wgmma runs.
          uv = ([decode_value(g) for g in range(1 if serial_groups else gv)]
                if overlap_values else [])
          return ([a[...] for a in key_accs], (off_ref[0][...] if off_ref else None), uv)
        # The offsets take their own accumulator, issued with the keys' wgmma: 200 registers
        # (2 CTAs/SM), yet 3-4% faster at 8 x 32K than adding them onto the scores after the
        # key tile is dead (168 registers, 3 CTAs/SM, one more wgmma on the critical path).
        if s8:
          accs = [plgpu.ACC((sub, HEADS), jnp.int32)] * (qparts * gk) + (
              [plgpu.ACC((sub, HEADS), jnp.float32)] if rope is not None else [])
        else:
          accs = [plgpu.ACC((sub, HEADS), jnp.float32)] * (gk + (1 if rope is not None else 0))
        parts, off, uv = pl.run_scoped(scores, *accs)
        if s8:      # q·L = q_scale·(hi + lo/127)·L, per group
          units = ([fold_p_parts(a.astype(jnp.float32)) for a in parts] if pack_q_parts else
                   [hi_.astype(jnp.float32) + lo_.astype(jnp.float32) * (1 / 127)
                    for hi_, lo_ in zip(parts[0::2], parts[1::2])])
          parts = [(u_ + (0.0 if ko is None else jax.lax.broadcast_in_dim(ko, u_.shape, [1])))
                   * jax.lax.broadcast_in_dim(qscale_v, u_.shape, [1])
                   for u_, ko in zip(units, koff_v)]
        s = None
        for dots, kn_ref, dot_scale in zip(parts, kn_smem, dot_scales):
          kn = plgpu.load(part(kn_ref), (), layout=plgpu.Layout.WGMMA.reduce(1)
                          ).astype(jnp.float32)
          dots = dots * jax.lax.broadcast_in_dim(kn * dot_scale, dots.shape, [0])
          s = dots if s is None else s + dots
        if off is not None:
          s = s + off * jax.lax.broadcast_in_dim(rscale_v, s.shape, [1])
        s = s + jax.lax.broadcast_in_dim(qoff_v, s.shape, [1])
        if soft_cap is not None:
          s = (soft_cap * log2e) * jnp.tanh(s / soft_cap)
        def masked(s):
          pos = start + plgpu.broadcasted_iota(jnp.int32, s.shape, 0,
                                               layout=plgpu.Layout.WGMMA)
          # Masked scores below the running max's floor (neg): exp2 takes them to 0 even
          # while no token has been seen, so p needs no mask of its own.
          return jnp.where((pos >= lo) & (pos < hi), s, 2 * neg)
        if mask_edges_only:   # only a range's first and last steps hold tokens outside it
          s = jax.lax.cond((start >= lo) & (start + sub <= hi), lambda: s, lambda: masked(s))
        else:
          s = masked(s)
        # The commit below is the barrier column_max needs before its next call.
        m_next = jnp.maximum(m_prev, column_max(s, max_smem))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - jax.lax.broadcast_in_dim(m_next, s.shape, [1]))
        # l is kept per row and summed over the tile's rows once, after the loop.
        l_rows = l_rows * jax.lax.broadcast_in_dim(alpha, s.shape, [1]) + p
        pmaxes, pvs = [], []
        for g in range(gv if s8 else 0):   # p·‖v‖ as two int8 parts of its max per head / 127
          vn = plgpu.load(part(vn_smem[g]), (), layout=plgpu.Layout.WGMMA.reduce(1)
                          ).astype(jnp.float32)
          pv = p * jax.lax.broadcast_in_dim(vn, p.shape, [0])
          pvs.append(pv)
          if not p_bound:
            pmaxes.append(jnp.maximum(pv.max(axis=0), 1e-30))
          x = pv * (vinv_v[g] if p_bound else
                    jax.lax.broadcast_in_dim(127.0 / pmaxes[g], pv.shape, [1]))
          store_s8_parts(x, p_smem[g:g + 1] if packed else p_smem[2 * g:2 * g + 2], packed)
        for vn_ref, p_ref in zip(() if s8 else vn_smem, p_smem):
          vn = plgpu.load(part(vn_ref), (), layout=plgpu.Layout.WGMMA.reduce(1)
                          ).astype(jnp.float32)
          pv = (p * jax.lax.broadcast_in_dim(vn, p.shape, [0])).astype(jnp.float16)
          # wgmma's B needs a 128-byte swizzle, so p^T [tokens, 8] is stored as p [8, tokens]
          # (one shuffle per register into the transposed layout) and read transposed.
          plgpu.transpose_ref(p_ref, (1, 0))[...] = plgpu.layout_cast(
              pv, plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()
        if not uv and not serial_groups:
          uv = [decode_value(g) for g in range(gv)]
        new_o = []
        if s8:
          for g, o_g in enumerate(o):
            uv_g = uv[g] if g < len(uv) else decode_value(g)   # serial: after the last wgmma

            def values_s8(*accs, uv_g=uv_g, g=g):
              for n, acc in enumerate(accs):
                plgpu.wgmma(acc, uv_g[0], plgpu.transpose_ref(
                    p_smem[g if packed else 2 * g + n], (1, 0)))
              return tuple(acc[...] for acc in accs)
            parts_o = pl.run_scoped(
                values_s8, *[plgpu.ACC((value_rows[g], HEADS), jnp.int32)] * (1 if packed
                                                                                else 2))
            a = jax.lax.broadcast_in_dim(alpha, o_g.shape, [1])
            ov = parts_o[0].astype(jnp.float32)
            if not packed:
              ov = ov + parts_o[1].astype(jnp.float32) * (1 / 127)
            if not p_bound:   # else in bound/127 units until after the loop
              ov = ov * jax.lax.broadcast_in_dim(pmaxes[g] * (1 / 127), o_g.shape, [1])
            new_o.append(o_g * a + ov)
          pv_rows = tuple(r_ * jax.lax.broadcast_in_dim(alpha, r_.shape, [1]) + pvs[g]
                          for r_, g in zip(pv_rows, offset_groups))
          return tuple(new_o), l_rows, m_next, pv_rows
        for g, (o_g, p_ref) in enumerate(zip(o, p_smem)):
          a = jax.lax.broadcast_in_dim(alpha, o_g.shape, [1])
          uv_g = uv[g] if g < len(uv) else decode_value(g)   # serial: after the last wgmma

          def values(acc_ref, uv_g=uv_g, p_ref=p_ref):
            for k in range(per_step):
              plgpu.wgmma(acc_ref, uv_g[k],
                          plgpu.transpose_ref(p_ref, (1, 0)).at[pl.ds(k * tv, tv)])
          new_o.append(pl.run_state(values)(plgpu.ACC.init(o_g * a)))
        return tuple(new_o), l_rows, m_next, pv_rows

      zeros = lambda shape: plgpu.layout_cast(  # noqa: E731
          jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
      init = (tuple(zeros((rows, HEADS)) for rows in value_rows), zeros((sub, HEADS)),
              plgpu.layout_cast(jnp.full((HEADS,), neg, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(0)),
              tuple(zeros((sub, HEADS)) for _ in offset_groups))
      pipeline = plgpu.emit_pipeline(
          body, grid=(last - first,),
          in_specs=[plgpu.BlockSpec((per_step * wr, s.words_per_row), lambda t: (first + t, 0))
                    for s in key_specs]
          + [plgpu.BlockSpec((st,), lambda t: (first + t,))] * gk
          + [plgpu.BlockSpec((per_step * wr, s.words_per_row), lambda t: (first + t, 0))
             for s in value_specs]
          + [plgpu.BlockSpec((st,), lambda t: (first + t,))] * gv
          + ([plgpu.BlockSpec((rope_blocks, 2, d), lambda t: (first + t, 0, 0))]
             if rope is not None else []),
          max_concurrent_steps=max_concurrent_steps, init_carry=init)
      o, l_rows, m, pv_rows = pipeline(
          *[x.at[i] for x in kw_gmem], *[x.at[i] for x in kn_gmem],
          *[x.at[i] for x in vw_gmem], *[x.at[i] for x in vn_gmem],
          *([trig_gmem] if rope is not None else []))
      o = list(o)
      if p_bound:
        o = [o_g * (vb * (1 / 127)) for o_g, vb in zip(o, vb_v)]
      for r_, g in zip(pv_rows, offset_groups):   # + 1/2·Σp·‖v‖ in every channel row
        off = value_offsets[g] * jax.lax.broadcast_in_dim(r_.sum(axis=0), o[g].shape, [1])
        if packed:   # once per head: on the high parts' columns
          col = plgpu.broadcasted_iota(jnp.int32, off.shape, 1, layout=plgpu.Layout.WGMMA)
          off = jnp.where(col < HEADS // 2, off, 0.0)
        o[g] = o[g] + off
      if packed:   # back to one sum per head, in both halves (o as without packing)
        o = [fold_p_parts(o_g) for o_g in o]

      def write(o_smem, lm_smem):
        if gv == 1:
          o_smem[...] = o[0] * value_forms[0].factor
        else:
          for o_g, at, rows, form in zip(o, value_starts, value_rows, value_forms):
            o_smem.at[pl.ds(int(at), rows)][...] = o_g * form.factor
        _write_partial(l_rows.sum(axis=0), m, o_smem, lm_smem, (o_gmem, l_gmem, m_gmem),
                       i, j)
      with_output(write)

    def with_output(fn):
      # int8: o and l, m take memory the pipeline's buffers had (3.5 bits without RoPE
      # offsets: 75.8 KB per CTA, three per SM, against 80.9 KB and two); the fp16 path's
      # modules, checked on the GPU, keep their kernel-wide buffers.
      if s8:
        pl.run_scoped(fn, plgpu.SMEM((d, HEADS), jnp.float32),
                      plgpu.SMEM((2, HEADS), jnp.float32))
      else:
        fn(o_smem, lm_smem)

    if exact is None:
      compressed()
    else:   # more splits per row: the exact tokens, one block each
      pl.when(j < num_splits)(compressed)
      with_output(lambda o_smem, lm_smem: exact_split(
          i, j, exact_refs, o_gmem, l_gmem, m_gmem, o_smem, lm_smem))

  if exact is not None:
    exact_split = functools.partial(
        _exact_split, first=num_splits, blocks=exact_sizes,
        position_heads=tuple(None if p is None else r // p.shape[0]
                             for p in exact.positions),
        heads=r // exact.limits.shape[0], dot_scale=off_scale, soft_cap=soft_cap,
        sliding_window=sliding_window)
  f32 = jnp.float32
  splits_out = num_splits + (exact_splits(exact, exact_blocks) if exact is not None else 0)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((r, splits_out, d, HEADS), f32),
                jax.ShapeDtypeStruct((r, splits_out, HEADS), f32),
                jax.ShapeDtypeStruct((r, splits_out, HEADS), f32)),
      grid=(r, splits_out), grid_names=("row", "split"),
      scratch_types=([plgpu.SMEM((HEADS, sp.cols), jnp.int8, transforms=s8_transforms(sp.cols))
                      for sp in key_specs for _ in range(qparts)]
                     + [plgpu.SMEM((HEADS, sub), jnp.int8, transforms=s8_transforms(sub))]
                     * (gv if packed else 2 * gv)
                     if s8 else
                     [plgpu.SMEM((HEADS, s.cols), jnp.float16, transforms=q_transforms())
                      for s in key_specs]
                     + [plgpu.SMEM((HEADS, sub), jnp.float16, transforms=q_transforms())] * gv)
      + ([] if s8 else [plgpu.SMEM((d, HEADS), f32), plgpu.SMEM((2, HEADS), f32)])
      + [plgpu.Barrier(num_arrivals=1 + raw_parts if rotate else qparts * gk if s8 else 1)]
      + ([plgpu.SMEM((rope.table.shape[0], d), jnp.float16, transforms=q_transforms()),
          plgpu.SMEM((2, d, HEADS), rope.coef.dtype)]
         + [plgpu.SMEM((HEADS, d), jnp.float16, transforms=q_transforms())] * pass_blocks
         + [plgpu.Barrier(num_arrivals=1, num_barriers=2)] if rope is not None else [])
      + ([plgpu.Barrier(num_arrivals=1, num_barriers=gk - 1)] if gk > 1 and not s8 else [])
      + [plgpu.SMEM((COLUMN_MAX_SCRATCH,), f32)],
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=not auto_barriers),
  )(*k_words, *k_norms, *v_words, *v_norms, *q,
    *([q_rotation] if rotate else [q_scale] if s8 else []),
    *([koff] if koff is not None else []), *([vbound] if p_bound else []), bounds, qoff,
    *(tuple(rope) if rope is not None else ()),
    *(_exact_args(exact) if exact is not None else ()))


def decode_partials_reference(k_codes, k_norms, v_codes, v_norms, q, bounds: Array,
                              qoff: Array, *, bits_k, bits_v, key_levels, value_levels,
                              num_splits: int, scale: float, soft_cap: float | None = None,
                              rope: RopeOffsets | None = None,
                              exact: ExactTokens | None = None, exact_blocks=EXACT_BLOCK,
                              sliding_window: int | None = None,
                              q_scale: Array | None = None, pack_p_parts: bool = False,
                              step_tokens: int | None = None):
  """`decode_partials` in float32 jnp, from level indices k_codes, v_codes [R, T, D_g]
  (channel groups as in `decode_partials`: tuples, with bits_k, bits_v per group), split
  as the kernel splits T in steps of `step_tokens` (`split_steps`; None: T / num_splits
  tokens per split).
  With q_scale (the int8 path): q int8 [R, 2, 8, D] parts and `ByteLevels`, taken as the
  kernel takes them (the p·‖v‖ rounding of its value product aside); pack_p_parts: checks
  the query's rows 4-7 repeat rows 0-3 (where they are concrete), as the kernel needs."""
  if pack_p_parts:
    _check_packed(q_scale, q)
  if q_scale is not None:
    q = q_scale[..., None] * (q[:, 0].astype(jnp.float32)
                              + q[:, 1].astype(jnp.float32) / 127.0)
  k_codes, k_norms, q = _groups(k_codes), _groups(k_norms), _groups(q)
  v_codes, v_norms = _groups(v_codes), _groups(v_norms)
  bits_k, bits_v = _groups(bits_k), _groups(bits_v)
  if len(q) == 1 < len(k_codes):   # one query array: the groups' columns side by side
    cuts = np.cumsum([c.shape[-1] for c in k_codes])[:-1]
    q = tuple(jnp.split(q[0], cuts, axis=-1))
  key_levels, value_levels = (
      _s8_levels(lv) if isinstance(lv, ByteLevels) or isinstance(lv[0], ByteLevels)
      else _level_groups(lv) for lv in (key_levels, value_levels))

  def levels(codes, bits, ac):
    if isinstance(ac, ByteLevels):
      return (jnp.asarray(ac.table, jnp.float32)[codes] + ac.offset) * ac.scale
    u = codes.astype(jnp.float32) - ((1 << bits) - 1) / 2
    return sum(ck * u ** (2 * i + 1) for i, ck in enumerate(ac))
  hi_ = jax.lax.Precision.HIGHEST
  f = lambda x: x.astype(jnp.float32)  # noqa: E731
  s = qoff[:, None, :]
  for codes, norms, q_g, bits, ac in zip(k_codes, k_norms, q, bits_k, key_levels):
    dots = jnp.einsum("rtd,rhd->rth", levels(codes, bits, ac), f(q_g), precision=hi_)
    s = s + dots * f(norms)[..., None]
  if rope is not None:
    s = s + rope_offsets_dense(rope)
  s = s * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  r, t, _ = s.shape
  bounds = jnp.repeat(bounds, r // bounds.shape[0], axis=0)      # per row
  pos = jnp.arange(t)[None, :, None]
  valid = (pos >= bounds[:, 0, None, None]) & (pos < bounds[:, 1, None, None])
  if step_tokens is None:
    if t % num_splits:
      raise ValueError(f"{t} tokens do not split evenly into {num_splits}: give step_tokens")
    step_tokens = t // num_splits
  if t % step_tokens:
    raise ValueError(f"{t} tokens are not whole steps of {step_tokens}")
  # split[t]: the split of token t; a one-hot [T, S] membership reduces per split.
  cuts = split_steps(t // step_tokens, num_splits) * step_tokens
  member = (pos[0] >= cuts[None, :-1]) & (pos[0] < cuts[None, 1:])        # [T, S]
  valid = valid[:, :, None, :] & member[None, :, :, None]                  # [R, T, S, 1]
  s = jnp.where(valid, s[:, :, None, :], -1e30)                            # [R, T, S, H]
  m = s.max(axis=1)
  p = jnp.where(valid, jnp.exp(s - m[:, None]), 0.0)
  l = p.sum(axis=1)
  o = []
  for codes, norms, bits, ac in zip(v_codes, v_norms, bits_v, value_levels):
    pv = p * f(norms)[:, :, None, None]
    o.append(jnp.einsum("rtd,rtsh->rsdh", levels(codes, bits, ac), pv, precision=hi_))
  o = jnp.concatenate(o, axis=2)
  if exact is not None:
    o_e, l_e, m_e = _exact_reference(exact, exact_block_sizes(exact, exact_blocks), scale,
                                     soft_cap, sliding_window)
    o, l, m = (jnp.concatenate([x, y], 1) for x, y in ((o, o_e), (l, l_e), (m, m_e)))
  return o, l, m


def _check_packed(q_scale, q) -> None:
  """q: the int8 path's parts [R, 2, 8, D]."""
  if q_scale is None:
    raise ValueError("pack_p_parts is for operand='int8' only")
  half = HEADS // 2
  try:
    rows = np.asarray(q)
  except jax.errors.TracerArrayConversionError:   # under jit: the glue's to keep
    return
  if not np.array_equal(rows[..., half:, :], rows[..., :half, :]):
    raise ValueError("pack_p_parts needs the query's rows 4-7 to repeat rows 0-3")


def _exact_reference(exact: ExactTokens, blocks: tuple[int, ...], scale: float,
                     soft_cap: float | None, sliding_window: int | None
                     ) -> tuple[Array, Array, Array]:
  """The exact splits' (o [R, E, D, 8], l, m [R, E, 8]) in float32, one per block."""
  f = lambda x: x.astype(jnp.float32)  # noqa: E731
  r = exact.q.shape[0]
  heads = r // exact.limits.shape[0]
  lim = jnp.repeat(exact.limits, heads, axis=0)                   # per row
  qp = lim[:, 0, None, None]
  o_all, l_all, m_all = [], [], []
  for part, (keys, values, pos, n) in enumerate(zip(exact.keys, exact.values,
                                                    exact.positions, blocks)):
    slots = keys.shape[1]
    pad = -slots % n                 # the kernel reads zeros past the last slot
    grow = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    keys, values = f(grow(keys)), f(grow(values))
    slot = jnp.arange(slots + pad, dtype=jnp.int32)
    pos = (jnp.broadcast_to(slot, (r, slots + pad)) if pos is None
           else grow(jnp.repeat(pos, r // pos.shape[0], axis=0)))
    e = (slots + pad) // n
    keys, values = (x.reshape(r, e, n, -1) for x in (keys, values))
    pos = pos.reshape(r, e, n)
    s = jnp.einsum("rend,rhd->renh", keys, f(exact.q), precision=jax.lax.Precision.HIGHEST)
    s = s * scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    lo, hi = lim[:, 1 + 2 * part, None, None], lim[:, 2 + 2 * part, None, None]
    valid = (pos >= lo) & (pos < hi) & (pos <= qp) & (slot < slots).reshape(1, e, n)
    if sliding_window is not None:
      valid &= pos > qp - sliding_window
    s = jnp.where(valid[..., None], s, -1e30)
    m = s.max(axis=2)
    p = jnp.where(valid[..., None], jnp.exp(s - m[:, :, None]), 0.0)
    o_all.append(jnp.einsum("rend,renh->redh", values, p,
                            precision=jax.lax.Precision.HIGHEST))
    l_all.append(p.sum(axis=2))
    m_all.append(m)
  return tuple(jnp.concatenate(x, axis=1) for x in (o_all, l_all, m_all))
