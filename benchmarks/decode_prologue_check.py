"""`pallas_kernels.decode_prologue` (and `merge_exact`'s unrotated splits) on the GPU.

    python -m benchmarks.decode_prologue_check            # checks, then timings
    python -m benchmarks.decode_prologue_check --micro    # the prologue's parts alone

- the prologue against `decode_prologue_reference` on random inputs (R = 64 and small,
  a 256-, 128- and no window, one and two key groups, a sliding window), the query
  rotated by Triton's dot inside it or by an XLA gemm before it (each output layout),
  each timed alone;
- `merge_exact` with the Mosaic kernel's exact splits as unrotated splits (no exact parts)
  against its reference compiled by XLA, each timed;
- the whole attention through caches (`mosaic_attend.check`: the jnp reference, outputs
  NaN-poisoned) with prologue "all", "query", "off", the fused merge and each rotation
  and packing (`--rotation` runs these alone);
- one layer's attention, K4/V3 int8 (keys centred after RoPE), at 8 x 4K, 1 x 4K and
  8 x 32K per variant beside cuDNN. These loops chain calls on one cache, so XLA computes
  the jnp glue's cache-only work (ranges) once for all of them: the decode step's own
  comparison is `decode_e2e --paired` with `tq3.5-k4v3-int8-jnp-prologue` (or
  `-prologue-dot`, `-prologue-8w`), and `step_profile` the prologue's time in a step.

Results: `decode_prologue_check_<platform>.json` (or `decode_prologue_micro_...`). The
committed `decode_prologue_gpu.json` and `decode_prologue_micro_gpu.json` are the rows of
this session's scratch runs of the same code (see their annotations).
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import mgpu_decode as md
from benchmarks import mosaic_attend as ma
from benchmarks.int8_decode_check import attend_ab
from pallas_kernels import decode_prologue as dp
from pallas_kernels import merge_exact as me

D = 128
ONE_GROUP = (dp.KeyGroup(0, D, 0.5),)
TWO_GROUPS = (dp.KeyGroup(0, 64, 0.5), dp.KeyGroup(64, 64, 0.0))
PROLOGUE_CASES = [(64, 256, ONE_GROUP, None), (8, 128, TWO_GROUPS, 300),
                  (16, 0, ONE_GROUP, None)]
MERGE_CASES = [(64, 20, 4), (64, 12, 4), (8, 36, 4)]
CACHE_CHECKS = [
    (4, 3, 32, dict(center_keys="plain", **ma.INT8)),
    (4, 3, 32, dict(center_keys="plain", sliding_window=900, soft_cap=30.0, **ma.INT8)),
    (4, 2, 8, dict(center_keys=False, num_sinks=0, sliding_window=600, **ma.INT8)),
    (3.5, 3.5, 32, dict(center_keys="plain", **ma.INT8)),
    (3, 3, 32, dict(center_keys="plain", window=104, num_sinks=6, **ma.INT8)),
    (3, 3, 32, dict(center_keys="rope", **ma.INT8))]
VARIANTS = [("jnp glue", dict(prologue="off")), ("prologue", dict(prologue="all")),
            ("query prologue", dict(prologue="query")),
            ("prologue+merge", dict(prologue="all", fused_merge=True)),
            ("prologue dot rotation", dict(prologue="all", prologue_rotation="dot"))]
# The query rotated by XLA before the prologue, in each packing of the kernel's operands;
# Triton's dot with both packings.
PACKINGS = {"rows": dict(pack_p_parts=False),
            "repeat": dict(pack_p_parts=True, pack_q_parts=False),
            "packed": dict(pack_p_parts=True, pack_q_parts=True)}
ROTATION_VARIANTS = (
    [(f"xla rotation, {name}", dict(prologue="all", prologue_rotation="xla", **packing))
     for name, packing in PACKINGS.items()]
    + [("xla rotation, query", dict(prologue="query", prologue_rotation="xla")),
       ("dot rotation, packed", dict(prologue="all", prologue_rotation="dot",
                                     **PACKINGS["packed"]))]
    # The Mosaic kernel rotating the query itself (the prologue: q·μ and the ranges).
    + [(f"kernel rotation, {name}", dict(prologue="all", prologue_rotation="kernel",
                                         **packing)) for name, packing in PACKINGS.items()])


def ring(lengths, w):
  """int32 [B, W]: a full ring's slot positions (slot p mod W holds p; -1 below 0)."""
  p = lengths[:, None] - w + jnp.arange(w)[None]
  return jax.vmap(lambda s, v: jnp.zeros(w, jnp.int32).at[s].set(v))(
      jnp.mod(p, w), jnp.where(p >= 0, p, -1).astype(jnp.int32))


