"""End-to-end decode on the GPU: tokens/s and context per GPU, compressed vs bf16 cache.

Real architectures with random bf16 weights (speed does not depend on the values): a
Llama-3-8B-like config, Gemma 3 270M's and SmolLM2-135M's own. For each (batch, context)
and each cache (dense bf16 through cuDNN, TurboQuant at 3 and 3.5 bits) the caches are
filled with random keys and values up to the context, then `models.decode_loop` decodes
greedily: one jitted call of `steps` tokens, caches donated, no host sync per token;
`repeats` calls are queued and blocked on once. Per point it also times one layer's
attention and one layer's single-token append (so the step splits into attention, append
and the rest: the matmuls, norms and logits), and per model the largest batch that fits
in the GPU's memory at each context with each cache (every buffer counted, from the
caches' shapes). Prefill-sized appends (quantize-on-append of a whole chunk) are timed
against the HBM read ceiling measured in the same run.

    python -m benchmarks.decode_e2e [--models llama3_8b,gemma3_270m,smollm2_135m]
        [--points 8x32768,...] [--caches bf16,tq3,...] [--out DIR] [--fresh]
    python -m benchmarks.decode_e2e --paired --points 8x32768 --caches bf16,tq3-tiles-rope

`--paired` times only decode steps, the caches of a point held at once and timed in
alternating rounds (`paired_steps`): the ratio between caches as a median over rounds,
which separate runs (drift of several percent between them) cannot give. A name ending
in `@nographs` decodes with XLA's default compiler options instead of
`models.generate.GRAPH_OPTIONS` (e.g. `--caches bf16,tq3-int8,tq3-int8@nographs`); in
`@layerconds`, with each layer's rare append work under its own conditional instead of
one per step (`models.generate.model_step`'s defer_appends=False); `@stepflush`, with
one conditional after every step (`decode_loop`'s lazy_codes=False, how decode ran before
lazy block codes); the probes of `FLUSH_PROBES` and `TRITON_GEMM` (`make_loop`) bound or
vary what that conditional costs; `@donateall`, with the lazy loop donating and returning
every cache array (`decode_loop`'s undonated_constants=False); `@sinkwrites`, with its
appends writing the sinks every step (hold_sinks=False). `--queue N` also times N
calls queued per round (device time: each call's dispatch overlaps the one before).

Results go to benchmarks/results/decode_e2e_<platform>.json after every point; a rerun
skips the points already there (a long sweep spans several calls), then prints the table
and plots tokens/s against context if matplotlib is installed.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
import traceback

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from models import config as model_config
from models.decoder import Decoder
from models.generate import GRAPH_OPTIONS, decode_loop
from turboquant_jax import exact_tokens, kv_cache
from turboquant_jax.kv_cache import DenseKVCache
from turboquant_jax.layer_policy import window_rings
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

MODELS = {
    "llama3_8b": model_config.llama3_8b,
    "gemma3_270m": model_config.gemma3_270m,
    "smollm2_135m": model_config.smollm2_135m,
}
def tiles(key_bits, value_bits, levels, center_keys, **kw):
  """A TurboQuant cache maker for the Mosaic GPU kernel: codes in tiles."""
  return functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
      key_bits=key_bits, value_bits=value_bits, levels=levels, layout="tiles",
      center_keys=center_keys, **kw))


INT8 = dict(tile_operand="int8")
NO_GRAPHS = "@nographs"   # a paired name's suffix: decode without GRAPH_OPTIONS
LAYER_CONDS = "@layerconds"   # ... and one conditional per layer (defer_appends=False)
# Timing probes of what the deferred work's conditional costs (`make_loop`): no flush at
# all, one conditional per 8 steps, the flush under a 0-or-1-trip while loop, and the
# flush after every step (`decode_loop`'s lazy_codes=False: how decode ran before), the
# lazy loop coding completed blocks after every run without a conditional. The
# first two drop deferred work (their caches are wrong once a block completes: a bound,
# never a result).
FLUSH_PROBES = {"@noflush": "none", "@flush8": "every8", "@whileflush": "while",
                "@stepflush": "step", "@codealways": "lazy-always"}
# ... and the loop compiled with XLA's Triton gemms for every dot (no cuBLAS calls, which
# a CUDA graph records by tracing them).
TRITON_GEMM = "@tritongemm"


DONATE_ALL = "@donateall"   # the lazy loop donates and returns every cache array
SINK_WRITES = "@sinkwrites"   # the lazy loop's appends write the sinks (hold_sinks=False)


def loop_variant(name: str) -> tuple[str, dict]:
  """A decode name's cache and its `make_loop` options, from its suffixes."""
  options = {"graphs": True, "defer_appends": True, "flush": "cond"}
  if DONATE_ALL in name:
    name = name.replace(DONATE_ALL, "")
    options["undonated_constants"] = False
  if SINK_WRITES in name:
    name = name.replace(SINK_WRITES, "")
    options["hold_sinks"] = False
  for suffix, option in ((NO_GRAPHS, "graphs"), (LAYER_CONDS, "defer_appends")):
    if suffix in name:
      name = name.replace(suffix, "")
      options[option] = False
  if TRITON_GEMM in name:
    name = name.replace(TRITON_GEMM, "")
    options["triton_gemm"] = True
  for suffix, how in FLUSH_PROBES.items():
    if suffix in name:
      name = name.replace(suffix, "")
      options["flush"] = how
  if name not in CACHES:
    raise ValueError(f"unknown cache {name!r}; known: {sorted(CACHES)}")
  return name, options


def _while_flush(caches):
  """flush_caches with a while loop of 0 or 1 trips instead of a conditional."""
  at = [i for i, c in enumerate(caches) if getattr(c, "pending", None) is not None]
  if not at:
    return kv_cache.drop_deferred(caches)
  due = jnp.any(jnp.stack([caches[i].flush_due for i in at]))

  def body(state):
    _, cs = state
    return jnp.zeros((), bool), [c.flush().replace(pending=c.pending, defer=True) for c in cs]

  _, done = jax.lax.while_loop(lambda s: s[0], body, (due, [caches[i] for i in at]))
  out = list(caches)
  for i, c in zip(at, done):
    out[i] = c
  return kv_cache.drop_deferred(out)


