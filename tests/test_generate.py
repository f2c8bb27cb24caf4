import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Decoder, SamplingConfig, generate, sample_logits
from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache

from test_decoder import TINY


@pytest.fixture(scope="module")
def model():
  return Decoder(TINY["llama"], rngs=nnx.Rngs(0))


def greedy_by_hand(model, prompt, n):
  """The slow way: full forward passes over the growing sequence (right-padded to one
  length, so one compilation: causal attention ignores the padding)."""
  forward = nnx.jit(lambda m, x: m(x)[0])
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
    seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_equals_full_forward_argmax_and_ragged_rows_are_independent(model):
  prompts = jnp.asarray([[5, 9, 14, 3, 7], [8, 2, 0, 0, 0]])
  lengths = jnp.asarray([5, 2])
  out, count = generate(model, prompts, lengths, 6, DenseKVCache.create)
  assert list(count) == [6, 6]
  assert list(out[0]) == greedy_by_hand(model, [5, 9, 14, 3, 7], 6)
  assert list(out[1]) == greedy_by_hand(model, [8, 2], 6)


def test_stop_tokens_end_rows_and_pad(model):
  prompt = jnp.asarray([[5, 9, 14, 3, 7]])
  free, _ = generate(model, prompt, None, 6, DenseKVCache.create)
  stop = int(free[0, 2])
  out, count = generate(model, prompt, None, 6, DenseKVCache.create, stop_tokens=[stop],
                        pad_id=-1)
  first = list(free[0]).index(stop)
  assert int(count[0]) == first + 1
  assert list(out[0, :first + 1]) == list(free[0, :first + 1])
  assert all(int(t) == -1 for t in out[0, first + 1:])


