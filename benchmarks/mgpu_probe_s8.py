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
times say what the decode and the 8-bit wgmma cost. The storage is
`pallas_kernels.byte_codes`, the decoder the kernel module's `byte_decoder`; keys and
values run through the library's own int8 path (`decode_partials(operand="int8")`,
`--library`: checked against its float32 reference, then timed beside the fp16 path and
cuDNN). `mgpu_probe_s8_full_gpu.json` came from a K+V probe kernel (commit 2f960c1) that
the library path replaced.

    python -m benchmarks.mgpu_probe_s8              # keys only, 2/3/4 bits
    python -m benchmarks.mgpu_probe_s8 --library    # decode_partials(operand="int8")
    python -m benchmarks.mgpu_probe_s8 --profile 3  # two library int8 calls, for ncu
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import common
from pallas_kernels import byte_codes as bc
from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc
from turboquant_jax import codebook

WR = rc.WORD_ROWS
D = 128
# Lloyd-Max levels (Gaussian limit) scaled to int8, level index order; 4 bits in
# sign-magnitude, (y + 1/2)·scale (`byte_codes`; `codebook.int8_codebook(128, 4)`'s table).
LEVELS = {2: (-127, -38, 38, 127),
          3: (-127, -79, -45, -14, 14, 45, 79, 127),
          4: (-114, -87, -68, -53, -40, -28, -17, -6, 5, 16, 27, 39, 52, 67, 86, 113)}


def byte_table(bits: int) -> dm.ByteLevels:
  """`LEVELS[bits]` as the int8 path's levels (scale 1/127; 4 bits offset 1/2)."""
  return dm.ByteLevels(LEVELS[bits], 1.0 / 127, 0.5 if bits == 4 else 0.0)
LEVELS_3BIT = LEVELS[3]


def prmt_decoder(rows: int, raw: bool = False, bits: int = 3, levels=None):
  """`decode_attention_mgpu.byte_decoder` of the `LEVELS[bits]` table (or `levels`):
  int8 [rows = 128, 128] from a byte-code tile's words; raw: no decode (the floor)."""
  if rows != bc.ROWS:
    raise ValueError(f"byte-code tiles hold {bc.ROWS} rows, got {rows}")
  return dm.byte_decoder(bits, LEVELS[bits] if levels is None else levels, raw)


q8_transforms = dm.s8_transforms


