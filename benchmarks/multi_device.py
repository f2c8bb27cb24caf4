"""Scaling over the GPUs of one host: decode attention and index search, 1 GPU vs n.

Decode attention: Llama-3-8B's attention shape (32 q / 8 kv heads, d = 128), one query
token, batch 8 at 32K and 128K tokens; the compressed cache (3 and 3.5 bits) and the bf16
cache (cuDNN), on one GPU, then as a `ShardedKVCache` with the kv heads split over n GPUs
(each attends over its own heads: the Pallas kernel under `shard_map`, no cache traffic).
Index search: 2^22 vectors of d = 128 at 4 bits, 64 queries, k = 10, on one GPU, then with
the rows split over n GPUs (per-device top-k and a merge), with the default block size
(16,384 rows: 256 blocks, many small launches) and with blocks of 262,144 rows.

Decode steps: the Llama-3-8B-like model (random bf16 weights), batch 8 at 32K, on one GPU
and tensor-parallel over n (`models.sharding.shard_decoder` with sharded caches).

Strong scaling: the same problem on 1 and n devices, efficiency = t_1 / (n · t_n).
Device time: calls queued, one block (`common.device_time`).

    python -m benchmarks.multi_device [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from benchmarks import common
from benchmarks.decode_e2e import CACHES
from turboquant_jax.index import TurboQuantIndex
from turboquant_jax.sharding import sharded

HQ, HKV, D = 32, 8, 128


def log(*args):
  print(*args, flush=True)


def filled(make, batch, tokens, key, chunk=8192):
  cache = make(batch, tokens, HKV, D, jnp.bfloat16)
  update = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  for start in range(0, tokens, chunk):
    kk, kv = jax.random.split(jax.random.fold_in(key, start))
    shape = (batch, min(chunk, tokens - start), HKV, D)
    cache = update(cache, jax.random.normal(kk, shape, jnp.bfloat16),
                   jax.random.normal(kv, shape, jnp.bfloat16))
  return cache


def attention_scaling(mesh, batch, tokens, key) -> list[dict]:
  n = mesh.size
  q = jax.random.normal(key, (batch, 1, HQ, D), jnp.bfloat16)
  attend = jax.jit(lambda c, q: c.attend(q))
  rows = []
  for name, make in CACHES.items():
    one = filled(make, batch, tokens, key)
    t1 = common.device_time(attend, one, q)
    ref = attend(one, q)
    del one
    many = filled(sharded(make, mesh), batch, tokens, key)
    tn = common.device_time(attend, many, q)
    err = float(jnp.max(jnp.abs((attend(many, q) - ref).astype(jnp.float32))))
    del many
    rows.append({"what": "decode_attention", "cache": name, "batch": batch, "tokens": tokens,
                 "devices": n, "t1_ms": t1 * 1e3, "tn_ms": tn * 1e3, "speedup": t1 / tn,
                 "efficiency": t1 / (n * tn), "max_abs_diff_vs_one_device": err})
    log(rows[-1])
  return rows


def index_scaling(devices, n_rows, key, block_size, k=10, num_q=64, bits=4) -> dict:
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((num_q, D)), jnp.float32)
  times, ids = {}, {}
  for label, devs in (("one", devices[:1]), ("all", devices)):
    index = TurboQuantIndex(D, bits, "ip", devices=devs, block_size=block_size)
    chunk = 1 << 20
    for start in range(0, n_rows, chunk):
      index.add(np.asarray(jax.random.normal(jax.random.fold_in(key, start), (chunk, D))))
    scan = lambda qq: index._scan(qq, k, None)  # noqa: E731 - device arrays, no host sync
    times[label] = common.device_time(scan, q)
    ids[label] = index.search(np.asarray(q), k)[1]
    index = None  # frees the device memory before the next placement
  n = len(devices)
  row = {"what": "index_search", "rows": n_rows, "block_size": block_size, "bits": bits,
         "queries": num_q, "k": k, "devices": n, "t1_ms": times["one"] * 1e3,
         "tn_ms": times["all"] * 1e3, "speedup": times["one"] / times["all"],
         "efficiency": times["one"] / (n * times["all"]),
         "same_ids_as_one_device": bool(np.array_equal(ids["one"], ids["all"]))}
  log(row)
  return row


def decode_scaling(mesh, batch=8, tokens=32768) -> list[dict]:
  """Whole decode steps of the Llama-3-8B-like model (random bf16 weights): one GPU, then
  tensor-parallel over the mesh's model axis with sharded caches (benchmarks.decode_e2e)."""
  from flax import nnx
  from benchmarks import decode_e2e
  from models import config as model_config
  from models.decoder import Decoder
  from models.sharding import shard_decoder
  cfg = model_config.llama3_8b()
  model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  rows = []
  for name in ("bf16", "tq3.5"):
    one = decode_e2e.run_point(model, cfg, CACHES[name], batch, tokens, jax.random.PRNGKey(1))
    rows.append({"what": "decode_step", "cache": name, "batch": batch, "tokens": tokens,
                 "devices": 1, "tokens_per_s": one["tokens_per_s"], "step_ms": one["step_ms"]})
    log(rows[-1])
  model = shard_decoder(model, mesh)
  for name in ("bf16", "tq3.5"):
    many = decode_e2e.run_point(model, cfg, sharded(CACHES[name], mesh), batch, tokens,
                                jax.random.PRNGKey(1))
    one = next(r for r in rows if r["cache"] == name)
    rows.append({"what": "decode_step", "cache": name, "batch": batch, "tokens": tokens,
                 "devices": mesh.size, "tokens_per_s": many["tokens_per_s"],
                 "step_ms": many["step_ms"], "t1_ms": one["step_ms"], "tn_ms": many["step_ms"],
                 "speedup": one["step_ms"] / many["step_ms"],
                 "efficiency": one["step_ms"] / (mesh.size * many["step_ms"])})
    log(rows[-1])
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=None)
  parser.add_argument("--index-rows", type=int, default=1 << 22)
  parser.add_argument("--parts", default="attention,index,decode",
                      help="what to measure; the rows of the others are kept from the "
                           "committed results")
  args = parser.parse_args(argv)
  devices = jax.devices()
  if len(devices) < 2:
    raise SystemExit("needs at least two devices")
  mesh = jax.make_mesh((1, len(devices)), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  key = jax.random.PRNGKey(0)
  parts = set(args.parts.split(","))
  kept = common.RESULTS_DIR / f"multi_device_{jax.devices()[0].platform}.json"
  rows = []
  if kept.exists():
    import json
    rows = [r for r in json.loads(kept.read_text())["rows"]
            if {"decode_attention": "attention", "index_search": "index",
                "decode_step": "decode"}[r["what"]] not in parts]
  start = time.time()
  if "attention" in parts:
    for tokens in (32768, 131072):
      rows += attention_scaling(mesh, 8, tokens, jax.random.fold_in(key, tokens))
      common.write_result("multi_device", {"rows": rows}, args.out)
  if "index" in parts:
    for block_size in (16384, 262144):
      rows.append(index_scaling(devices, args.index_rows, key, block_size))
      common.write_result("multi_device", {"rows": rows}, args.out)
  if "decode" in parts:
    rows += decode_scaling(mesh)
  path = common.write_result("multi_device", {
      "rows": rows, "timing": "median of 21 samples of 10 queued calls, one block",
      "scaling": "strong: the same problem on 1 and n devices, efficiency t1 / (n tn)",
      "mesh": "kv heads over the model axis (attention); index blocks round-robin"},
      args.out)
  log(f"[{time.time() - start:.0f}s]")
  common.print_table(rows, ["what", "cache", "batch", "tokens", "rows", "block_size",
                            "devices", "t1_ms",
                            "tn_ms", "speedup", "efficiency"])
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