def test_compressed_cache_generates_with_the_same_call(model):
  prompts = jnp.asarray([[5, 9, 14, 3, 7, 1, 2, 3]])
  make = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
      key_bits=4, value_bits=4, window=4, num_sinks=1))
  out, count, caches = generate(model, prompts, None, 5, make, return_caches=True)
  assert out.shape == (1, 5) and int(count[0]) == 5
  assert int(caches[0].lengths[0]) == 8 + 4  # the last token is sampled, not appended


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model):
  prompts = jnp.asarray([[5, 9, 14, 3, 7]])
  hot = SamplingConfig(temperature=1.5)
  a, _ = generate(model, prompts, None, 6, DenseKVCache.create, sampling=hot,
                  key=jax.random.PRNGKey(1))
  b, _ = generate(model, prompts, None, 6, DenseKVCache.create, sampling=hot,
                  key=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  greedy, _ = generate(model, prompts, None, 6, DenseKVCache.create)
  for cfg in (SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=1.0,
                                                                       top_p=1e-6)):
    c, _ = generate(model, prompts, None, 6, DenseKVCache.create, sampling=cfg,
                    key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(c, greedy)


def test_sample_logits_respects_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  draw = lambda cfg: np.asarray(jax.vmap(lambda k: sample_logits(k, logits, cfg))(keys))[:, 0]  # noqa: E731
  assert set(draw(SamplingConfig(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}
  freq = np.bincount(draw(SamplingConfig(temperature=1.0)), minlength=4) / 2000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_bad_arguments(model):
  with pytest.raises(ValueError, match="PRNG key"):
    generate(model, jnp.ones((1, 3), jnp.int32), None, 2, DenseKVCache.create,
             sampling=SamplingConfig(temperature=1.0))
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, jnp.ones((1, 3), jnp.int32), None, 0, DenseKVCache.create)


# -- decode_steps: the bare loop the end-to-end benchmark times -----------------------------

def _bound_loop(model, entry: str, num_steps: int):
  """(step(tokens, caches), compilations so far) for decode_steps or decode_loop."""
  from models import decode_loop, decode_steps
  from models.generate import _decode_steps
  if entry == "decode_steps":
    return (lambda t, c: decode_steps(model, t, c, num_steps)), _decode_steps._cache_size
  step = decode_loop(model, num_steps)
  return step, step.jitted._cache_size


_TQ = functools.partial(TurboQuantKVCache.create,
                        config=TurboQuantConfig(window=4, num_sinks=1))
_PREROTATED = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(
    key_bits=3, value_bits=3, window=4, num_sinks=1, values_prerotated=True))


# Both entries share `_decode_loop`: decode_steps once, decode_loop with every cache.
@pytest.mark.parametrize("make, entry", [
    (DenseKVCache.create, "decode_steps"), (DenseKVCache.create, "decode_loop"),
    (_TQ, "decode_loop"), (_PREROTATED, "decode_loop")],
    ids=["dense-decode_steps", "dense-decode_loop", "turboquant-decode_loop",
         "prerotated-decode_loop"])
def test_decode_loops_continue_generate_compile_once_and_donate(model, make, entry):
  prompts = jnp.asarray([[5, 9, 14, 3, 7, 1, 2, 3], [4, 4, 8, 1, 0, 6, 2, 9]])
  want, _ = generate(model, prompts, None, 7, make)
  out = want[:, :1]    # greedy: generate's first token whatever its length (one compile)
  caches = model.init_caches(2, 32, make)
  _, caches = model(prompts, caches=caches, prefill=True)
  step, compilations = _bound_loop(model, entry, 3)
  before = compilations()
  leaves = jax.tree.leaves(caches)
  first, caches = step(out[:, 0], caches)
  # Donated: every buffer of the caches passed in is gone (written in place).
  assert all(x.is_deleted() for x in leaves)
  second, caches = step(first[:, -1], caches)
  assert compilations() == before + 1  # same shapes: one compilation
  got = jnp.concatenate([out[:, :1], first, second], axis=1)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(caches[0].lengths, [8 + 6, 8 + 6])
  with pytest.raises(ValueError, match="tokens must have shape"):
    step(jnp.zeros((3,), jnp.int32), caches)


def test_decode_steps_rejects_bad_arguments(model):
  from models import decode_loop, decode_steps
  caches = model.init_caches(2, 16, DenseKVCache.create)
  with pytest.raises(ValueError, match="num_steps"):
    decode_loop(model, 0)
  with pytest.raises(ValueError, match="num_steps"):
    decode_steps(model, jnp.zeros((2,), jnp.int32), caches, 0)
  with pytest.raises(ValueError, match="tokens must have shape"):
    decode_steps(model, jnp.zeros((3,), jnp.int32), caches, 2)


def test_graph_options_compile_and_leave_the_tokens_unchanged(model):
  """GRAPH_OPTIONS reach XLA (a misspelt command buffer kind fails to compile) and, off
  the GPU where they are ignored or on it, decode the same tokens as XLA's defaults."""
  import jax
  from models import decode_steps
  from models.generate import GRAPH_OPTIONS
  jax.jit(lambda x: x + 1, compiler_options=GRAPH_OPTIONS)(1.0)
  with pytest.raises(Exception, match="enum"):
    jax.jit(lambda x: x + 2, compiler_options={
        "xla_gpu_enable_command_buffer": "FUSION,WHILE_LOOPS"})(1.0)
  tokens = jnp.array([3, 5], jnp.int32)
  got = {}
  for graphs in (True, False):
    caches = model.init_caches(2, 32, TurboQuantKVCache.create, jnp.float32)
    got[graphs], _ = decode_steps(model, tokens, caches, 4, graphs=graphs)
  np.testing.assert_array_equal(got[True], got[False])


def _top_level_conds(jaxpr) -> int:
  """Conditionals not nested in another conditional, through calls and loops."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      count += 1
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _top_level_conds(sub)
  return count


def test_model_step_holds_one_conditional_for_every_layers_appends(model):
  """With defer_appends, a decode step's rare append work (calibration, completed blocks)
  is one conditional after the layers, not one per layer (each a CUDA-graph conditional
  node on a GPU), and the tokens and caches are the same as without."""
  from models import model_step
  from models.generate import greedy_scan
  caches = model.init_caches(2, 256, TurboQuantKVCache.create, jnp.float32)
  assert caches[0].defers_codes
  tokens = jnp.array([[3], [5]], jnp.int32)
  conds = {d: _top_level_conds(jax.make_jaxpr(
      lambda c, d=d: model_step(model, tokens, c, defer_appends=d))(caches).jaxpr)
      for d in (True, False)}
  assert conds == {True: 1, False: TINY["llama"].num_layers}
  # From 120 prompt tokens, 10 steps complete the first 128-token block.
  prompts = jax.random.randint(jax.random.PRNGKey(4), (2, 120), 0, TINY["llama"].vocab_size)
  _, caches = model(prompts, caches=caches, prefill=True)
  # lazy_codes=False: the flush after every step (lazy runs would drop it: no row
  # calibrates here; test_lazy_runs_* covers them).
  run = jax.jit(lambda c, d: greedy_scan(model, tokens[:, 0], c, 10, defer_appends=d,
                                         lazy_codes=False), static_argnums=1)
  (got, deferred), (want, eager) = run(caches, True), run(caches, False)
  assert list(deferred[0].lengths) == [130, 130]
  # The steps coded the block (the prefill held none): equal caches mean equal codes.
  assert not any(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(deferred[0].key_codes), jax.tree.leaves(caches[0].key_codes)))
  np.testing.assert_array_equal(got, want)
  for a, b in zip(jax.tree.leaves(deferred), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(a, b)


def _prefilled_ragged(model):
  """Caches whose row 0 (10 tokens) calibrates only after 246 more, row 1 (270) already."""
  caches = model.init_caches(2, 800, TurboQuantKVCache.create, jnp.float32)
  prompts = jax.random.randint(jax.random.PRNGKey(3), (2, 270), 0, TINY["llama"].vocab_size)
  _, caches = model(prompts, caches=caches, num_tokens=jnp.array([10, 270]), prefill=True)
  assert list(caches[0].calibrated) == [False, True]
  return caches


def test_lazy_runs_drop_the_per_step_conditional_and_decode_as_step_by_step(model):
  """In runs of steps where no row calibrates, greedy_scan appends with the rare work
  dropped (no conditional per step) and codes the completed blocks once after the run;
  runs where a row calibrates flush step by step. Tokens and every cache buffer equal the
  step-by-step loop's: row 0 calibrates in the second run, row 1 before the first, both
  complete blocks, 260 steps = two runs of 128 and one of 4."""
  from models.generate import _greedy_steps, greedy_scan
  from turboquant_jax import kv_cache
  caches = _prefilled_ragged(model)
  assert kv_cache.lazy_code_steps(caches) == 128
  assert bool(kv_cache.skip_rare_work(caches, 128))       # row 0 is far from calibrating
  tokens = jnp.array([3, 5], jnp.int32)
  run = jax.jit(lambda c, lazy: greedy_scan(model, tokens, c, 260, lazy_codes=lazy),
                static_argnums=1)
  (got, lazy), (want, stepwise) = run(caches, True), run(caches, False)
  np.testing.assert_array_equal(got, want)
  assert list(lazy[0].calibrated) == [True, True]
  for a, b in zip(jax.tree.leaves(lazy), jax.tree.leaves(stepwise)):
    np.testing.assert_array_equal(a, b)
  dropped = jax.make_jaxpr(lambda c: _greedy_steps(model, tokens, c, 3, defer_appends=True,
                                                   flush=False))(caches).jaxpr
  assert _top_level_conds(dropped) == 0
  # A run in which a row calibrates cannot drop its work.
  assert not bool(caches[0].replace(lengths=jnp.array([200, 300])).skips_rare_work(100))
  with pytest.raises(ValueError, match="num_steps"):
    caches[0].skips_rare_work(0)


def test_decode_loop_chooses_the_lazy_loop_on_the_host_and_reads_only_when_unknown(
    model, monkeypatch):
  """decode_loop runs calls in which no row calibrates with no conditional at all
  (lazy_greedy_scan), the others with greedy_scan; it reads the caches' flags and lengths
  only until their outputs are known calibrated, and then codes blocks only in calls that
  complete one. Five calls of 90 steps (the third calibrates row 0; the fourth completes
  no block, the fifth one) decode the tokens and caches of the step-by-step flush; the
  fourth passes what it leaves as it is undonated and gets it back untouched."""
  from models import decode_loop
  reads = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or device_get(x))
  tokens = jnp.array([3, 5], jnp.int32)
  got = {}
  for lazy in (True, False):
    step, caches, t, outs = decode_loop(model, 90, lazy_codes=lazy), _prefilled_ragged(model), tokens, []
    counts = []
    for i in range(5):
      before = caches
      out, caches = step(t, caches)
      if lazy and i == 3:    # no block coded: codes and quantizers went in undonated
        for field in ("key_codes", "value_quantizer", "calibrated"):
          assert all(x is y for x, y in zip(jax.tree.leaves(getattr(caches[0], field)),
                                            jax.tree.leaves(getattr(before[0], field))))
        assert before[0].window_keys.is_deleted()   # the rest donated
        assert not caches[0].sinks_held   # held inside the call only
      t = out[:, -1]
      outs.append(out)
      counts.append(len(reads))
    got[lazy] = (jnp.concatenate(outs, axis=1), caches, counts, step)
    reads.clear()
  (a, lazy, counts, step), (b, stepwise, _, _) = got[True], got[False]
  np.testing.assert_array_equal(a, b)
  for x, y in zip(jax.tree.leaves(lazy), jax.tree.leaves(stepwise)):
    np.testing.assert_array_equal(x, y)
  assert counts == [1, 2, 3, 4, 4]   # the fourth call's inputs were read calibrated
  assert step.jitted._cache_size() == 1     # the third call
  assert {k: f._cache_size() for k, f in step.lazy_jitted.items()} == {
      "when_due": 1, "never": 1, "always": 1}   # calls 1-2 (uncalibrated), 4, 5
