"""Generation: a jitted prefill, then a decode loop under `lax.while_loop`.

    tokens, num_generated = generate(model, prompts, prompt_lengths, 32,
                                     make_cache=TurboQuantKVCache.create)

`decode_steps` is the bare greedy loop over caches the caller owns (benchmarks, serving):
the caches are donated, so each step writes them in place. `decode_loop` binds it to a
model once, for callers that call it many times.

The prompt is attended exactly (prefill) and written to the caches; each decode step
appends one token per sequence and reads the caches. No Python loop runs per token.
Prompts of different lengths share a batch (padded on the right, with their lengths).

On GPUs `decode_steps` and `decode_loop` compile with `GRAPH_OPTIONS` (`graphs=False`
keeps XLA's defaults; `generate` takes `graphs=True`, not yet checked on a GPU):
XLA then records the loop body, conditionals included, as CUDA graphs. By default it
launches a while loop's body and each `lax.cond` from the host, and a TurboQuant layer
has a conditional (its one-tile-per-128-steps append) and twice the kernels of a bf16
layer: the GPU waited for the host 1.3-5.0 ms of a 10.5-14.3 ms step (H200, Llama-3-8B
shapes, 8 x 32K, 3.5 bits as K4/V3: `benchmarks/results/step_timeline_*_gpu.json`), and
0.6-0.7 ms with these options, the same greedy tokens; bf16 steps idled 0.05-0.27 ms
either way. Other backends ignore the options.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turboquant_jax import kv_cache

Array = jax.Array

# XLA's default command buffer kinds plus WHILE and CONDITIONAL (see the module docstring).
GRAPH_OPTIONS = {"xla_gpu_enable_command_buffer": ",".join((
    "FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "DYNAMIC_SLICE_FUSION",
    "WHILE", "CONDITIONAL"))}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k / top_p restrict sampling to the most likely tokens."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def sample_logits(key: Array, logits: Array, sampling: SamplingConfig) -> Array:
  """logits: [B, V] -> [B] int32 tokens."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    keep_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def model_step(model, tokens: Array, caches: Sequence[Any], *, defer_appends: bool = True
               ) -> tuple[Array, list[Any]]:
  """One decode step, tokens [B, 1] -> (logits [B, 1, vocab], caches). defer_appends: the
  caches that can leave their rare append work (calibration, a completed block's codes)
  to one conditional after the step (`kv_cache.flush_caches`) do, instead of one
  conditional per layer inside it."""
  if not defer_appends:
    return model(tokens, caches=caches)
  logits, caches = model(tokens, caches=kv_cache.deferring(caches))
  return logits, kv_cache.flush_caches(caches)


def _generate_loop(graphdef, state, caches, prompts, prompt_lengths, key, *, max_new_tokens,
                   sampling, stop_tokens, pad_id):
  model = nnx.merge(graphdef, state)
  logits, caches = model(prompts, caches=caches, num_tokens=prompt_lengths, prefill=True,
                         logits_at=prompt_lengths - 1)
  last = logits[:, 0]
  batch = prompts.shape[0]
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def is_stop(tok):
    return jnp.any(tok[:, None] == stops[None, :], axis=-1)

  key, sub = jax.random.split(key)
  token = sample_logits(sub, last, sampling)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = is_stop(token)
  count = jnp.ones((batch,), jnp.int32)

  def cond(carry):
    step, _, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, caches, out, done, count, key = carry
    logits, caches = model_step(model, token[:, None], caches)
    key, sub = jax.random.split(key)
    new = sample_logits(sub, logits[:, 0], sampling)
    new = jnp.where(done, pad_id, new)
    out = out.at[:, step].set(new)
    count = count + (~done).astype(jnp.int32)
    done = done | is_stop(new)
    return step + 1, new, caches, out, done, count, key

  carry = (jnp.int32(1), token, caches, out, done, count, key)
  _, _, caches, out, _, count, _ = jax.lax.while_loop(cond, body, carry)
  return out, count, caches


_GENERATE_STATIC = ("graphdef", "max_new_tokens", "sampling", "stop_tokens", "pad_id")
_generate = jax.jit(_generate_loop, static_argnames=_GENERATE_STATIC,
                    compiler_options=GRAPH_OPTIONS)
