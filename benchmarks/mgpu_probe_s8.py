"""Probe: 3-bit key codes decoded by byte permutes (PRMT) into int8 wgmma operands.

The library's Mosaic kernel is instruction-bound (ncu on the H200, 3-bit keys and values
at 8 x 32K: 62% of issue slots busy, ~10 instructions per pair of codes, half of them
the decode's LOP3 / HFMA2 / HMUL2). This probe asks how much a cheaper decode would
save: each 3-bit code becomes one byte by `prmt.b32`, whose four selector nibbles pick
bytes from an 8-byte table (the 8 levels as int8, so any codebook is exact), four codes
per instruction, straight into wgmma's 8-bit A fragments; the scores run as an
int8 x int8 -> int32 wgmma (k = 32: half the instructions of fp16's k = 16) against
queries quantized to int8 per row.

Storage of 32 codes in three 32-bit words (no bit wasted): bits 0-2 of each nibble hold
24 codes (selectors after one AND), the 24 bits 3 of the nibbles hold 8 more (gathered
by three shifts and three LOP3). Per 32 codes: 21 instructions, against ~80 for the
fp16 cubic decode.

Keys only, as `mgpu_probe_kernels.key_scores_probe` (decode, scores, norms, running
max), on the same words: the variants differ only in the decode and the wgmma, so their
times say what the decode and the 8-bit wgmma cost. Measurement tool, not a library
kernel: the storage is `pallas_kernels.byte_codes` (checked against a float32 jnp
reference on the GPU, `--full`), the rest of the library does not use it yet.

    python -m benchmarks.mgpu_probe_s8            # keys only
    python -m benchmarks.mgpu_probe_s8 --full     # keys and values, with the library kernel
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import common
from pallas_kernels import byte_codes as bc
from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc

WR = rc.WORD_ROWS
D = 128
LEVELS_3BIT = (-127, -79, -45, -14, 14, 45, 79, 127)   # Lloyd-Max 3-bit levels, scaled


def _i32(v: int):
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith
  i32 = ir.IntegerType.get_signless(32)
  return arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))


def prmt_decoder(rows: int, raw: bool = False):
  """f(words int32 [rows/2, 24] in WGMMA layout) -> int8 [rows, 128] in WGMMA_LAYOUT_8BIT:
  the levels `LEVELS_3BIT` of 3-bit codes stored by `byte_codes.pack_tile` (12 words per
  thread -> 32 registers of 4 levels; `byte_codes.decode_words` is the same in numpy);
  raw: the words' bytes reinterpreted, no decode (the floor)."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import llvm

  out_shape = (rows, D)
  out_type = plgpu.ShapeDtypeStruct(out_shape, jnp.int8, layout=plgpu.Layout.WGMMA_8BIT)
  lo, hi = bc.level_pool(LEVELS_3BIT)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=out_type)
  def decode(ctx, words):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i8x4 = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
    layout = mgpu.WGMMA_LAYOUT_8BIT
    regs_shape = layout.registers_shape(out_shape)
    out = np.empty(regs_shape, dtype=object)
    flat_out = list(np.ndindex(*regs_shape))
    thread_words = []
    for vec in words.registers.flat:
      for k in range(2):
        thread_words.append(mgpu_utils.bitcast(
            mgpu_utils.vector_slice(vec, slice(k, k + 1)), i32))
    assert len(thread_words) * 32 == len(flat_out) * 4 * 3, (len(thread_words), len(flat_out))
    pool_lo, pool_hi = _i32(lo), _i32(hi)
    m7, m1, m2, m4 = (_i32(0x77777777), _i32(0x11111111), _i32(0x22222222),
                      _i32(0x44444444))

    def asm(text, args):
      return llvm.inline_asm(i32, args, text, ",".join(["=r"] + ["r"] * len(args)))

    n = 0
    for g in range(len(thread_words) // 3):
      w = thread_words[3 * g:3 * g + 3]
      if raw:
        sels = [w[0], w[1], w[2], w[0]]
      else:
        sels = [asm("and.b32 $0, $1, $2;", [x, m7]) for x in w]
        # The bits 3 of the three words' nibbles: 8 more codes.
        sels.append(asm(
            "{ .reg .b32 t0, t1, t2; shr.b32 t0, $1, 3; shr.b32 t1, $2, 2;"
            " shr.b32 t2, $3, 1; and.b32 t0, t0, $4;"
            " lop3.b32 t0, t1, $5, t0, 0xEA; lop3.b32 $0, t2, $6, t0, 0xEA; }",
            [w[0], w[1], w[2], m1, m2, m4]))
      for s in sels:
        for half in range(2):
          if raw:
            r = s if half == 0 else asm("shr.b32 $0, $1, 16;", [s])
          elif half == 0:
            r = asm("prmt.b32 $0, $1, $2, $3;", [pool_lo, pool_hi, s])
          else:
            r = asm("{ .reg .b32 t; shr.b32 t, $3, 16; prmt.b32 $0, $1, $2, t; }",
                    [pool_lo, pool_hi, s])
          out[flat_out[n]] = mgpu_utils.bitcast(r, i8x4)
          n += 1
    assert n == len(flat_out)
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=True)

  return decode


