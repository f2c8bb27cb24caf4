"""The int8 path's decode on the GPU: checks against float32 references, then the kernel's
time beside cuDNN (4-bit byte tiles in sign-magnitude: `pallas_kernels.byte_codes`).

- `decode_partials(operand="int8")` against `decode_partials_reference` on packed random
  codes (`mgpu_probe_s8.check_library`: ragged ranges, soft-cap, the RoPE term, exact
  tokens; every width pair with 4 bits on either side, where the levels' 1/2 offset
  enters the keys' dots and the values' outputs);
- the whole attention through caches (`mosaic_attend.INT8_CHECKS`, fractional widths'
  64-channel groups included) against the jnp reference;
- the kernel alone on random byte tiles, K4/V3 and K4/V4 at 8 x 32K and 8 x 4K, by
  splits, with cuDNN bf16 and the read ceiling measured in the same run.

    python -m benchmarks.int8_decode_check
    python -m benchmarks.int8_decode_check --p-scale-ab   # p_scale "step" vs "bound"
    python -m benchmarks.int8_decode_check --packed       # pack_p_parts vs two operands
    python -m benchmarks.int8_decode_check --packed --no-kernel-alone   # checks, attention
    python -m benchmarks.int8_decode_check --packed-q     # pack_q_parts vs two key operands

`--p-scale-ab` (`int8_p_scale_gpu.json`): the kernel checks with p_scale="bound" and a
K4/V3 check under both with a few large value norms, the cache checks, then the kernel
alone (K4/V3, K4/V4) and the whole K4/V3 attention with each scale, interleaved.
"""

from __future__ import annotations

import sys
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import mgpu_decode as md
from benchmarks import mgpu_probe_s8 as ps
from benchmarks import mosaic_attend as ma
from pallas_kernels import byte_codes as bc
from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc

D = 128
KERNEL_CHECKS = [(4, 3, None, False, False), (4, 4, None, False, False),
                 (3, 3, 5.0, False, False), (2, 4, None, False, True),
                 (4, 2, None, True, False), (4, 4, 30.0, True, True)]
POINTS = [(8, 32768, 4, 3, (8, 16)), (8, 4096, 4, 3, (4, 8)), (8, 32768, 4, 4, (8, 16))]


def random_inputs(r: int, t: int, bits_k: int, bits_v: int):
  """(qoff, q8, k words, k norms, v words, v norms, bounds, q_scale) of r rows x t tokens:
  every bit pattern is a valid byte tile."""
  def words(bits, seed):
    return jax.random.randint(jax.random.PRNGKey(seed), (r, t // 128 * rc.WORD_ROWS,
                                                          bc.words_per_row(bits)),
                              -2**31, 2**31 - 1, jnp.int32)
  norms = jax.random.uniform(jax.random.PRNGKey(3), (2, r, t), jnp.float32, 0.5, 1.5)
  norms = norms.astype(jnp.float16)
  q8, qs = dm.quantize_query_s8(jax.random.normal(jax.random.PRNGKey(4), (r, 8, D)) * 0.05)
  bounds = jnp.tile(jnp.array([[4, t - 128]], jnp.int32), (r, 1))
  return (jnp.zeros((r, 8), jnp.float32), q8, words(bits_k, 1), norms[0], words(bits_v, 2),
          norms[1], bounds, qs)


def kernel_fn(bits_k: int, bits_v: int, splits: int, **options):
  ks, vs = rc.TileSpec(bits_k, 128, 128), rc.TileSpec(bits_v, 128, 128)
  return lambda qoff, q8, kw, kn, vw, vn, bounds, qs: dm.decode_partials(
      kw, kn, vw, vn, q8, bounds, qoff, key_spec=ks, value_spec=vs,
      key_levels=ps.byte_table(bits_k), value_levels=ps.byte_table(bits_v),
      num_splits=splits, scale=D**-0.5, operand="int8", q_scale=qs, **options)


def point(b: int, t: int, bits_k: int, bits_v: int):
  """(inputs, their bytes, cuDNN bf16's seconds) of a timing point: b x 8 kv heads x t."""
  args = random_inputs(b * 8, t, bits_k, bits_v)
  base, _ = md.time_cudnn(jax.random.PRNGKey(0), b, t)
  return args, sum(a.nbytes for a in args[2:6]), base


