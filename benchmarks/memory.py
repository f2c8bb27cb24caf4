"""Bytes per token per head of the KV cache, counting every buffer, against bf16 and fp32.

    python -m benchmarks.memory
"""

from __future__ import annotations

import jax.numpy as jnp

from benchmarks import common
from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

BATCH, HEADS, MAX_LEN = 1, 8, 32768


def main():
  rows = []
  for d in (64, 128, 256):
    fp32 = DenseKVCache.create(BATCH, MAX_LEN, HEADS, d, jnp.float32).memory_report()
    bf16 = DenseKVCache.create(BATCH, MAX_LEN, HEADS, d, jnp.bfloat16).memory_report()
    row = {"d": d, "fp32": fp32["bytes_per_token_per_head"],
           "bf16": bf16["bytes_per_token_per_head"]}
    for kq in ("mse", "prod"):
      for bits in (2, 2.5, 3, 3.5, 4):
        config = TurboQuantConfig(key_bits=bits, value_bits=bits, key_quantizer=kq)
        rep = TurboQuantKVCache.create(BATCH, MAX_LEN, HEADS, d, jnp.bfloat16,
                                       config=config).memory_report()
        row[f"{kq}_{bits}"] = rep["bytes_per_token_per_head"]
        row[f"{kq}_{bits}_all_buffers_32k"] = rep["bytes_per_token_per_head_all_buffers"]
        row[f"{kq}_{bits}_compression_vs_bf16_32k"] = rep["compression_vs_bf16"]
    rows.append(row)
  path = common.write_result("memory", {"batch": BATCH, "heads": HEADS, "max_len": MAX_LEN,
                                        "rows": rows})
  table = [{"d": r["d"], "fp32": r["fp32"], "bf16": r["bf16"],
            **{f"{b}b": r[f"mse_{b}"] for b in (2, 2.5, 3, 3.5, 4)},
            "3.5b x (all, 32K)": r["mse_3.5_compression_vs_bf16_32k"]} for r in rows]
  common.print_table(table, list(table[0]))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
