"""How fast can a Mosaic GPU kernel decode register-layout codes? Keys only.

The question the decode-attention rewrite has to settle first: the Triton kernels decode
about 2.5e12 coordinates/s whatever the bit width (one code per 32-bit lane), far from
the HBM floor. `decode_attention_mgpu.key_scores_probe` decodes codes stored in wgmma's
register order (`register_codes`) with a few bit operations per pair, multiplies with the
tensor cores, scales by the norms and keeps a running max. Timed on 8 sequences × 8 kv
heads × 32K tokens × d = 128 (the decode-attention benchmark's shape, keys only), with
variants that drop a stage: "raw" (no decode), no wgmma, and cubic levels (u and u³).

    python -m benchmarks.mgpu_probe [--quick] [--check-only]
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import mgpu_probe_kernels as pk
from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc

D = 128


def log(*args):
  print(*args, flush=True)


def spec_for(bits: int) -> rc.TileSpec:
  return rc.TileSpec(bits, rc.tile_rows(bits, D), D)


def packed_keys(codes: jax.Array, spec: rc.TileSpec) -> jax.Array:
  """codes [BH, T, D] level indices -> words [BH, T/rows·64, C]."""
  bh, t, d = codes.shape
  tiles = codes.reshape(bh, t // spec.rows, spec.rows, d)
  return rc.pack_tile(tiles, spec).reshape(bh, -1, spec.words_per_row)


def check(key, bits, variant, bh=4, t=4096, splits=4, per_step=1, ws=None):
  spec = spec_for(bits)
  kc, kn, kq = jax.random.split(key, 3)
  codes = jax.random.randint(kc, (bh, t, D), 0, 1 << bits)
  norms = jax.random.uniform(kn, (bh, t), jnp.float32, 0.5, 2.0).astype(jnp.float16)
  q = jax.random.normal(kq, (bh, dm.HEADS, D), jnp.float32).astype(jnp.float16)
  words = packed_keys(codes, spec)
  if ws == "direct":
    got = pk.key_scores_probe_direct(words, norms, q, spec=spec, num_splits=splits,
                                     variant=variant, tiles_per_step=per_step)
  elif ws is None:
    got = pk.key_scores_probe(words, norms, q, spec=spec, num_splits=splits,
                              variant=variant, tiles_per_step=per_step)
  else:
    got = pk.key_scores_probe_ws(words, norms, q, spec=spec, num_splits=splits,
                                 variant=variant, compute_wgs=ws, tiles_per_wg=per_step)
    got = jnp.max(got, axis=2)
  got = jnp.max(got, axis=2)
  ref = pk.key_scores_probe_reference(codes, norms, q, bits=bits, num_splits=splits,
                                      variant=variant)
  err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
  return err, bool(jnp.all(jnp.isfinite(got)))


def read_ceiling(gib: float = 4.0) -> float:
  x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  return x.nbytes / common.device_time(f, x, calls=10, repeats=9)


def cudnn_time(key, b, t, hq=32, hkv=8):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, 1, hq, D), jnp.bfloat16)
  k = jax.random.normal(kk, (b, t, hkv, D), jnp.bfloat16)
  v = jax.random.normal(kv, (b, t, hkv, D), jnp.bfloat16)
  f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  return common.device_time(f, q, k, v)


def probe_inputs(bits, b=8, hkv=8, t=32768):
  """Pseudo-random words (a hash of the index: one cheap kernel), norms and queries."""
  spec = spec_for(bits)
  bh = b * hkv
  shape = (bh, t // spec.rows * rc.WORD_ROWS, spec.words_per_row)
  idx = jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * jnp.uint32(shape[2]) + \
      jax.lax.broadcasted_iota(jnp.uint32, shape, 2)
  idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * jnp.uint32(shape[1] * shape[2])
  h = idx * jnp.uint32(2654435761)
  h = (h ^ (h >> 15)) * jnp.uint32(2246822519)
  words = jax.lax.bitcast_convert_type(h ^ (h >> 13), jnp.int32)
  norms = (1.0 + (jax.lax.broadcasted_iota(jnp.float32, (bh, t), 1) % 7) / 7).astype(jnp.float16)
  q = (jax.lax.broadcasted_iota(jnp.float32, (bh, dm.HEADS, D), 2) % 5 - 2).astype(jnp.float16)
  return spec, words, norms, q


def probe_fn(spec, variant, splits, stages, per_step, ws=None, use_wgmma=True):
  """ws: None (one warpgroup, TMA pipeline), an int (warp-specialized, that many compute
  warpgroups) or "direct" (loads straight into registers, no pipeline)."""
  if ws == "direct":
    return jax.jit(lambda w, n, q: pk.key_scores_probe_direct(
        w, n, q, spec=spec, num_splits=splits, variant=variant, tiles_per_step=per_step))
  if ws is None:
    return jax.jit(lambda w, n, q: pk.key_scores_probe(
        w, n, q, spec=spec, num_splits=splits, variant=variant, use_wgmma=use_wgmma,
        max_concurrent_steps=stages, tiles_per_step=per_step))
  return jax.jit(lambda w, n, q: pk.key_scores_probe_ws(
      w, n, q, spec=spec, num_splits=splits, variant=variant, compute_wgs=ws,
      max_concurrent_steps=stages, tiles_per_wg=per_step))


def profile():
  """One call of the plain and the warp-specialized probe, for ncu."""
  spec, words, norms, q = probe_inputs(4)
  jax.block_until_ready((words, norms, q))
  for fn in (probe_fn(spec, "affine", 8, 4, 1), probe_fn(spec, "affine", 8, 4, 2, ws="direct")):
    jax.block_until_ready(fn(words, norms, q))


def time_probe(bits, variant, t=32768, splits=8, use_wgmma=True, stages=4,
               tiles_per_step=1, ws=None):
  """Seconds per call at 8 sequences x 8 kv heads x t tokens, and coordinates and bytes
  read. Every bit pattern is a valid code tile (the layout is a bijection), so the words
  are pseudo-random bits."""
  spec, words, norms, q = probe_inputs(bits, t=t)
  f = probe_fn(spec, variant, splits, stages, tiles_per_step, ws, use_wgmma)
  sec = common.device_time(f, words, norms, q)
  return sec, words.shape[0] * t * D, words.nbytes + norms.nbytes


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--check-only", action="store_true")
  p.add_argument("--profile", action="store_true")
  args = p.parse_args(argv)
  if args.profile:
    return profile()
  key = jax.random.PRNGKey(0)
  checks, rows = [], []
  for bits, variant, per_step, ws in [
      (4, "affine", 1, None), (3, "affine", 1, None), (2, "affine", 1, None),
      (4, "cubic", 1, None), (3, "cubic", 2, None), (4, "affine", 1, "direct"),
      (3, "cubic", 2, "direct"), (2, "affine", 4, "direct"), (4, "affine", 2, 2)]:
    key, sub = jax.random.split(key)
    try:
      err, finite = check(sub, bits, variant, per_step=per_step, ws=ws)
      checks.append(dict(bits=bits, variant=variant, per_step=per_step, ws=ws, rel_err=err,
                         finite=finite,
                         ok=finite and err <= 3e-3))
    except Exception as e:  # noqa: BLE001 - report every variant, keep going
      traceback.print_exc()
      checks.append(dict(bits=bits, variant=variant, error=repr(e)[:300], ok=False))
    log("check", checks[-1])
  if args.check_only:
    return
  ceiling = read_ceiling()
  t = 4096 if args.quick else 32768
  base = cudnn_time(key, 8, t)
  log(f"read ceiling {ceiling / 1e12:.2f} TB/s; cuDNN bf16 8x{t} (K+V) {base * 1e3:.3f} ms")
  plain = lambda bits, variant, splits=8, stages=4, per_step=1: dict(  # noqa: E731
      bits=bits, variant=variant, wgmma=True, splits=splits, stages=stages,
      per_step=per_step, ws=None)
  variants = [plain(4, "affine"), plain(4, "raw"), plain(4, "affine", per_step=2),
              plain(3, "affine"), plain(2, "affine", per_step=2), plain(4, "affine")]
  for bits, variant, per_step, splits in [
      (4, "affine", 1, 8), (4, "affine", 2, 8), (4, "affine", 4, 8), (4, "affine", 2, 16),
      (4, "affine", 4, 16), (4, "raw", 2, 8), (4, "raw", 4, 8), (4, "cubic", 2, 8),
      (3, "affine", 1, 8), (3, "affine", 2, 8), (3, "affine", 2, 16), (3, "cubic", 2, 8),
      (3, "raw", 2, 8), (2, "affine", 2, 8), (2, "affine", 4, 8), (2, "cubic", 4, 8),
      (4, "affine", 2, 32), (3, "affine", 1, 32)]:
    variants.append(dict(bits=bits, variant=variant, wgmma=True, splits=splits, stages=0,
                         per_step=per_step, ws="direct"))
  if args.quick:
    variants = variants[:4]
  for label in variants:
    try:
      sec, coords, nbytes = time_probe(
          label["bits"], label["variant"], t=t, splits=label["splits"],
          use_wgmma=label["wgmma"], stages=label["stages"], tiles_per_step=label["per_step"],
          ws=label["ws"])
      rows.append(dict(label, ms=sec * 1e3, coords_per_s=coords / sec,
                       tb_per_s=nbytes / sec / 1e12, ceiling_frac=nbytes / sec / ceiling))
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      rows.append(dict(label, error=repr(e)[:300]))
    log(rows[-1])
  path = common.write_result("mgpu_probe", dict(
      shape=dict(batch=8, kv_heads=8, tokens=t, head_dim=D, q_heads_per_kv=4),
      read_ceiling_bytes_per_s=ceiling, cudnn_bf16_kv_seconds=base, checks=checks,
      timings=rows))
  log(f"wrote {path}")
  common.print_table(checks, ["bits", "variant", "per_step", "ws", "rel_err", "ok"])
  common.print_table([dict(r, coords_per_s=r.get("coords_per_s", 0) / 1e12) for r in rows],
                     ["bits", "variant", "ws", "splits", "stages", "per_step", "ms", "coords_per_s",
                      "tb_per_s", "ceiling_frac"])


if __name__ == "__main__":
  sys.exit(main())
