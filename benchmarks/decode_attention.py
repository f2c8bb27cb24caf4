"""Decode attention speed: our fused kernel over the compressed cache vs bf16/fp32 baselines.

One query token, 32 q heads, 8 kv heads, d = 128 (the issue's shape), random data (speed
does not depend on the values). Device time: many calls queued, one block. For each
(T, batch): fp32 and bf16 jnp attention, cuDNN bf16, JAX's Pallas bf16 decode kernel on a
head-major cache, and ours: the Triton kernel on the default bit-plane layout and, for
integer widths on Hopper, the Mosaic GPU kernel on the tiles layout (`benchmarks/
mosaic_attend.py` times it with back-to-back calls, right for short calls); plus a large
read that measures the HBM ceiling in the run.

    python -m benchmarks.decode_attention [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from turboquant_jax.rope import RopeSpec
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

HQ, HKV, D = 32, 8, 128


def log(*args):
  print(*args, flush=True)


def read_ceiling(gib: float = 4.0) -> float:
  """Bytes/s of a large reduction: what reading HBM costs here."""
  x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  t = common.device_time(f, x, calls=10, repeats=9)
  return x.nbytes / t


def jnp_attention(q, k, v):
  """q: [B, HQ, D]; k, v: [B, HKV, T, D] head-major."""
  b, _, d = q.shape
  qg = q.reshape(b, HKV, HQ // HKV, d)
  s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32) * d**-0.5
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhgt,bhtd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, HQ, d).astype(q.dtype)


def cudnn_attention(q, k, v):
  """q: [B, 1, HQ, D]; k, v: [B, T, HKV, D] token-major (what cuDNN takes)."""
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def pallas_bf16_attention(q, k, v):
  """JAX's Pallas decode kernel per kv head on a head-major cache (no transpose)."""
  from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
  b, _, d = q.shape
  qg = q.reshape(b, HKV, HQ // HKV, d)
  return jax.vmap(jax_decode.mqa, in_axes=(1, 1, 1), out_axes=1)(qg, k, v).reshape(b, HQ, d)


def make_cache(key, batch, t, config, chunk=8192, rope=None, *, kv_heads=HKV, head_dim=D):
  """A cache of random keys and values; `rope` (a `RopeSpec`) for center_keys="rope"."""
  cache = TurboQuantKVCache.create(batch, t, kv_heads, head_dim, jnp.bfloat16, config=config,
                                   rope=rope)
  update = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  for start in range(0, t, chunk):
    n = min(chunk, t - start)
    kk, kv = jax.random.split(jax.random.fold_in(key, start))
    k = jax.random.normal(kk, (batch, n, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, n, kv_heads, head_dim), jnp.bfloat16)
    cache = update(cache, k, v)
  return cache


def ours_fn(kernel_kwargs):
  return jax.jit(lambda c, q: c.attend(q, implementation="pallas", **kernel_kwargs))


def compressed_bytes(cache) -> int:
  """Bytes the kernel must read: every code, norm and sign buffer (all tokens)."""
  rep = cache.memory_report()
  return int(rep["bytes_per_token_per_head"] * cache.batch * cache.num_kv_heads * cache.max_len)


def check_correctness(results):
  """Kernel vs the jnp reference on the GPU, fresh random inputs, several settings."""
  rng = np.random.default_rng(0)
  rows = []
  for d, cfg in [(128, TurboQuantConfig(key_bits=3, value_bits=3, window=16)),
                 (128, TurboQuantConfig(window=16)),
                 (64, TurboQuantConfig(key_bits=2.5, value_bits=2, key_quantizer="prod",
                                       window=32)),
                 (256, TurboQuantConfig(key_bits=4, value_bits=3.5, window=8)),
                 (128, TurboQuantConfig(key_bits=3.5, window=16, center_keys="rope"))]:
    b, t, hq = 3, 2048, 16
    k = jnp.asarray(rng.standard_normal((b, t, HKV, d)) + 2.0, jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, HKV, d)), jnp.float32)
    # Keys centred before RoPE: the cache is given a RoPE (here an interleaved one).
    spec = RopeSpec(10000.0, interleaved=True) if cfg.center_keys == "rope" else None
    cache = TurboQuantKVCache.create(b, t, HKV, d, config=cfg, rope=spec).update(
        k, v, num_tokens=jnp.array([t, 1500, 700]))
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
    ref = cache.attend(q, implementation="reference")
    for dtype in (jnp.float32, jnp.bfloat16):
      got = cache.attend(q, implementation="pallas", compute_dtype=dtype, poison=True)
      err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
      rows.append({"d": d, "key_bits": cfg.key_bits, "value_bits": cfg.value_bits,
                   "key_quantizer": cfg.key_quantizer, "center_keys": str(cfg.center_keys),
                   "compute_dtype": jnp.dtype(dtype).name,
                   "rel_err": err, "nan": bool(jnp.any(jnp.isnan(got)))})
      log("check", rows[-1])
  results["correctness"] = rows


