"""`TurboQuantKVCache.attend` through the Mosaic GPU kernel: GPU check and speed.

The cache in the tiles layout (`TurboQuantConfig(layout="tiles", levels="cubic")`), the
whole attention as a user calls it (query transforms, the kernel, the merge with the
exact window and sinks, the inverse rotation), against:
- the jnp reference on the same cache (fresh random inputs, ragged lengths, GQA 1/4/8,
  soft-cap, sliding window, keys uncentred, centred, or centred before RoPE (Llama 3's
  RoPE), each output NaN-poisoned first);
- cuDNN bf16 attention and the Triton kernel (bit-plane layout) on the same shapes, timed
  in the same run (device time of back-to-back calls), with the HBM read ceiling.

    python -m benchmarks.mosaic_attend [--check-only] [--quick]
    python -m benchmarks.mosaic_attend --levels   # quintic against cubic levels
    python -m benchmarks.mosaic_attend --int8     # the int8 path against fp16 levels
    python -m benchmarks.mosaic_attend --sweep-splits-int8   # the int8 path's splits
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.decode_attention import compressed_bytes, make_cache
from benchmarks.mgpu_decode import read_ceiling, time_cudnn
from turboquant_jax import rope as rope_lib
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

HQ, HKV, D = 32, 8, 128
LLAMA3_ROPE = rope_lib.RopeSpec(500000.0)


def log(*args):
  print(*args, flush=True)


def tiles_config(bits_k, bits_v, **kw):
  kw.setdefault("center_keys", "plain")
  kw.setdefault("levels", "cubic")
  return TurboQuantConfig(key_bits=bits_k, value_bits=bits_v, layout="tiles", **kw)


def check(seed, bits_k, bits_v, hq, *, soft_cap=None, sliding_window=None, kernel=None,
          **cfg):
  rng = np.random.default_rng(seed)
  b, t = 3, 2048
  k = jnp.asarray(rng.standard_normal((b, t, HKV, D)) + 1.5, jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, HKV, D)), jnp.float32)
  rope = LLAMA3_ROPE if cfg.get("center_keys") == "rope" else None
  if rope is not None:   # keys after RoPE, with a mean before it
    k = rope_lib.rotate(k, jnp.arange(t)[None, :, None], rope)
  cache = TurboQuantKVCache.create(b, t, HKV, D, jnp.bfloat16, rope=rope,
                                   config=tiles_config(bits_k, bits_v, **cfg))
  cache = cache.update(k, v, num_tokens=jnp.array([t, 1500, 700]))
  q = jnp.asarray(rng.standard_normal((b, 1, hq, D)), jnp.float32)
  kw = dict(soft_cap=soft_cap, sliding_window=sliding_window)
  ref = cache.attend(q, implementation="reference", **kw)
  # Freed NaN buffers of the output's size just before the call: where the allocator is
  # likely to put the kernel's results.
  jax.block_until_ready(jnp.full((4, *ref.shape), jnp.nan, ref.dtype))
  got = cache.attend(q, implementation="mosaic", **kw, **(kernel or {}))
  auto = cache.attend(q, **kw)
  err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  from turboquant_jax import kernel_attention
  exact_split = (kernel_attention.exact_unsupported(cache) is None
                 and bool(cache.exact_parts()) and (kernel or {}).get("exact_in_kernel", True))
  return dict(bits_k=bits_k, bits_v=bits_v, q_heads=hq, levels=cache.config.levels,
              kernel=kernel, exact_split=exact_split,
              soft_cap=soft_cap,
              sliding_window=sliding_window, center_keys=str(cache.config.center_keys),
              rel_err=err, nan=bool(jnp.any(jnp.isnan(got))),
              default_is_mosaic=bool(jnp.array_equal(auto, got)) if not kernel else None,
              ok=err <= 3e-3 and not bool(jnp.any(jnp.isnan(got))))


def run_checks(cases, first_seed: int, **defaults) -> list[dict]:
  """`check` of each (bits_k, bits_v, q_heads, config) case (seeds from first_seed, the
  config over `defaults`), an error reported as a failed row instead of raised."""
  rows = []
  for i, (bk, bv, hq, kw) in enumerate(cases):
    common.checked(rows, check, first_seed + i, bk, bv, hq, **{**defaults, **kw},
                   error_fields=dict(bits_k=bk, bits_v=bv, q_heads=hq))
  return rows


def time_attend(cache, q, **kw):
  f = lambda q, c: c.attend(q, **kw)  # noqa: E731
  return common.device_time_chained(f, (q, cache), 0, iters=8)


def cudnn_row(rows: list, key, b, t, ceiling) -> float:
  """Times cuDNN bf16 attention at (b, t), appends its row; returns its seconds."""
  base, base_bytes = time_cudnn(key, b, t)
  rows.append(dict(batch=b, tokens=t, kernel="cudnn bf16", ms=base * 1e3, speedup=1.0,
                   ceiling_frac=base_bytes / base / ceiling))
  log(rows[-1])
  return base


def time_merge(key, b, t, splits) -> list[dict]:
  """`merge_exact` alone on a decode step's shapes (Llama 3 8B: 8 kv heads, 4 q heads
  each, padded to the Mosaic kernel's 8 rows; a 128-token window and 4 sinks), against
  its jnp reference compiled by XLA (what the jnp merge costs, fused as XLA fuses it)."""
  from pallas_kernels import merge_exact as me
  r, rows, ks = b * HKV, 8, jax.random.split(key, 8)
  q = jax.random.normal(ks[0], (r, rows, D), jnp.float32)
  o = jax.random.normal(ks[1], (r, splits, D, rows), jnp.float32)
  l = jax.random.uniform(ks[2], (r, splits, rows), jnp.float32)
  m = jax.random.normal(ks[3], (r, splits, rows), jnp.float32)
  qpos = jnp.full((b, rows), t - 1, jnp.int32)
  rot = jnp.linalg.qr(jax.random.normal(ks[4], (D, D)))[0]
  exact = tuple((jax.random.normal(ks[5], (r, n, D), jnp.bfloat16),
                 jax.random.normal(ks[6], (r, n, D), jnp.bfloat16),
                 jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) + off, (b, n)))
                for n, off in ((128, t - 128), (4, 0)))
  args = (q, o, l, m, qpos, rot, exact)
  ref = jax.jit(lambda *a: me.merge_exact_reference(*a, heads=HKV, scale=D**-0.5))
  want = ref(*args)
  out = []
  cases = [("jnp (XLA)", ref)] + [
      (f"kernel, {w} warps",
       jax.jit(lambda *a, w=w: me.merge_exact(*a, heads=HKV, scale=D**-0.5, num_warps=w)))
      for w in (4, 8)]
  for label, fn in cases:
    try:
      got = fn(*args)
      err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
      sec = common.device_time_chained(fn, args, 0, iters=16)
      out.append(dict(batch=b, tokens=t, kernel=f"merge {label}", splits=splits,
                      ms=sec * 1e3, rel_err=err))
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      out.append(dict(batch=b, tokens=t, kernel=f"merge {label}", error=repr(e)[:300]))
    log(out[-1])
  return out


def sweep_splits(ceiling) -> list[dict]:
  """The whole attention (K3/V3, keys centred before RoPE) per number of splits, ending in
  `merge_exact` or in jnp, beside cuDNN: how many splits a short context wants."""
  rows = []
  key = jax.random.PRNGKey(1)
  for b, t in ((8, 4096), (1, 4096), (8, 32768)):
    key, sub = jax.random.split(key)
    base, base_bytes = time_cudnn(sub, b, t)
    rows.append(dict(batch=b, tokens=t, kernel="cudnn bf16", ms=base * 1e3, speedup=1.0))
    log(rows[-1])
    cache = make_cache(sub, b, t, tiles_config(3, 3, center_keys="rope"), rope=LLAMA3_ROPE)
    q = jax.random.normal(sub, (b, 1, HQ, D), jnp.bfloat16)
    for splits in (4, 8, 16, 32):
      rows += time_merge(sub, b, t, splits) if (b, t) == (8, 4096) else []
      for fused in (True, False):
        label = f"mosaic attend K3/V3 rope-centred, {splits} splits, " + (
            "merge_exact" if fused else "jnp merge")
        sec = time_attend(cache, q, implementation="mosaic", num_splits=splits,
                          fused_merge=fused)
        rows.append(dict(batch=b, tokens=t, kernel=label, ms=sec * 1e3, speedup=base / sec,
                         ceiling_frac=compressed_bytes(cache) / sec / ceiling))
        log(rows[-1])
  return rows


def sweep_splits_int8(ceiling) -> tuple[list[dict], list[dict]]:
  """The int8 path (K4/V3, keys centred plainly) per number of splits: the default
  (`kernel_attention._mosaic_splits`, waves of three CTAs per SM) against fixed counts,
  the whole attention beside cuDNN; first the GPU check of the default."""
  checks = run_checks([(4, 3, 32, dict(center_keys="plain", **INT8)),
                       (3, 3, 32, dict(center_keys="rope", **INT8))], 300)
  from turboquant_jax import kernel_attention
  rows = []
  key = jax.random.PRNGKey(1)
  for b, t in ((8, 32768), (8, 4096), (1, 32768), (1, 4096)):
    key, sub = jax.random.split(key)
    base = cudnn_row(rows, sub, b, t, ceiling)
    cache = make_cache(sub, b, t, tiles_config(4, 3, center_keys="plain", **INT8))
    q = jax.random.normal(sub, (b, 1, HQ, D), jnp.bfloat16)
    steps = t // 128
    auto = kernel_attention._mosaic_splits(steps, b * HKV, ctas_per_sm=3,
                                           sms=kernel_attention._multiprocessors())
    for splits in [None] + [s for s in (4, 8, 16, 32, 64) if steps % s == 0 and s != auto]:
      label = "mosaic attend K4/V3 int8, " + (
          f"default ({auto} splits)" if splits is None else f"{splits} splits")
      try:
        sec = time_attend(cache, q, implementation="mosaic",
                          **({} if splits is None else dict(num_splits=splits)))
        rows.append(dict(batch=b, tokens=t, kernel=label, splits=splits or auto,
                         ms=sec * 1e3, speedup=base / sec,
                         ceiling_frac=compressed_bytes(cache) / sec / ceiling))
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(dict(batch=b, tokens=t, kernel=label, error=repr(e)[:300]))
      log(rows[-1])
    del cache
  return checks, rows


# 256-token tiles (fractional widths) in two 128-token passes (the default) or one; keys
# centred before RoPE take their offsets from a 64-row table (the default: 111,616 bytes of
# shared memory, two CTAs per SM) or a longer one (one CTA per SM).
SUB_STEP_CHECKS = [
    (3.5, 3.5, 32, dict(center_keys="rope", kernel=dict(sub_steps=2, rope_table_rows=256))),
    (3.5, 3, 16, dict(center_keys="rope", soft_cap=20.0)),
    (3.5, 2.5, 8, dict(soft_cap=20.0, sliding_window=700, kernel=dict(sub_steps=2)))]
SUB_STEP_CASES = [(3.5, "quintic", "rope", dict(sub_steps=1)),
                  (3.5, "quintic", "rope", dict(sub_steps=2)),
                  (3.5, "quintic", "rope", dict(rope_table_rows=128)),
                  (3.5, "quintic", "rope", dict(rope_table_rows=256)),
                  (3.5, "quintic", "plain", dict(sub_steps=1)),
                  (3.5, "quintic", "plain", dict(sub_steps=2))]


# The epilogue kernel (`merge_exact`) on channel groups (block-diagonal unrotation and the
# values' outlier order), against the jnp merge, the default 3.5-bit cache.
MERGE_CHECKS = [
    (3.5, 3.5, 32, dict(center_keys="rope", kernel=dict(fused_merge=True))),
    (3.5, 2.5, 16, dict(center_keys="rope", soft_cap=20.0, sliding_window=900,
                        kernel=dict(fused_merge=True))),
    (2.5, 3, 8, dict(center_values=True, kernel=dict(fused_merge=True)))]
MERGE_CASES = [(3.5, "quintic", "rope", {}), (3.5, "quintic", "rope", dict(fused_merge=True)),
               (3, "cubic", "rope", {}), (3, "cubic", "rope", dict(fused_merge=True))]


# The exact window and sinks as the kernel's last split (the default on a bf16 cache)
# against the jnp exact partial (exact_in_kernel=False), side by side.
EXACT_CHECKS = [
    (3.5, 3.5, 32, dict(center_keys="rope")),                   # window 256, 4 sinks
    (3, 3, 32, dict(center_keys="rope", levels="cubic", soft_cap=20.0,
                    sliding_window=900)),                       # window 128
    (3.5, 2.5, 16, dict(center_keys="rope", soft_cap=20.0, sliding_window=200)),
    (4, 2, 8, dict(center_keys=False, levels="cubic", num_sinks=0, sliding_window=600)),
    (2, 3, 64, dict(center_keys="rope", levels="cubic", window=0, num_sinks=8)),
    (3, 4, 16, dict(levels="cubic", soft_cap=5.0, window=64, center_values=True)),
    # A ring of 104 slots (its last block part-filled, TMA's zero fill) and 6 sinks.
    (3, 3, 32, dict(center_keys="rope", levels="cubic", window=104, num_sinks=6))]
EXACT_CASES = [(3.5, "quintic", "rope", {}),
               (3.5, "quintic", "rope", dict(exact_blocks=(64, 64))),
               (3.5, "quintic", "rope", dict(exact_in_kernel=False)),
               (3, "cubic", "rope", {})]


# The int8 path (TurboQuantConfig(tile_operand="int8"): byte tiles, int8 levels, queries
# in two int8 parts) through the cache, against the fp16 path's cubic and quintic levels.
INT8 = dict(levels="int8", tile_operand="int8")
INT8_CHECKS = [
    (3, 3, 32, dict(center_keys="rope", **INT8)),
    (2, 4, 16, dict(center_keys="rope", soft_cap=20.0, sliding_window=900, **INT8)),
    (4, 2, 8, dict(center_keys=False, num_sinks=0, sliding_window=600, **INT8)),
    (3, 3, 32, dict(center_keys="rope", window=104, num_sinks=6, **INT8)),
    # Fractional widths: two 64-channel groups per side, 256-token byte tiles.
    (3.5, 3.5, 32, dict(center_keys="rope", **INT8)),
    (2.5, 3.5, 16, dict(center_keys="rope", soft_cap=20.0, sliding_window=700, **INT8)),
    # 3.5 bits as 4-bit keys and 3-bit values: 128-token byte tiles, no channel groups.
    (4, 3, 32, dict(center_keys="plain", **INT8))]
INT8_CASES = [(3.5, "int8", "rope", {}), (3.5, "int8", "rope", dict(serial_groups=False)),
              (3.5, "quintic", "rope", {}), (3.5, "int8", "plain", {}),
              (3.5, "quintic", "plain", {}),
              (3, "int8", "rope", {}), (3, "int8", "rope", dict(rope_table_rows=64)),
              (3, "cubic", "rope", {}), (3, "quintic", "rope", {}),
              (3, "int8", "plain", {}), (3, "cubic", "plain", {}), (2, "int8", "rope", {}),
              (2, "cubic", "rope", {}),
              # 3.5 bits without channel groups: K4/V3 (a width is a number or a K/V pair).
              ((4, 3), "int8", "plain", {}), ((4, 3), "int8", "rope", {}),
              ((4, 3), "quintic", "plain", {}), ((4, 3), "quintic", "rope", {})]


def levels_run(ceiling, checks_only=None, cases=None, points=((8, 32768), (8, 4096)),
               only=None) -> tuple[list[dict], list[dict]]:
  """Quintic levels (`codebook.polynomial_codebook`, three fp16 ops per pair of codes)
  against cubic ones (two): the GPU check, then the whole attention side by side, keys
  centred before RoPE; at 3.5 bits (channel groups) with and without serial groups and
  the value decode's overlap. A case's width is one number or a (keys, values) pair;
  `only`, a list of substrings, keeps the cases whose label holds one of them."""
  checks = run_checks(checks_only or [
      (3, 3, 32, dict(center_keys="rope")), (4, 2, 8, dict(soft_cap=20.0)),
      (3.5, 3.5, 32, dict(center_keys="rope")),
      (3.5, 2.5, 16, dict(center_keys="rope", soft_cap=20.0, sliding_window=900)),
      (3.5, 3, 32, dict(center_keys="rope", levels="cubic")),     # the cubic path still
      *SUB_STEP_CHECKS], 100, levels="quintic")
  rows = []
  key = jax.random.PRNGKey(1)
  for b, t in points:
    key, sub = jax.random.split(key)
    base = cudnn_row(rows, sub, b, t, ceiling)
    q = jax.random.normal(sub, (b, 1, HQ, D), jnp.bfloat16)
    for w, levels, center, kw in cases or [
        (3, "cubic", "rope", {}), (3, "quintic", "rope", {}),
        (3.5, "quintic", "rope", {}),                    # two 128-token passes per tile
        (3.5, "quintic", "rope", dict(sub_steps=1)),     # one pass, serial groups
        (3.5, "quintic", "rope", dict(rope_table_rows=256)),
        (3.5, "quintic", "plain", {})]:
      wk, wv = w if isinstance(w, tuple) else (w, w)
      label = f"mosaic attend K{wk}/V{wv} {levels}" + (
          " rope-centred" if center == "rope" else "") + "".join(
          f", {k}={v}" for k, v in kw.items())
      if only and not any(o in label for o in only):
        continue
      try:
        cfg = tiles_config(wk, wv, center_keys=center, levels=levels,
                           **(dict(tile_operand="int8") if levels == "int8" else {}))
        cache = make_cache(sub, b, t, cfg, rope=LLAMA3_ROPE if center == "rope" else None)
        sec = time_attend(cache, q, implementation="mosaic", **kw)
        rows.append(dict(batch=b, tokens=t, kernel=label, ms=sec * 1e3, speedup=base / sec,
                         ceiling_frac=compressed_bytes(cache) / sec / ceiling))
        del cache
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(dict(batch=b, tokens=t, kernel=label, error=repr(e)[:300]))
      log(rows[-1])
  return checks, rows


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--check-only", action="store_true")
  p.add_argument("--sweep-splits", action="store_true",
                 help="only the splits sweep (written as mosaic_attend_splits_<platform>)")
  p.add_argument("--sweep-splits-int8", action="store_true",
                 help="only the int8 path's splits (written as mosaic_splits_int8_<platform>)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--levels", action="store_true",
                 help="only quintic vs cubic levels (written as mosaic_attend_levels_<platform>)")
  p.add_argument("--merge", action="store_true",
                 help="only the merge kernel on channel groups vs the jnp merge "
                      "(mosaic_attend_merge_groups_*)")
  p.add_argument("--exact", action="store_true",
                 help="only the exact tokens in the kernel vs in jnp (mosaic_attend_exact_*)")
  p.add_argument("--int8", action="store_true",
                 help="only the int8 path (tile_operand='int8') vs fp16 levels "
                      "(mosaic_attend_int8_*)")
  p.add_argument("--points", default=None,
                 help="with --int8: batch x tokens points, e.g. 8x32768,8x4096")
  p.add_argument("--cases", default=None,
                 help="with --int8: time only the cases whose label holds one of these "
                      "';'-separated substrings, e.g. 'K4/V3;K3/V3 int8'")
  p.add_argument("--checks", default=None,
                 help="with --int8: run only these INT8_CHECKS, e.g. 0,6")
  p.add_argument("--sub-steps", action="store_true",
                 help="only 256-token tiles' passes and RoPE tables, 8 x 32K "
                      "(mosaic_attend_sub_steps_*)")
  args = p.parse_args(argv)
  checks, rows = [], []
  ceiling = None
  if args.levels or args.sub_steps or args.merge or args.exact or args.int8:
    ceiling = read_ceiling()
    if args.int8:
      points = ([tuple(int(x) for x in pt.split("x")) for pt in args.points.split(",")]
                if args.points else [(8, 32768), (8, 4096), (1, 4096), (64, 4096)])
      int8_checks = ([INT8_CHECKS[int(i)] for i in args.checks.split(",")]
                     if args.checks else INT8_CHECKS)
      checks, rows = levels_run(ceiling, int8_checks, INT8_CASES,
                                [] if args.check_only else points,
                                only=args.cases.split(";") if args.cases else None)
      name = "mosaic_attend_int8"
    elif args.exact:
      checks, rows = levels_run(ceiling, EXACT_CHECKS, EXACT_CASES,
                                [] if args.check_only else
                                [(8, 4096), (1, 4096), (8, 32768), (64, 4096)])
      name = "mosaic_attend_exact"
    elif args.sub_steps:
      checks, rows = levels_run(ceiling, SUB_STEP_CHECKS, SUB_STEP_CASES, [(8, 32768)])
      name = "mosaic_attend_sub_steps"
    elif args.merge:
      checks, rows = levels_run(ceiling, MERGE_CHECKS, MERGE_CASES,
                                [(8, 32768), (8, 4096), (1, 4096)])
      name = "mosaic_attend_merge_groups"
    else:
      checks, rows = levels_run(ceiling)
      name = "mosaic_attend_levels"
    common.write_result(name, dict(read_ceiling_bytes_per_s=ceiling, checks=checks,
                                   timings=rows))
    common.print_table(checks, ["bits_k", "bits_v", "q_heads", "levels", "soft_cap",
                                "sliding_window", "center_keys", "exact_split", "rel_err",
                                "ok"])
    common.print_table(rows, ["batch", "tokens", "kernel", "ms", "speedup", "ceiling_frac"])
    return
  if args.sweep_splits_int8:
    ceiling = read_ceiling()
    checks, rows = sweep_splits_int8(ceiling)
    common.write_result("mosaic_splits_int8", dict(read_ceiling_bytes_per_s=ceiling,
                                                   checks=checks, timings=rows))
    common.print_table(checks, ["bits_k", "bits_v", "q_heads", "center_keys", "rel_err", "ok"])
    common.print_table(rows, ["batch", "tokens", "kernel", "ms", "speedup", "ceiling_frac"])
    return
  if args.sweep_splits:
    ceiling = read_ceiling()
    rows = sweep_splits(ceiling)
    common.write_result("mosaic_attend_splits", dict(read_ceiling_bytes_per_s=ceiling,
                                                     timings=rows))
    common.print_table(rows, ["batch", "tokens", "kernel", "ms", "speedup", "rel_err"])
    return

  def save():
    return common.write_result("mosaic_attend", dict(
        shape=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, query_tokens=1),
        read_ceiling_bytes_per_s=ceiling, checks=checks, timings=rows))

  for i, (bk, bv, hq, kw) in enumerate([
      (3, 3, 32, {}), (4, 4, 32, dict(soft_cap=20.0)), (2, 2, 64, {}),
      (4, 2, 8, dict(center_keys=False, sliding_window=600)),
      (2, 4, 32, dict(window=0, num_sinks=0)), (3, 4, 16, dict(soft_cap=5.0, window=32)),
      (3, 3, 32, dict(center_keys="rope")),
      (4, 2, 8, dict(center_keys="rope", soft_cap=20.0, sliding_window=900)),
      (2, 3, 64, dict(center_keys="rope", window=0, num_sinks=0)),
      # Fractional widths (two channel groups, 256-token tiles).
      (3.5, 3.5, 32, {}), (3.5, 2.5, 32, dict(soft_cap=20.0)),
      (2.5, 3, 8, dict(sliding_window=600)),
      (3.5, 3.5, 32, dict(center_keys="rope")),      # RoPE offsets in 256-token steps
      (3, 3.5, 16, dict(center_keys="rope", soft_cap=20.0, sliding_window=900))]):
    try:
      checks.append(check(i, bk, bv, hq, **kw))
    except Exception as e:  # noqa: BLE001 - report every case
      traceback.print_exc()
      checks.append(dict(bits_k=bk, bits_v=bv, q_heads=hq, error=repr(e)[:300], ok=False))
    log("check", checks[-1])
    save()
  if not args.check_only:
    ceiling = read_ceiling()
    log(f"read ceiling {ceiling / 1e12:.2f} TB/s")
    points = [(8, 32768), (8, 4096), (1, 4096)]
    key = jax.random.PRNGKey(0)
    for b, t in points:
      key, sub = jax.random.split(key)
      base = cudnn_row(rows, sub, b, t, ceiling)
      q = jax.random.normal(sub, (b, 1, HQ, D), jnp.bfloat16)
      widths = [3] if args.quick or (b, t) != points[0] else [3, 4, 2]
      rows += time_merge(sub, b, t, 32)
      cases = [(f"mosaic attend K{w}/V{w}", tiles_config(w, w), "mosaic") for w in widths]
      cases += [(f"mosaic attend K{w}/V{w} rope-centred",
                 tiles_config(w, w, center_keys="rope"), "mosaic") for w in (3, 4)]
      cases += [("mosaic attend K3.5/V3.5 (channel groups)", tiles_config(3.5, 3.5),
                 "mosaic"),
                ("mosaic attend K3.5/V3.5 rope-centred (channel groups)",
                 tiles_config(3.5, 3.5, center_keys="rope"), "mosaic")]
      # The same attention ending in merge_exact instead of jnp (side by side).
      cases += [(label + ", merge_exact", cfg, impl)
                for label, cfg, impl in (cases[0], cases[-4])]
      if (b, t) == points[0] and not args.quick:
        cases.append(("triton attend 3.5 rope-centred (default config)", TurboQuantConfig(),
                      "triton"))
        cases.append(("triton attend K3/V3 rope-centred",
                      TurboQuantConfig(key_bits=3, value_bits=3), "triton"))
      for label, cfg, impl in cases:
        try:
          rope = LLAMA3_ROPE if cfg.center_keys == "rope" else None
          cache = make_cache(sub, b, t, cfg, rope=rope)
          kw = dict(fused_merge=True) if label.endswith("merge_exact") else {}
          sec = time_attend(cache, q, implementation=impl, **kw)
          nbytes = compressed_bytes(cache)
          rows.append(dict(batch=b, tokens=t, kernel=label, ms=sec * 1e3, speedup=base / sec,
                           ceiling_frac=nbytes / sec / ceiling))
          del cache
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          rows.append(dict(batch=b, tokens=t, kernel=label, error=repr(e)[:300]))
        log(rows[-1])
        save()
  log(f"wrote {save()}")
  common.print_table(checks, ["bits_k", "bits_v", "q_heads", "soft_cap", "sliding_window",
                              "center_keys", "rel_err", "nan", "default_is_mosaic", "ok"])
  common.print_table(rows, ["batch", "tokens", "kernel", "ms", "speedup", "ceiling_frac",
                            "rel_err"])


if __name__ == "__main__":
  sys.exit(main())