def q8_transforms():
  return (plgpu.TilingTransform((8, D)), plgpu.SwizzleTransform(128))


def key_scores_probe_s8(words, norms, q8, *, num_splits: int, rows: int = 128,
                        raw: bool = False, max_concurrent_steps: int = 4):
  """Running max of norm·(q8·level) per (kv head, split) over 3-bit tiles of `rows`
  tokens; words int32 [BH, tiles·rows/2, 24], norms float16 [BH, tiles·rows],
  q8 int8 [BH, 8, 128]. Returns float32 [BH, splits, rows, 8]."""
  bh, word_rows, c = words.shape
  step_words = rows // 2
  tiles = word_rows // step_words
  steps = tiles // num_splits
  decode = prmt_decoder(rows, raw)

  def kernel(words_gmem, norms_gmem, q_gmem, out_gmem, q_smem, out_smem, q_barrier):
    i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("split")
    plgpu.copy_gmem_to_smem(q_gmem.at[i], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def body(_, words_smem, norms_smem, carry):
      w = plgpu.load(words_smem, (), layout=plgpu.Layout.WGMMA)
      n = plgpu.load(norms_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
      a = decode(w)

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(q_smem, (1, 0)))
        return acc_ref[...]
      s = pl.run_scoped(scores, plgpu.ACC((rows, dm.HEADS), jnp.int32)).astype(jnp.float32)
      s = s * jax.lax.broadcast_in_dim(n.astype(jnp.float32), s.shape, [0])
      return jnp.maximum(carry, s)

    pipeline = plgpu.emit_pipeline(
        body, grid=(steps,),
        in_specs=[plgpu.BlockSpec((step_words, c), lambda t: (t, 0)),
                  plgpu.BlockSpec((rows,), lambda t: (t,))],
        max_concurrent_steps=max_concurrent_steps,
        init_carry=plgpu.layout_cast(jnp.full((rows, dm.HEADS), -jnp.inf, jnp.float32),
                                     plgpu.Layout.WGMMA))
    first = j * steps
    carry = pipeline(words_gmem.at[i, pl.ds(first * step_words, steps * step_words)],
                     norms_gmem.at[i, pl.ds(first * rows, steps * rows)])
    out_smem[...] = carry
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[i, j])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((bh, num_splits, rows, dm.HEADS), jnp.float32),
      grid=(bh, num_splits), grid_names=("bh", "split"),
      scratch_types=[plgpu.SMEM((dm.HEADS, D), jnp.int8, transforms=q8_transforms()),
                     plgpu.SMEM((rows, dm.HEADS), jnp.float32),
                     plgpu.Barrier(num_arrivals=1)])(words, norms, q8)