def bench_point(key, batch, t, bits_list, results, kernel_kwargs, baselines=True,
                mosaic=True):
  row = {"batch": batch, "tokens": t}
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, HQ, D), jnp.bfloat16)
  if baselines:
    for name, dtype in (("fp32_jnp", jnp.float32), ("bf16_jnp", jnp.bfloat16)):
      nbytes = 2 * batch * HKV * t * D * jnp.dtype(dtype).itemsize
      if nbytes > 24e9:
        continue
      try:
        k = jax.random.normal(kk, (batch, HKV, t, D), dtype)
        v = jax.random.normal(kv, (batch, HKV, t, D), dtype)
        row[name] = common.device_time(jax.jit(jnp_attention), q.astype(dtype), k, v)
        if name == "bf16_jnp":
          try:
            row["pallas_bf16"] = common.device_time(jax.jit(pallas_bf16_attention), q, k, v)
          except Exception as e:  # noqa: BLE001 - a baseline that fails is reported
            row["pallas_bf16_error"] = repr(e)[:300]
          kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
          del k, v
          try:
            row["cudnn_bf16"] = common.device_time(jax.jit(cudnn_attention), q[:, None], kt, vt)
          except Exception as e:  # noqa: BLE001
            row["cudnn_bf16_error"] = repr(e)[:300]
          row["bf16_bytes"] = int(kt.nbytes + vt.nbytes)
          del kt, vt
        else:
          del k, v
      except Exception as e:  # noqa: BLE001
        row[f"{name}_error"] = repr(e)[:300]
  for bits in bits_list:
    config = TurboQuantConfig(key_bits=bits, value_bits=bits)
    try:
      cache = make_cache(kk, batch, t, config)
      row[f"ours_{bits}"] = common.device_time(ours_fn(kernel_kwargs), cache, q[:, None])
      row[f"ours_{bits}_bytes"] = compressed_bytes(cache)
      del cache
    except Exception as e:  # noqa: BLE001
      row[f"ours_{bits}_error"] = repr(e)[:300]
      traceback.print_exc()
  # The Mosaic GPU kernel (Hopper) on the tiles layout, integer widths, beside them.
  for bits in [b for b in bits_list if float(b).is_integer()] if mosaic else []:
    config = TurboQuantConfig(key_bits=bits, value_bits=bits, levels="cubic",
                              layout="tiles", center_keys="plain")
    try:
      cache = make_cache(kk, batch, t, config)
      f = jax.jit(lambda c, q: c.attend(q, implementation="mosaic"))  # noqa: E731
      row[f"mosaic_{bits}"] = common.device_time(f, cache, q[:, None])
      row[f"mosaic_{bits}_bytes"] = compressed_bytes(cache)
      del cache
    except Exception as e:  # noqa: BLE001
      row[f"mosaic_{bits}_error"] = repr(e)[:300]
  log("point", json.dumps(row))
  results["points"].append(row)
  return row