def prologue_inputs(seed, r, w, groups, sliding, heads=8):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (r, 8, D)).at[:, 4:].set(0) * 0.3
  rot = jnp.linalg.qr(jax.random.normal(ks[1], (D, D)))[0]
  b = r // heads
  lengths = jax.random.randint(ks[3], (b,), 1, 5000).astype(jnp.int32)
  wpos = ring(lengths, w) if w else jnp.zeros((b, 0), jnp.int32)
  return q, rot, dict(heads=heads, key_groups=groups,
                      key_mean=jax.random.normal(ks[2], (r, D)),
                      ranges=dp.Ranges(lengths, lengths - 1, wpos, 4, 4, sliding))


def prologue_case(seed, r, w, groups, sliding, parts=None) -> dict:
  """parts None: Triton's dot in the kernel; else the query rotated by XLA before the
  kernel, outputs in that `decode_prologue` layout (rows 4-7 zero in the inputs)."""
  q, rot, kw = prologue_inputs(seed, r, w, groups, sliding)
  jax.block_until_ready(jnp.full((8, r, 2, 8, D), 77, jnp.int8))   # poison freed memory
  if parts is None:
    fn = jax.jit(lambda q, rot: dp.decode_prologue(q, rot, **kw))
  else:
    q = q[:, :4] if parts != "rows" else q
    fn = jax.jit(lambda q, rot: dp.decode_prologue(
        q, None, rotated=jnp.einsum("rmd,ed->rme", q, rot, precision="highest"),
        parts=parts, **kw))
  got = fn(q, rot)
  ref = dp.decode_prologue_reference(q, rot, **kw, parts=parts or "rows")   # HIGHEST
  x = jnp.einsum("rmd,ed->rme", q, rot, precision="highest")
  if parts is not None and parts != "rows":   # the repeated rows, as the kernel sees them
    x = jnp.concatenate([x, x], axis=1)
  q8 = got.q
  if parts == "packed":   # [hi 0-3 | lo 0-3] -> both parts of all 8 rows
    hi, lo = q8[:, 0, :4], q8[:, 0, 4:]
    q8 = jnp.stack([jnp.concatenate([hi, hi], 1), jnp.concatenate([lo, lo], 1)], 1)
  deq = got.scale[..., None] * (q8[:, 0].astype(jnp.float32) + q8[:, 1] / 127.0)
  row = dict(r=r, w=w, groups=len(groups), sliding=sliding,
             parts=parts or "rows", rotation="dot" if parts is None else "xla",
             q_err_units=float(jnp.max(jnp.abs(deq - x) / got.scale[..., None])),
             koff=float(jnp.max(jnp.abs(got.key_offsets - ref.key_offsets))
                        / jnp.max(jnp.abs(ref.key_offsets))),
             qoff=float(jnp.max(jnp.abs(got.qoff - ref.qoff))),
             ranges=bool(jnp.array_equal(got.bounds, ref.bounds)
                         and jnp.array_equal(got.limits, ref.limits)))
  row["ok"] = (row["q_err_units"] < 0.6 / 127 and row["koff"] < 1e-4 and row["qoff"] < 1e-3
               and row["ranges"])
  row["us"] = common.device_time_chained(fn, (q, rot), 0, iters=16) * 1e6
  return row