def attention_probe_s8(k_words, k_norms, v_words, v_norms, q8, *, num_splits: int,
                       rows: int = 128, raw: bool = False, max_concurrent_steps: int = 2):
  """Keys and values: split-K partials (o, l, m) as `decode_attention_mgpu.decode_partials`
  (one group, no RoPE term, no exact tokens), with both tiles decoded by PRMT into int8
  wgmma operands: scores^T = K·q8^T (int32), online softmax in float32, and
  out^T = V^T·p^T as two int8 wgmmas, p·‖v‖ split as hi/127 + lo/127² (14 bits: under
  2^-14 of a step's largest weight lost). k_words, v_words int32 [BH, tiles·64, 24]
  (3-bit tiles of `rows` tokens), norms float16 [BH, T], q8 int8 [BH, 8, 128].
  Returns o float32 [BH, splits, 128, 8], l, m float32 [BH, splits, 8]."""
  bh, word_rows, c = k_words.shape
  step_words = rows // 2
  steps = word_rows // step_words // num_splits
  decode = prmt_decoder(rows, raw)
  log2e = float(np.log2(np.e))

  def kernel(kw_gmem, kn_gmem, vw_gmem, vn_gmem, q_gmem, o_gmem, l_gmem, m_gmem,
             q_smem, ph_smem, pl_smem, o_smem, lm_smem, q_barrier):
    i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("split")
    plgpu.copy_gmem_to_smem(q_gmem.at[i], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def body(_, kw_smem, kn_smem, vw_smem, vn_smem, carry):
      o, l_rows, m_prev = carry
      a = decode(plgpu.load(kw_smem, (), layout=plgpu.Layout.WGMMA))

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(q_smem, (1, 0)))
        av = decode(plgpu.load(vw_smem, (), layout=plgpu.Layout.WGMMA))  # while it runs
        return acc_ref[...], av
      s, av = pl.run_scoped(scores, plgpu.ACC((rows, dm.HEADS), jnp.int32))
      kn = plgpu.load(kn_smem, (), layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
      s = s.astype(jnp.float32) * jax.lax.broadcast_in_dim(kn * (log2e / 40.0 / 127.0),
                                                           (rows, dm.HEADS), [0])
      m_next = jnp.maximum(m_prev, s.max(axis=0))
      alpha = jnp.exp2(m_prev - m_next)
      p = jnp.exp2(s - jax.lax.broadcast_in_dim(m_next, s.shape, [1]))
      l_rows = l_rows * jax.lax.broadcast_in_dim(alpha, s.shape, [1]) + p
      vn = plgpu.load(vn_smem, (), layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
      pv = p * jax.lax.broadcast_in_dim(vn * 0.5 * 127.0, p.shape, [0])   # norms < 2
      hi = jnp.round(pv)
      lo = jnp.round((pv - hi) * 127.0)
      for ref, x in ((ph_smem, hi), (pl_smem, lo)):
        # Mosaic transposes 16-bit registers only: transpose in fp16 (exact: |x| <= 127).
        plgpu.transpose_ref(ref, (1, 0))[...] = plgpu.layout_cast(
            x.astype(jnp.float16), plgpu.Layout.WGMMA_TRANSPOSED).astype(jnp.int8)
      plgpu.commit_smem()

      def values(acc_h, acc_l):
        plgpu.wgmma(acc_h, av, plgpu.transpose_ref(ph_smem, (1, 0)))
        plgpu.wgmma(acc_l, av, plgpu.transpose_ref(pl_smem, (1, 0)))
        return acc_h[...], acc_l[...]
      oh, ol = pl.run_scoped(values, plgpu.ACC((D, dm.HEADS), jnp.int32),
                             plgpu.ACC((D, dm.HEADS), jnp.int32))
      o = (o * jax.lax.broadcast_in_dim(alpha, o.shape, [1]) + oh.astype(jnp.float32)
           + ol.astype(jnp.float32) * (1.0 / 127.0))
      return o, l_rows, m_next

    zeros = lambda shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32),  # noqa: E731
                                            plgpu.Layout.WGMMA)
    init = (zeros((D, dm.HEADS)), zeros((rows, dm.HEADS)),
            plgpu.layout_cast(jnp.full((dm.HEADS,), -1e30, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(0)))
    pipeline = plgpu.emit_pipeline(
        body, grid=(steps,),
        in_specs=[plgpu.BlockSpec((step_words, c), lambda t: (t, 0)),
                  plgpu.BlockSpec((rows,), lambda t: (t,)),
                  plgpu.BlockSpec((step_words, c), lambda t: (t, 0)),
                  plgpu.BlockSpec((rows,), lambda t: (t,))],
        max_concurrent_steps=max_concurrent_steps, init_carry=init)
    first = j * steps
    sl = lambda x, n: x.at[i, pl.ds(first * n, steps * n)]  # noqa: E731
    o, l_rows, m = pipeline(sl(kw_gmem, step_words), sl(kn_gmem, rows),
                            sl(vw_gmem, step_words), sl(vn_gmem, rows))
    o_smem[...] = o * (2.0 / 127.0 / 127.0)
    lm_smem[0] = l_rows.sum(axis=0)
    lm_smem[1] = m
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[i, j])
    plgpu.copy_smem_to_gmem(lm_smem.at[0], l_gmem.at[i, j])
    plgpu.copy_smem_to_gmem(lm_smem.at[1], m_gmem.at[i, j])
    plgpu.wait_smem_to_gmem(0)

  f32 = jnp.float32
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((bh, num_splits, D, dm.HEADS), f32),
                jax.ShapeDtypeStruct((bh, num_splits, dm.HEADS), f32),
                jax.ShapeDtypeStruct((bh, num_splits, dm.HEADS), f32)),
      grid=(bh, num_splits), grid_names=("bh", "split"),
      scratch_types=[plgpu.SMEM((dm.HEADS, D), jnp.int8, transforms=q8_transforms()),
                     plgpu.SMEM((dm.HEADS, rows), jnp.int8, transforms=q8_transforms()),
                     plgpu.SMEM((dm.HEADS, rows), jnp.int8, transforms=q8_transforms()),
                     plgpu.SMEM((D, dm.HEADS), f32), plgpu.SMEM((2, dm.HEADS), f32),
                     plgpu.Barrier(num_arrivals=1)])(k_words, k_norms, v_words, v_norms, q8)



