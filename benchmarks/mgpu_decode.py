"""The Mosaic GPU decode kernel over register-layout codes: GPU check and speed.

Checks `decode_attention_mgpu.decode_partials` against its float32 jnp reference on
fresh random codes, norms, queries and ragged ranges (an empty row, rows that end inside
a tile and a split, soft-cap on one case), for every integer width pair; then times it
beside cuDNN bf16 attention on the same shapes (one query token, 32 q heads, 8 kv heads,
d = 128) and measures the HBM read ceiling in the same run. Device time of back-to-back
calls (`common.device_time_chained`): these kernels are shorter than a host dispatch.

    python -m benchmarks.mgpu_decode [--check-only] [--quick] [--sweep]
    python -m benchmarks.mgpu_decode --profile BK BV   # a few calls, for ncu
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc
from turboquant_jax import codebook

D, HQ, HKV = 128, 32, 8
G = HQ // HKV


def log(*args):
  print(*args, flush=True)


def specs(bits_k, bits_v, d=D):
  tt = max(rc.tile_rows(bits_k, d), 64)
  while not _valid(bits_v, d, tt):
    tt += 64
  return rc.TileSpec(bits_k, tt, d), rc.TileSpec(bits_v, d, tt)


def _valid(bits, d, tt):
  try:
    rc.TileSpec(bits, d, tt)
    return True
  except ValueError:
    return False


def levels(bits):
  book = codebook.cubic_codebook(D, bits)
  return (book.linear, book.cubic)


def pack_keys(codes, spec):
  r, t, d = codes.shape
  tiles = codes.reshape(r, t // spec.rows, spec.rows, d)
  return rc.pack_tile(tiles, spec).reshape(r, -1, spec.words_per_row)


def pack_values(codes, spec):
  r, t, d = codes.shape
  tiles = codes.reshape(r, t // spec.cols, spec.cols, d).swapaxes(-1, -2)
  return rc.pack_tile(tiles, spec).reshape(r, -1, spec.words_per_row)


def inputs(key, r, t, bits_k, bits_v, lengths=None):
  ks = jax.random.split(key, 7)
  kc = jax.random.randint(ks[0], (r, t, D), 0, 1 << bits_k)
  vc = jax.random.randint(ks[1], (r, t, D), 0, 1 << bits_v)
  kn = jax.random.uniform(ks[2], (r, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  vn = jax.random.uniform(ks[3], (r, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  # Queries scaled so that scores spread over a few units (a peaked softmax).
  q = jax.random.normal(ks[4], (r, dm.HEADS, D), jnp.float32) * 2.0 / (2 ** bits_k)
  q = q.at[:, G:].set(0.0).astype(jnp.float16)
  qoff = jax.random.normal(ks[5], (r, dm.HEADS), jnp.float32)
  if lengths is None:
    bounds = jnp.stack([jnp.full((r,), 4), jnp.full((r,), t - 128)], -1).astype(jnp.int32)
  else:
    bounds = jnp.asarray(lengths, jnp.int32)
  return kc, vc, kn, vn, q, qoff, bounds


def merged(o, l, m):
  """The normalised output per (row, head) after merging splits: [R, 8, D]."""
  w = jnp.exp(m - m.max(axis=1, keepdims=True))
  l_t = jnp.sum(l * w, axis=1)
  o = jnp.sum(o * w[:, :, None, :], axis=1)
  return jnp.swapaxes(o / jnp.where(l_t > 0, l_t, 1.0)[:, None, :], 1, 2)


def rope_operands(key, r, t, size=1.0, repeat=False):
  """Random q·R(t)·μ operands (Llama 3's RoPE frequencies), offsets of about `size`;
  repeat: heads G-2G repeat heads 0-G (else zero past the G real heads)."""
  freq = 500000.0 ** (-jnp.arange(D // 2, dtype=jnp.float32) * 2 / D)
  ca, cb = jax.random.normal(key, (2, r, dm.HEADS, D // 2)) * size / 8
  ca, cb = (x.at[:, G:].set(0.0) for x in (ca, cb))
  if repeat:
    ca, cb = (jnp.concatenate([x[:, :G], x[:, :G]], axis=1) for x in (ca, cb))
  return dm.rope_offsets(ca, cb, freq, t)


def check(key, bits_k, bits_v, soft_cap=None, splits=4, overlap=True, step=128, rope=False):
  ks, vs = specs(bits_k, bits_v)
  r, t = 6, 8 * 128 * splits // 4 * 2
  lengths = [(4, t - 128), (0, 37), (5, 5), (130, t), (ks.rows + 3, t - ks.rows - 1),
             (0, t)]
  kc, vc, kn, vn, q, qoff, bounds = inputs(key, r, t, bits_k, bits_v, lengths)
  args = (pack_keys(kc, ks), kn, pack_values(vc, vs), vn, q, bounds, qoff)
  kw = dict(num_splits=splits, scale=0.3, soft_cap=soft_cap, key_levels=levels(bits_k),
            value_levels=levels(bits_v),
            rope=rope_operands(jax.random.fold_in(key, 1), r, t, 3.0) if rope else None)
  # Outputs poisoned first: NaN buffers of the output shapes, freed just before the call,
  # are where the allocator is likely to put the kernel's results, so an element the
  # kernel does not write is likely to show up as NaN.
  poison = jax.jit(lambda *a: tuple(jnp.full_like(x, jnp.nan) for x in a))
  shapes = jax.eval_shape(lambda *a: dm.decode_partials(*a, key_spec=ks, value_spec=vs,
                                                        **kw), *args)
  jax.block_until_ready(poison(*[jnp.zeros(x.shape, x.dtype) for x in shapes]))
  got = dm.decode_partials(*args, key_spec=ks, value_spec=vs, overlap_values=overlap,
                           tokens_per_step=step, **kw)
  ref = dm.decode_partials_reference(kc, kn, vc, vn, q, bounds, qoff, bits_k=bits_k,
                                     bits_v=bits_v, **kw)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  out, out_ref = merged(*got), merged(*ref)
  err = float(jnp.linalg.norm(out - out_ref) / jnp.linalg.norm(out_ref))
  m_err = float(jnp.max(jnp.abs(jnp.where(ref[2] > -1e29, got[2] - ref[2], 0.0))))
  empty_ok = bool(jnp.all((got[2] > -1e29) == (ref[2] > -1e29)))
  l_err = float(jnp.max(jnp.abs(got[1] - ref[1])) / jnp.max(ref[1]))
  return dict(bits_k=bits_k, bits_v=bits_v, soft_cap=soft_cap, overlap=overlap, step=step,
              rope=rope, rel_err=err, m_err=m_err, l_err=l_err, finite=finite,
              ok=finite and empty_ok and err <= 3e-3 and l_err <= 3e-3 and m_err <= 3e-3)


def read_ceiling(gib: float = 4.0) -> float:
  x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  return x.nbytes / common.device_time(f, x, calls=10, repeats=9)


def cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def cudnn_inputs(key, b, t, hq=HQ, hkv=HKV, d=D):
  """Random bf16 q [b, 1, hq, d], k and v [b, t, hkv, d]: one decode step's attention."""
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, 1, hq, d), jnp.bfloat16),
          jax.random.normal(kk, (b, t, hkv, d), jnp.bfloat16),
          jax.random.normal(kv, (b, t, hkv, d), jnp.bfloat16))