def key_scores_probe_s8(words, norms, q8, *, num_splits: int, rows: int = 128,
                        raw: bool = False, max_concurrent_steps: int = 4, bits: int = 3):
  """Running max of norm·(q8·level) per (kv head, split) over `bits`-bit tiles of `rows`
  tokens; words int32 [BH, tiles·rows/2, 8·bits], norms float16 [BH, tiles·rows],
  q8 int8 [BH, 8, 128]. Returns float32 [BH, splits, rows, 8]."""
  bh, word_rows, c = words.shape
  step_words = rows // 2
  tiles = word_rows // step_words
  steps = tiles // num_splits
  decode = prmt_decoder(rows, raw, bits)

  def kernel(words_gmem, norms_gmem, q_gmem, out_gmem, q_smem, out_smem, q_barrier):
    i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("split")
    plgpu.copy_gmem_to_smem(q_gmem.at[i], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def body(_, words_smem, norms_smem, carry):
      w = plgpu.load(words_smem, (), layout=plgpu.Layout.WGMMA, optimized=c <= 24)
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


def pack_keys(codes, bits):
  """codes [BH, T, 128] -> words [BH, T/128·64, 8·bits] (each 128-token tile [tokens, D])."""
  bh, t, d = codes.shape
  return bc.pack_tile(codes.reshape(bh, t // 128, 128, d), bits).reshape(bh, -1, 8 * bits)


def pack_values(codes, bits):
  """codes [BH, T, 128] -> words of the value tiles [D, tokens] (the transpose)."""
  bh, t, d = codes.shape
  return bc.pack_tile(jnp.swapaxes(codes.reshape(bh, t // 128, 128, d), -1, -2),
                      bits).reshape(bh, -1, 8 * bits)


def check(key, bits=3, bh=4, t=4096, splits=4):
  """The keys probe on packed random codes against a float32 jnp reference (exact: int8
  products summed in int32, times fp16 norms)."""
  ks = jax.random.split(key, 3)
  kc = jax.random.randint(ks[0], (bh, t, D), 0, 1 << bits)
  kn = jax.random.uniform(ks[1], (bh, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  q8 = jax.random.randint(ks[2], (bh, dm.HEADS, D), -127, 128).astype(jnp.int8)
  lv = jnp.asarray(LEVELS[bits], jnp.float32)
  dots = jnp.einsum("btd,bhd->bth", lv[kc], q8.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  s = dots * kn.astype(jnp.float32)[..., None]
  got = key_scores_probe_s8(pack_keys(kc, bits), kn, q8, num_splits=splits, bits=bits)
  want = s.reshape(bh, splits, -1, 128, dm.HEADS).max(axis=2)
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  return dict(bits=bits, keys_rel_err=err, ok=err <= 1e-5)


def check_library(key, bits_k, bits_v, soft_cap=None, rope=False, exact=False, splits=4,
                  p_scale="bound", value_spread=1.0, pack_p_parts=False,
                  pack_q_parts=False):
  """`decode_attention_mgpu.decode_partials(operand="int8")` against its float32 reference
  on packed random codes: ragged ranges (an empty row, rows ending inside a tile and a
  split), outputs NaN-poisoned first; optionally soft-cap, the RoPE term, exact tokens
  (a 200-slot ring with stale slots and 5 sinks, two rows per batch entry); p_scale as
  `decode_partials`; value_spread: every 97th token's value norm times this (a few large
  norms: what p_scale="bound" resolves the others against); pack_p_parts: the query's
  rows 4-7 (with their q·μ and RoPE terms) repeat rows 0-3, as the kernel needs;
  pack_q_parts: with it, the query's parts as one key operand too."""
  from benchmarks import mgpu_decode as md
  r, t = 6, 4096
  lengths = [(4, t - 128), (0, 37), (5, 5), (130, t), (131, t - 129), (0, t)]
  kc, vc, kn, vn, q, qoff, bounds = md.inputs(key, r, t, bits_k, bits_v, lengths)
  vn = vn.at[:, ::97].multiply(value_spread)
  if pack_p_parts:
    q, qoff = (jnp.concatenate([x[:, :4], x[:, :4]], axis=1) for x in (q, qoff))
  q8, qs = dm.quantize_query_s8(q)
  ks, vs = rc.TileSpec(bits_k, 128, 128), rc.TileSpec(bits_v, 128, 128)
  kl, vl = byte_table(bits_k), byte_table(bits_v)
  kw = dict(num_splits=splits, scale=0.3, soft_cap=soft_cap, key_levels=kl, value_levels=vl,
            rope=md.rope_operands(jax.random.fold_in(key, 1), r, t, 3.0,
                                  repeat=pack_p_parts) if rope else None)
  ex = None
  if exact:
    ke = jax.random.split(jax.random.fold_in(key, 2), 3)
    full = jnp.arange(200) + t - 150        # per batch entry: full, stale/empty, full
    ring = jnp.stack([full, jnp.where(jnp.arange(200) < 60, full, -1), full]).astype(jnp.int32)
    limits = jnp.array([[t + 40, t - 150, t + 50, 0, 5]] * 3, jnp.int32)
    ek = [jax.random.normal(ke[0], (r, n, D), jnp.float32).astype(jnp.bfloat16) for n in (200, 5)]
    ev = [jax.random.normal(ke[1], (r, n, D), jnp.float32).astype(jnp.bfloat16) for n in (200, 5)]
    qe = (jax.random.normal(ke[2], (r, dm.HEADS, D)) * 0.1).astype(jnp.bfloat16)
    ex = dm.ExactTokens(qe, limits, tuple(ek), tuple(ev), (ring, None))
  args = (pack_keys(kc, bits_k), kn, pack_values(vc, bits_v), vn, q8, bounds, qoff)
  shapes = jax.eval_shape(lambda *a: dm.decode_partials(
      *a, key_spec=ks, value_spec=vs, operand="int8", q_scale=qs, exact=ex, **kw), *args)
  poison = jax.jit(lambda *a: tuple(jnp.full_like(x, jnp.nan) for x in a))
  jax.block_until_ready(poison(*[jnp.zeros(x.shape, x.dtype) for x in shapes]))
  got = dm.decode_partials(*args, key_spec=ks, value_spec=vs, operand="int8", q_scale=qs,
                           exact=ex, p_scale=p_scale, pack_p_parts=pack_p_parts,
                           **({"pack_q_parts": True} if pack_q_parts else {}), **kw)
  ref = dm.decode_partials_reference(kc, kn, vc, vn, q8, bounds, qoff, bits_k=bits_k,
                                     bits_v=bits_v, q_scale=qs, exact=ex, step_tokens=128,
                                     **kw)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  out, out_ref = md.merged(*got), md.merged(*ref)
  err = float(jnp.linalg.norm(out - out_ref) / jnp.linalg.norm(out_ref))
  m_err = float(jnp.max(jnp.abs(jnp.where(ref[2] > -1e29, got[2] - ref[2], 0.0))))
  empty_ok = bool(jnp.all((got[2] > -1e29) == (ref[2] > -1e29)))
  l_err = float(jnp.max(jnp.abs(got[1] - ref[1])) / jnp.max(ref[1]))
  return dict(bits_k=bits_k, bits_v=bits_v, soft_cap=soft_cap, rope=rope, exact=exact,
              splits=splits, p_scale=p_scale, value_spread=value_spread, pack_p_parts=pack_p_parts,
              pack_q_parts=pack_q_parts,
              rel_err=err, m_err=m_err,
              l_err=l_err, finite=finite,
              ok=finite and empty_ok and err <= 3e-3 and l_err <= 3e-3 and m_err <= 3e-3)


def library_main():
  """decode_partials(operand="int8"): checks, then 8 x 32K timings beside the fp16 path."""
  from benchmarks import mgpu_decode as md
  checks = []
  for i, (bk, bv, cap, rope, exact) in enumerate([
      (3, 3, None, False, False), (2, 4, None, False, False), (4, 2, 5.0, False, False),
      (3, 3, None, True, False), (3, 4, 30.0, True, True), (2, 3, None, False, True)]):
    try:
      checks.append(check_library(jax.random.PRNGKey(20 + i), bk, bv, cap, rope, exact))
    except Exception as e:  # noqa: BLE001 - report every case
      checks.append(dict(bits_k=bk, bits_v=bv, rope=rope, exact=exact, error=repr(e)[:400],
                         ok=False))
    print("check", checks[-1], flush=True)
  ceiling = md.read_ceiling()
  key = jax.random.PRNGKey(0)
  b, t = 8, 32768
  base, _ = md.time_cudnn(key, b, t)
  rows = [dict(bits=16, kernel="cudnn bf16 attention", ms=base * 1e3)]
  for bits in (3, 2):
    for rope in (False, True):
      for lv in (("cubic", "quintic") if bits == 3 else ("cubic",)):
        try:
          sec, nbytes = md.time_ours(key, b, t, bits, bits, 16, 2, rope=rope,
                                     levels_fn=functools.partial(_levels, lv))
          rows.append(dict(bits=bits, rope=rope, kernel=f"fp16 path, {lv} levels",
                           ms=sec * 1e3, x_cudnn=base / sec, ceiling_frac=nbytes / sec / ceiling))
        except Exception as e:  # noqa: BLE001
          rows.append(dict(bits=bits, rope=rope, kernel=f"fp16 {lv}", error=repr(e)[:300]))
        print(rows[-1], flush=True)
      f, args = library_call(bits, t, rope, key)
      try:
        sec = common.device_time_chained(f, args, 0, iters=8)
        nbytes = 2 * (args[2].nbytes + args[3].nbytes)
        rows.append(dict(bits=bits, rope=rope, kernel="int8 path (PRMT)", ms=sec * 1e3,
                         x_cudnn=base / sec, ceiling_frac=nbytes / sec / ceiling))
      except Exception as e:  # noqa: BLE001
        rows.append(dict(bits=bits, rope=rope, kernel="int8 path", error=repr(e)[:300]))
      print(rows[-1], flush=True)
  path = common.write_result("mgpu_decode_s8", dict(
      shape=dict(batch=b, kv_heads=8, tokens=t, head_dim=D, q_heads=32),
      read_ceiling_bytes_per_s=ceiling, checks=checks, timings=rows))
  print(f"wrote {path}")
  common.print_table(checks, ["bits_k", "bits_v", "soft_cap", "rope", "exact", "rel_err",
                              "m_err", "l_err", "ok"])
  common.print_table(rows, ["bits", "rope", "kernel", "ms", "x_cudnn", "ceiling_frac"])


def mp_inputs(bits, t=32768):
  """8 x 8 kv heads x t tokens of pseudo-random byte-code words, norms and queries."""
  from benchmarks import mgpu_probe as mp
  _, words, norms, q = mp.probe_inputs(bits, t=t)
  return words.reshape(words.shape[0], -1, 8 * bits), norms, q


def library_call(bits, t, rope, key=None):
  """(f, args): `decode_partials(operand="int8")` on 8 x 8 kv heads x t tokens of
  pseudo-random byte tiles at `bits`, 16 splits, with or without the RoPE term."""
  from benchmarks import mgpu_decode as md
  words, norms, q = mp_inputs(bits, t)
  r = words.shape[0]
  q8, qs = dm.quantize_query_s8(q.astype(jnp.float32) * 0.01)
  lv8 = byte_table(bits)
  bounds = jnp.tile(jnp.array([[4, t - 128]], jnp.int32), (r, 1))
  qoff = jnp.zeros((r, dm.HEADS), jnp.float32)
  ro = md.rope_operands(key if key is not None else jax.random.PRNGKey(0), r, t) if rope \
      else None
  ts = rc.TileSpec(bits, 128, 128)
  f = lambda qoff, q8, w, n, bounds, qs, ro: dm.decode_partials(  # noqa: E731
      w, n, w, n, q8, bounds, qoff, key_spec=ts, value_spec=ts, key_levels=lv8,
      value_levels=lv8, num_splits=16, scale=D**-0.5, rope=ro, operand="int8", q_scale=qs)
  return f, (qoff, q8, words, norms, bounds, qs, ro)


def _levels(kind: str, bits: int):
  if kind == "cubic":
    book = codebook.cubic_codebook(D, bits)
    return (book.linear, book.cubic)
  return tuple(codebook.polynomial_codebook(D, bits, degree=5).coefficients)


def main(argv=None):
  """Keys-only checks and times at 2, 3 and 4 bits; or `--library` (the int8 path's checks
  and timings), or `--profile BITS` (two library int8 calls, for ncu)."""
  argv = sys.argv[1:] if argv is None else argv
  if "--library" in argv:
    return library_main()
  if "--profile" in argv:
    f, args = library_call(int(argv[argv.index("--profile") + 1]), 32768, rope=False)
    fn = jax.jit(f)
    for _ in range(2):
      jax.block_until_ready(fn(*args))
    return
  from benchmarks import mgpu_probe as mp
  from benchmarks import mgpu_probe_kernels as pk
  checks = []
  for bits in (2, 3, 4):
    try:
      checks.append(check(jax.random.PRNGKey(7 + bits), bits))
    except Exception as e:  # noqa: BLE001 - report, then time anyway
      checks.append(dict(bits=bits, error=repr(e)[:400], ok=False))
    print("check", checks[-1], flush=True)
  ceiling = mp.read_ceiling()
  rows = []

  def timed(label, fn, args, coords, nbytes):
    try:
      sec = common.device_time(fn, *args)
      rows.append(dict(label, ms=sec * 1e3, coords_per_s=coords / sec,
                       ceiling_frac=nbytes / sec / ceiling))
    except Exception as e:  # noqa: BLE001 - report every variant
      rows.append(dict(label, error=repr(e)[:400]))
    print(rows[-1], flush=True)

  for bits in (2, 3, 4):
    spec, words, norms, q = mp.probe_inputs(bits)
    words8 = words.reshape(words.shape[0], -1, 8 * bits)
    q8 = (q * 40).astype(jnp.int8)
    coords = words.shape[0] * norms.shape[1] * D
    nbytes = words.nbytes + norms.nbytes

    def f16_probe(variant, form=None, spec=spec):
      decode = dm.tile_decoder(spec, variant, 1, form=form)
      return jax.jit(lambda w, n, qq: pk.key_scores_probe(
          w, n, qq, spec=spec, num_splits=8, variant=variant, max_concurrent_steps=4,
          decoder=decode))

    for lv in ("quintic", "cubic"):
      try:
        form = dm.level_form(_levels(lv, bits), bits)
      except ValueError as e:
        rows.append(dict(bits=bits, decode=f"fp16 {lv} levels", error=str(e)[:200]))
        continue
      timed(dict(bits=bits, decode=f"fp16 {lv} levels"), f16_probe("levels", form),
            (words, norms, q), coords, nbytes)
    timed(dict(bits=bits, decode="fp16 raw (no decode)"), f16_probe("raw"),
          (words, norms, q), coords, nbytes)
    for raw in (False, True):
      fn = jax.jit(lambda w, n, qq, raw=raw, bits=bits: key_scores_probe_s8(
          w, n, qq, num_splits=8, raw=raw, bits=bits))
      timed(dict(bits=bits, decode=f"int8 {'raw (no decode)' if raw else 'prmt'}"), fn,
            (words8, norms, q8), coords, nbytes)
  path = common.write_result("mgpu_probe_s8", dict(
      shape=dict(batch=8, kv_heads=8, tokens=32768, head_dim=D, side="keys only"),
      read_ceiling_bytes_per_s=ceiling, checks=checks, timings=rows))
  print(f"wrote {path}")
  common.print_table(checks, ["bits", "keys_rel_err", "ok"])
  common.print_table([dict(r, coords_per_s=r.get("coords_per_s", 0) / 1e12) for r in rows],
                     ["bits", "decode", "ms", "coords_per_s", "ceiling_frac"])


if __name__ == "__main__":
  sys.exit(main())