def merge_case(seed, r, splits, unrotated) -> dict:
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  args = (jax.random.normal(ks[0], (r, 8, D)), jax.random.normal(ks[1], (r, splits, D, 8)),
          jax.random.uniform(ks[2], (r, splits, 8)) + 0.1,
          jax.random.normal(ks[3], (r, splits, 8)), jnp.full((r // 8, 8), 5000, jnp.int32),
          jnp.linalg.qr(jax.random.normal(ks[4], (D, D)))[0], ())
  kw = dict(heads=8, scale=D**-0.5, value_mean=jax.random.normal(ks[5], (r, D)),
            unrotated_splits=unrotated)
  fn = jax.jit(lambda *a: me.merge_exact(*a, **kw))
  ref = jax.jit(lambda *a: me.merge_exact_reference(*a, **kw))
  got, want = fn(*args), ref(*args)
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  return dict(r=r, splits=splits, unrotated=unrotated, rel_err=err, ok=err < 1e-4,
              us=common.device_time_chained(fn, args, 0, iters=16) * 1e6,
              us_xla_ref=common.device_time_chained(ref, args, 0, iters=16) * 1e6)


def micro() -> None:
  """The prologue's parts alone (R = 64, a 256-slot window), L2-warm, beside the query
  work in jnp compiled by XLA."""
  rows = []
  q, rot, kw = prologue_inputs(0, 64, 256, ONE_GROUP, None)
  parts = {"full": kw, "q+mean": dict(kw, ranges=None),
           "q only": dict(kw, ranges=None, key_mean=None)}
  for rep in range(2):
    for name, p in parts.items():
      for warps in (4, 8):
        for rotation in ("dot", "xla"):
          def fn(q, rot, p=p, w=warps, xla=rotation == "xla"):
            if not xla:
              return dp.decode_prologue(q, rot, **p, num_warps=w)
            rotated = jnp.einsum("rmd,ed->rme", q, rot, precision="highest")
            return dp.decode_prologue(q, None, **p, num_warps=w, rotated=rotated)
          fn = jax.jit(fn)
          rows.append(dict(variant=f"{name} {warps}w {rotation}", rep=rep, us=1e6 *
                           common.device_time_chained(fn, (q, rot), 0, iters=16)))
          print(rows[-1], flush=True)
  mean = kw["key_mean"]

  def glue(q, rot):
    x = jnp.einsum("rmd,ed->rme", q, rot, precision="highest")
    hi, lo, s = dp.quantize_rotated(x)
    return (jnp.stack([hi, lo], 1).astype(jnp.int8), s, 0.5 * (hi + lo / 127).sum(-1),
            jnp.einsum("rmd,rd->rm", q, mean))
  rows.append(dict(variant="xla q glue", us=1e6 * common.device_time_chained(
      jax.jit(glue), (q, rot), 0, iters=16)))
  print(f"wrote {common.write_result('decode_prologue_micro', dict(rows=rows))}")
  common.print_table(rows, ["variant", "rep", "us"])


def rotation_checks(only: str | None = None) -> None:
  """The prologue with the query rotated by XLA: each output layout against the reference
  (and timed alone), then caches through each rotation and packing against the jnp
  reference; only: one rotation's ("xla" or "dot")."""
  prologue, checks = [], []
  for parts in [p for p in dp.PARTS if p != "none"] if only in (None, "xla") else ():
    for i, case in enumerate(PROLOGUE_CASES):
      common.checked(prologue, prologue_case, 20 + i, *case, parts=parts,
                     error_fields=dict(case=i, parts=parts))
  # 1 and 4 rows per kv head (packable); 8 rows (q_heads 64 over 8 kv heads: rows only).
  cases = CACHE_CHECKS[:3] + [(4, 3, 64, dict(center_keys="plain", **ma.INT8))]
  for label, kernel in ROTATION_VARIANTS:
    if only not in (None, kernel["prologue_rotation"]):
      continue
    usable = [c for c in cases if c[2] // ma.HKV <= 4 or not kernel.get("pack_p_parts")]
    for row in ma.run_checks(usable, 500, kernel=kernel):
      checks.append(dict(row, variant=label))
  attend = []
  if only == "kernel":   # one layer's attention, the query rotated in the prologue or kernel
    attend_ab(attend, "prologue_rotation", ("dot", "kernel"),
              ((8, 32768), (8, 4096), (1, 4096)), md.read_ceiling(), dict(prologue="all"))
  path = common.write_result("decode_prologue_rotation", dict(prologue=prologue, checks=checks,
                                                              attend=attend))
  print(f"wrote {path}")
  common.print_table(prologue, ["r", "w", "groups", "rotation", "parts", "q_err_units",
                                "koff", "ranges", "us", "ok"])
  common.print_table(checks, ["variant", "bits_k", "bits_v", "q_heads", "rel_err", "ok"])
  common.print_table(attend, ["batch", "tokens", "kernel", "prologue_rotation", "rep", "ms",
                              "speedup"])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--micro", action="store_true", help="the prologue's parts alone")
  parser.add_argument("--rotation", nargs="?", const="all", default=None,
                      help="checks of the prologue's rotations only (or of one: xla, dot, "
                      "kernel)")
  args = parser.parse_args(argv)
  if args.micro:
    return micro()
  if args.rotation:
    return rotation_checks(None if args.rotation == "all" else args.rotation)
  prologue, merge, checks, attend = [], [], [], []

  def save():
    return common.write_result("decode_prologue_check", dict(
        prologue=prologue, merge=merge, checks=checks, attend=attend))

  for parts in (None, "rows"):   # Triton's dot inside, the XLA gemm before
    for i, case in enumerate(PROLOGUE_CASES):
      common.checked(prologue, prologue_case, i, *case, parts=parts,
                     error_fields=dict(case=i, parts=parts))
  for i, case in enumerate(MERGE_CASES):
    common.checked(merge, merge_case, 10 + i, *case, error_fields=dict(case=i))
  for label, kernel in VARIANTS:
    for row in ma.run_checks(CACHE_CHECKS, 400, kernel=kernel):
      checks.append(dict(row, variant=label))
  save()
  ceiling = md.read_ceiling()
  key = jax.random.PRNGKey(1)
  for b, t in ((8, 4096), (1, 4096), (8, 32768)):
    key, sub = jax.random.split(key)
    base = ma.cudnn_row(attend, sub, b, t, ceiling)
    cache = ma.make_cache(sub, b, t, ma.tiles_config(4, 3, center_keys="plain", **ma.INT8))
    q = jax.random.normal(sub, (b, 1, ma.HQ, D), jnp.bfloat16)
    for rep in range(2):
      for label, kw in VARIANTS:
        try:
          sec = ma.time_attend(cache, q, implementation="mosaic", **kw)
          attend.append(dict(batch=b, tokens=t, kernel="K4/V3 int8 " + label, rep=rep,
                             ms=sec * 1e3, speedup=base / sec))
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          attend.append(dict(batch=b, tokens=t, kernel=label, error=repr(e)[:300]))
        print(attend[-1], flush=True)
    save()
  print(f"wrote {save()}")
  common.print_table(prologue, ["r", "w", "groups", "rotation", "q_err_units", "koff",
                                "ranges", "us", "ok"])
  common.print_table(merge, ["r", "splits", "unrotated", "rel_err", "us", "us_xla_ref", "ok"])
  common.print_table(checks, ["variant", "bits_k", "bits_v", "q_heads", "rel_err", "ok"])
  common.print_table(attend, ["batch", "tokens", "kernel", "rep", "ms", "speedup"])


if __name__ == "__main__":
  main()