def make_loop(model, steps: int, graphs: bool = True, defer_appends: bool = True,
              flush: str = "cond", triton_gemm: bool = False,
              undonated_constants: bool = True, hold_sinks: bool = True):
  """`models.decode_loop` with a `loop_variant`'s options; other `flush` values build the
  FLUSH_PROBES loops."""
  if flush in ("cond", "step", "lazy-always") and not triton_gemm:
    return decode_loop(model, steps, graphs=graphs, defer_appends=defer_appends,
                       lazy_codes=flush != "step", codes_when_due=flush != "lazy-always",
                       undonated_constants=undonated_constants, hold_sinks=hold_sinks)
  from models.generate import _check_tokens
  graphdef, state = nnx.split(model)
  group = 8 if flush == "every8" else 1
  if steps % group:
    raise ValueError(f"{flush} decodes {group} steps at a time, not {steps}")

  def loop(state, tokens, caches):
    model = nnx.merge(graphdef, state)

    def body(carry, _):
      token, caches = carry
      out = []
      for i in range(group):
        logits, caches = model(token[:, None], caches=kv_cache.deferring(caches))
        if flush == "cond":
          caches = kv_cache.flush_caches(caches)
        elif flush == "while":
          caches = _while_flush(caches)
        elif flush == "every8" and i == group - 1:
          caches = kv_cache.flush_caches(caches)
        else:
          caches = kv_cache.drop_deferred(caches)
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        out.append(token)
      return (token, caches), jnp.stack(out)

    (_, caches), out = jax.lax.scan(body, (tokens, caches), None, length=steps // group)
    return out.reshape(steps, -1).T, caches

  options = dict(GRAPH_OPTIONS) if graphs else {}
  if triton_gemm:
    options["xla_gpu_triton_gemm_any"] = True
  jitted = jax.jit(loop, donate_argnames=("caches",), compiler_options=options or None)
  return lambda tokens, caches: jitted(state, _check_tokens(tokens, caches), list(caches))


CACHES = {
    "bf16": DenseKVCache.create,
    "tq3": functools.partial(TurboQuantKVCache.create,
                             config=TurboQuantConfig(key_bits=3, value_bits=3)),
    "tq3.5": functools.partial(TurboQuantKVCache.create,
                               config=TurboQuantConfig(key_bits=3.5, value_bits=3.5)),
    # The Mosaic GPU kernel's cache (Hopper): tiles layout, cubic levels, keys centred
    # after RoPE, or before it (the kernel adds q·R(t)·μ per 128-token step).
    "tq3-tiles": tiles(3, 3, "cubic", "plain"),
    "tq3-tiles-rope": tiles(3, 3, "cubic", "rope"),
    "tq3.5-tiles-rope": tiles(3.5, 3.5, "cubic", "rope"),
    # The same with quintic levels: Lloyd-Max's D_mse within 0.16% (one more op per pair).
    "tq3.5-quintic-rope": tiles(3.5, 3.5, "quintic", "rope"),
    # The int8 path: byte tiles decoded by byte permutes into int8 wgmma operands, levels
    # Lloyd-Max on an int8 grid (`codebook.int8_codebook`); queries in two int8 parts.
    "tq3-int8": tiles(3, 3, "int8", "plain", **INT8),
    "tq3-int8-rope": tiles(3, 3, "int8", "rope", **INT8),
    "tq3.5-int8-rope": tiles(3.5, 3.5, "int8", "rope", **INT8),
    # 3.5 bits as 4-bit keys and 3-bit values: 128-token tiles, no channel groups (the
    # groups' 256-token tiles and serial passes cost the kernel time).
    "tq3.5-k4v3-int8": tiles(4, 3, "int8", "plain", **INT8),
    # The same with values the decoder rotated (`values_prerotated`): no inverse rotation
    # after the kernel. A model serving it folds `value_rotation` into its value and output
    # projections (`models.decoder.fold_value_rotations`): their values change, not their
    # shapes or cost, so the timed model is the unfolded one.
    "tq3.5-k4v3-int8-prerotated": tiles(4, 3, "int8", "plain", values_prerotated=True,
                                        **INT8),
    # 3 bits on both sides, values prerotated: the grid's 3-bit point of the int8 path
    # (3-bit keys are looked up by byte permutes, no plain nibbles).
    "tq3-int8-prerotated": tiles(3, 3, "int8", "plain", values_prerotated=True, **INT8),
    # 4-bit keys of evenly spaced levels (`codebook.uniform_codebook`) as plain nibbles,
    # decoded by two masks per word instead of a table lookup; values as above.
    "tq3.5-k4uv3-int8-prerotated": tiles(4, 3, ("uniform", "int8"), "plain",
                                         values_prerotated=True, **INT8),
    # The same with the window pinned at 512 tokens: where tiles hold 256 tokens (head_dim
    # 64, SmolLM2) the default since 2026-12-01 (two tiles, so decode codes lazily); the
    # runs that chose it were timed under this name, beside the 256-token window of before.
    "tq3.5-k4v3-int8-prerotated-w512": tiles(4, 3, "int8", "plain", values_prerotated=True,
                                             window=512, **INT8),
    # The same with the 128-token window of the results before the default became 256.
    "tq3.5-k4v3-int8-w128": tiles(4, 3, "int8", "plain", window=128, **INT8),
    "tq3.5-k4v3-int8-rope": tiles(4, 3, "int8", "rope", **INT8),
    "tq3.5-k4v3-quintic": tiles(4, 3, "quintic", "plain"),
    "tq3.5-k4v3-quintic-prerotated": tiles(4, 3, "quintic", "plain", values_prerotated=True),
    "tq3.5-quintic": tiles(3.5, 3.5, "quintic", "plain"),
    "tq4-tiles-rope": tiles(4, 4, "cubic", "rope"),
    # 3.5-bit tiles hold 256 tokens, so the default window is 256 (decode steps defer their
    # codes); with 128 every step re-packs a tile.
    "tq3.5-quintic-rope-w128": tiles(3.5, 3.5, "quintic", "rope", window=128),
}


def fixed_attend_cache(name: str, doc: str, **options) -> type:
  """A `TurboQuantKVCache` subclass whose `attend` always passes `options` (a variant of
  the kernel path, timed side by side with the default under its own cache name)."""
  def attend(self, q, **kwargs):
    return TurboQuantKVCache.attend(self, q, **options, **kwargs)
  return flax.struct.dataclass(type(name, (TurboQuantKVCache,),
                                    {"attend": attend, "__doc__": doc}))


# Variants timed only when named in --caches: (name, base cache, doc, attend options).
VARIANTS = [
    ("tq3-tiles-rope-merge-kernel", "tq3-tiles-rope",
     "ends in `pallas_kernels.merge_exact` instead of jnp", dict(fused_merge=True)),
    ("tq3.5-quintic-rope-merge-kernel", "tq3.5-quintic-rope",
     "ends in `pallas_kernels.merge_exact` instead of jnp", dict(fused_merge=True)),
    ("tq3.5-quintic-rope-jnp-exact", "tq3.5-quintic-rope",
     "attends over the exact window and sinks in jnp (float32 products after the kernel) "
     "instead of in the kernel's last splits", dict(exact_in_kernel=False)),
    ("tq3.5-k4v3-int8-merge-kernel", "tq3.5-k4v3-int8",
     "ends in `pallas_kernels.merge_exact` (one launch for the split merge and the inverse "
     "rotation, the kernel's exact splits merged as unrotated ones) instead of jnp",
     dict(fused_merge=True)),
    ("tq3.5-k4v3-int8-jnp-merge", "tq3.5-k4v3-int8",
     "ends in XLA's merge (the split merge and the inverse rotation in jnp), at every head "
     "dim (the default ends in `merge_exact` up to FUSED_MERGE_MAX_HEAD_DIM)",
     dict(fused_merge=False)),
    ("tq3.5-k4v3-int8-query-prologue", "tq3.5-k4v3-int8",
     "the query's int8 parts, offsets and q·μ from `decode_prologue`, the ranges in jnp",
     dict(prologue="query")),
    ("tq3.5-k4v3-int8-jnp-prologue", "tq3.5-k4v3-int8",
     "the kernel's query parts, offsets and ranges in jnp (about eleven XLA kernels)",
     dict(prologue="off")),
    ("tq3.5-k4v3-int8-packed", "tq3.5-k4v3-int8",
     "p·‖v‖'s two int8 parts as one value operand (the query's as two)",
     dict(pack_p_parts=True, pack_q_parts=False)),
    ("tq3.5-k4v3-int8-unpacked", "tq3.5-k4v3-int8",
     "p·‖v‖'s two int8 parts as two value operands", dict(pack_p_parts=False)),
    ("tq3.5-k4v3-int8-packed-q", "tq3.5-k4v3-int8",
     "p·‖v‖'s and the query's two int8 parts each as one operand",
     dict(pack_p_parts=True, pack_q_parts=True)),
    ("tq3.5-k4v3-int8-prologue-8w", "tq3.5-k4v3-int8",
     "the prologue with 8 warps instead of 4", dict(prologue_warps=8)),
    ("tq3.5-k4v3-int8-prologue-xla", "tq3.5-k4v3-int8",
     "the query rotated by an XLA gemm before the prologue (which then only quantizes, "
     "repeats and packs its real rows)", dict(prologue_rotation="xla")),
    ("tq3.5-k4v3-int8-prologue-dot", "tq3.5-k4v3-int8",
     "the query rotated inside the prologue by Triton's dot (float32 FMAs)",
     dict(prologue_rotation="dot")),
    # (The default since 2026-12-02; these rows were measured against the dot rotation.)
    ("tq3.5-k4uv3-int8-prerotated-rotating", "tq3.5-k4uv3-int8-prerotated",
     "the query rotated inside the Mosaic kernel (a float16 wgmma per CTA), the prologue "
     "only q·μ and the ranges", dict(prologue_rotation="kernel")),
    ("tq3.5-k4uv3-int8-prerotated-prologue-dot", "tq3.5-k4uv3-int8-prerotated",
     "the query rotated inside the prologue by Triton's dot (the default before "
     "2026-12-02)", dict(prologue_rotation="dot")),
    ("tq3-int8-prerotated-rotating", "tq3-int8-prerotated",
     "the query rotated inside the Mosaic kernel (a float16 wgmma per CTA), the prologue "
     "only q·μ and the ranges", dict(prologue_rotation="kernel")),
    ("tq3.5-k4uv3-int8-prerotated-merge-splits", "tq3.5-k4uv3-int8-prerotated",
     "the kernel's splits merged by `merge_exact.merge_splits` (one Triton launch) instead "
     "of XLA's max, reduce and convert", dict(split_merge="kernel")),
    # (merge_splits is the default where it serves since 2026-12-02: these time XLA's.)
    ("tq3.5-k4uv3-int8-prerotated-xla-merge", "tq3.5-k4uv3-int8-prerotated",
     "the kernel's splits merged by XLA's max, reduce and convert (the default before "
     "2026-12-02) instead of `merge_exact.merge_splits`", dict(split_merge="xla")),
    ("tq3.5-k4v3-quintic-prerotated-xla-merge", "tq3.5-k4v3-quintic-prerotated",
     "the kernel's splits merged by XLA's max, reduce and convert instead of "
     "`merge_exact.merge_splits`", dict(split_merge="xla")),
    # (int8 tiles decode values after the softmax since 2026-12-03: this times the old way.)
    ("tq3.5-k4uv3-int8-prerotated-early-values", "tq3.5-k4uv3-int8-prerotated",
     "the value tile decoded under the key wgmma (overlap_values=True, the default before "
     "2026-12-03) instead of after the softmax", dict(overlap_values=True)),
    # (int8 tiles' splits fill the GPU since 2026-12-03, `SPLITS_RULES` "fill": this
    # times the rule before, the divisors' count everywhere.)
    ("tq3.5-k4uv3-int8-prerotated-divisor-splits", "tq3.5-k4uv3-int8-prerotated",
     "as many splits as the best divisor of the steps gives (the rule before 2026-12-03)",
     dict(splits_rule="divisors")),
    ("tq3.5-quintic-rope-table256", "tq3.5-quintic-rope",
     "RoPE offsets from a table as long as the 256-token tiles (the default is 64 rows: "
     "two CTAs per SM, where this leaves one)", dict(rope_table_rows=256)),
]
for _name, _base, _doc, _options in VARIANTS:
  _cls = fixed_attend_cache(
      "".join(w.capitalize() for w in _name.replace(".", "_").split("-")) + "Cache",
      f"A TurboQuant cache timed beside the default; its Mosaic path: {_doc}.", **_options)
  CACHES[_name] = functools.partial(_cls.create, config=CACHES[_base].keywords["config"])
DEFAULT_CACHES = ("bf16", "tq3", "tq3.5", "tq3-tiles", "tq3-tiles-rope", "tq3.5-quintic-rope",
                  "tq4-tiles-rope")
# (batch, context) per model; a point a cache cannot hold is recorded as not fitting.
POINTS = {
    "llama3_8b": [(8, 32768), (1, 4096), (8, 4096), (64, 4096), (1, 32768), (32, 32768),
                  (1, 131072), (8, 131072)],
    "gemma3_270m": [(8, 32768), (1, 4096), (64, 4096), (32, 32768), (8, 131072)],
    "smollm2_135m": [(8, 32768), (1, 4096), (64, 4096), (32, 32768), (8, 131072)],
}
# 128 timed appends and 128 timed steps: a compressed cache codes a block of 128 tokens
# once every 128 single-token appends, so each timing holds exactly one such step.
STEPS, REPEATS, APPENDS = 16, 8, 130
RESERVE_BYTES = 4 * 2**30  # activations, logits, partials and the allocator's slack


def log(*args):
  print(*args, flush=True)


# -- memory ---------------------------------------------------------------------------------

def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def layer_caches(cfg, make_cache):
  """The maker a model uses: layers with a sliding window (Gemma 3's local layers) keep a
  ring of their window (`RingKVCache`, exact) with every cache, the others `make_cache`."""
  return window_rings(make_cache, cfg.layer_window)


def cache_cost(cfg, make_cache, probe_len: int = 4096) -> tuple[float, float, float]:
  """(bytes per token, bytes per sequence, bytes per model) over all layers, from shapes
  alone: a cache of B sequences of L tokens takes B·(L·per_token + per_sequence) +
  per_model (rotations and codebooks are shared by the batch)."""
  make_cache = layer_caches(cfg, make_cache)

  def total(batch, length):
    shapes = jax.eval_shape(lambda: [make_cache(batch, length, cfg.num_kv_heads,
                                                cfg.head_dim, jnp.bfloat16, layer=i)
                                     for i in range(cfg.num_layers)])
    return tree_bytes(shapes)
  a, b, c = total(1, probe_len), total(1, 2 * probe_len), total(2, probe_len)
  per_token = (b - a) / probe_len
  per_sequence = (c - a) - per_token * probe_len
  return per_token, per_sequence, a - per_token * probe_len - per_sequence


def max_batch(free: float, cost: tuple[float, float, float], context: int) -> int:
  per_token, per_sequence, per_model = cost
  return max(int((free - per_model) // (per_token * context + per_sequence)), 0)


def capacity(cfg, weights_bytes: int, memory_bytes: int, contexts, names=None) -> dict:
  """Largest batch per context for each cache (`names`, default all; bf16 always), and
  batch×context against bf16."""
  free = memory_bytes - weights_bytes - RESERVE_BYTES
  out = {"memory_bytes": memory_bytes, "weights_bytes": weights_bytes,
         "reserve_bytes": RESERVE_BYTES, "caches": {}}
  names = list(CACHES) if names is None else ["bf16"] + [n for n in names if n != "bf16"]
  for name in names:
    make = CACHES[name]
    try:
      cost = cache_cost(cfg, make)
    except ValueError as e:   # e.g. fractional widths in tiles at head_dim 64
      out["caches"][name] = {"unsupported": str(e)}
      continue
    out["caches"][name] = {
        "bytes_per_token_all_layers": cost[0], "bytes_per_sequence": cost[1],
        "bytes_per_model": cost[2],
        "max_batch": {str(t): max_batch(free, cost, t) for t in contexts}}
  for name, c in out["caches"].items():
    if "unsupported" in c:
      continue
    c["batch_x_context_vs_bf16"] = {
        t: b / max(out["caches"]["bf16"]["max_batch"][t], 1e-9) for t, b in c["max_batch"].items()}
  return out


def capacity_only(models, names, memory_bytes: int) -> dict:
  """`capacity` of the caches `names` (bf16 first: the ratios' base) per model, on a
  device of memory_bytes, from shapes alone (no device needed): what a run on that device
  records. Prints one row per model and cache."""
  out = {"memory_bytes": memory_bytes, "reserve_bytes": RESERVE_BYTES, "models": {}}
  for m in models:
    cfg = MODELS[m]()
    weights = tree_bytes(nnx.state(nnx.eval_shape(lambda: Decoder(  # noqa: B023
        cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))))
    out["models"][m] = capacity(cfg, weights, memory_bytes, (4096, 32768, 131072), names)
    log_capacity(m, out["models"][m])
  return out


def log_capacity(model: str, cap: dict) -> None:
  """One line per cache of a `capacity` result (caches it could not build: their reason)."""
  for name, c in cap["caches"].items():
    if "max_batch" not in c:
      log(f"capacity {model} {name}: {c.get('unsupported')}")
      continue
    log(f"capacity {model} {name}: {c['bytes_per_token_all_layers']:.0f} bytes per token, "
        f"max batch {c['max_batch']}, "
        f"x bf16 {({k: round(v, 2) for k, v in c['batch_x_context_vs_bf16'].items()})}")


# -- one point ------------------------------------------------------------------------------

def warm_start(limit: int, block: int = 128) -> int:
  """The longest prefix up to `limit` tokens that is one token short of a `block`-token
  block (the caches' `code_block`, `largest_block`): a decode loop's first call from
  there completes a block (for steps < block) and its second does not, so two untimed
  calls compile both of `decode_loop`'s lazy loops (with and without block codes) before
  any call is timed."""
  if limit < block - 1:
    raise ValueError(f"{limit} tokens hold no prefix one short of a {block}-token block")
  return limit - (limit - (block - 1)) % block


def largest_block(caches) -> int:
  """The longest `code_block` of the caches (128 where none codes in blocks): a prefix
  one short of such a block is one short of every shorter one (they divide it)."""
  return max([getattr(c, "code_block", 128) for c in caches] + [128])


def fill_caches(cfg, caches, key, length: int):
  """Appends random K/V until every cache holds `length` tokens (a prefill's state)."""
  batch = caches[0].batch
  chunk = max(256, 65536 // batch)
  update = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)

  @functools.partial(jax.jit, static_argnums=(1,))
  def random_kv(key, n):
    shape = (batch, n, cfg.num_kv_heads, cfg.head_dim)
    kk, kv = jax.random.split(key)
    return (jax.random.normal(kk, shape, jnp.bfloat16),
            jax.random.normal(kv, shape, jnp.bfloat16))

  out = []
  for i, cache in enumerate(caches):
    for start in range(0, length, chunk):
      k, v = random_kv(jax.random.fold_in(key, i * 1000003 + start), min(chunk, length - start))
      cache = update(cache, k, v)
    out.append(cache)
  return out


@functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
def appends(c, kk, m):
  """m single-token appends of kk to the cache c, in one call (one compilation serves every
  layer of a model: same shapes, rotations are arrays)."""
  return jax.lax.fori_loop(0, m, lambda i, c: c.update(kk * (1.0 + i), kk), c)


def time_append(cache, key, n: int) -> tuple[float, object]:
  """Seconds per single-token append to one layer: n appends looped inside one jitted call
  (cache donated), so the device time is counted, not n dispatches."""
  b, h, d = cache.batch, cache.num_kv_heads, cache.head_dim
  k = jax.random.normal(key, (b, 1, h, d), jnp.bfloat16)
  cache = jax.block_until_ready(appends(cache, k, 2))   # compiles the first shape
  cache = jax.block_until_ready(appends(cache, k, n - 2))
  start = time.perf_counter()
  cache = jax.block_until_ready(appends(cache, k, n - 2))
  return (time.perf_counter() - start) / (n - 2), cache


def time_attention(cache, cfg, key, layer: int) -> float:
  """Device seconds of one layer's attention: calls chained inside one jitted call, since
  a call per dispatch over a cache of many buffers measured the dispatch (0.17-0.20 ms at
  1 x 32K, 3.5 bits, where the kernels take 54 µs: `step_profile_1x32k_gpu.json`)."""
  q = jax.random.normal(key, (cache.batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  attend = lambda q, c: c.attend(q, scale=cfg.scale,  # noqa: E731
                                 sliding_window=cfg.layer_window(layer),
                                 soft_cap=cfg.attn_soft_cap)
  return common.device_time_chained(attend, (q, cache), 0, iters=8)


def run_point(model, cfg, make_cache, batch, context, key) -> dict:
  """One (cache, batch, context): fill, time appends and attention, then decode steps.
  make_cache: a `make_cache` (`CACHES[name]`, or `sharded(...)` of one on a mesh)."""
  caches = model.init_caches(batch, context, layer_caches(cfg, make_cache), jnp.bfloat16)
  # The decode loop starts after the appends timed below (2 * APPENDS - 2 tokens).
  prefix = (warm_start(context - STEPS * (2 + REPEATS), largest_block(caches))
            - (2 * APPENDS - 2))
  t0 = time.perf_counter()
  caches = fill_caches(cfg, caches, key, prefix)
  jax.block_until_ready(caches)
  row = {"fill_s": time.perf_counter() - t0}
  per_layer_append, caches[0] = time_append(caches[0], key, APPENDS)
  # Every layer pays the same append; layer 0 stands for all, and its cache is now
  # longer: keep the others in step so the loop sees equal lengths.
  caches[1:] = [time_append(c, key, APPENDS)[1] for c in caches[1:]]
  attention = {}
  for layer in sorted({0, cfg.num_layers - 1}):
    attention[layer] = time_attention(caches[layer], cfg, jax.random.fold_in(key, layer), layer)
  windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
  attn_total = sum(attention[0] if w == windows[0] else attention[cfg.num_layers - 1]
                   for w in windows)
  tokens = jnp.zeros((batch,), jnp.int32)
  decode = decode_loop(model, STEPS)
  t0 = time.perf_counter()
  # Two untimed calls: the first call's inputs (fresh tokens; on a mesh, fresh arrays)
  # can be placed differently from the outputs that the next calls take, and the second
  # call may compile once more for them; from then on every call hits the cache.
  for _ in range(2):
    out, caches = decode(tokens, caches)
    tokens = out[:, -1]
  jax.block_until_ready(tokens)
  row["compile_and_first_calls_s"] = time.perf_counter() - t0
  start = time.perf_counter()
  outs = []
  for _ in range(REPEATS):
    out, caches = decode(tokens, caches)
    outs.append(out)
    tokens = out[:, -1]
  jax.block_until_ready((outs, caches))
  elapsed = time.perf_counter() - start
  step = elapsed / (REPEATS * STEPS)
  ok = not bool(jnp.any(jnp.stack([c.overflowed for c in caches])))
  memory = sum(c.memory_report()["total"] for c in caches)
  del caches
  row.update({
      "tokens_per_s": batch / step, "step_ms": step * 1e3,
      "attention_ms_per_step": attn_total * 1e3,
      "append_ms_per_step": per_layer_append * cfg.num_layers * 1e3,
      "rest_ms_per_step": (step - attn_total - per_layer_append * cfg.num_layers) * 1e3,
      "attention_ms_per_layer": {str(k): v * 1e3 for k, v in attention.items()},
      "cache_bytes": memory, "no_overflow": ok})
  return row


def paired_steps(model, cfg, names, batch: int, context: int, key, rounds: int = 8,
                 steps: int = STEPS, queue: int = 0) -> dict:
  """Decode steps of several caches timed in alternation, for ratios that drift between
  separate runs cannot move (one run per cache put the same code at 0.97x and 1.08x).

  Every cache of `names` is filled to the same prefix and compiled first, all held at
  once; then each round times one call of `steps` greedy tokens per cache, in an order
  that reverses every round. Per cache: the median step over rounds; per cache against
  the first name: the median (and range) of the per-round tokens/s ratios.

  A call timed alone (as a server that reads each call's tokens before the next) counts
  the host's dispatch of the call besides its device time. queue > 0: each round also
  queues `queue` calls and blocks once, so every call's dispatch overlaps the one
  before it (device time, the `queued_*` keys), and records how long the first call took
  to return to the host (`dispatch_ms`, the median over rounds).
  """
  limit = context - steps * (2 + rounds * (1 + queue)) - 1
  if limit < 127:
    raise ValueError(f"context {context} is too short for {rounds} rounds of {steps} steps")
  empty = {name: model.init_caches(batch, context, layer_caches(cfg, CACHES[loop_variant(
      name)[0]]), jnp.bfloat16) for name in names}
  prefix = warm_start(limit, max(largest_block(c) for c in empty.values()))
  states, loops = {}, {}
  for i, name in enumerate(names):
    options = loop_variant(name)[1]
    caches = fill_caches(cfg, empty.pop(name), jax.random.fold_in(key, i), prefix)
    tokens = jnp.zeros((batch,), jnp.int32)
    loops[name] = make_loop(model, steps, **options)
    for _ in range(2):                 # compile, and settle buffer placements
      out, caches = loops[name](tokens, caches)
      tokens = out[:, -1]
    states[name] = jax.block_until_ready((tokens, caches))
  samples = {name: [] for name in names}
  queued = {name: [] for name in names}
  dispatch = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      tokens, caches = states[name]
      start = time.perf_counter()
      out, caches = loops[name](tokens, caches)
      tokens = jax.block_until_ready(out[:, -1])
      samples[name].append((time.perf_counter() - start) / steps)
      if queue:
        start = time.perf_counter()
        for i in range(queue):
          out, caches = loops[name](tokens, caches)
          if i == 0:
            dispatch[name].append(time.perf_counter() - start)
          tokens = out[:, -1]
        tokens = jax.block_until_ready(tokens)
        queued[name].append((time.perf_counter() - start) / (queue * steps))
      states[name] = (tokens, caches)
  ok = {name: not bool(jnp.any(jnp.stack([c.overflowed for c in states[name][1]])))
        for name in names}
  del states
  out = {}
  for name in names:
    out[name] = {**_paired_stats(samples, name, names[0], batch), "no_overflow": ok[name]}
    if queue:
      out[name].update({f"queued_{k}": v for k, v in
                        _paired_stats(queued, name, names[0], batch).items()})
      out[name]["queued_calls"] = queue
      out[name]["dispatch_ms"] = float(np.median(dispatch[name])) * 1e3
  return out


def _paired_stats(samples: dict, name: str, base: str, batch: int) -> dict:
  """tokens/s, the median step and its samples, and the median and range of the
  per-round ratios to `base`, from per-round seconds per step."""
  ratios = sorted(b / x for b, x in zip(samples[base], samples[name]))
  step = float(np.median(samples[name]))
  return {"tokens_per_s": batch / step, "step_ms": step * 1e3,
          "step_ms_samples": [x * 1e3 for x in samples[name]],
          f"x_{base}_median": float(np.median(ratios)),
          f"x_{base}_range": [ratios[0], ratios[-1]]}


def time_prefill_append(cfg, cache_name, batch, chunk, max_len, key, ceiling) -> dict:
  """One layer, appends of `chunk` tokens per row: ms, and bytes moved against the ceiling."""
  cache = CACHES[cache_name](batch, max_len, cfg.num_kv_heads, cfg.head_dim, jnp.bfloat16)
  update = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  shape = (batch, chunk, cfg.num_kv_heads, cfg.head_dim)
  k = jax.random.normal(key, shape, jnp.bfloat16)
  v = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
  n = max_len // chunk
  cache = update(cache, k, v)   # compiles; also calibrates (first window)
  jax.block_until_ready(cache)
  start = time.perf_counter()
  for _ in range(n - 1):
    cache = update(cache, k, v)
  jax.block_until_ready(cache)
  seconds = (time.perf_counter() - start) / (n - 1)
  rep = cache.memory_report()
  written = rep["bytes_per_token_per_head"] * batch * cfg.num_kv_heads * chunk
  read = k.nbytes + v.nbytes
  return {"cache": cache_name, "batch": batch, "chunk": chunk, "ms": seconds * 1e3,
          "input_bytes": int(read), "written_bytes": int(written),
          "read_ceiling_frac": read / seconds / ceiling,
          "moved_ceiling_frac": (read + written) / seconds / ceiling}


# -- checks ---------------------------------------------------------------------------------

def check_correctness(names=None, h: int = 4, hq: int = 16, d: int = 128) -> list[dict]:
  """cuDNN dense attention vs the jnp reference, and the Pallas path vs the reference,
  on fresh random caches with ragged lengths (decode, windowed decode, a 4-token chunk):
  a ragged prefill, then 150 single-token appends (every row completes a 128-token block
  on the way, so the codes a decode step defers to the window are written and read).
  names: the caches to check (default every one in CACHES); h, hq, d: kv heads, q heads
  and head_dim (default Llama-3-8B's group of 4 q heads per kv head)."""
  rng = np.random.default_rng(0)
  rows = []
  b, t = 3, 1024
  k = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  lengths = jnp.array([800, 700, 33])
  for name in names or CACHES:
    try:
      cache = CACHES[name](b, t, h, d, jnp.bfloat16)
    except ValueError as e:   # a cache that cannot hold these heads (int8 tiles at d = 256)
      rows.append({"cache": name, "heads": f"{hq}/{h}x{d}", "unsupported": str(e)})
      log("check", rows[-1])
      continue
    cache = cache.update(k, v, num_tokens=lengths)
    cache = appends(cache, k[:, :1], 150)
    for tq, window in ((1, None), (1, 100), (4, None)):
      q = jnp.asarray(rng.standard_normal((b, tq, hq, d)), jnp.bfloat16)
      ref = cache.attend(q, sliding_window=window, implementation="reference")
      got = cache.attend(q, sliding_window=window)
      err = float(jnp.linalg.norm((got - ref).astype(jnp.float32))
                  / jnp.linalg.norm(ref.astype(jnp.float32)))
      rows.append({"cache": name, "heads": f"{hq}/{h}x{d}", "q_len": tq, "window": window,
                   "rel_err": err,
                   "finite": bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))})
      log("check", rows[-1])
  return rows


# -- driver ---------------------------------------------------------------------------------

def load(path: pathlib.Path) -> dict:
  if path.exists():
    return json.loads(path.read_text())
  return {}


def summarize(results) -> list[dict]:
  table = []
  for m, mres in results.get("models", {}).items():
    for key, point in mres.get("points", {}).items():
      b, t = key.split("x")
      base = point.get("bf16", {})
      for name in CACHES:
        r = point.get(name)
        if not r:
          continue
        row = {"model": m, "B": int(b), "T": int(t), "cache": name}
        if "tokens_per_s" in r:
          row.update(tok_s=r["tokens_per_s"], step_ms=r["step_ms"],
                     attn_ms=r["attention_ms_per_step"], append_ms=r["append_ms_per_step"],
                     rest_ms=r["rest_ms_per_step"])
          if "tokens_per_s" in base:
            row["x_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
        else:
          row["tok_s"] = r.get("status", "error")
        table.append(row)
  return table


def plot(results, path: pathlib.Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  models = list(results.get("models", {}))
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
  for ax, m in zip(axes[0], models):
    points = results["models"][m]["points"]
    for batch in sorted({int(k.split("x")[0]) for k in points}):
      for name, style in zip(CACHES, ("-o", "--s", ":^")):
        xs, ys = [], []
        for key in sorted(points, key=lambda k: int(k.split("x")[1])):
          b, t = map(int, key.split("x"))
          r = points[key].get(name, {})
          if b == batch and "tokens_per_s" in r:
            xs.append(t)
            ys.append(r["tokens_per_s"])
        if xs:
          ax.plot(xs, ys, style, label=f"{name} B={batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(m)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--points", default=None, help="e.g. 8x32768,1x4096 (all models)")
  parser.add_argument("--caches", default=None,
                      help=f"default {','.join(DEFAULT_CACHES)}; --check-only: every cache")
  parser.add_argument("--out", default=None, help="results folder")
  parser.add_argument("--budget-s", type=float, default=540.0,
                      help="stop starting new points after this many seconds")
  parser.add_argument("--fresh", action="store_true",
                      help="start from no results (no resume) and skip the correctness "
                           "check and prefill appends: a side-by-side run of a few points")
  parser.add_argument("--paired", action="store_true",
                      help="only decode steps, the caches timed in alternation at each point "
                           "(paired_steps), written to decode_e2e_paired_<platform>.json")
  parser.add_argument("--rounds", type=int, default=8, help="rounds of --paired")
  parser.add_argument("--queue", type=int, default=0,
                      help="--paired: also time this many calls queued per round, blocked "
                           "on once (device time; the queued_* keys)")
  parser.add_argument("--check-only", action="store_true",
                      help="only the correctness check, written to decode_e2e_check_<platform>"
                           ".json")
  parser.add_argument("--report-only", action="store_true",
                      help="no measuring: the table and plot of the results file")
  parser.add_argument("--ring-select-bytes", type=int, default=None,
                      help="exact_tokens.RING_SELECT_BYTES for this run (0: decode steps "
                           "scatter into every window ring)")
  parser.add_argument("--capacity-gib", type=float, default=None,
                      help="no measuring: the largest batch per context for --caches on a "
                           "device of this many GiB of usable memory, from the caches' "
                           "shapes (decode_e2e_capacity_<platform>.json)")
  args = parser.parse_args(argv)
  if args.ring_select_bytes is not None:
    exact_tokens.RING_SELECT_BYTES = args.ring_select_bytes
  if args.capacity_gib is not None:
    names = (args.caches or ",".join(DEFAULT_CACHES)).split(",")
    results = capacity_only(args.models.split(","), names, int(args.capacity_gib * 2**30))
    common.write_result("decode_e2e_capacity", results, args.out)
    return
  if args.report_only:
    platform = "gpu"
    results = load(pathlib.Path(args.out or common.RESULTS_DIR) / f"decode_e2e_{platform}.json")
    report(results, pathlib.Path(args.out or common.RESULTS_DIR), platform)
    return
  out_dir = pathlib.Path(args.out or common.RESULTS_DIR)
  platform = jax.devices()[0].platform
  if args.paired:
    names = (args.caches or ",".join(DEFAULT_CACHES)).split(",")
    rows, results = [], {"caches": names, "rounds": args.rounds, "steps_per_call": STEPS,
                         "queued_calls": args.queue,
                         "weights": "random, bf16", "graph_options": GRAPH_OPTIONS,
                         "ring_select_bytes": exact_tokens.RING_SELECT_BYTES, "points": {}}
    for m in args.models.split(","):
      cfg = MODELS[m]()
      model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
      pts = POINTS[m] if args.points is None else [
          tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
      for b, t in pts:
        point = paired_steps(model, cfg, names, b, t, jax.random.PRNGKey(b * 7 + t),
                             rounds=args.rounds, queue=args.queue)
        results["points"][f"{m} {b}x{t}"] = point
        common.write_result("decode_e2e_paired", results, out_dir)
        for name, r in point.items():
          rows.append({"model": m, "B": b, "T": t, "cache": name, "tok_s": r["tokens_per_s"],
                       "step_ms": r["step_ms"], f"x_{names[0]}": r[f"x_{names[0]}_median"],
                       "range": "%.3f-%.3f" % tuple(r[f"x_{names[0]}_range"])})
          if args.queue:
            rows[-1].update({"queued_ms": r["queued_step_ms"],
                             f"queued_x_{names[0]}": r[f"queued_x_{names[0]}_median"],
                             "dispatch_ms": r["dispatch_ms"]})
    common.print_table(rows, list(rows[0]))
    return
  if args.check_only:
    names = args.caches.split(",") if args.caches else None
    rows = []
    for m in args.models.split(","):   # each model's heads (a duplicate shape runs again)
      cfg = MODELS[m]()
      rows += check_correctness(names, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
    common.write_result("decode_e2e_check", {"correctness": rows}, out_dir)
    ran = [r for r in rows if "rel_err" in r]
    worst = max(ran, key=lambda r: r["rel_err"])
    log(f"{len(ran)} checks ({len(rows) - len(ran)} unsupported), all finite: "
        f"{all(r['finite'] for r in ran)}, worst "
        f"rel_err {worst['rel_err']:.2e} ({worst['cache']})")
    return
  path = out_dir / f"decode_e2e_{platform}.json"
  # Resume from the committed results when writing elsewhere (a device run's $OUT).
  results = {} if args.fresh else (
      load(path) or load(common.RESULTS_DIR / f"decode_e2e_{platform}.json"))
  if args.fresh:
    results.update(correctness="skipped (--fresh)", prefill_append="skipped (--fresh)")
  results.pop("environment", None)
  results.pop("benchmark", None)
  results.setdefault("models", {})
  results["settings"] = {"steps_per_call": STEPS, "calls_timed": REPEATS,
                         "weights": "random, bf16", "cache_dtype": "bf16 (exact parts too)",
                         "bf16_attention": "cuDNN fused attention (BNTH, padding mask)",
                         "local_layers": "sliding-window layers: an exact RingKVCache of the "
                                         "window with every cache (window_rings)",
                         "tq_attention": "Triton kernel (pallas_kernels.decode_attention); "
                                         "tq3-tiles: Mosaic GPU (decode_attention_mgpu)"}
  start = time.perf_counter()
  if "correctness" not in results:
    results["correctness"] = check_correctness()
  if "read_ceiling_bytes_per_s" not in results:
    from benchmarks.decode_attention import read_ceiling
    results["read_ceiling_bytes_per_s"] = read_ceiling()
  ceiling = results["read_ceiling_bytes_per_s"]
  log(f"read ceiling {ceiling / 1e12:.2f} TB/s")
  if "prefill_append" not in results:
    cfg = MODELS["llama3_8b"]()
    rows = []
    for name in CACHES:
      for batch, chunk in ((1, 4096), (8, 4096), (8, 512)):
        rows.append(time_prefill_append(cfg, name, batch, chunk, 32768, jax.random.PRNGKey(1),
                                        ceiling))
        log("prefill append", rows[-1])
    results["prefill_append"] = rows
  common.write_result("decode_e2e", results, out_dir)

  cache_names = (args.caches or ",".join(DEFAULT_CACHES)).split(",")
  jobs = []
  for m in args.models.split(","):
    pts = POINTS[m] if args.points is None else [
        tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    for b, t in pts:
      for name in cache_names:
        done = results["models"].get(m, {}).get("points", {}).get(f"{b}x{t}", {}).get(name)
        if not done:
          jobs.append((m, b, t, name))
  progress = common.Progress(len(jobs))
  stats = jax.devices()[0].memory_stats() or {}
  mem_limit = stats.get("bytes_limit", 16 * 2**30)  # CPU runs (smoke tests) report none
  model, model_name = None, None
  for m, b, t, name in jobs:
    if time.perf_counter() - start > args.budget_s:
      log(f"budget spent; {len(jobs) - progress.done} points left for the next call")
      break
    cfg = MODELS[m]()
    mres = results["models"].setdefault(m, {"config": cfg.__dict__, "points": {}})
    if model_name != m:
      model = None
      model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
      model_name = m
      weights = tree_bytes(nnx.state(model))
      mres["weights_bytes"] = weights
      cap = mres["capacity"] = capacity(cfg, weights, mem_limit, (4096, 32768, 131072))
      memory_free = mem_limit - weights - RESERVE_BYTES
      costs = {n: (c["bytes_per_token_all_layers"], c["bytes_per_sequence"],
                   c["bytes_per_model"]) for n, c in cap["caches"].items()}
    point = mres["points"].setdefault(f"{b}x{t}", {})
    if b > max_batch(memory_free, costs[name], t):
      point[name] = {"status": "does not fit"}
    else:
      try:
        point[name] = run_point(model, cfg, CACHES[name], b, t,
                                jax.random.PRNGKey(b * 7 + t))
      except Exception as e:  # noqa: BLE001 - a point that fails is recorded and skipped
        traceback.print_exc()
        point[name] = {"status": "error", "error": repr(e)[:400]}
    log("point", m, b, t, name, json.dumps(point[name]))
    progress.step(f"{m} B={b} T={t} {name}")
    common.write_result("decode_e2e", results, out_dir)

  results["table"] = summarize(results)
  common.write_result("decode_e2e", results, out_dir)
  report(results, out_dir, platform)


def report(results, out_dir: pathlib.Path, platform: str) -> None:
  plot(results, out_dir / f"decode_e2e_{platform}.png")
  for m, mres in results["models"].items():
    if "capacity" in mres:
      log_capacity(m, mres["capacity"])
  common.print_table(summarize(results), ["model", "B", "T", "cache", "tok_s", "x_bf16",
                                          "step_ms", "attn_ms", "append_ms", "rest_ms"])


if __name__ == "__main__":
  sys.exit(main())
