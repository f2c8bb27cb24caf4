"""Prefill appends into the tiles layout: the fused append kernel against the jnp writer.

    python -m benchmarks.append_prefill            # GPU; writes append_prefill_<platform>.json
    python -m benchmarks.append_prefill --sweep    # and the kernel's precisions and warps

Llama-3-8B shapes (8 kv heads, d = 128), one layer. For each cache in the tiles layout,
the same chunks appended with `TurboQuantConfig(append_kernel=False)` (XLA: rotation,
levels, a zeroed window of tiles, per-bit gather packing, masked merge) and `True`
(`pallas_kernels.tile_quantize`: one Triton program per tile, then a tile-wise write),
side by side on the same inputs; the dense bf16 cache's append for scale. Chunks go to
consecutive positions (tile-aligned), donated, queued and blocked on once. The kernel is
also timed alone on the float32 operand the cache hands it. Fractions of the read ceiling
count the chunk's bf16 keys and values (what a prefill must read).

Check: after the same appends both caches' codes are compared level by level. They may
differ where a rotated coordinate falls within float rounding of a boundary (the kernel's
products and the norm's sum of squares run in another order), and a norm by one unit in
the last place of its storage dtype; the tests' inputs are bit-exact in interpret mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.decode_attention import read_ceiling
from benchmarks.decode_e2e import CACHES
from pallas_kernels import tile_quantize
from turboquant_jax import tile_codes
from turboquant_jax.kv_cache import DenseKVCache

HEADS, DIM, MAX_LEN = 8, 128, 16384
POINTS = ((8, 4096), (1, 4096))
NAMES = ("tq3-tiles-rope", "tq3.5-quintic-rope")


def _make(name: str, batch: int, kernel: bool | None):
  if name == "bf16":
    return DenseKVCache.create(batch, MAX_LEN, HEADS, DIM, jnp.bfloat16)
  make = CACHES[name]
  config = dataclasses.replace(make.keywords["config"], append_kernel=kernel)
  return make.func(batch, MAX_LEN, HEADS, DIM, jnp.bfloat16, config=config)


def _chunks(key, batch, chunk, n):
  shape = (batch, chunk, HEADS, DIM)
  return [(jax.random.normal(jax.random.fold_in(key, 2 * i), shape, jnp.bfloat16),
           jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, jnp.bfloat16))
          for i in range(n)]


def time_appends(name, batch, chunk, kernel, chunks):
  """ms per chunk appended (after the first, which calibrates), and the filled cache."""
  update = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  jax.block_until_ready(update(_make(name, batch, kernel), *chunks[0]))   # compiles
  best = None
  for _ in range(3):    # fresh caches; the chunks fill positions chunk, 2·chunk, ...
    cache = jax.block_until_ready(update(_make(name, batch, kernel), *chunks[0]))
    start = time.perf_counter()
    for k, v in chunks[1:]:
      cache = update(cache, k, v)
    jax.block_until_ready(cache)
    t = (time.perf_counter() - start) / (len(chunks) - 1)
    best = t if best is None else min(best, t)
  return best, cache


def _levels(cache):
  return [np.asarray(tile_codes.read_levels(c)) for c in cache.key_codes + cache.value_codes]


def kernel_alone(name, batch, chunk, **kw):
  """The kernel on both sides' groups, float32 operand [B·H, chunk, d_g]: seconds."""
  cache = _make(name, batch, True)
  total = 0.0
  for quantizer, codes in ((cache.key_quantizer, cache.key_codes),
                           (cache.value_quantizer, cache.value_codes)):
    for g, c in zip(quantizer.groups, codes):
      x = jax.random.normal(jax.random.PRNGKey(0), (batch * HEADS, chunk, g.dim))
      f = jax.jit(lambda x, r, b, g=g, c=c: tile_quantize.quantize_tiles(
          x, r, b, bits=g.bits, tokens=c.layout.tokens, transposed=c.layout.transposed,
          interpret=jax.default_backend() == "cpu", **kw))
      total += common.device_time(f, x, g.rotation.matrix.T, g.boundaries, calls=10,
                                  repeats=7)
  return total


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sweep", action="store_true",
                      help="first the kernel alone over precisions and warps, 8 x 4096")
  parser.add_argument("--points", default=None, help="batch x chunk, e.g. 8x4096,1x4096")
  args = parser.parse_args(argv)
  ceiling = read_ceiling()
  key = jax.random.PRNGKey(1)
  rows, checks = [], []
  # The kernel alone: the rotation's precision and the warps per program.
  for name in NAMES if args.sweep else ():
    for precision in tile_quantize.PRECISIONS:
      for warps in (4, 8):
        label = f"{name} kernel alone, {precision}, {warps} warps"
        try:
          t = kernel_alone(name, 8, 4096, precision=precision, num_warps=warps)
        except Exception as e:  # noqa: BLE001  (a variant that does not compile)
          rows.append(dict(cache=label, error=repr(e)[:300]))
          continue
        rows.append(dict(cache=label, batch=8, chunk=4096, ms=t * 1e3,
                         read_ceiling_frac=2 * 8 * 4096 * HEADS * DIM * 2 / t / ceiling))
        print(rows[-1], flush=True)
  points = POINTS if args.points is None else [
      tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
  for batch, chunk in points:
    n = min(MAX_LEN // chunk, 5)
    chunks = _chunks(key, batch, chunk, n)
    read = 2 * batch * chunk * HEADS * DIM * 2       # bf16 keys and values
    t_dense, _ = time_appends("bf16", batch, chunk, None, chunks)
    rows.append(dict(cache="bf16", batch=batch, chunk=chunk, ms=t_dense * 1e3,
                     read_ceiling_frac=read / t_dense / ceiling))
    for name in NAMES:
      t_jnp, c_jnp = time_appends(name, batch, chunk, False, chunks)
      t_fused, c_fused = time_appends(name, batch, chunk, True, chunks)
      t_kernel = kernel_alone(name, batch, chunk, precision="tf32x3", num_warps=8)
      mem = c_fused.memory_report()
      for label, t in (("jnp", t_jnp), ("append kernel", t_fused)):
        rows.append(dict(cache=f"{name} {label}", batch=batch, chunk=chunk, ms=t * 1e3,
                         x_jnp=t_jnp / t, read_ceiling_frac=read / t / ceiling))
      rows.append(dict(cache=f"{name} kernel alone (f32 operand)", batch=batch, chunk=chunk,
                       ms=t_kernel * 1e3, read_ceiling_frac=read / t_kernel / ceiling))
      if batch == 1:
        # Then single tokens, past a tile boundary: the deferred block codes go through
        # the kernel too (`TurboQuantKVCache.defers_codes`).
        step = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
        for i in range(300):
          k, v = (x[:, i % chunk:i % chunk + 1] for x in chunks[0])
          c_jnp, c_fused = step(c_jnp, k, v), step(c_fused, k, v)
      diff = [(a != b) for a, b in zip(_levels(c_jnp), _levels(c_fused))]
      checks.append(dict(cache=name, batch=batch, chunk=chunk,
                         levels_differing=int(sum(d.sum() for d in diff)),
                         levels=int(sum(d.size for d in diff)),
                         norms_differing=sum(int(jnp.sum(a.norms != b.norms)) for a, b in
                                             zip(c_jnp.key_codes + c_jnp.value_codes,
                                                 c_fused.key_codes + c_fused.value_codes)),
                         bytes_per_token_per_head=mem.get("bytes_per_token_per_head")))
      print(rows[-3:], checks[-1], flush=True)
    save(ceiling, checks, rows)
  save(ceiling, checks, rows)
  common.print_table(checks, ["cache", "batch", "chunk", "levels_differing", "levels",
                              "norms_differing"])
  common.print_table(rows, ["cache", "batch", "chunk", "ms", "x_jnp", "read_ceiling_frac"])


def save(ceiling, checks, rows):
  common.write_result("append_prefill", dict(read_ceiling_bytes_per_s=ceiling, heads=HEADS,
                                             head_dim=DIM, max_len=MAX_LEN, checks=checks,
                                             timings=rows))


if __name__ == "__main__":
  main()
