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
model's greedy argmax (on the H200 they parted ~225 steps in on 2026-12-01, every code
buffer identical; ~110 steps in on 2026-12-02, the kernel rounding differently since, so the
blocks coded from the tokens after that differ too: `layers_together_gpu.json`, where
`--compare same` shows the device's runs are otherwise identical, and `--compare codes`
that the layers' flush vmapped together writes each layer's codes bit for bit).
What parts them is the int8 kernel's p·‖v‖ scale, the cache's value-norm bound
(`TileCodes.norm_max`), which the block completed at 1,024 raises at step 24 in the
step-by-step flush but only after the call in the lazy loop: with each step's own max
(`--p-scale step`) the two decode the same 384 tokens, with the bound they part at step 24
(`lazy_codes_pscale_gpu.json`, H200). Both are valid scales (upper bounds of the norms
read); the tokens differ only at the random model's near-ties.
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


def _each_layer_alone(caches):
  """`kv_cache._flush_grouped` as before the layers' flush went together: each cache
  flushes alone (one compiled copy of the work per layer)."""
  return [c.flush() for c in caches]


def _step_p_scale(partials):
  """The Mosaic kernel with p·‖v‖'s int8 scale from each step's own max (p_scale="step")
  instead of the cache's value-norm bound, which a block's codes raise when they are
  written: at its step in the step-by-step flush, after the call in the lazy loop."""
  def call(*args, value_bound=None, p_scale=None, **kw):
    del value_bound, p_scale
    return partials(*args, p_scale="step", **kw)
  return call


def run(cache_name: str, batch: int = 8, context: int = 2048, filled: int = 1000,
        steps: int = 128, compare: str = "lazy", p_scale: str = "bound") -> dict:
  """384 steps in calls of `steps` (a divisor of 128); the caches compared after 256.
  compare="lazy": lazy codes against the step-by-step flush; "same": the default loop
  twice (the device's run-to-run numerics). p_scale: the int8 kernel's ("bound", the
  library's default, or "step": `_step_p_scale`)."""
  if 128 % steps:
    raise ValueError(f"steps must divide 128, got {steps}")
  if p_scale not in ("bound", "step"):
    raise ValueError(f"p_scale must be 'bound' or 'step', got {p_scale!r}")
  from pallas_kernels import decode_attention_mgpu as dm
  partials = dm.decode_partials
  if p_scale == "step":
    dm.decode_partials = _step_p_scale(partials)
  try:
    return _run(cache_name, batch, context, filled, steps, compare) | {"p_scale": p_scale}
  finally:
    dm.decode_partials = partials


def _run(cache_name, batch, context, filled, steps, compare):
  calls, compared = 384 // steps, 256
  from benchmarks import step_profile
  from models.generate import decode_loop
  got = {}
  for first in (True, False):
    lazy = first or compare == "same"
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
    got[first] = (np.concatenate(outs, axis=1), leaves)
  (t_lazy, c_lazy), (t_step, c_step) = got[True], got[False]
  differ = {}
  for (path, a), (_, b) in zip(c_lazy, c_step):
    if a.size and not np.array_equal(a, b):
      differ[path] = float(np.mean(a.view(np.uint8) != b.view(np.uint8)))
  before = compared
  parted = np.flatnonzero(np.any(t_lazy != t_step, axis=0))
  return {"cache": cache_name, "compare": compare, "batch": batch, "filled": filled,
          "steps": steps * calls,
          "tokens_equal_before_codes_read": bool(np.array_equal(t_lazy[:, :before],
                                                                t_step[:, :before])),
          "tokens_equal": bool(np.array_equal(t_lazy, t_step)),
          "tokens_equal_fraction": float(np.mean(t_lazy == t_step)),
          "first_differing_step": int(parted[0]) if parted.size else None,
          "buffers": len(c_lazy), "steps_compared": before,
          "differing_byte_fraction": differ}


