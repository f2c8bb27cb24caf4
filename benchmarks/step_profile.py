"""Where a decode step's device time goes, kernel by kernel (JAX's profiler).

    python -m benchmarks.step_profile [--caches bf16,tq3-tiles-rope] [--layers 2]
        [--batch 8] [--context 32768] [--out DIR]

Per cache, a decoder of Llama-3-8B's shapes with `--layers` layers (random weights; every
layer costs the same) gets its caches (the `decode_e2e` caches) filled to `--context`
tokens per row; then three phases are compiled and one call of each is traced with
`jax.profiler.trace`: one decode step (`decode_loop`, 1 token), one layer's single-token
append, one layer's attention. The GPU kernels of each trace (the device plane's stream
lines) are summed by kernel name with its numeric suffix dropped, and written to
`step_profile_<platform>.json` with a short table. Kernels on one stream run one after
another, so the sum is the device work of the call; the decode step's sum is per step.

`--timeline N` traces one call of N decode steps instead (after two untraced ones; `--calls`
back-to-back calls, each taking the last one's tokens) and
splits its span, first kernel start to last kernel end, into kernel time and idle time
(the GPU waiting for the host to launch), with the idle time summed by the kernel that
ends each gap: whether a step is bound by its kernels or by their launches.

    python -m benchmarks.step_profile --layers 32 --timeline 8 --graphs on,off \
        --caches bf16,tq3.5-k4v3-int8
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import re
import tempfile

def model_with_caches(cache_name: str, layers: int, batch: int, context: int, filled: int,
                      model_name: str = "llama3_8b"):
  """(config, decoder, caches): a `decode_e2e.MODELS` model's shapes (default Llama-3-8B)
  with `layers` layers (random bf16 weights; every layer costs the same) and its
  `decode_e2e` caches of `cache_name` (a `decode_e2e.CACHES` name, no suffix), `filled`
  random tokens per row."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks import decode_e2e
  from models.decoder import Decoder

  cfg = dataclasses.replace(decode_e2e.MODELS[model_name](), num_layers=layers)
  model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  caches = model.init_caches(batch, context, decode_e2e.layer_caches(
      cfg, decode_e2e.CACHES[cache_name]), jnp.bfloat16)
  return cfg, model, decode_e2e.fill_caches(cfg, caches, jax.random.PRNGKey(0), filled)