def pack_keys(codes):
  """codes [BH, T, 128] -> words [BH, T/128·64, 24] (each 128-token tile [tokens, D])."""
  bh, t, d = codes.shape
  return bc.pack_tile(codes.reshape(bh, t // 128, 128, d)).reshape(bh, -1, 24)


def pack_values(codes):
  """codes [BH, T, 128] -> words of the value tiles [D, tokens] (the transpose)."""
  bh, t, d = codes.shape
  return bc.pack_tile(jnp.swapaxes(codes.reshape(bh, t // 128, 128, d), -1, -2)
                      ).reshape(bh, -1, 24)


def check(key, bh=4, t=4096, splits=4):
  """Both probes on packed random codes against float32 jnp references."""
  ks = jax.random.split(key, 6)
  kc = jax.random.randint(ks[0], (bh, t, D), 0, 8)
  vc = jax.random.randint(ks[1], (bh, t, D), 0, 8)
  kn = jax.random.uniform(ks[2], (bh, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  vn = jax.random.uniform(ks[3], (bh, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  q8 = jax.random.randint(ks[4], (bh, dm.HEADS, D), -127, 128).astype(jnp.int8)
  lv = jnp.asarray(LEVELS_3BIT, jnp.float32)
  hi_ = jax.lax.Precision.HIGHEST
  dots = jnp.einsum("btd,bhd->bth", lv[kc], q8.astype(jnp.float32), precision=hi_)
  s = dots * kn.astype(jnp.float32)[..., None]
  out = {}
  got = key_scores_probe_s8(pack_keys(kc), kn, q8, num_splits=splits)
  want = s.reshape(bh, splits, -1, 128, dm.HEADS).max(axis=2)
  out["keys_rel_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  o, l, m = attention_probe_s8(pack_keys(kc), kn, pack_values(vc), vn, q8,
                               num_splits=splits)
  s2 = (s * (np.log2(np.e) / 40.0 / 127.0)).reshape(bh, splits, -1, dm.HEADS)
  m_ref = s2.max(axis=2)
  p = jnp.exp2(s2 - m_ref[:, :, None])
  l_ref = p.sum(axis=2)
  vals = (lv[vc] / 127.0 * vn.astype(jnp.float32)[..., None]).reshape(bh, splits, -1, D)
  o_ref = jnp.einsum("bstd,bsth->bsdh", vals, p, precision=hi_)
  out["m_err"] = float(jnp.max(jnp.abs(m - m_ref)))
  out["l_rel_err"] = float(jnp.max(jnp.abs(l - l_ref) / l_ref))
  out["o_rel_err"] = float(jnp.linalg.norm(o / l[:, :, None] - o_ref / l_ref[:, :, None])
                           / jnp.linalg.norm(o_ref / l_ref[:, :, None]))
  out["ok"] = (out["keys_rel_err"] <= 1e-5 and out["m_err"] <= 1e-4
               and out["l_rel_err"] <= 1e-4 and out["o_rel_err"] <= 1e-3)
  return out


def main(argv=None):
  full = "--full" in (argv if argv is not None else sys.argv[1:])
  from benchmarks import mgpu_probe as mp
  from benchmarks import mgpu_probe_kernels as pk
  try:
    checked = check(jax.random.PRNGKey(7))
  except Exception as e:  # noqa: BLE001 - report, then time anyway
    checked = dict(error=repr(e)[:400], ok=False)
  print("check", checked, flush=True)
  ceiling = mp.read_ceiling()
  spec, words, norms, q = mp.probe_inputs(3)          # 8 x 8 kv heads x 32K tokens
  q8 = (q * 40).astype(jnp.int8)
  rows = []
  forms = {"cubic": dm.level_form((0.3, 0.01), 3),
           "quintic": dm.level_form((0.3, 0.01, 0.0005), 3)}

  def f16_probe(variant, form=None):
    decode = dm.tile_decoder(spec, variant, 1, form=form)

    def run(w, n, qq):
      return pk.key_scores_probe(w, n, qq, spec=spec, num_splits=8, variant=variant,
                                 max_concurrent_steps=4, decoder=decode)
    return jax.jit(run)

  cases = [("fp16 quintic levels (library)", f16_probe("levels", forms["quintic"]), q),
           ("fp16 cubic levels", f16_probe("levels", forms["cubic"]), q),
           ("fp16 affine", f16_probe("affine"), q),
           ("fp16 raw (no decode)", f16_probe("raw"), q),
           ("int8 prmt", jax.jit(lambda w, n, qq: key_scores_probe_s8(
               w, n, qq, num_splits=8)), q8),
           ("int8 raw (no decode)", jax.jit(lambda w, n, qq: key_scores_probe_s8(
               w, n, qq, num_splits=8, raw=True)), q8)]
  coords = words.shape[0] * norms.shape[1] * D
  if full:   # keys and values, against the library kernel and cuDNN on the same shapes
    from benchmarks import mgpu_decode as md
    key = jax.random.PRNGKey(0)
    base, _ = md.time_cudnn(key, 8, norms.shape[1])
    rows.append(dict(decode="cudnn bf16 attention", ms=base * 1e3))
    print(rows[-1], flush=True)
    for bits in (3,):
      for lv in ("cubic", "quintic"):
        md.levels = (lambda b, lv=lv: (0.3, 0.01) if lv == "cubic" else (0.3, 0.01, 0.0005))
        sec, nbytes = md.time_ours(key, 8, norms.shape[1], bits, bits, 16, 2)
        rows.append(dict(decode=f"library decode_partials K3/V3 {lv}", ms=sec * 1e3,
                         coords_per_s=2 * coords / sec, ceiling_frac=nbytes / sec / ceiling,
                         x_cudnn=base / sec))
        print(rows[-1], flush=True)
    for splits in (8, 16):
      for raw in (False, True):
        fn = jax.jit(lambda w, n, qq, raw=raw, splits=splits: attention_probe_s8(
            w, n, w, n, qq, num_splits=splits, raw=raw))
        sec = common.device_time(fn, words, norms, q8)
        rows.append(dict(decode=f"int8 {'raw' if raw else 'prmt'} K+V, {splits} splits",
                         ms=sec * 1e3, coords_per_s=2 * coords / sec,
                         ceiling_frac=2 * (words.nbytes + norms.nbytes) / sec / ceiling,
                         x_cudnn=base / sec))
        print(rows[-1], flush=True)
    cases = []
  for label, fn, qq in cases:
    try:
      sec = common.device_time(fn, words, norms, qq)
      rows.append(dict(decode=label, ms=sec * 1e3, coords_per_s=coords / sec,
                       ceiling_frac=(words.nbytes + norms.nbytes) / sec / ceiling))
    except Exception as e:  # noqa: BLE001 - report every variant
      rows.append(dict(decode=label, error=repr(e)[:400]))
    print(rows[-1], flush=True)
  path = common.write_result("mgpu_probe_s8" + ("_full" if full else ""), dict(
      shape=dict(batch=8, kv_heads=8, tokens=norms.shape[1], head_dim=D, bits=3,
                 side="keys and values" if full else "keys only"),
      read_ceiling_bytes_per_s=ceiling, check=checked, timings=rows))
  print(f"wrote {path}")
  common.print_table([dict(r, coords_per_s=r.get("coords_per_s", 0) / 1e12) for r in rows],
                     ["decode", "ms", "coords_per_s", "ceiling_frac", "x_cudnn"])


if __name__ == "__main__":
  sys.exit(main())
