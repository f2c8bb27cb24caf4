"""The Mosaic kernel's pipeline settings at a model's head shapes: GPU check and speed.

The defaults of `decode_attention_mgpu.decode_partials` (one tile per pipeline step, two
steps in flight, int8 splits in waves of three CTAs per SM) were tuned at Llama-3-8B's
heads (8 kv heads of 128). Other heads (SmolLM2: 3 kv heads of 64; Gemma 3: 1 of 256)
move other bytes per step. This times the whole `TurboQuantKVCache.attend`
(implementation="mosaic"; `CONFIGS`) per setting beside cuDNN bf16 on the same shapes
(the kernels' device time per call, from the profiler; ceiling_frac: the Mosaic kernel's
read of the cache against the HBM ceiling), each setting first checked against the jnp
reference (NaN-poisoned output).

    python -m benchmarks.kernel_sweep --model smollm2_135m --points 8x32768,1x4096
    python -m benchmarks.kernel_sweep --model gemma3_270m --config k4v3-quintic
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import statistics
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import mgpu_decode as md
from benchmarks.decode_attention import make_cache
from benchmarks.decode_e2e import MODELS
from turboquant_jax import kernel_attention
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

CALLS = 5
# The caches timed: K4/V3 int8 tiles (the int8 path), and with fp16 tiles and quintic
# levels where int8 tiles do not serve the heads (head_dim 256: Gemma 3).
CONFIGS = {
    "k4v3-int8": TurboQuantConfig(key_bits=4, value_bits=3, levels="int8", layout="tiles",
                                  tile_operand="int8", center_keys="plain"),
    "k4v3-quintic": TurboQuantConfig(key_bits=4, value_bits=3, levels="quintic",
                                     layout="tiles", center_keys="plain"),
    # 4-bit keys of evenly spaced levels as plain nibbles (two masks per word, no table).
    "k4uv3-int8": TurboQuantConfig(key_bits=4, value_bits=3, levels=("uniform", "int8"),
                                   layout="tiles", tile_operand="int8", center_keys="plain"),
}
# The same with values the decoder rotated (`values_prerotated`: no inverse rotation after
# the kernel; the folded projections cost what the plain ones do).
CONFIGS.update({f"{name}-prerotated": dataclasses.replace(cfg, values_prerotated=True)
                for name, cfg in list(CONFIGS.items())})
CONFIG = CONFIGS["k4v3-int8"]
# `attend` options; ctas_per_sm: the splits `kernel_attention._mosaic_splits` picks for
# that many resident CTAs per SM (the int8 default assumes three); splits_x: that many
# times the default's splits.
GRID = [dict(), dict(max_concurrent_steps=3), dict(max_concurrent_steps=4),
        dict(ctas_per_sm=2), dict(ctas_per_sm=4), dict(ctas_per_sm=6),
        dict(splits_x=0.5), dict(splits_x=2), dict(splits_x=4),
        dict(fused_merge=True), dict(fused_merge=False),
        dict(fused_merge=True, ctas_per_sm=6),
        # The splits merged by one Triton launch (`merge_exact.merge_splits`), not XLA's three.
        dict(split_merge="kernel"),
        # XLA's merge (the default before 2026-12-02), to time the default against.
        dict(split_merge="xla"),
        # Values decoded after the softmax (the int8 default since 2026-12-03: fewer
        # registers live under the key wgmma), or under it (the default before).
        dict(overlap_values=False), dict(overlap_values=True)]


def shapes(model: str) -> tuple[int, int, int]:
  cfg = MODELS[model]()
  return cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


def kernel_options(setting: dict, cache, b: int, hkv: int) -> dict:
  """`attend` options of a GRID setting (ctas_per_sm becomes a number of splits; splits_x
  multiplies the cache's default, `kernel_attention._mosaic_splits` by its tile operand)."""
  kw = dict(setting)
  ctas, times = kw.pop("ctas_per_sm", None), kw.pop("splits_x", None)
  if ctas is None and times is None:
    return kw
  steps = cache.max_len // cache.key_codes[0].layout.tokens   # one tile per step
  if ctas is None and cache.config.tile_operand != "int8":   # the fp16 path's own rule
    splits = kernel_attention._mosaic_splits(steps, b * hkv)
  else:
    splits = kernel_attention._mosaic_splits(steps, b * hkv, ctas_per_sm=ctas or 3,
                                             sms=kernel_attention._multiprocessors())
  splits = int(splits * (times or 1))
  if not 1 <= splits <= steps:
    raise ValueError(f"{splits} splits do not fit {steps} steps")
  kw["num_splits"] = splits
  return kw


def split_setting(text: str) -> dict:
  """A `--splits` entry: "12" -> num_splits 12; "12t" / "12f" with overlap_values."""
  overlap = {"t": True, "f": False}.get(text[-1:])
  setting = dict(num_splits=int(text[:-1] if overlap is not None else text))
  return setting if overlap is None else dict(setting, overlap_values=overlap)


def check(seed: int, hq: int, hkv: int, d: int, kw: dict, config=CONFIG) -> dict:
  """The setting against the jnp reference on a ragged 3-entry cache."""
  rng = np.random.default_rng(seed)
  b, t = 3, 2048
  cache = TurboQuantKVCache.create(b, t, hkv, d, jnp.bfloat16, config=config)
  k = jnp.asarray(rng.standard_normal((b, t, hkv, d)) + 1.5, jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
  cache = cache.update(k, v, num_tokens=jnp.array([t, 1500, 700]))
  q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
  ref = cache.attend(q, implementation="reference")
  jax.block_until_ready(jnp.full((4, *ref.shape), jnp.nan, ref.dtype))
  opts = kernel_options(kw, cache, b, hkv)
  if "num_splits" in opts:   # a setting's own count (`--splits`), up to this cache's steps
    opts["num_splits"] = min(opts["num_splits"],
                             t // cache.key_codes[0].layout.tokens)
  got = cache.attend(q, implementation="mosaic", **opts)
  err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  nan = bool(jnp.any(jnp.isnan(got)))
  return dict(setting=str(kw), rel_err=err, nan=nan, ok=err <= 3e-3 and not nan)


def kernel_time(fn, *args, calls: int = CALLS) -> dict:
  """Device time of one call of jitted fn, from the profiler: the kernels' summed
  durations per call (what a CUDA-graphed decode loop pays, launch gaps aside; back-to-back
  calls timed on the host clock count XLA's launches instead, ~5 us each without graphs),
  the Mosaic kernel's share, and the kernels per call. Median over `calls` traced calls."""
  from benchmarks.step_profile import device_kernels, kernel_group
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(calls):
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        jax.block_until_ready(fn(*args))
      per_call.append(device_kernels(glob.glob(f"{trace_dir}/**/*.xplane.pb",
                                               recursive=True)))
  totals = [sum(us for _, _, us in rows) for rows in per_call]
  total = statistics.median(totals)
  mosaic = statistics.median(sum(us for name, _, us in rows if "mosaic" in name)
                             for rows in per_call)
  # The median call's kernels in launch order: where the time outside the kernel goes.
  median_call = per_call[sorted(range(calls), key=totals.__getitem__)[calls // 2]]
  breakdown = [(kernel_group(name), round(us, 2))
               for name, _, us in sorted(median_call, key=lambda r: r[1])]
  return dict(us=total, kernel_us=mosaic, kernels=statistics.median(map(len, per_call)),
              breakdown=breakdown)


def probe_modes(name: str, description: str, modes, setup, argv=None,
                config: str = "k4v3-int8-prerotated") -> list[dict]:
  """The `main` of a speed probe that swaps part of the Mosaic kernel (`key_decode_probe`,
  `rotation_probe`): per --points, one `attend` call's device time (`kernel_time`) under
  each of `modes`, in order, on the same cache and query. setup(mode) applies a mode (its
  patch, JAX's caches cleared) and returns attend's extra keyword arguments; setup(None)
  restores the library's kernel, on error too. Writes <name>_<platform>.json, prints the
  table and returns the rows."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--model", default="llama3_8b")
  p.add_argument("--config", default=config, choices=sorted(CONFIGS))
  p.add_argument("--points", default="8x32768")
  p.add_argument("--calls", type=int, default=7)
  p.add_argument("--out", default=None, help="results folder for the JSON")
  args = p.parse_args(argv)
  hq, hkv, d = shapes(args.model)
  ceiling = md.read_ceiling()
  rows = []
  try:
    for point in args.points.split(","):
      b, t = (int(x) for x in point.split("x"))
      cache = make_cache(jax.random.PRNGKey(0), b, t, CONFIGS[args.config], kv_heads=hkv,
                         head_dim=d)
      q = jax.random.normal(jax.random.PRNGKey(1), (b, 1, hq, d), jnp.bfloat16)
      nbytes = int(cache.memory_report()["bytes_per_token_per_head"] * b * hkv * t)
      for mode in modes:
        kw = setup(mode)
        fn = jax.jit(lambda q, c, kw=kw: c.attend(q, implementation="mosaic", **kw))
        got = kernel_time(fn, q, cache, calls=args.calls)
        rows.append(dict(batch=b, tokens=t, mode=mode, us=got["us"],
                         kernel_us=got["kernel_us"],
                         ceiling_frac=nbytes / got["kernel_us"] / 1e-6 / ceiling))
        print(rows[-1], flush=True)
      del cache
  finally:
    setup(None)
  path = common.write_result(name, dict(
      model=args.model, config=repr(CONFIGS[args.config]), read_ceiling_bytes_per_s=ceiling,
      rows=rows), args.out)
  print(f"wrote {path}")
  common.print_table(rows, ["batch", "tokens", "mode", "us", "kernel_us", "ceiling_frac"])
  return rows


def cudnn_time(key, b, t, hq, hkv, d) -> tuple[dict, int]:
  q, k, v = md.cudnn_inputs(key, b, t, hq, hkv, d)
  return kernel_time(jax.jit(md.cudnn_attention), q, k, v), k.nbytes + v.nbytes


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="smollm2_135m", choices=sorted(MODELS))
  p.add_argument("--points", default="8x32768,1x4096")
  p.add_argument("--config", default="k4v3-int8", choices=sorted(CONFIGS))
  p.add_argument("--settings", default=None,
                 help="indices into GRID, e.g. 0,3,5 (default: all)")
  p.add_argument("--splits", default="",
                 help="more settings, each its own split count, with t / f for the value "
                      "tiles decoded under the key wgmma or not: e.g. 6,12t,16f (checked "
                      "at up to the check cache's 16 steps)")
  p.add_argument("--name", default="", help="a suffix to the result's file name")
  args = p.parse_args(argv)
  hq, hkv, d = shapes(args.model)
  config = CONFIGS[args.config]
  grid = ([GRID[int(i)] for i in args.settings.split(",")] if args.settings else GRID)
  grid = grid + [split_setting(n) for n in args.splits.split(",") if n]
  ceiling = md.read_ceiling()
  checks, rows = [], []

  def save():
    suffix = "" if args.config == "k4v3-int8" else "_" + args.config.replace("-", "_")
    suffix += f"_{args.name}" if args.name else ""
    return common.write_result(f"kernel_sweep_{args.model}{suffix}", dict(
        shape=dict(q_heads=hq, kv_heads=hkv, head_dim=d), config=repr(config),
        read_ceiling_bytes_per_s=ceiling, checks=checks, timings=rows))

  for i, kw in enumerate(grid):
    common.checked(checks, check, 500 + i, hq, hkv, d, kw, config,
                   error_fields=dict(setting=str(kw)))
  save()
  key = jax.random.PRNGKey(3)
  for b, t in (tuple(int(x) for x in pt.split("x")) for pt in args.points.split(",")):
    key, sub = jax.random.split(key)
    base, base_bytes = cudnn_time(sub, b, t, hq, hkv, d)
    rows.append(dict(batch=b, tokens=t, setting="cudnn bf16", **base, speedup=1.0,
                     ceiling_frac=base_bytes / base["us"] / 1e-6 / ceiling))
    print(rows[-1], flush=True)
    cache = make_cache(sub, b, t, config, kv_heads=hkv, head_dim=d)
    q = jax.random.normal(sub, (b, 1, hq, d), jnp.bfloat16)
    nbytes = int(cache.memory_report()["bytes_per_token_per_head"] * b * hkv * t)
    for kw in grid:
      try:
        opts = kernel_options(kw, cache, b, hkv)
        f = jax.jit(lambda q, c, opts=opts: c.attend(q, implementation="mosaic", **opts))
        got = kernel_time(f, q, cache)
        rows.append(dict(batch=b, tokens=t, setting=str(kw), splits=opts.get("num_splits"),
                         **got, speedup=base["us"] / got["us"],
                         ceiling_frac=nbytes / got["kernel_us"] / 1e-6 / ceiling))
      except Exception as e:  # noqa: BLE001 - report every setting
        traceback.print_exc()
        rows.append(dict(batch=b, tokens=t, setting=str(kw), error=repr(e)[:300]))
      print(rows[-1], flush=True)
    del cache
    save()
  print(f"wrote {save()}")
  common.print_table(checks, ["setting", "rel_err", "ok"])
  common.print_table(rows, ["batch", "tokens", "setting", "splits", "us", "kernel_us",
                            "kernels", "speedup", "ceiling_frac"])


if __name__ == "__main__":
  main()