_generate_default = jax.jit(_generate_loop, static_argnames=_GENERATE_STATIC)


def generate(model, prompts: Array, prompt_lengths: Array | None, max_new_tokens: int,
             make_cache: Callable[..., Any], *, sampling: SamplingConfig = SamplingConfig(),
             stop_tokens: Sequence[int] = (), key: Array | None = None, pad_id: int = 0,
             cache_dtype=jnp.float32, return_caches: bool = False, graphs: bool = False):
  """Generates up to max_new_tokens tokens per prompt.

  Args:
    model: a `models.Decoder`.
    prompts: [B, P] int tokens, right-padded.
    prompt_lengths: [B] real prompt lengths (default: all P).
    max_new_tokens: tokens to generate at most (a stop token counts and ends its row).
    make_cache: `DenseKVCache.create`, `TurboQuantKVCache.create` or a partial of either.
    sampling: greedy by default.
    stop_tokens: token ids that end a sequence.
    key: PRNG key for sampling (required unless greedy).
    pad_id: written after a sequence has stopped.
    graphs: compile with `GRAPH_OPTIONS` (GPU: the decode loop as CUDA graphs). Off by
      default here until checked on a GPU: this loop's trip count depends on the data
      (stop tokens), unlike `decode_steps`'s scan, which was.

  Returns:
    (tokens [B, max_new_tokens] int32, num_generated [B] int32), and the caches if asked.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  b, p = prompts.shape
  lengths = jnp.full((b,), p, jnp.int32) if prompt_lengths is None else jnp.asarray(
      prompt_lengths, jnp.int32)
  if sampling.temperature > 0 and key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key")
  key = jax.random.PRNGKey(0) if key is None else key
  # A multiple of 16 keeps the fused GPU kernel applicable.
  max_len = -(-(p + max_new_tokens) // 16) * 16
  caches = model.init_caches(b, max_len, make_cache, cache_dtype)
  graphdef, state = nnx.split(model)
  run = _generate if graphs else _generate_default
  out, count, caches = run(graphdef, state, caches, prompts, lengths, key,
                           max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=pad_id)
  return (out, count, caches) if return_caches else (out, count)


def greedy_scan(model, tokens: Array, caches: Sequence[Any], num_steps: int, *,
                defer_appends: bool = True, lazy_codes: bool = True) -> tuple[Array, list[Any]]:
  """The greedy decode loop as a `lax.scan` (call it under jit): tokens [B] -> (generated
  [B, num_steps], caches).

  lazy_codes (with defer_appends): runs of up to `kv_cache.lazy_code_steps(caches)` steps
  in which no row calibrates are decoded by `lazy_greedy_scan` (no conditional per step);
  one conditional per run picks that or the step-by-step flush (`model_step`). The tokens
  and caches are the same either way. `decode_loop` makes that choice on the host instead,
  with no conditional at all.
  """
  runs = kv_cache.lazy_code_steps(caches) if defer_appends and lazy_codes else None
  if not runs:
    return _greedy_steps(model, tokens, caches, num_steps, defer_appends=defer_appends)

  def run(tokens, caches, steps):
    return jax.lax.cond(
        kv_cache.skip_rare_work(caches, steps),
        lambda args: lazy_greedy_scan(model, *args, steps),
        lambda args: _greedy_steps(model, *args, steps, defer_appends=True),
        (tokens, list(caches)))

  return _in_runs(run, tokens, caches, num_steps, min(runs, num_steps))


CODES = ("when_due", "always", "never")


def lazy_greedy_scan(model, tokens: Array, caches: Sequence[Any], num_steps: int, *,
                     codes: str = "when_due") -> tuple[Array, list[Any]]:
  """`greedy_scan` for steps in which no row calibrates (`kv_cache.skip_rare_work(caches,
  num_steps)` holds: the caller's to check): the caches' rare append work is dropped and
  the blocks it would have coded are coded after every `kv_cache.lazy_code_steps(caches)`
  steps (`code_completed`), while the window still holds them. No conditional per step: on
  an H200 the one after every step cost a 32-layer Llama-3-8B-shaped step 0.25-1.25 ms
  (6.3-6.7 ms without it; 8 x 4K, K4/V3, 16 steps per call), and this loop decodes at
  0.94x the bf16 cache's tokens/s against 0.78-0.90x
  (`benchmarks/results/decode_e2e_paired_lazy_gpu.json`).

  codes: "when_due", after each run under one conditional, skipped when no block completed
  in it; "always", after each run unconditionally; "never", not at all: the steps run as
  one scan, for a caller that knows no block completes in them (`decode_loop`, which
  tracks the lengths on the host: a conditional the GPU cannot keep in its CUDA graph
  makes the host wait for its predicate, which at batch 1 made every call synchronous).
  """
  if codes not in CODES:
    raise ValueError(f"codes must be one of {CODES}, got {codes!r}")
  runs = kv_cache.lazy_code_steps(caches)
  if not runs:
    raise ValueError("these caches cannot code lazily (kv_cache.lazy_code_steps is "
                     f"{runs}): decode with greedy_scan")
  if codes == "never":
    return _greedy_steps(model, tokens, caches, num_steps, defer_appends=True, flush=False)

  def run(tokens, caches, steps):
    since = [getattr(c, "lengths", None) for c in caches]
    out, caches = _greedy_steps(model, tokens, caches, steps, defer_appends=True, flush=False)
    return out, kv_cache.code_completed(caches, since, when_due=codes == "when_due")

  return _in_runs(run, tokens, caches, num_steps, min(runs, num_steps))


def blocks_complete(caches: Sequence[Any], lengths: Sequence[np.ndarray | None],
                    num_steps: int) -> bool:
  """Whether num_steps single-token appends from `lengths` (host copies of the caches'
  lengths [B], None for caches that do not code lazily) complete a block in some row of
  some cache (`TurboQuantKVCache.completed_since`, on the host)."""
  for c, n in zip(caches, lengths):
    if n is not None and np.any((n + num_steps) // c.code_block > n // c.code_block):
      return True
  return False


def _in_runs(run, tokens: Array, caches: Sequence[Any], num_steps: int, runs: int
             ) -> tuple[Array, list[Any]]:
  """run(tokens, caches, steps) over num_steps in runs of `runs` steps (a scan), then the
  rest."""
  full, rest = divmod(num_steps, runs)
  if full == 1:
    out, caches = run(tokens, list(caches), runs)
  else:
    def body(carry, _):
      out, caches = run(*carry, runs)
      return (out[:, -1], caches), out

    (tokens, caches), outs = jax.lax.scan(body, (tokens, list(caches)), None, length=full)
    out = jnp.moveaxis(outs, 0, 1).reshape(outs.shape[1], full * runs)
  if rest:
    more, caches = run(out[:, -1], caches, rest)
    out = jnp.concatenate([out, more], axis=1)
  return out, caches


def _greedy_steps(model, tokens: Array, caches: Sequence[Any], num_steps: int, *,
                  defer_appends: bool, flush: bool = True) -> tuple[Array, list[Any]]:
  """num_steps greedy steps in a `lax.scan`; flush=False drops the deferred append work
  (`greedy_scan` codes what it owed afterwards)."""
  def body(carry, _):
    token, caches = carry
    if flush:
      logits, caches = model_step(model, token[:, None], caches, defer_appends=defer_appends)
    else:
      logits, caches = model(token[:, None], caches=kv_cache.deferring(caches))
      caches = kv_cache.drop_deferred(caches)
    token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return (token, caches), token

  (_, caches), out = jax.lax.scan(body, (tokens, list(caches)), None, length=num_steps)
  return out.T, caches


def _lazy_decode_loop(graphdef, state, tokens, caches, constants, *, num_steps,
                      codes="when_due", hold_sinks=True):
  caches = _with_fields(caches, constants)
  # Sinks passed as constants are held by every row (the host's lengths): appends that
  # know it skip their scatters (two kernels per layer and step).
  held = [hold_sinks and f is not None and "sink_keys" in f for f in constants]
  caches = [c.holding_sinks() if h else c for c, h in zip(caches, held)]
  out, caches = lazy_greedy_scan(nnx.merge(graphdef, state), tokens, caches, num_steps,
                                 codes=codes)
  caches = [c.holding_sinks(False) if h else c for c, h in zip(caches, held)]
  return out, _without_fields(caches, constants)


def _with_fields(caches: Sequence[Any], fields: Sequence[dict | None]) -> list[Any]:
  """Each cache with `fields` (a dict of its field values, or None) put in."""
  return [c if f is None else c.replace(**f) for c, f in zip(caches, fields)]


def _without_fields(caches: Sequence[Any], fields: Sequence[dict | None]) -> list[Any]:
  """Each cache with the fields named in `fields` set to None (left out of its pytree)."""
  return [c if f is None else c.replace(**dict.fromkeys(f)) for c, f in zip(caches, fields)]


def _decode_loop(graphdef, state, tokens, caches, *, num_steps, defer_appends=True,
                 lazy_codes=True):
  return greedy_scan(nnx.merge(graphdef, state), tokens, caches, num_steps,
                     defer_appends=defer_appends, lazy_codes=lazy_codes)


_decode_steps = jax.jit(_decode_loop, static_argnames=("graphdef", "num_steps"),
                        donate_argnames=("caches",), compiler_options=GRAPH_OPTIONS)
_decode_steps_default = jax.jit(_decode_loop, static_argnames=("graphdef", "num_steps"),
                                donate_argnames=("caches",))


def decode_loop(model, num_steps: int, *, graphs: bool = True, defer_appends: bool = True,
                lazy_codes: bool = True, codes_when_due: bool = True,
                undonated_constants: bool = True, hold_sinks: bool = True
                ) -> Callable[[Array, Sequence[Any]], tuple[Array, list[Any]]]:
  """`decode_steps` bound to a model and a number of steps, for a serving loop.

  The model is split once and the loop compiled once (per cache shapes), so a call costs
  the dispatch of its arrays only; `decode_steps` splits the model and hashes its graph
  on every call (at Llama-3-8B shapes on an H200's host about 35 ms per call: the bf16
  step at 8 x 32K, 16 tokens per call, went from 14.86 to 12.65 ms). Later changes to the
  model's parameters are not seen: bind it again after them.

    step = decode_loop(model, 16)
    out, caches = step(tokens, caches)      # out [B, 16]; caches donated

  graphs: compile with `GRAPH_OPTIONS`. defer_appends: one conditional per step for the
  caches' rare append work (`model_step`), not one per layer. lazy_codes (with
  defer_appends): a call in which no row calibrates runs `lazy_greedy_scan`, a loop with no
  conditional at all; the others `greedy_scan`. The choice is made on the host, and so is
  whether the call completes a block to code (two compilations of the lazy loop, with and
  without the codes): once the caches passed in are the outputs of a call whose inputs were
  known (calibrated in every row, their lengths), from what the host knows, without
  reading the device; otherwise by reading their lengths and calibration flags (a few
  bytes, which waits for the caches to be ready). A call longer than lazy_code_steps (128
  for the default tiles) codes under one conditional per run instead.
  codes_when_due=False: the lazy loop codes after every run whether a block completed or
  not (a probe of what the codes cost). undonated_constants: the fields a lazy call leaves
  as they are (`TurboQuantKVCache.lazy_constants`: quantizers, calibration, the codes when
  it codes no block) go in undonated and do not come back, so the call returns about a
  quarter of the arrays; False donates and returns them all (how it ran before).
  hold_sinks (with undonated_constants): once the host's lengths show every row past its
  sinks, the lazy loop's appends skip the sinks' scatters (`holding_sinks`; False: a
  probe of what they cost).

  Returns:
    run(tokens [B] int32, caches) -> (generated [B, num_steps] int32, updated caches).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  graphdef, state = nnx.split(model)
  options = dict(donate_argnames=("caches",), compiler_options=GRAPH_OPTIONS if graphs else None)
  loop = jax.jit(functools.partial(_decode_loop, graphdef, num_steps=num_steps,
                                   defer_appends=defer_appends, lazy_codes=lazy_codes),
                 **options)
  lazy_loops = {codes: jax.jit(functools.partial(_lazy_decode_loop, graphdef,
                                                 num_steps=num_steps, codes=codes,
                                                 hold_sinks=hold_sinks), **options)
                for codes in CODES}
  # What the host knows of the last outputs, valid while the next inputs are those arrays:
  # (their calibrated flags and lengths, the lengths' values) of the lazily coding caches.
  known: dict[str, list] = {}

  def lazy_caches(caches):
    return [c if hasattr(c, "skips_rare_work") else None for c in caches]

  def run(tokens: Array, caches: Sequence[Any]) -> tuple[Array, list[Any]]:
    tokens = _check_tokens(tokens, caches)
    caches = list(caches)
    runs = kv_cache.lazy_code_steps(caches) if defer_appends and lazy_codes else None
    if not runs:
      return loop(state, tokens, caches)
    lazy = lazy_caches(caches)
    arrays = [(c.calibrated, c.lengths) for c in lazy if c is not None]
    if not (known and len(arrays) == len(known["arrays"]) and all(
        a is x and b is y for (a, b), (x, y) in zip(arrays, known["arrays"]))):
      known.clear()
      calibrated, ok, lengths = jax.device_get((
          jnp.all(jnp.stack([jnp.all(a) for a, _ in arrays])),
          kv_cache.skip_rare_work(caches, num_steps),
          [None if c is None else c.lengths for c in lazy]))
      if not ok:
        return loop(state, tokens, caches)
      if calibrated:
        known["lengths"] = lengths
    lengths = known.get("lengths")
    if not codes_when_due:
      codes = "always"
    elif lengths is None:
      codes = "when_due"    # rows not yet calibrated: the lengths are read every call
    elif not blocks_complete(caches, lengths, num_steps):
      codes = "never"
    else:
      codes = "when_due" if num_steps > runs else "always"
    # What the loop leaves as it is goes in undonated and does not come back (each output
    # buffer costs the dispatch: SmolLM2's 30 layers returned 690 arrays, now 150).
    constants = [None if c is None or not undonated_constants else {
        f: getattr(c, f) for f in c.lazy_constants(
            codes=codes != "never", lengths=None if lengths is None else lengths[i])}
        for i, c in enumerate(lazy)]
    out, moving = lazy_loops[codes](state, tokens, _without_fields(caches, constants),
                                    constants)
    caches = _with_fields(moving, constants)
    if lengths is not None:
      known["arrays"] = [(c.calibrated, c.lengths) for c in lazy_caches(caches)
                         if c is not None]
      known["lengths"] = [None if n is None else n + num_steps for n in lengths]
    return out, caches

  run.jitted = loop   # the compiled loops, for inspection (e.g. their cache sizes)
  run.lazy_jitted = lazy_loops
  return run


def _check_tokens(tokens, caches) -> Array:
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 1 or tokens.shape[0] != caches[0].lengths.shape[0]:
    raise ValueError(f"tokens must have shape [{caches[0].lengths.shape[0]}], "
                     f"got {tokens.shape}")
  return tokens


def decode_steps(model, tokens: Array, caches: Sequence[Any], num_steps: int, *,
                 graphs: bool = True) -> tuple[Array, list[Any]]:
  """Greedy decoding of num_steps tokens in one jitted call, with no host sync per token.

  Args:
    model: a `models.Decoder`.
    tokens: [B] int32, the last token of each sequence (not yet in the caches).
    caches: one cache per layer. They are donated: do not use them after this call.
    num_steps: tokens to decode; one compilation per (shapes, num_steps).
    graphs: compile with `GRAPH_OPTIONS` (GPU: the decode loop as CUDA graphs).

  Returns:
    (generated [B, num_steps] int32, the updated caches).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  tokens = _check_tokens(tokens, caches)
  graphdef, state = nnx.split(model)
  run = _decode_steps if graphs else _decode_steps_default
  out, caches = run(graphdef, state, tokens, list(caches), num_steps=num_steps)
  return out, caches
