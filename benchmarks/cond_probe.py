"""What a `lax.cond` that is never taken costs a CUDA-graph decode loop, and what it scales with.

    python -m benchmarks.cond_probe [--out DIR]

A jitted `lax.scan` of STEPS steps, compiled with `models.generate.GRAPH_OPTIONS` (the loop
and its conditionals recorded as CUDA graphs, as `decode_loop` runs them), does a little
work per step and then a `lax.cond` on a predicate computed on the device that is always
False. The branch not taken holds `kernels` separate kernels (one per optimization
barrier) and the cond carries `mib` MiB of buffers through, in `buffers` arrays of which it writes `written`. Per configuration: device time
per step (calls queued back to back, blocked once), against the same loop without the
cond. Writes cond_probe_<platform>.json and a table.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from models.generate import GRAPH_OPTIONS

STEPS, CALLS = 64, 10
# (kernels in the branch, MiB carried, in how many buffers, how many the branch writes[,
# cuBLAS dots in the branch])
CONFIGS = [(0, 1, 1, 1), (1, 1, 1, 1), (16, 1, 1, 1), (128, 1, 1, 1), (0, 512, 1, 1),
           (1, 512, 1, 1), (128, 512, 1, 1), (0, 256, 16, 16), (1, 256, 16, 16),
           (0, 256, 256, 256), (1, 256, 256, 256), (1, 256, 256, 1), (16, 256, 256, 256),
           (1, 1, 1, 1, 1), (1, 1, 1, 1, 8), (1, 1, 1, 1, 64)]


def loop_fn(kernels: int, writes: int, dots: int = 0):
  """(x [4096] f32, bufs: list of f32 arrays) -> same; kernels=0: no conditional. The
  branch writes one element of each of the first `writes` buffers, after `dots` f32
  [32, 128] x [128, 128] products (cuBLAS calls, which a CUDA graph records by tracing)."""

  def branch(state):
    x, bufs = state
    for i in range(kernels):
      x = jax.lax.optimization_barrier(jnp.sin(x) + i)
    w = jnp.eye(128, dtype=jnp.float32)
    for _ in range(dots):
      x = jnp.dot(x.reshape(32, 128), w).reshape(-1)
    return x, [b.at[0].add(x[0]) if j < writes else b for j, b in enumerate(bufs)]

  def body(state, _):
    x, bufs = state
    x = jnp.cos(x) * 0.5                       # the step's own work
    if kernels:
      x, bufs = jax.lax.cond(jnp.abs(x[0]) > 10.0, branch, lambda s: s, (x, bufs))
    return (x, bufs), None

  def loop(x, bufs):
    return jax.lax.scan(body, (x, bufs), None, length=STEPS)[0]

  return jax.jit(loop, donate_argnums=(0, 1), compiler_options=GRAPH_OPTIONS)


def time_config(kernels: int, mib: int, buffers: int, writes: int, dots: int = 0) -> float:
  """Device µs per step: CALLS calls queued back to back, blocked once."""
  fn = loop_fn(kernels, writes, dots)
  state = (jnp.ones((4096,), jnp.float32),
           [jnp.zeros((mib * 2**18 // buffers,), jnp.float32) for _ in range(buffers)])
  for _ in range(3):
    state = jax.block_until_ready(fn(*state))
  start = time.perf_counter()
  for _ in range(CALLS):
    state = fn(*state)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / (CALLS * STEPS) * 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = [{"kernels_in_branch": k, "mib_carried": m, "buffers": b, "written": w,
           "dots": d[0] if d else 0, "us_per_step": time_config(k, m, b, w, *d)}
          for k, m, b, w, *d in CONFIGS]
  base = {(r["mib_carried"], r["buffers"]): r["us_per_step"] for r in rows
          if r["kernels_in_branch"] == 0}
  for r in rows:
    r["cond_us"] = r["us_per_step"] - base[r["mib_carried"], r["buffers"]]
  results = {"settings": {"steps": STEPS, "calls": CALLS, "graph_options": GRAPH_OPTIONS},
             "rows": rows}
  path = common.write_result("cond_probe", results,
                             pathlib.Path(args.out) if args.out else None)
  print(f"{'kernels':>8} {'MiB':>5} {'buffers':>8} {'written':>8} {'dots':>5} {'us/step':>9} "
        f"{'cond us':>8}")
  for r in rows:
    print(f"{r['kernels_in_branch']:>8} {r['mib_carried']:>5} {r['buffers']:>8} "
          f"{r['written']:>8} {r['dots']:>5} {r['us_per_step']:>9.2f} {r['cond_us']:>8.2f}")
  print(path)


if __name__ == "__main__":
  main()
