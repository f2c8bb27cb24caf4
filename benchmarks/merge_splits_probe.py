"""`merge_exact.merge_splits` alone: its block of channels and warps, at the decode path's shapes.

The Mosaic kernel's splits are merged by one Triton launch gridded (rows, D / block_d);
block_d = 32 and 4 warps were the first choice, untuned. This times each (block_d,
num_warps) at the shapes the decode path gives it (R = batch x kv heads rows, S splits
including the exact ones, D channels, 4 query rows of 8 columns), each first checked
against `merge_exact_reference` on the same random partials (the output NaN-poisoned
beforehand), in device time from the profiler (`kernel_sweep.kernel_time`).

    python -m benchmarks.merge_splits_probe [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.kernel_sweep import kernel_time
from pallas_kernels import merge_exact as me

# (label, R, S, D, heads): Llama-3-8B heads (8 kv heads of 128, splits of
# `kernel_attention._mosaic_splits` + 1 exact) and Gemma 3's (1 kv head of 256).
SHAPES = [("llama 1x4K", 8, 33, 128, 8), ("llama 8x4K", 64, 5, 128, 8),
          ("llama 8x32K", 64, 17, 128, 8), ("llama 64x4K", 512, 3, 128, 8),
          ("gemma 1x4K", 1, 17, 256, 1), ("gemma 8x32K", 8, 33, 256, 1)]
ROWS, COLS = 4, 8
BLOCK_DS, WARPS = (16, 32, 64, 128), (1, 2, 4)


def partials(seed: int, r: int, s: int, d: int):
  rng = np.random.default_rng(seed)
  o = jnp.asarray(rng.standard_normal((r, s, d, COLS)), jnp.float32)
  l = jnp.asarray(rng.uniform(0.5, 3.0, (r, s, COLS)), jnp.float32)
  m = jnp.asarray(rng.standard_normal((r, s, COLS)) * 4, jnp.float32)
  mean = jnp.asarray(rng.standard_normal((r, d)), jnp.float32)
  return o, l, m, mean


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  rows = []
  for n, (label, r, s, d, heads) in enumerate(SHAPES):
    o, l, m, mean = partials(n, r, s, d)
    poison = jnp.zeros((r // heads,), bool)
    q = jnp.zeros((r, COLS, d), jnp.float32)
    ref = me.merge_exact_reference(q, o, l, m, jnp.zeros((r // heads, COLS), jnp.int32),
                                   None, (), heads=heads, scale=1.0, value_mean=mean,
                                   unrotated_splits=1)
    ref = np.asarray(jnp.swapaxes(ref, 1, 2)[:, :ROWS])
    for block_d, warps in itertools.product(BLOCK_DS, WARPS):
      if d % block_d:
        continue
      f = jax.jit(lambda o, l, m, mean, poison, bd=block_d, w=warps: me.merge_splits(
          o, l, m, rows=ROWS, heads=heads, value_mean=mean, exact_splits=1, poison=poison,
          out_dtype=jnp.bfloat16, block_d=bd, num_warps=w))
      jax.block_until_ready(jnp.full((4, r, ROWS, d), jnp.nan, jnp.bfloat16))
      got = np.asarray(f(o, l, m, mean, poison), np.float32)
      err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
      t = kernel_time(f, o, l, m, mean, poison)
      rows.append(dict(shape=label, R=r, S=s, D=d, block_d=block_d, num_warps=warps,
                       programs=r * d // block_d, rel_err=err,
                       ok=bool(err < 1e-2 and np.isfinite(got).all()),
                       us=t["us"], kernels=t["kernels"]))
      print(rows[-1], flush=True)
  path = common.write_result("merge_splits_probe", dict(rows=rows), args.out)
  print(f"wrote {path}")
  common.print_table(rows, ["shape", "block_d", "num_warps", "programs", "rel_err", "ok",
                            "us"])


if __name__ == "__main__":
  main()