def time_cudnn(key, b, t):
  q, k, v = cudnn_inputs(key, b, t)
  return (common.device_time_chained(cudnn_attention, (q, k, v), 0, iters=8),
          k.nbytes + v.nbytes)


def time_ours(key, b, t, bits_k, bits_v, splits, stages, overlap=True, step=128,
              rope=False, levels_fn=None):
  """Seconds of `decode_partials` at (b, t) on random tiles, and bytes read; levels_fn(bits)
  gives the levels (default `levels`, the cubic codebook)."""
  levels_fn = levels_fn or levels
  ks, vs = specs(bits_k, bits_v)
  r = b * HKV
  kk, kv, kn, kq = jax.random.split(key, 4)
  # Every bit pattern is a valid tile (the layout is a bijection): random words.
  rnd = lambda k, c: jax.random.randint(  # noqa: E731
      k, (r, t // ks.rows * rc.WORD_ROWS, c), -2**31, 2**31 - 1, jnp.int32)
  kw, vw = rnd(kk, ks.words_per_row), rnd(kv, vs.words_per_row)
  norms = jax.random.uniform(kn, (2, r, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  q = (jax.random.normal(kq, (1, r, dm.HEADS, D)) * 0.05).astype(jnp.float16)
  bounds = jnp.tile(jnp.array([[4, t - 128]], jnp.int32), (r, 1))
  qoff = jnp.zeros((r, dm.HEADS), jnp.float32)
  offsets = rope_operands(kq, r, t) if rope else None
  f = lambda q, kw, kn, vw, vn, bounds, qoff, offsets: dm.decode_partials(  # noqa: E731
      kw, kn, vw, vn, q, bounds, qoff, key_spec=ks, value_spec=vs, num_splits=splits,
      scale=D**-0.5, key_levels=levels_fn(bits_k), value_levels=levels_fn(bits_v),
      max_concurrent_steps=stages, overlap_values=overlap, tokens_per_step=step,
      rope=offsets)
  args = (q[0], kw, norms[0], vw, norms[1], bounds, qoff, offsets)
  nbytes = kw.nbytes + vw.nbytes + norms.nbytes
  return common.device_time_chained(f, args, 0, iters=8), nbytes


def profile(bits_k, bits_v, b=8, t=32768, splits=16, stages=2, calls=3, rope=False):
  """A few plain calls of one configuration, for `ncu -k regex:mosaic`."""
  ks, vs = specs(bits_k, bits_v)
  r = b * HKV
  key = jax.random.PRNGKey(1)
  kw = jax.random.randint(key, (r, t // ks.rows * rc.WORD_ROWS, ks.words_per_row),
                          -2**31, 2**31 - 1, jnp.int32)
  vw = jax.random.randint(key, (r, t // vs.cols * rc.WORD_ROWS, vs.words_per_row),
                          -2**31, 2**31 - 1, jnp.int32)
  n = jnp.ones((r, t), jnp.float16)
  q = jnp.full((r, dm.HEADS, D), 0.01, jnp.float16)
  bounds = jnp.tile(jnp.array([[0, t]], jnp.int32), (r, 1))
  f = jax.jit(lambda *a: dm.decode_partials(
      *a, key_spec=ks, value_spec=vs, key_levels=levels(bits_k), value_levels=levels(bits_v),
      num_splits=splits, scale=D**-0.5, max_concurrent_steps=stages,
      rope=rope_operands(key, r, t) if rope else None))
  for _ in range(calls):
    jax.block_until_ready(f(kw, n, vw, n, q, bounds, jnp.zeros((r, dm.HEADS), jnp.float32)))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--check-only", action="store_true")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--sweep", action="store_true", help="pipeline depth and decode order")
  p.add_argument("--profile", nargs=2, type=int, metavar=("BK", "BV"))
  p.add_argument("--rope", action="store_true", help="--profile with RoPE offsets")
  p.add_argument("--skip-checks", action="store_true", help="timings only")
  p.add_argument("--rope-sweep", action="store_true",
                 help="8 x 32K only: RoPE offsets with values decoded before or after the "
                      "softmax, 2 or 3 steps in flight (implies --skip-checks)")
  args = p.parse_args(argv)
  if args.profile:
    return profile(*args.profile, rope=args.rope)
  key = jax.random.PRNGKey(0)
  checks = []
  for bk, bv, cap, overlap, step, *rope in [
      (4, 4, None, True, 128), (3, 3, None, True, 128), (2, 2, None, True, 128),
      (4, 4, None, False, 64), (4, 3, None, False, 128), (3, 4, 30.0, True, 128),
      (2, 4, None, True, 128), (4, 2, 5.0, True, 64), (3, 3, None, True, 128, True),
      (4, 4, 30.0, True, 128, True), (2, 3, None, False, 128, True)][
          :0 if args.skip_checks or args.rope_sweep else None]:
    key, sub = jax.random.split(key)
    try:
      checks.append(check(sub, bk, bv, cap, overlap=overlap, step=step, rope=bool(rope)))
    except Exception as e:  # noqa: BLE001 - report every case
      traceback.print_exc()
      checks.append(dict(bits_k=bk, bits_v=bv, soft_cap=cap, error=repr(e)[:300], ok=False))
    log("check", checks[-1])
  rows = []
  ceiling = None

  def save():
    return common.write_result("mgpu_decode", dict(
        shape=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, query_tokens=1),
        read_ceiling_bytes_per_s=ceiling, checks=checks, timings=rows))
  save()

  def run(label, base, **kw):
    nonlocal key
    key, sub = jax.random.split(key)
    try:
      sec, nbytes = time_ours(sub, label["batch"], label["tokens"], **kw)
      rows.append(dict(label, ms=sec * 1e3, speedup=base / sec,
                       tb_per_s=nbytes / sec / 1e12, ceiling_frac=nbytes / sec / ceiling))
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      rows.append(dict(label, error=repr(e)[:300]))
    log(rows[-1])
    save()

  if not args.check_only:
    ceiling = read_ceiling()
    log(f"read ceiling {ceiling / 1e12:.2f} TB/s")
    points = [(8, 32768), (8, 4096), (1, 4096)] if not args.quick else [(8, 32768), (1, 4096)]
    if args.rope_sweep:
      points = [(8, 32768)]
    for b, t in points:
      key, sub = jax.random.split(key)
      base, base_bytes = time_cudnn(sub, b, t)
      rows.append(dict(batch=b, tokens=t, kernel="cudnn bf16", ms=base * 1e3, speedup=1.0,
                       tb_per_s=base_bytes / base / 1e12,
                       ceiling_frac=base_bytes / base / ceiling))
      log(rows[-1])
      save()
      splits = 16 if b * HKV * 16 >= 512 else t // 128
      for bk, bv in [(4, 4), (3, 3), (2, 2)]:
        if args.rope_sweep:
          if bk == 2:
            continue
          run(dict(batch=b, tokens=t, kernel=f"mosaic K{bk}/V{bv}", splits=splits, stages=2,
                   overlap=True, step=128), base, bits_k=bk, bits_v=bv, splits=splits,
              stages=2)
          for stages, overlap in ((2, True), (2, False), (3, False)):
            run(dict(batch=b, tokens=t, kernel=f"mosaic K{bk}/V{bv} rope", splits=splits,
                     stages=stages, overlap=overlap, step=128), base, bits_k=bk, bits_v=bv,
                splits=splits, stages=stages, overlap=overlap, rope=True)
          continue
        configs = [(2, True, 128)]
        if args.sweep and (b, t) == points[0]:
          configs = [(2, True, 128), (2, False, 128), (3, True, 128)]
          if bk != 3:
            configs += [(2, True, 64)]
        for stages, overlap, step in configs:
          run(dict(batch=b, tokens=t, kernel=f"mosaic K{bk}/V{bv}", splits=splits,
                   stages=stages, overlap=overlap, step=step), base, bits_k=bk, bits_v=bv,
              splits=splits, stages=stages, overlap=overlap, step=step)
        if bk in (3, 4):   # keys centred before RoPE: one more wgmma per step
          run(dict(batch=b, tokens=t, kernel=f"mosaic K{bk}/V{bv} rope", splits=splits,
                   stages=2, overlap=True, step=128), base, bits_k=bk, bits_v=bv,
              splits=splits, stages=2, rope=True)
  log(f"wrote {save()}")
  if checks:
    common.print_table(checks, ["bits_k", "bits_v", "soft_cap", "overlap", "step", "rope",
                                "rel_err", "m_err", "l_err", "ok"])
  common.print_table(rows, ["batch", "tokens", "kernel", "splits", "stages", "overlap", "step",
                            "ms", "speedup", "tb_per_s", "ceiling_frac"])


if __name__ == "__main__":
  sys.exit(main())
