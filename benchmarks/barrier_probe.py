"""What the int8 kernel's barriers and per-step max cost: a speed probe on the GPU (H200).

`decode_attention_mgpu.decode_partials` places its own barriers (auto_barriers=False):
Pallas's automatic ones put a warpgroup barrier before and after every SMEM store and
before every TMA copy (at K4/V3 int8, 9 per pipeline step: 2 for the store of p, 4 for the
pipeline's four copies, 2 for the per-step max's exchange, 1 for the commit), the
kernel's need 2 (the commit, and `column_max`'s exchange, whose second barrier the
commit makes redundant). This times the whole `attend` call at Llama-3-8B shapes, each
mode swapped in one process:

- "auto": Pallas's barriers and Mosaic's max (the kernel before 2026-12-02);
- "auto+colmax": Pallas's barriers, the kernel's one-barrier max;
- "own+mosaicmax": the kernel's barriers, Mosaic's two-barrier max;
- "own": the kernel's barriers and max, every step's scores masked (the kernel of
  2026-12-02 until `mask_edges_only`);
- "edges": the library's default, "own" with only the edge steps of a split's range
  masked (`mask_edges_only`: a uniform branch skips the mask's compares and selects on
  every interior step; `mask_edges_probe_gpu.json`).

With --check the --check-mode (default "edges") is first checked against the jnp reference
on the GPU: ragged caches of every kernel path (fp16 and int8 tiles, RoPE offsets, channel
groups, exact windows), at Llama's heads (4 kv heads of 128 here) and SmolLM2's (3 of 64).

    python -m benchmarks.barrier_probe --check --points 8x4096,8x32768
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels import decode_attention_mgpu as dm

MODES = ("auto", "auto+colmax", "own+mosaicmax", "own", "edges")
_PARTIALS, _COLUMN_MAX = dm.decode_partials, dm.column_max
# Kernel paths for the check: fp16 tiles with RoPE offsets and channel groups, int8 tiles
# (Lloyd-Max and plain-nibble keys, RoPE, channel groups, prerotated values).
CHECK_CACHES = ("tq3-tiles-rope", "tq3.5-quintic-rope", "tq3.5-quintic", "tq3.5-int8-rope",
                "tq3.5-k4v3-int8", "tq3.5-k4uv3-int8-prerotated", "tq3.5-k4v3-int8-rope")


def patch(mode: str) -> None:
  """Swaps the kernel's barriers and max for the mode's (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  auto = mode.startswith("auto")
  dm.decode_partials = functools.partial(_PARTIALS, auto_barriers=auto,
                                         mask_edges_only=mode == "edges")
  mosaic_max = mode in ("auto", "own+mosaicmax")
  dm.column_max = (lambda x, scratch: x.max(axis=0)) if mosaic_max else _COLUMN_MAX
  jax.clear_caches()


def main(argv=None) -> None:
  from benchmarks import decode_e2e
  from benchmarks import mgpu_decode as md
  from benchmarks.decode_attention import make_cache
  from benchmarks.kernel_sweep import CONFIGS, kernel_time, shapes
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama3_8b")
  p.add_argument("--configs", default="k4uv3-int8-prerotated,k4v3-int8-prerotated")
  p.add_argument("--points", default="8x32768", help="per config: a;b for two configs")
  p.add_argument("--calls", type=int, default=7)
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--check", action="store_true")
  p.add_argument("--check-mode", default="edges", choices=MODES,
                 help="the mode --check checks against the reference")
  args = p.parse_args(argv)
  checks, rows = [], []

  def save():
    return common.write_result("barrier_probe", dict(
        model=args.model, configs=args.configs, read_ceiling_bytes_per_s=ceiling,
        checks=checks, rows=rows))

  ceiling = md.read_ceiling()
  if args.check:
    patch(args.check_mode)
    for h, hq, d in ((4, 16, 128), (3, 9, 64)):
      checks += decode_e2e.check_correctness(CHECK_CACHES, h=h, hq=hq, d=d)
    save()
  hq, hkv, d = shapes(args.model)
  configs = args.configs.split(",")
  points = args.points.split(";") if ";" in args.points else [args.points] * len(configs)
  for config, config_points in zip(configs, points, strict=True):
    for point in config_points.split(","):
      b, t = (int(x) for x in point.split("x"))
      cache = make_cache(jax.random.PRNGKey(0), b, t, CONFIGS[config], kv_heads=hkv,
                         head_dim=d)
      q = jax.random.normal(jax.random.PRNGKey(1), (b, 1, hq, d), jnp.bfloat16)
      nbytes = int(cache.memory_report()["bytes_per_token_per_head"] * b * hkv * t)
      modes = args.modes.split(",")
      for mode in (*modes, modes[0]):   # the first mode again: the run's drift
        patch(mode)
        fn = jax.jit(lambda q, c: c.attend(q, implementation="mosaic"))
        got = kernel_time(fn, q, cache, calls=args.calls)
        rows.append(dict(config=config, batch=b, tokens=t, mode=mode, us=got["us"],
                         kernel_us=got["kernel_us"],
                         ceiling_frac=nbytes / got["kernel_us"] / 1e-6 / ceiling))
        print(rows[-1], flush=True)
      patch("edges")
      del cache
      save()
  print(f"wrote {save()}")
  if checks:
    common.print_table(checks, ["cache", "heads", "q_len", "window", "rel_err", "finite"])
  common.print_table(rows, ["config", "batch", "tokens", "mode", "us", "kernel_us",
                            "ceiling_frac"])


if __name__ == "__main__":
  main()