def kernel_ab(rows: list, field: str, variants, reps: int, ceiling: float,
              query=lambda q8: q8, fixed=None, points=POINTS) -> None:
  """The kernel alone at each of `points` and its splits, each variant (a value of the
  decode_partials option `field`, with the options `fixed`) timed in turn, `reps` rounds;
  query: the int8 query parts as the variants take them."""
  fixed = fixed or {}
  for b, t, bk, bv, splits in points:
    args, nbytes, base = point(b, t, bk, bv)
    args = (args[0], query(args[1]), *args[2:])
    for s in splits:
      for rep in range(reps):
        for value in variants:
          sec = common.device_time_chained(kernel_fn(bk, bv, s, **fixed, **{field: value}),
                                           args, 0, iters=8, repeats=11)
          rows.append(dict(batch=b, tokens=t, bits_k=bk, bits_v=bv, splits=s, rep=rep,
                           **{field: value}, cudnn_ms=base * 1e3, ms=sec * 1e3,
                           x_cudnn=base / sec, ceiling_frac=nbytes / sec / ceiling))
          print(rows[-1], flush=True)


def attend_ab(rows: list, field: str, variants, points, ceiling: float, fixed=None) -> None:
  """The whole K4/V3 int8 attention through a cache at each (batch, tokens) of `points`
  beside cuDNN, each variant (a value of the attend option `field`, with the options
  `fixed`) in turn, 2 rounds."""
  fixed = fixed or {}
  key = jax.random.PRNGKey(1)
  for b, t in points:
    key, sub = jax.random.split(key)
    base = ma.cudnn_row(rows, sub, b, t, ceiling)
    cache = ma.make_cache(sub, b, t, ma.tiles_config(4, 3, center_keys="plain", **ma.INT8))
    q = jax.random.normal(sub, (b, 1, ma.HQ, D), jnp.bfloat16)
    for rep in range(2):
      for value in variants:
        sec = ma.time_attend(cache, q, implementation="mosaic", **fixed, **{field: value})
        rows.append(dict(batch=b, tokens=t, kernel="K4/V3 int8", **{field: value}, rep=rep,
                         ms=sec * 1e3, speedup=base / sec,
                         ceiling_frac=ma.compressed_bytes(cache) / sec / ceiling))
        print(rows[-1], flush=True)


def p_scale_ab() -> None:
  """p_scale "step" (each step's largest p·‖v‖, a cross-warp max per step) against
  "bound" (the row's largest ‖v‖ for every step): checks, kernel, whole attention."""
  checks, kernel, attend = [], [], []

  def save():
    return common.write_result("int8_p_scale", dict(
        checks=checks, cache_checks=cache_checks, kernel=kernel, attend=attend))

  for i, args in enumerate(KERNEL_CHECKS):
    common.checked(checks, ps.check_library, jax.random.PRNGKey(40 + i), *args,
                   p_scale="bound", error_fields=dict(args=args))
  for p_scale in ("step", "bound"):     # every 97th token's ‖v‖ x30 / x300
    for spread in (30.0, 300.0):
      common.checked(checks, ps.check_library, jax.random.PRNGKey(60), 4, 3,
                     p_scale=p_scale, value_spread=spread,
                     error_fields=dict(p_scale=p_scale, value_spread=spread))
  cache_checks = ma.run_checks(ma.INT8_CHECKS, 400, kernel=dict(p_scale="bound"))
  save()
  ceiling = md.read_ceiling()
  kernel_ab(kernel, "p_scale", ("step", "bound"), 2, ceiling)
  save()
  attend_ab(attend, "p_scale", ("step", "bound"), ((8, 32768), (8, 4096)), ceiling)
  print(f"wrote {save()}")
  common.print_table(checks, ["bits_k", "bits_v", "p_scale", "value_spread", "rel_err", "ok"])
  common.print_table(kernel, ["batch", "tokens", "bits_k", "bits_v", "splits", "p_scale", "ms",
                              "x_cudnn", "ceiling_frac"])
  common.print_table(attend, ["batch", "tokens", "kernel", "ms", "speedup", "ceiling_frac"])


