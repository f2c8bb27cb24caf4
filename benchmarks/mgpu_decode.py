"""The Mosaic GPU decode kernel over register-layout codes: GPU check and speed.

Checks `decode_attention_mgpu.decode_partials` against its float32 jnp reference on
fresh random codes, norms, queries and ragged ranges (an empty row, rows that end inside
a tile and a split, soft-cap on one case), for every integer width pair; then times it
beside cuDNN bf16 attention on the same shapes (one query token, 32 q heads, 8 kv heads,
d = 128) and measures the HBM read ceiling in the same run. Device time of back-to-back
calls (`common.device_time_chained`): these kernels are shorter than a host dispatch.

    python -m benchmarks.mgpu_decode [--check-only] [--quick]
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
  q = jax.random.normal(ks[4], (r, dm.HEADS, D), jnp.float32) * 0.05
  q = q.at[:, G:].set(0.0)
  ql, qc = (q * 1.0).astype(jnp.float16), (q * 0.02).astype(jnp.float16)
  qoff = jax.random.normal(ks[5], (r, dm.HEADS), jnp.float32)
  if lengths is None:
    bounds = jnp.stack([jnp.full((r,), 4), jnp.full((r,), t - 128)], -1).astype(jnp.int32)
  else:
    bounds = jnp.asarray(lengths, jnp.int32)
  return kc, vc, kn, vn, ql, qc, qoff, bounds


def merged(o_lin, o_cub, l, m, a_v=1.0, c_v=0.05):
  """The normalised output per (row, head) after merging splits: [R, 8, D]."""
  w = jnp.exp(m - m.max(axis=1, keepdims=True))
  l_t = jnp.sum(l * w, axis=1)
  o = jnp.sum((a_v * o_lin + c_v * o_cub) * w[:, :, None, :], axis=1)
  return jnp.swapaxes(o / jnp.where(l_t > 0, l_t, 1.0)[:, None, :], 1, 2)


def check(key, bits_k, bits_v, soft_cap=None, splits=4):
  ks, vs = specs(bits_k, bits_v)
  r, t = 6, 8 * 128 * splits // 4 * 2
  lengths = [(4, t - 128), (0, 37), (5, 5), (130, t), (ks.rows + 3, t - ks.rows - 1),
             (0, t)]
  kc, vc, kn, vn, ql, qc, qoff, bounds = inputs(key, r, t, bits_k, bits_v, lengths)
  args = (pack_keys(kc, ks), kn, pack_values(vc, vs), vn, ql, qc, bounds, qoff)
  kw = dict(num_splits=splits, scale=0.3, soft_cap=soft_cap)
  got = dm.decode_partials(*args, key_spec=ks, value_spec=vs, **kw)
  ref = dm.decode_partials_reference(kc, kn, vc, vn, ql, qc, bounds, qoff, bits_k=bits_k,
                                     bits_v=bits_v, **kw)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  out, out_ref = merged(*got), merged(*ref)
  err = float(jnp.linalg.norm(out - out_ref) / jnp.linalg.norm(out_ref))
  m_err = float(jnp.max(jnp.abs(jnp.where(ref[3] > -1e29, got[3] - ref[3], 0.0))))
  l_err = float(jnp.max(jnp.abs(got[2] - ref[2])) / jnp.max(ref[2]))
  return dict(bits_k=bits_k, bits_v=bits_v, soft_cap=soft_cap, rel_err=err, m_err=m_err,
              l_err=l_err, finite=finite, ok=finite and err <= 3e-3 and l_err <= 3e-3)


def read_ceiling(gib: float = 4.0) -> float:
  x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  return x.nbytes / common.device_time(f, x, calls=10, repeats=9)


def time_cudnn(key, b, t):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, 1, HQ, D), jnp.bfloat16)
  k = jax.random.normal(kk, (b, t, HKV, D), jnp.bfloat16)
  v = jax.random.normal(kv, (b, t, HKV, D), jnp.bfloat16)
  f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")  # noqa: E731
  return common.device_time_chained(f, (q, k, v), 0, iters=8), k.nbytes + v.nbytes


def time_ours(key, b, t, bits_k, bits_v, splits, stages):
  ks, vs = specs(bits_k, bits_v)
  r = b * HKV
  kk, kv, kn, kq = jax.random.split(key, 4)
  # Every bit pattern is a valid tile (the layout is a bijection): random words.
  rnd = lambda k, c: jax.random.randint(  # noqa: E731
      k, (r, t // ks.rows * rc.WORD_ROWS, c), -2**31, 2**31 - 1, jnp.int32)
  kw, vw = rnd(kk, ks.words_per_row), rnd(kv, vs.words_per_row)
  norms = jax.random.uniform(kn, (2, r, t), jnp.float32, 0.5, 1.5).astype(jnp.float16)
  q = (jax.random.normal(kq, (2, r, dm.HEADS, D)) * 0.05).astype(jnp.float16)
  bounds = jnp.tile(jnp.array([[4, t - 128]], jnp.int32), (r, 1))
  qoff = jnp.zeros((r, dm.HEADS), jnp.float32)
  f = lambda ql, kw, kn, vw, vn, qc, bounds, qoff: dm.decode_partials(  # noqa: E731
      kw, kn, vw, vn, ql, qc, bounds, qoff, key_spec=ks, value_spec=vs, num_splits=splits,
      scale=D**-0.5, max_concurrent_steps=stages)
  args = (q[0], kw, norms[0], vw, norms[1], q[1], bounds, qoff)
  nbytes = kw.nbytes + vw.nbytes + norms.nbytes
  return common.device_time_chained(f, args, 0, iters=8), nbytes


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--check-only", action="store_true")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  key = jax.random.PRNGKey(0)
  checks = []
  for bk, bv, cap in [(4, 4, None), (3, 3, None), (2, 2, None), (4, 3, None), (3, 4, 30.0),
                      (2, 4, None), (4, 2, 5.0)]:
    key, sub = jax.random.split(key)
    try:
      checks.append(check(sub, bk, bv, cap))
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
  if not args.check_only:
    ceiling = read_ceiling()
    log(f"read ceiling {ceiling / 1e12:.2f} TB/s")
    points = [(8, 32768), (8, 4096), (1, 4096)] if not args.quick else [(8, 32768), (1, 4096)]
    for b, t in points:
      key, sub = jax.random.split(key)
      base, base_bytes = time_cudnn(sub, b, t)
      rows.append(dict(batch=b, tokens=t, kernel="cudnn bf16", ms=base * 1e3, speedup=1.0,
                       tb_per_s=base_bytes / base / 1e12,
                       ceiling_frac=base_bytes / base / ceiling))
      log(rows[-1])
      save()
      for bk, bv in [(4, 4), (3, 3), (2, 2)]:
        for splits, stages in [(16, 2), (32, 2)]:
          if b * HKV * splits < 512 and splits != 32:
            continue
          key, sub = jax.random.split(key)
          label = dict(batch=b, tokens=t, kernel=f"mosaic K{bk}/V{bv}", splits=splits,
                       stages=stages)
          try:
            sec, nbytes = time_ours(sub, b, t, bk, bv, splits, stages)
            rows.append(dict(label, ms=sec * 1e3, speedup=base / sec,
                             tb_per_s=nbytes / sec / 1e12, ceiling_frac=nbytes / sec / ceiling))
          except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(dict(label, error=repr(e)[:300]))
          log(rows[-1])
          save()
  log(f"wrote {save()}")
  common.print_table(checks, ["bits_k", "bits_v", "soft_cap", "rel_err", "m_err", "l_err",
                              "ok"])
  common.print_table(rows, ["batch", "tokens", "kernel", "splits", "stages", "ms", "speedup",
                            "tb_per_s", "ceiling_frac"])


if __name__ == "__main__":
  sys.exit(main())
