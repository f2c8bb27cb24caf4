"""Probe: how much of the 8-bit norms' perplexity cost is their float8 format.

float8_e4m3fn norms (3 mantissa bits, ~3.6% RMS error on a norm) free 0.125-0.25 bits
per coordinate at d = 64, but on SmolLM2's code text they cost: 3.5/3.5 bits, window 256,
+0.00% with float16 norms against +0.43% with float8. This simulates an 8-bit norm on a
log grid (256 codes: 16 steps per octave over 2^-8..2^8, ~1.3% RMS error, what a uint8
log code would store) by rounding every float16-stored norm onto that grid, and runs
`benchmarks.quality` on:

  uniform   3.5/3.5 bits, keys centred before RoPE, window 256 (the default config)
  budget    the 3.5 budget as chosen for float8 norms (`budget_layer_bits`: 3.50 stored
            bits with 8-bit norms), its norms on the log grid instead
  kv        uniform's cache with float16 key norms and float8_e4m3fn value norms (3.875
            stored bits at d = 64): which side's norms the 8-bit format costs (a
            `quality` row now that `norm_dtype` takes a pair; it was measured through a
            patch that gave every value quantizer float8 norms, the same caches)
  budget-kv the budget's widths with float16 key norms and float8_e4m3fn value norms
            (3.60 stored bits: fractional widths hold two key norms): what 16-bit key
            norms buy at the budget (`norm_dtype` as a pair, not simulated)

    python -m benchmarks.quality_norms uniform --model smollm2 --text <file> \\
        [--text-lines a:b] --out <folder> --needle-lengths ""

A probe, not a format: the caches still store float16 (the bits reported are float16's);
the budget row's 3.50 stored bits are those of an 8-bit norm. The uniform row keeps the
float16 row's name: give it an --out folder of its own. SmolLM2 only (the budget's layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import jax.numpy as jnp

from benchmarks import quality
from models import config as model_config
from turboquant_jax import quantizers

LOG_LO, LOG_STEPS = -8.0, 16    # 2^-8 .. 2^8, 16 steps per octave: 256 codes
_store_norms = quantizers.store_norms


def log_grid_norms(norms, dtype):
  """`quantizers.store_norms` with float16 norms rounded onto the 8-bit log grid first."""
  if jnp.dtype(dtype) == jnp.float16:
    x = jnp.log2(jnp.maximum(norms, 2.0 ** LOG_LO))
    x = jnp.clip(jnp.round((x - LOG_LO) * LOG_STEPS), 0, 255) / LOG_STEPS + LOG_LO
    norms = jnp.where(norms > 0, 2.0 ** x, norms)   # zeros stay zero, NaN stays NaN
  return _store_norms(norms, dtype)


def budget_method(budget: float = 3.5, key_norms_16: bool = False) -> quality.Method:
  """The budget chosen for float8 norms, stored as float16 on the log grid, or with
  key_norms_16 with float16 key norms (8 bits more per key norm: 3.60 stored bits)."""
  cfg = model_config.smollm2_135m()
  fp8 = quality.tq_config(norm_dtype=jnp.float8_e4m3fn, window=256)
  layer_bits = quality.budget_layer_bits(budget, cfg.num_layers, cfg.head_dim,
                                         layer_window=cfg.layer_window, config=fp8)
  stored = dataclasses.replace(fp8, norm_dtype=(jnp.float16, jnp.float8_e4m3fn)
                               if key_norms_16 else jnp.float16)
  make = lambda seed: quality.turboquant_per_layer(  # noqa: E731
      dataclasses.replace(stored, seed=seed), layer_bits=layer_bits)
  bits = quality.mean_stored_bits(layer_bits, cfg.head_dim, stored if key_norms_16 else fp8)
  what = "float16 key norms" if key_norms_16 else "log8 norms"
  return quality.Method(f"turboquant budget {budget} {what} window 256", "budget", make,
                        seeded=True, bits=bits)


KV_METHOD = "turboquant 3.5 rope-centred window 256 float16/float8_e4m3fn norms"


@contextlib.contextmanager
def patched(owner, name: str, value):
  """owner.name = value inside the context (the probes' one lever on library internals)."""
  old = getattr(owner, name)
  setattr(owner, name, value)
  try:
    yield
  finally:
    setattr(owner, name, old)


def run_method(rest: list[str], method: quality.Method) -> None:
  """`quality.main` on `method` alone, added to the harness's rows."""
  base = quality.methods
  with patched(quality, "methods", lambda: base() + [method]):
    quality.main([*rest, "--exact", method.name])


PROBES = ("uniform", "budget", "kv", "budget-kv")


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  probe, rest = argv[0], argv[1:]
  if probe not in PROBES:
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
  if "--model" not in rest or rest[rest.index("--model") + 1] != "smollm2" or "--out" not in rest:
    raise ValueError("quality_norms runs --model smollm2 into an --out folder of its own")
  if probe == "kv":   # configs the cache takes (norm_dtype per side): no patch
    quality.main([*rest, "--exact", KV_METHOD])
    return
  if probe == "budget-kv":
    run_method(rest, budget_method(key_norms_16=True))
    return
  with patched(quantizers, "store_norms", log_grid_norms):
    if probe == "uniform":
      quality.main([*rest, "--exact", "turboquant 3.5 rope-centred window 256"])
    else:
      run_method(rest, budget_method())

if __name__ == "__main__":
  main()
