"""Nearest-neighbour search: TurboQuantIndex against exhaustive search and FAISS PQ.

    python -m benchmarks.nn_search            # CPU: real and synthetic sets, FAISS if installed
    python -m benchmarks.nn_search --gpu      # GPU: scoring throughput vs the HBM ceiling

Datasets (inner-product search, the ground truth exhaustive float32 search):
- real: top-k next-token retrieval. The database is a model's unembedding matrix
  (SmolLM2-135M 49152×576, Gemma 3 270M 262144×640), the queries its final hidden states
  on real text, so the true top-1 is the model's greedy next token.
- synthetic: unit vectors with a decaying spectrum (as learned embeddings have),
  d ∈ {128, 200, 1536}.

Per set and bit width (2, 4), for both quantizers: recall@1@k (is the true nearest in our
top k, k = 1..64), recall@10 (10@10), indexing time and queries/s; beside FAISS IndexPQ
with 8-bit sub-quantizers at the largest M dividing d with at most our bytes per vector
(so PQ never has more bytes), trained on 16,384 vectors, and IndexFlatIP. FAISS is optional (`pip install faiss-cpu`).

GPU mode: the scoring kernel over 2^20 vectors of d=128 for several query batches, the
device time of a whole search, the bytes it reads as a fraction of the HBM read ceiling
measured in the same run, beside the jnp path and a bf16 exhaustive matmul + top-k.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from turboquant_jax.index import TurboQuantIndex

KS = (1, 2, 4, 8, 16, 32, 64)


def log(*args):
  print(*args, flush=True)


# -- data -------------------------------------------------------------------------------------

def synthetic(d: int, n: int, num_queries: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  spectrum = (1.0 / np.arange(1, d + 1)) ** 0.5
  basis = np.linalg.qr(rng.standard_normal((d, d)))[0]

  def draw(m):
    x = (rng.standard_normal((m, d)) * spectrum) @ basis.T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return draw(n), draw(num_queries)


def real(name: str, num_queries: int):
  from benchmarks.quality import MODELS, PERPLEXITY_TEXT, load_text
  from models import evaluation, gguf_loader
  from models.tokenizer import tokenizer_from_gguf
  model, f = gguf_loader.load_gguf(MODELS[name]())
  tok = tokenizer_from_gguf(f)
  ids = tok.encode(load_text(PERPLEXITY_TEXT))[:num_queries]
  hidden = evaluation.final_hidden_states(model, jnp.asarray([ids]))[0]
  return np.asarray(evaluation.unembedding(model)), np.asarray(hidden)


def exact_top(db: np.ndarray, queries: np.ndarray, k: int = 64, chunk: int = 65536):
  """[Q, k] ids of the exact top k by inner product (float32, chunked)."""
  best_s = np.full((len(queries), 0), -np.inf, np.float32)
  best_i = np.zeros((len(queries), 0), np.int64)
  for start in range(0, len(db), chunk):
    s = queries @ db[start:start + chunk].T
    i = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
    s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
    keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
    best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
  return best_i


def recalls(found: np.ndarray, truth: np.ndarray) -> dict:
  """recall@1@k for k in KS (found [Q, ≥64]) and recall@10 = |top10 ∩ true top10| / 10."""
  out = {f"r1@{k}": float(np.mean([truth[q, 0] in found[q, :k] for q in range(len(truth))]))
         for k in KS if k <= found.shape[1]}
  out["r10@10"] = float(np.mean([len(set(found[q, :10]) & set(truth[q, :10])) / 10
                                 for q in range(len(truth))]))
  return out


# -- methods ----------------------------------------------------------------------------------

def run_ours(db, queries, truth, bits, quantizer):
  d = db.shape[1]
  warm = TurboQuantIndex(d, bits, "ip", quantizer)
  warm.add(db[:min(len(db), warm.config.block_size)])  # compile the add path once
  warm.search(queries, 64)
  index = TurboQuantIndex(d, bits, "ip", quantizer)
  start = time.perf_counter()
  index.add(db)
  jax.block_until_ready(index._blocks[-1]["sq_norms"])
  add_s = time.perf_counter() - start
  index.search(queries, 64)  # compile for this database size
  start = time.perf_counter()
  _, found = index.search(queries, 64)
  search_s = time.perf_counter() - start
  return {"method": f"turboquant {quantizer}", "bits": bits,
          "bytes_per_vector": index.bytes_per_vector(), "index_seconds": add_s,
          "train_seconds": 0.0, "queries_per_s": len(queries) / search_s,
          **recalls(found, truth)}


def pq_sizes(d: int, target_bytes: int) -> list[int]:
  divisors = [m for m in range(1, d + 1) if d % m == 0]
  below = max(m for m in divisors if m <= target_bytes)
  return [below]


def _faiss_add_and_search(index, db, queries):
  """(seconds to add db, seconds to search the top 64, found ids) of a FAISS index."""
  start = time.perf_counter()
  index.add(db)
  add_s = time.perf_counter() - start
  start = time.perf_counter()
  _, found = index.search(queries, 64)
  return add_s, time.perf_counter() - start, found


def run_faiss_pq(faiss, db, queries, truth, m):
  d = db.shape[1]
  index = faiss.IndexPQ(d, m, 8, faiss.METRIC_INNER_PRODUCT)
  # k-means on 64 points per centroid (16,384 vectors) instead of FAISS's 256: 4x less
  # training time for PQ, at a small cost in its recall.
  index.pq.cp.max_points_per_centroid = 64
  start = time.perf_counter()
  index.train(db)
  train_s = time.perf_counter() - start
  add_s, search_s, found = _faiss_add_and_search(index, db, queries)
  return {"method": "faiss IndexPQ", "M": m, "bytes_per_vector": m,
          "train_seconds": train_s, "index_seconds": train_s + add_s,
          "queries_per_s": len(queries) / search_s, **recalls(found, truth)}


def run_faiss_flat(faiss, db, queries, truth):
  index = faiss.IndexFlatIP(db.shape[1])
  add_s, search_s, found = _faiss_add_and_search(index, db, queries)
  return {"method": "faiss IndexFlatIP", "bytes_per_vector": 4 * db.shape[1],
          "train_seconds": 0.0, "index_seconds": add_s,
          "queries_per_s": len(queries) / search_s, **recalls(found, truth)}


def cpu_benchmark(args) -> dict:
  try:
    import faiss
  except ImportError:
    faiss = None
    log("faiss not installed: FAISS baselines skipped (pip install faiss-cpu)")
  sets = {}
  for name in args.real:
    sets[name] = lambda name=name: real(name, args.queries)
  for d in args.synthetic:
    n = args.n if d < 1000 else args.n // 5
    sets[f"synthetic d={d}"] = lambda d=d, n=n: synthetic(d, n, args.queries)
  results = {}
  for name, make in sets.items():
    db, queries = make()
    truth = exact_top(db, queries)
    rows = []
    for bits in args.bits:
      for quantizer in ("mse", "prod"):
        rows.append(run_ours(db, queries, truth, bits, quantizer))
        log(name, rows[-1])
      if faiss is not None:
        for m in pq_sizes(db.shape[1], rows[-2]["bytes_per_vector"]):
          rows.append({"bits_matched": bits, **run_faiss_pq(faiss, db, queries, truth, m)})
          log(name, rows[-1])
    if faiss is not None:
      rows.append(run_faiss_flat(faiss, db, queries, truth))
    results[name] = {"n": len(db), "d": db.shape[1], "queries": len(queries), "rows": rows}
  return results


# -- GPU scoring throughput -------------------------------------------------------------------

def gpu_benchmark(args) -> dict:
  from benchmarks.decode_attention import read_ceiling
  from turboquant_jax import index as index_lib
  ceiling = read_ceiling()
  log("read ceiling TB/s", ceiling / 1e12)
  d, n, k = 128, args.gpu_n, 10
  rng = np.random.default_rng(0)
  out = {"read_ceiling_bytes_per_s": ceiling, "d": d, "n": n, "k": k, "rows": []}
  db = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32)
  db = db / jnp.linalg.norm(db, axis=1, keepdims=True)
  db_bf16 = db.astype(jnp.bfloat16)
  for bits in args.bits:
    index = TurboQuantIndex(d, bits, "ip", block_size=args.block_size)
    for start in range(0, n, 1 << 18):
      index.add(np.asarray(db[start:start + (1 << 18)]))
    valid = [jnp.asarray(v) for v in index._valid]
    blocks = [(b["codes"], b["sq_norms"], v) for b, v in zip(index._blocks, valid)]
    offsets = jnp.arange(len(blocks), dtype=jnp.int32) * index.config.block_size
    code_bytes = sum(sum(int(x.nbytes) for x in jax.tree.leaves(b["codes"]))
                     + int(v.nbytes) for b, v in zip(index._blocks, valid))
    out.setdefault("sweep", {})[bits] = sweep(index, blocks, ceiling, code_bytes, rng, d, k)
    for num_q in args.gpu_queries:
      q = jnp.asarray(rng.standard_normal((num_q, d)), jnp.float32)
      row = {"bits": bits, "queries": num_q, "bytes_read": code_bytes}
      for label, use_kernel in (("kernel", True), ("jnp", False)):
        f = lambda q, uk=use_kernel: index_lib._scan_blocks(  # noqa: E731
            index.quantizer, q, blocks, offsets, k=k, metric="ip", use_kernel=uk,
            interpret=False)
        row[f"{label}_s"] = common.device_time(f, q, calls=5, repeats=7)
        row[f"{label}_ids"] = np.asarray(f(q)[1])
      row["kernel_equals_jnp"] = float(np.mean(row.pop("kernel_ids") == row.pop("jnp_ids")))
      exact = jax.jit(lambda q: jax.lax.top_k(
          jnp.dot(q.astype(jnp.bfloat16), db_bf16.T, preferred_element_type=jnp.float32), k))
      row["bf16_exhaustive_s"] = common.device_time(exact, q, calls=5, repeats=7)
      row["kernel_ceiling_frac"] = code_bytes / row["kernel_s"] / ceiling
      row["bf16_ceiling_frac"] = db_bf16.nbytes / row["bf16_exhaustive_s"] / ceiling
      row["kernel_vectors_per_s"] = n / row["kernel_s"]
      row["x_vs_bf16_exhaustive"] = row["bf16_exhaustive_s"] / row["kernel_s"]
      out["rows"].append(row)
      log(row)
  return out


def sweep(index, blocks, ceiling, code_bytes, rng, d, k, num_q=64):
  """Kernel settings at 64 queries over one block of the whole database: device time."""
  from pallas_kernels import index_scoring
  codes, sq, valid = blocks[0]
  q = jnp.asarray(rng.standard_normal((num_q, d)), jnp.float32)
  q_t = (index.quantizer.rotate_queries(q),)
  rows = []
  settings = [(tiles, warps, dtype) for tiles in (4, 16) for warps in (4, 8)
              for dtype in (jnp.float32, jnp.bfloat16)]
  block_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(codes)) + int(valid.nbytes)
  for tiles, warps, dtype in settings:
    kw = dict(k=k, metric="ip", tiles_per_program=tiles, num_warps=warps, compute_dtype=dtype)
    f = lambda q_t, kw=kw: index_scoring.block_top_k(  # noqa: E731
        index.quantizer, q_t, codes, sq, valid, **kw)
    try:
      t = common.device_time(f, q_t, calls=5, repeats=5)
    except Exception as e:  # a setting that fails to compile is reported, not fatal
      log("sweep", tiles, warps, dtype.__name__, "failed:", type(e).__name__, str(e)[:300])
      continue
    rows.append({"tiles_per_program": tiles, "num_warps": warps,
                 "compute_dtype": jnp.dtype(dtype).name, "seconds": t,
                 "ceiling_frac": block_bytes / t / ceiling})
    log("sweep", rows[-1])
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="scoring throughput on the GPU")
  parser.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
  parser.add_argument("--real", type=lambda s: [x for x in s.split(",") if x],
                      default=["smollm2", "gemma3"])
  parser.add_argument("--synthetic", type=lambda s: [int(x) for x in s.split(",") if x],
                      default=[128, 200, 1536])
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--gpu-n", type=int, default=1 << 20)
  parser.add_argument("--gpu-queries", type=lambda s: [int(x) for x in s.split(",")],
                      default=[16, 64, 256])
  parser.add_argument("--block-size", type=int, default=1 << 20)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.gpu:
    result = gpu_benchmark(args)
    path = common.write_result("nn_search_scoring", result, args.out)
    common.print_table(result["rows"], ["bits", "queries", "kernel_s", "jnp_s",
                                        "bf16_exhaustive_s", "kernel_ceiling_frac",
                                        "bf16_ceiling_frac", "x_vs_bf16_exhaustive",
                                        "kernel_equals_jnp"])
  else:
    result = {"datasets": cpu_benchmark(args)}
    path = common.write_result("nn_search", result, args.out)
    for name, r in result["datasets"].items():
      print(f"\n{name}: n={r['n']} d={r['d']} queries={r['queries']}")
      common.print_table(r["rows"], ["method", "bits", "M", "bytes_per_vector", "r1@1", "r1@4",
                                     "r1@16", "r1@64", "r10@10", "index_seconds",
                                     "queries_per_s"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
