"""Where a decode step's device time goes, kernel by kernel (JAX's profiler).

    python -m benchmarks.step_profile [--caches bf16,tq3-tiles-rope] [--layers 2]
        [--batch 8] [--context 32768] [--out DIR]

Per cache, a decoder of Llama-3-8B's shapes with `--layers` layers (random weights; every
layer costs the same) gets its caches (the `decode_e2e` caches) filled to `--context`
tokens per row; then three phases are compiled and one call of each is traced with
`jax.profiler.trace`: one decode step (`decode_steps`, 1 token), one layer's single-token
append, one layer's attention. The GPU kernels of each trace (the device plane's stream
lines) are summed by kernel name with its numeric suffix dropped, and written to
`step_profile_<platform>.json` with a short table. Kernels on one stream run one after
another, so the sum is the device work of the call; the decode step's sum is per step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import re
import tempfile

def profile_phases(cache_name: str, layers: int, batch: int, context: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks import decode_e2e
  from models.decoder import Decoder
  from models.generate import decode_steps

  cfg = dataclasses.replace(decode_e2e.MODELS["llama3_8b"](), num_layers=layers)
  model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  make = decode_e2e.CACHES[cache_name]
  caches = model.init_caches(batch, context, decode_e2e.layer_caches(cfg, make), jnp.bfloat16)
  caches = decode_e2e.fill_caches(cfg, caches, jax.random.PRNGKey(0), context - 16)
  key = jax.random.PRNGKey(1)
  tokens = jnp.zeros((batch,), jnp.int32)
  k = jax.random.normal(key, (batch, 1, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  q = jax.random.normal(key, (batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  attend = jax.jit(lambda c, q: c.attend(q, scale=cfg.scale))
  phases = {
      "step": lambda c: decode_steps(model, tokens, c, 1)[1],
      "append": lambda c: [decode_e2e.appends(c[0], k, 1)] + c[1:],
      "attend": lambda c: (jax.block_until_ready(attend(c[0], q)), c)[1],
  }
  out = {}
  for phase, call in phases.items():
    for _ in range(2):                     # compile, and settle buffer placements
      caches = jax.block_until_ready(call(caches))
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        caches = jax.block_until_ready(call(caches))
      out[phase] = device_kernels(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  return out


def device_kernels(paths: list[str]) -> list[tuple[str, float]]:
  """(kernel name, µs) of every kernel on the device planes' streams of the traces."""
  from jax.profiler import ProfileData
  rows = []
  for path in paths:
    for plane in ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:"):
        continue
      lines = list(plane.lines)
      streams = [x for x in lines if x.name.startswith("Stream")]
      if not streams:
        raise RuntimeError(f"no stream lines on {plane.name}: {[x.name for x in lines]}")
      for line in streams:
        rows.extend((e.name, e.duration_ns * 1e-3) for e in line.events)
  return rows


def kernel_group(name: str) -> str:
  """A kernel's family: XLA fusions lose their numeric suffix, templates their arguments."""
  name = re.sub(r"\(.*", "", name.split("<")[0])
  return re.sub(r"(_\d+)+$", "", name)


def summarize(rows: list[tuple[str, float]]) -> dict:
  groups = collections.defaultdict(lambda: [0, 0.0])
  for name, us in rows:
    g = groups[kernel_group(name)]
    g[0] += 1
    g[1] += us
  top = sorted(groups.items(), key=lambda kv: -kv[1][1])
  return {"kernels": len(rows), "total_us": sum(us for _, us in rows),
          "groups": [{"kernel": k, "launches": n, "us": us} for k, (n, us) in top]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--caches", default="bf16,tq3-tiles-rope")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--context", type=int, default=32768)
  parser.add_argument("--out", default=None, help="results folder for the JSON")
  args = parser.parse_args(argv)
  from benchmarks import common
  results = {"settings": {"model": "llama3_8b shapes", "layers": args.layers,
                          "batch": args.batch, "context": args.context},
             "profiles": {}}
  for name in args.caches.split(","):
    for phase, rows in profile_phases(name, args.layers, args.batch, args.context).items():
      results["profiles"][f"{name}/{phase}"] = summarize(rows)
      if phase == "attend":   # in launch order, full names: they match an XLA dump's fusions
        results["profiles"][f"{name}/{phase}"]["launches"] = [
            [n, round(us, 3)] for n, us in rows]
      common.write_result("step_profile", results, args.out)
  for name, prof in results["profiles"].items():
    print(f"\n{name}: {prof['kernels']} kernels, {prof['total_us']:.1f} us")
    for g in prof["groups"][:12]:
      print(f"  {g['us']:9.1f} us  {g['launches']:4d}x  {g['kernel'][:90]}")


if __name__ == "__main__":
  main()
