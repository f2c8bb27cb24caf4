"""The decode loop's lazy block codes against the step-by-step flush, on the device.

    python -m benchmarks.lazy_codes_check [--cache tq3.5-k4v3-int8-prerotated] [--batch 8]
        [--steps 128] [--out DIR]

A decoder of Llama-3-8B's shapes with 2 layers (random bf16 weights) and caches of
`--cache` (a `decode_e2e.CACHES` name) filled with random keys and values to 1,000 tokens
per row (calibrated) decodes 384 greedy steps (3 calls of 128, or `--steps` per call)
twice from the same caches: with `decode_loop`'s default (`lazy_greedy_scan`: no
conditional, the completed blocks coded after the call that completes them) and with
lazy_codes=False (a conditional after every step). After 256 steps no code written since
the fill has been read (the block completed at 1,024 leaves the 256-token window at
1,281), so every code buffer should agree; so
should the tokens, unless the two programs' numerics differ at a near-tie of the random
model's greedy argmax (on the H200 they part ~225 steps in, every code buffer identical).
The last 128 steps read that block's codes. Reports the tokens' agreement and, per
cache buffer that differs after 256 steps, the fraction of differing bytes, to
lazy_codes_check_<platform>.json.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def run(cache_name: str, batch: int = 8, context: int = 2048, filled: int = 1000,
        steps: int = 128) -> dict:
  """384 steps in calls of `steps` (a divisor of 128); the caches compared after 256."""
  if 128 % steps:
    raise ValueError(f"steps must divide 128, got {steps}")
  calls, compared = 384 // steps, 256
  from benchmarks import step_profile
  from models.generate import decode_loop
  got = {}
  for lazy in (True, False):
    _, model, caches = step_profile.model_with_caches(cache_name, 2, batch, context, filled)
    loop = decode_loop(model, steps, lazy_codes=lazy)
    tokens, outs = jnp.zeros((batch,), jnp.int32), []
    for call in range(calls):
      out, caches = loop(tokens, caches)
      tokens = out[:, -1]
      outs.append(np.asarray(out))
      if (call + 1) * steps == compared:   # before a code written lazily is read
        leaves = [(jax.tree_util.keystr(p), np.asarray(x))
                  for p, x in jax.tree_util.tree_leaves_with_path(caches)]
    got[lazy] = (np.concatenate(outs, axis=1), leaves)
  (t_lazy, c_lazy), (t_step, c_step) = got[True], got[False]
  differ = {}
  for (path, a), (_, b) in zip(c_lazy, c_step):
    if a.size and not np.array_equal(a, b):
      differ[path] = float(np.mean(a.view(np.uint8) != b.view(np.uint8)))
  before = compared
  return {"cache": cache_name, "batch": batch, "filled": filled, "steps": steps * calls,
          "tokens_equal_before_codes_read": bool(np.array_equal(t_lazy[:, :before],
                                                                t_step[:, :before])),
          "tokens_equal": bool(np.array_equal(t_lazy, t_step)),
          "tokens_equal_fraction": float(np.mean(t_lazy == t_step)),
          "buffers": len(c_lazy), "steps_compared": before,
          "differing_byte_fraction": differ}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache", default="tq3.5-k4v3-int8-prerotated")
  parser.add_argument("--steps", type=int, default=128,
                      help="steps per call (a divisor of 128; 16: most calls complete no "
                           "block, and decode_loop codes only in those that do)")
  parser.add_argument("--batch", type=int, default=8,
                      help="rows (1: a ring small enough to take tokens by a select, "
                           "exact_tokens.RING_SELECT_BYTES)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  row = run(args.cache, batch=args.batch, steps=args.steps)
  path = common.write_result("lazy_codes_check", {"rows": [row]},
                             pathlib.Path(args.out) if args.out else None)
  print(f"{row['cache']}: tokens equal {row['tokens_equal']} "
        f"({row['tokens_equal_fraction']:.4f}; before codes are read "
        f"{row['tokens_equal_before_codes_read']}); buffers differing after "
        f"{row['steps_compared']} steps: {row['differing_byte_fraction'] or 'none'}")
  print(path)


if __name__ == "__main__":
  main()