def sweep(key, results, batch=8, t=32768, bits=3):
  """Kernel knobs at the target point."""
  cache = make_cache(key, batch, t, TurboQuantConfig(key_bits=bits, value_bits=bits))
  q = jax.random.normal(key, (batch, 1, HQ, D), jnp.bfloat16)
  rows = []

  def measure(kw):
    try:
      ms = common.device_time(ours_fn(kw), cache, q) * 1e3
    except Exception as e:  # noqa: BLE001 - a variant that fails is recorded as NaN
      ms = float("nan")
      log("sweep error", kw, repr(e)[:200])
    rows.append({**kw, "ms": ms})
    log("sweep", rows[-1])

  for decode in ("poly", "ladder"):
    for block_k, num_warps, num_stages in ((64, 4, 2), (32, 4, 2), (128, 8, 3), (64, 8, 2)):
      measure(dict(decode=decode, block_k=block_k, num_warps=num_warps, num_stages=num_stages))
  best = min((r for r in rows if not math.isnan(r["ms"])), key=lambda r: r["ms"])
  for splits in (16, 32, 64, 128):
    measure({**{k: best[k] for k in ("decode", "block_k", "num_warps", "num_stages")},
             "num_splits": splits})
  results["sweep"] = rows
  best = min((r for r in rows if not math.isnan(r["ms"])), key=lambda r: r["ms"])
  return {k: best[k] for k in ("decode", "block_k", "num_warps", "num_stages", "num_splits")
          if k in best}


def summarize(results):
  ceiling = results["read_ceiling_bytes_per_s"]
  table = []
  for r in results["points"]:
    for kernel, bits in [(k, b) for b in results["bits"] for k in ("ours", "mosaic")]:
      if f"{kernel}_{bits}" not in r:
        continue
      ours = r[f"{kernel}_{bits}"]
      row = {"B": r["batch"], "T": r["tokens"], "bits": bits,
             "kernel": "triton" if kernel == "ours" else "mosaic", "ours_ms": ours * 1e3}
      for base in ("cudnn_bf16", "pallas_bf16", "bf16_jnp", "fp32_jnp"):
        if base in r:
          row[f"x_{base}"] = r[base] / ours
      row["ceiling_frac"] = r[f"{kernel}_{bits}_bytes"] / ours / ceiling
      if "cudnn_bf16" in r:
        row["cudnn_ms"] = r["cudnn_bf16"] * 1e3
        row["cudnn_ceiling_frac"] = r["bf16_bytes"] / r["cudnn_bf16"] / ceiling
      table.append(row)
  results["table"] = table
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="a small grid")
  parser.add_argument("--out", default=None, help="results folder")
  parser.add_argument("--no-sweep", action="store_true")
  parser.add_argument("--check-only", action="store_true",
                      help="only the GPU correctness check (decode_attention_check_<platform>.json)")
  args = parser.parse_args(argv)
  key = jax.random.PRNGKey(0)
  results = {"shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "q_len": 1},
             "timing": "median of 21 samples, each the mean of 10 calls queued before one block",
             "points": []}
  start = time.time()
  check_correctness(results)
  if args.check_only:
    path = common.write_result("decode_attention_check", results, args.out)
    common.print_table(results["correctness"], ["d", "key_bits", "value_bits", "key_quantizer",
                                                "center_keys", "compute_dtype", "rel_err", "nan"])
    print(f"wrote {path}")
    return
  results["read_ceiling_bytes_per_s"] = read_ceiling()
  log("read ceiling TB/s", results["read_ceiling_bytes_per_s"] / 1e12)
  kernel_kwargs = {} if args.no_sweep else sweep(key, results)
  results["kernel_kwargs"] = kernel_kwargs
  log("kernel kwargs", kernel_kwargs)
  if args.quick:
    grid, bits_grid = [(8, 4096), (8, 32768)], (2, 3, 4)
  else:
    grid = [(b, t) for t in (1024, 4096, 32768, 131072) for b in (1, 8, 32)]
    bits_grid = (3,)
  results["bits"] = sorted(set(bits_grid) | {2, 2.5, 3, 3.5, 4})
  for b, t in grid:
    full_bits = (2, 2.5, 3, 3.5, 4) if (b, t) in ((8, 4096), (8, 32768)) else bits_grid
    bench_point(jax.random.fold_in(key, b * t), b, t, full_bits, results, kernel_kwargs)
    path = common.write_result("decode_attention", results, args.out)
    log(f"[{time.time() - start:.0f}s] wrote {path}")
  table = summarize(results)
  path = common.write_result("decode_attention", results, args.out)
  common.print_table(table, ["B", "T", "bits", "kernel", "ours_ms", "cudnn_ms", "x_cudnn_bf16",
                             "x_pallas_bf16", "x_bf16_jnp", "x_fp32_jnp", "ceiling_frac",
                             "cudnn_ceiling_frac"])
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