def codes_together_vs_each(cache_name: str, batch: int = 8, context: int = 2048,
                           filled: int = 1000, steps: int = 40) -> dict:
  """The same appends (random tokens, the step completing a block at 1,024 among them),
  each step flushed by `kv_cache.flush_caches` with the layers' work vmapped together (the
  default) and with each layer's own: the fraction of differing bytes per buffer (no
  decoder, so no token can part the two runs' inputs)."""
  import functools

  from benchmarks import step_profile
  from turboquant_jax import kv_cache
  _, _, caches = step_profile.model_with_caches(cache_name, 2, batch, context, filled)
  c0 = caches[0]
  shape = (steps, len(caches), batch, 1, c0.num_kv_heads, c0.head_dim)
  k = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.bfloat16)
  v = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.bfloat16)

  def step(cs, kv):
    cs = [c.update(kk, vv) for c, kk, vv in zip(kv_cache.deferring(cs), *kv)]
    return kv_cache.flush_caches(cs), None

  grouped, out = kv_cache._flush_grouped, {}
  for name, fn in (("together", grouped), ("each", _each_layer_alone)):
    kv_cache._flush_grouped = fn
    try:
      done, _ = jax.jit(functools.partial(jax.lax.scan, step))(caches, (k, v))
    finally:
      kv_cache._flush_grouped = grouped
    out[name] = [(jax.tree_util.keystr(p), np.asarray(x))
                 for p, x in jax.tree_util.tree_leaves_with_path(done)]
  differ = {path: float(np.mean(a.view(np.uint8) != b.view(np.uint8)))
            for (path, a), (_, b) in zip(out["together"], out["each"])
            if a.size and not np.array_equal(a, b)}
  return {"cache": cache_name, "compare": "codes", "batch": batch, "filled": filled,
          "steps": steps, "buffers": len(out["each"]), "differing_byte_fraction": differ}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache", default="tq3.5-k4v3-int8-prerotated")
  parser.add_argument("--steps", type=int, default=128,
                      help="steps per call (a divisor of 128; 16: most calls complete no "
                           "block, and decode_loop codes only in those that do)")
  parser.add_argument("--batch", type=int, default=8,
                      help="rows (1: a ring small enough to take tokens by a select, "
                           "exact_tokens.RING_SELECT_BYTES)")
  parser.add_argument("--compare", default="lazy", choices=("lazy", "codes", "same"),
                      help="lazy: lazy codes against the step-by-step flush; codes: the "
                           "layers' flush vmapped together against each layer's own, on "
                           "random appends (no decoder); same: "
                           "the default loop twice (how far the device's own run-to-run "
                           "numerics part the tokens)")
  parser.add_argument("--p-scale", default="bound", choices=("bound", "step"),
                      help="the int8 kernel's p·‖v‖ scale (step: independent of when the "
                           "block's codes raise the value-norm bound)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.compare == "codes":
    row = codes_together_vs_each(args.cache, batch=args.batch)
    path = common.write_result("lazy_codes_check", {"rows": [row]},
                               pathlib.Path(args.out) if args.out else None)
    print(f"{row['cache']} (codes): buffers differing: "
          f"{row['differing_byte_fraction'] or 'none'}")
    print(path)
    return
  row = run(args.cache, batch=args.batch, steps=args.steps, compare=args.compare,
            p_scale=args.p_scale)
  path = common.write_result("lazy_codes_check", {"rows": [row]},
                             pathlib.Path(args.out) if args.out else None)
  print(f"{row['cache']} ({row['compare']}, p_scale {row['p_scale']}): tokens equal "
        f"{row['tokens_equal']} (first differing step {row['first_differing_step']}, "
        f"{row['tokens_equal_fraction']:.4f}; before codes are read "
        f"{row['tokens_equal_before_codes_read']}); buffers differing after "
        f"{row['steps_compared']} steps: {row['differing_byte_fraction'] or 'none'}")
  print(path)


if __name__ == "__main__":
  main()
