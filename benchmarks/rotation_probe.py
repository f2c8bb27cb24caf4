"""What the int8 kernel's own query rotation costs: a speed probe on the GPU (H200).

With `prologue_rotation="kernel"` (the default where it serves) each CTA copies U (float16
[D, D], 32 KB at D = 128) into shared memory and rotates its kv head's query by a wgmma
before its pipeline starts. This times the whole `attend` call at Llama-3-8B shapes:

- "kernel": the library's path;
- "kernel, U/2" and "kernel, U/8": the same kernel copying only the first half or eighth
  of U's rows (wrong outputs: speed only), so what U's bytes cost shows apart from the
  rest of the rotation;
- "dot": the query rotated by the Triton prologue instead (no U in the Mosaic kernel).

A first "kernel" and a last one bracket the run's noise.

    python -m benchmarks.rotation_probe --points 8x32768,1x4096
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import common

MODES = {"kernel": None, "kernel, U/2": 2, "kernel, U/8": 8}
_COPY = plgpu.copy_gmem_to_smem


def patch(divisor: int | None, d: int) -> None:
  """Copies only the first d / divisor rows of any float16 [d, d] operand (U) into shared
  memory; None restores the full copy. Kernels are traced once per shape: clear JAX's
  caches after patching."""
  def copy(src, dst, *args, **kwargs):
    if divisor and tuple(src.shape) == (d, d) and src.dtype == jnp.float16:
      rows = pl.ds(0, d // divisor)
      return _COPY(src.at[rows], dst.at[rows], *args, **kwargs)
    return _COPY(src, dst, *args, **kwargs)
  plgpu.copy_gmem_to_smem = copy if divisor else _COPY


def main(argv=None) -> None:
  from benchmarks import mgpu_decode as md
  from benchmarks.decode_attention import make_cache
  from benchmarks.kernel_sweep import CONFIGS, kernel_time, shapes
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama3_8b")
  p.add_argument("--config", default="k4uv3-int8-prerotated", choices=sorted(CONFIGS))
  p.add_argument("--points", default="8x32768")
  p.add_argument("--calls", type=int, default=7)
  p.add_argument("--out", default=None, help="results folder for the JSON")
  args = p.parse_args(argv)
  hq, hkv, d = shapes(args.model)
  ceiling = md.read_ceiling()
  rows = []
  for point in args.points.split(","):
    b, t = (int(x) for x in point.split("x"))
    cache = make_cache(jax.random.PRNGKey(0), b, t, CONFIGS[args.config], kv_heads=hkv,
                       head_dim=d)
    q = jax.random.normal(jax.random.PRNGKey(1), (b, 1, hq, d), jnp.bfloat16)
    nbytes = int(cache.memory_report()["bytes_per_token_per_head"] * b * hkv * t)
    for mode in (*MODES, "dot", "kernel"):
      patch(MODES.get(mode), d)
      jax.clear_caches()
      rotation = "dot" if mode == "dot" else "kernel"
      fn = jax.jit(lambda q, c, r=rotation: c.attend(q, implementation="mosaic",
                                                    prologue_rotation=r))
      got = kernel_time(fn, q, cache, calls=args.calls)
      rows.append(dict(batch=b, tokens=t, mode=mode, us=got["us"], kernel_us=got["kernel_us"],
                       ceiling_frac=nbytes / got["kernel_us"] / 1e-6 / ceiling))
      print(rows[-1], flush=True)
    patch(None, d)
    del cache
  path = common.write_result("rotation_probe", dict(
      model=args.model, config=repr(CONFIGS[args.config]), read_ceiling_bytes_per_s=ceiling,
      rows=rows), args.out)
  print(f"wrote {path}")
  common.print_table(rows, ["batch", "tokens", "mode", "us", "kernel_us", "ceiling_frac"])


if __name__ == "__main__":
  main()