def profile_phases(cache_name: str, layers: int, batch: int, context: int,
                   model_name: str = "llama3_8b") -> dict:
  import jax
  import jax.numpy as jnp

  from benchmarks import decode_e2e

  base, options = decode_e2e.loop_variant(cache_name)
  cfg, model, caches = model_with_caches(base, layers, batch, context, context - 16,
                                         model_name)
  key = jax.random.PRNGKey(1)
  tokens = jnp.zeros((batch,), jnp.int32)
  k = jax.random.normal(key, (batch, 1, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  q = jax.random.normal(key, (batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  attend = jax.jit(lambda c, q: c.attend(q, scale=cfg.scale))
  step = decode_e2e.make_loop(model, 1, **options)
  phases = {
      "step": lambda c: step(tokens, c)[1],
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


def timeline(cache_name: str, layers: int, batch: int, context: int, steps: int,
             graphs: bool = True, calls: int = 1, sequence: int = 90,
             model_name: str = "llama3_8b") -> dict:
  """`calls` traced calls of `steps` decode steps: their kernels' span, busy and idle time,
  and the tokens they generated (greedy, from caches filled the same way on every call).
  cache_name may carry `decode_e2e.loop_variant` suffixes; `@nographs` overrides graphs."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import decode_e2e

  base, options = decode_e2e.loop_variant(cache_name)
  _, model, caches = model_with_caches(base, layers, batch, context, decode_e2e.warm_start(
      context - (2 + calls) * steps - 16, 256), model_name)   # 256: any cache's block
  tokens = jnp.zeros((batch,), jnp.int32)
  decode = decode_e2e.make_loop(model, steps, **{**options,
                                                 "graphs": graphs and options["graphs"]})
  for _ in range(2):                # compiles the loop and the token slice, untraced
    out, caches = jax.block_until_ready(decode(tokens, caches))
    tokens = out[:, -1]
  tokens = jnp.zeros((batch,), jnp.int32)
  outs = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):        # queued back to back, each call's tokens the last's
        out, caches = decode(tokens, caches)
        tokens = out[:, -1]
        outs.append(out)
      jax.block_until_ready((outs, caches))
    paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    rows = device_kernels(paths)
    host = host_events(paths)
  tokens_out = np.concatenate([np.asarray(o) for o in outs], axis=1).tolist()
  out = idle_split(rows, steps * calls, sequence)
  out["calls"] = calls
  out["tokens"] = tokens_out
  out["host_events"] = [{"event": k, "count_per_step": n / (steps * calls),
                         "us_per_step": us / (steps * calls)}
                        for k, (n, us) in host[:25]]
  return out


def host_events(paths: list[str]) -> list[tuple[str, tuple[int, float]]]:
  """Host-thread trace events summed by name (count, µs), largest first."""
  from jax.profiler import ProfileData
  groups = collections.defaultdict(lambda: [0, 0.0])
  for path in paths:
    for plane in ProfileData.from_file(path).planes:
      if not plane.name.startswith("/host:"):
        continue
      for line in plane.lines:
        if line.name == "python":
          continue
        for e in line.events:
          g = groups[kernel_group(e.name)]
          g[0] += 1
          g[1] += e.duration_ns * 1e-3
  return sorted(((k, tuple(v)) for k, v in groups.items()), key=lambda kv: -kv[1][1])


def idle_split(rows: list[tuple[str, float, float]], steps: int, sequence: int = 90) -> dict:
  """Span, busy and idle µs per step of kernels given as (name, start µs, µs); idle
  time is where no kernel runs, summed by the kernel that ends each gap; the largest
  gaps with the kernels on either side."""
  rows = sorted(rows, key=lambda r: r[1])
  busy, idle, end = 0.0, collections.defaultdict(float), rows[0][1]
  gaps, last = [], rows[0][0]          # (µs, kernel before, kernel after)
  for name, start, us in rows:
    if start > end:
      idle[kernel_group(name)] += start - end
      gaps.append((start - end, last, name))
    busy += max(0.0, start + us - max(start, end))
    if start + us >= end:
      last = name
    end = max(end, start + us)
  span = end - rows[0][1]
  top = sorted(idle.items(), key=lambda kv: -kv[1])[:12]
  first = len(rows) // steps          # the second step's kernels in order, with gaps
  sequence = [[rows[i][0][:60], round(rows[i][1] - rows[i - 1][1] - rows[i - 1][2], 2),
               round(rows[i][2], 2)] for i in range(first, min(len(rows), first + sequence))]
  return {"steps": steps, "kernels_per_step": len(rows) / steps,
          "span_us_per_step": span / steps, "busy_us_per_step": busy / steps,
          "idle_us_per_step": (span - busy) / steps,
          "idle_before": [{"kernel": k, "us_per_step": v / steps} for k, v in top],
          "sequence": sequence,
          "largest_gaps": [{"us": round(g, 2), "after": a[:60], "before": b[:60]}
                           for g, a, b in sorted(gaps, key=lambda g: -g[0])[:3 * steps]],
          "kernels": summarize([(n, us) for n, _, us in rows])}


def device_kernels(paths: list[str]) -> list[tuple[str, float, float]]:
  """(kernel name, start µs, µs) of every kernel on the device planes' streams of the
  traces."""
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
        rows.extend((e.name, e.start_ns * 1e-3, e.duration_ns * 1e-3)
                    for e in line.events)
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
  parser.add_argument("--model", default="llama3_8b", help="a decode_e2e.MODELS name")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--context", type=int, default=32768)
  parser.add_argument("--timeline", type=int, default=0, metavar="STEPS",
                      help="trace STEPS decode steps: kernel vs idle time per step")
  parser.add_argument("--calls", type=int, default=1,
                      help="with --timeline: calls traced back to back (gaps between count)")
  parser.add_argument("--sequence", type=int, default=90,
                      help="with --timeline: kernels of the second step kept in order")
  parser.add_argument("--graphs", default="on", help="with --timeline: on, off or on,off "
                      "(decode with or without models.generate.GRAPH_OPTIONS)")
  parser.add_argument("--out", default=None, help="results folder for the JSON")
  args = parser.parse_args(argv)
  from benchmarks import common
  if args.timeline:
    return main_timeline(args)
  results = {"settings": {"model": f"{args.model} shapes", "layers": args.layers,
                          "batch": args.batch, "context": args.context},
             "profiles": {}}
  for name in args.caches.split(","):
    for phase, rows in profile_phases(name, args.layers, args.batch, args.context,
                                      args.model).items():
      results["profiles"][f"{name}/{phase}"] = summarize([(n, us) for n, _, us in rows])
      if phase == "attend":   # in launch order, full names: they match an XLA dump's fusions
        results["profiles"][f"{name}/{phase}"]["launches"] = [
            [n, round(us, 3)] for n, _, us in rows]
      common.write_result("step_profile", results, args.out)
  for name, prof in results["profiles"].items():
    print(f"\n{name}: {prof['kernels']} kernels, {prof['total_us']:.1f} us")
    for g in prof["groups"][:12]:
      print(f"  {g['us']:9.1f} us  {g['launches']:4d}x  {g['kernel'][:90]}")


def same_tokens(timelines: dict) -> dict[str, bool]:
  """Per cache decoded in several variants (graphs on/off, `decode_e2e.loop_variant`
  suffixes): whether all of them generated the same tokens. Caches run once are left out."""
  from benchmarks import decode_e2e
  groups = collections.defaultdict(list)
  for key, t in timelines.items():
    groups[decode_e2e.loop_variant(key.rsplit(" graphs ", 1)[0])[0]].append(t["tokens"])
  return {name: all(t == runs[0] for t in runs) for name, runs in groups.items()
          if len(runs) > 1}


def main_timeline(args):
  import os

  from benchmarks import common
  results = {"settings": {"model": f"{args.model} shapes", "layers": args.layers,
                          "batch": args.batch, "context": args.context,
                          "steps": args.timeline, "calls": args.calls,
                          "xla_flags": os.environ.get("XLA_FLAGS", "")},
             "timelines": {}}
  for name in args.caches.split(","):
    for graphs in args.graphs.split(","):
      if graphs not in ("on", "off"):
        raise ValueError(f"--graphs takes on and/or off, got {graphs!r}")
      results["timelines"][f"{name} graphs {graphs}"] = timeline(
          name, args.layers, args.batch, args.context, args.timeline, graphs == "on",
          args.calls, args.sequence, args.model)
      common.write_result("step_timeline", results, args.out)
    same = same_tokens(results["timelines"])
    if same:                      # variants of one cache (options, suffixes): same tokens?
      results["same_tokens"] = same
    common.write_result("step_timeline", results, args.out)
  print(f"\n{'cache':34s} {'kernels':>8s} {'span us':>9s} {'busy us':>9s} {'idle us':>8s}"
        "  (per step)")
  print("same tokens across each cache's variants:",
        results.get("same_tokens", "not compared"))
  for name, t in results["timelines"].items():
    print(f"{name:34s} {t['kernels_per_step']:8.0f} {t['span_us_per_step']:9.1f} "
          f"{t['busy_us_per_step']:9.1f} {t['idle_us_per_step']:8.1f}")
    for g in t["idle_before"][:6]:
      print(f"    idle {g['us_per_step']:8.1f} us before {g['kernel'][:70]}")
    for g in t["kernels"]["groups"][:8]:
      print(f"    {g['us'] / t['steps']:9.1f} us {g['launches'] / t['steps']:5.0f}x "
            f"{g['kernel'][:70]}")
    for g in t.get("host_events", [])[:10]:
      print(f"    host {g['us_per_step']:9.1f} us {g['count_per_step']:6.0f}x {g['event'][:60]}")


if __name__ == "__main__":
  main()