def packing_ab(field: str, fixed: dict, result: str, *, reps: int, points=POINTS,
               kernel_alone: bool = True, cache_both: bool = False) -> None:
  """A packing option of the int8 kernel (`field`: pack_p_parts, p·‖v‖'s parts as one
  value operand; pack_q_parts, the query's as one key operand) on against off, with the
  options `fixed`: kernel checks with it on (both p scales), cache checks (with it off too
  where cache_both), then the kernel alone at `points` (unless not kernel_alone, `reps`
  rounds) and the whole attention, interleaved (`<result>_<platform>.json`)."""
  checks, cache_checks, kernel, attend = [], [], [], []
  on = dict(fixed, **{field: True})

  def save():
    return common.write_result(result, dict(
        checks=checks, cache_checks=cache_checks, kernel=kernel, attend=attend))

  for i, args in enumerate(KERNEL_CHECKS):
    common.checked(checks, ps.check_library, jax.random.PRNGKey(40 + i), *args, **on,
                   error_fields=dict(args=args))
  for p_scale in ("step", "bound"):
    common.checked(checks, ps.check_library, jax.random.PRNGKey(60), 4, 4, p_scale=p_scale,
                   value_spread=300.0, **on,
                   error_fields=dict(p_scale=p_scale, value_spread=300.0))
  for value in (True, False) if cache_both else (True,):
    cache_checks += [dict(row, **{field: value}) for row in ma.run_checks(
        ma.INT8_CHECKS, 400, kernel=dict(fixed, **{field: value}))]
  save()
  ceiling = md.read_ceiling()
  if kernel_alone:  # the query's rows 4-7 repeating rows 0-3, as the glue hands them
    kernel_ab(kernel, field, (False, True), reps, ceiling,
              query=lambda q8: jnp.concatenate([q8[:, :, :4]] * 2, axis=2), fixed=fixed,
              points=points)
    save()
  attend_ab(attend, field, (False, True), ((8, 32768), (8, 4096), (1, 4096)), ceiling,
            fixed=fixed)
  print(f"wrote {save()}")
  common.print_table(checks, ["bits_k", "bits_v", "soft_cap", "rope", "exact", "p_scale",
                              "rel_err", "ok"])
  common.print_table(cache_checks, [field, "bits_k", "bits_v", "q_heads", "center_keys",
                                    "rel_err", "ok"])
  common.print_table(kernel, ["batch", "tokens", "bits_k", "bits_v", "splits", "rep", field,
                              "ms", "x_cudnn", "ceiling_frac"])
  common.print_table(attend, ["batch", "tokens", field, "rep", "ms", "speedup",
                              "ceiling_frac"])


def main():
  checks, cache_checks, rows = [], [], []

  def save():
    return common.write_result("int8_decode_check", dict(
        checks=checks, cache_checks=cache_checks, timings=rows))

  for i, args in enumerate(KERNEL_CHECKS):
    common.checked(checks, ps.check_library, jax.random.PRNGKey(40 + i), *args,
                   error_fields=dict(args=args))
  cache_checks += ma.run_checks(ma.INT8_CHECKS, 400)
  save()
  ceiling = md.read_ceiling()
  for b, t, bk, bv, splits in POINTS:
    args, nbytes, base = point(b, t, bk, bv)
    for s in splits:
      try:
        sec = common.device_time_chained(kernel_fn(bk, bv, s), args, 0, iters=8, repeats=11)
        row = dict(ms=sec * 1e3, x_cudnn=base / sec, ceiling_frac=nbytes / sec / ceiling)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row = dict(error=repr(e)[:300])
      rows.append(dict(batch=b, tokens=t, bits_k=bk, bits_v=bv, splits=s,
                       cudnn_ms=base * 1e3, **row))
      print(rows[-1], flush=True)
      save()
  path = save()
  print(f"wrote {path}")
  common.print_table(checks, ["bits_k", "bits_v", "soft_cap", "rope", "exact", "rel_err", "ok"])
  common.print_table(cache_checks, ["bits_k", "bits_v", "q_heads", "center_keys", "rel_err",
                                    "ok"])
  common.print_table(rows, ["batch", "tokens", "bits_k", "bits_v", "splits", "ms", "x_cudnn",
                            "ceiling_frac"])


if __name__ == "__main__":
  if "--p-scale-ab" in sys.argv[1:]:
    p_scale_ab()
  elif "--packed-q" in sys.argv[1:]:   # with the p parts packed, K4/V3 points only
    packing_ab("pack_q_parts", dict(pack_p_parts=True), "int8_packed_q", reps=2,
               points=POINTS[:2])
  elif "--packed" in sys.argv[1:]:     # the p parts alone (the query's two operands)
    packing_ab("pack_p_parts", dict(pack_q_parts=False), "int8_packed", reps=3,
               kernel_alone="--no-kernel-alone" not in sys.argv[1:], cache_both=True)
  else:
    main()
