"""The bit budget spread over layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import forward
from models import Decoder, evaluation
from tests.test_decoder import TINY
from turboquant_jax import TurboQuantConfig, turboquant_per_layer
from turboquant_jax.budget import (KEY_WEIGHT, allocate_bits, budget_layer_bits,
                                   mean_stored_bits, measured_layer_bits, readback_errors,
                                   stored_bits, width_distortion, width_errors)
from turboquant_jax.channel_split import CACHE_BITS
from turboquant_jax.codebook import lloyd_max_codebook


def test_stored_bits_count_norms():
  cfg = TurboQuantConfig(key_bits=3, value_bits=3.5)
  kb, vb = stored_bits(cfg, 64)
  assert kb == 3 + 16 / 64                   # one fp16 norm per vector
  assert vb == 3.5 + 2 * 16 / 64             # two groups, a norm each
  # Norms per side: 16-bit key norms, 8-bit value norms.
  pair = TurboQuantConfig(key_bits=3.5, value_bits=3, norm_dtype=(jnp.float16,
                                                                   jnp.float8_e4m3fn))
  assert stored_bits(pair, 64) == (3.5 + 2 * 16 / 64, 3 + 8 / 64)
  # ... and a budget over them is met: 16-bit key norms paid from the codes.
  bits = budget_layer_bits(3.5, 30, 64, config=pair)
  assert 3.5 - 1 / 30 < mean_stored_bits(bits, 64, pair) <= 3.5 + 1e-9


@pytest.mark.parametrize("key_weight", [None, KEY_WEIGHT])
@pytest.mark.parametrize("budget, head_dim", [(3.0, 64), (3.5, 64), (2.5, 256), (3.5, 256),
                                              (4.3, 64)])
def test_budget_is_never_exceeded_and_nothing_more_fits(budget, head_dim, key_weight):
  window = lambda i: None if i % 3 == 2 else 512  # noqa: E731 - Gemma-like: 1 global in 3
  bits = budget_layer_bits(budget, 9, head_dim, layer_window=window, key_weight=key_weight)
  spent = mean_stored_bits(bits, head_dim)
  assert spent <= budget + 1e-9
  for layer, (kb, vb) in bits.items():
    for side, b in ((0, kb), (1, vb)):
      i = CACHE_BITS.index(b)
      if i + 1 < len(CACHE_BITS):
        wider = dict(bits)
        wider[layer] = (CACHE_BITS[i + 1], vb) if side == 0 else (kb, CACHE_BITS[i + 1])
        assert mean_stored_bits(wider, head_dim) > budget, (layer, side)


def test_keys_and_global_layers_get_bits_first():
  window = lambda i: None if i == 2 else 512  # noqa: E731
  # Just above uniform 3 bits at d = 256 (3.0625 stored): room for a few steps only.
  bits = budget_layer_bits(3.2, 6, 256, layer_window=window)
  assert bits[2][0] == max(kb for kb, _ in bits.values())       # the global layer's keys
  assert all(kb >= vb for kb, vb in bits.values())
  assert min(min(b) for b in bits.values()) == 3
  uniform = budget_layer_bits(3.0625, 6, 256)
  assert set(uniform.values()) == {(3, 3)}


def test_width_distortion_is_the_codebooks_and_falls_with_width():
  widths = (2, 2.5, 3, 3.5, 4, 5)
  dist = width_distortion(widths, 64)
  assert np.all(np.diff(dist) < 0)
  assert dist[2] == lloyd_max_codebook(64, 3).mse
  # A fractional width: half the channels at each neighbour, each half its own d = 32.
  assert dist[1] == pytest.approx((lloyd_max_codebook(32, 3).mse
                                   + lloyd_max_codebook(32, 2).mse) / 2, rel=1e-12)


def test_key_weight_lets_keys_sit_above_values_where_the_model_says_so():
  pair = TurboQuantConfig(norm_dtype=(jnp.float16, jnp.float8_e4m3fn))
  weighted = budget_layer_bits(3.5, 30, 64, config=pair, key_weight=KEY_WEIGHT)
  uniform = budget_layer_bits(3.5, 30, 64, config=pair)
  # SmolLM2's shapes: 4-bit keys and 2.5-bit values everywhere, exactly 3.5 stored bits
  # (the uniform start gives K3.5/V3 and K3/V3, never a key a whole bit above its value).
  assert set(weighted.values()) == {(4, 2.5)}
  assert mean_stored_bits(weighted, 64, pair) == pytest.approx(3.5)
  assert all(kb - vb <= 0.5 for kb, vb in uniform.values())
  widths = (2, 2.5, 3, 3.5, 4)
  dist = dict(zip(widths, width_distortion(widths, 64)))

  def model(bits, w):
    return sum(w * dist[kb] + dist[vb] for kb, vb in bits.values())

  # The uniform start is among those tried, so the weighted choice models no worse ...
  for w in (1.0, KEY_WEIGHT, 16.0):
    assert model(budget_layer_bits(3.5, 30, 64, config=pair, key_weight=w), w) <= (
        model(uniform, w) + 1e-12)
  # ... and with equal weights keys get no more than values' share.
  equal = budget_layer_bits(3.5, 30, 64, config=pair, key_weight=1.0)
  assert sum(kb - vb for kb, vb in equal.values()) <= sum(kb - vb for kb, vb in
                                                           weighted.values())


@pytest.mark.parametrize("key_weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_key_weight_raises(key_weight):
  with pytest.raises(ValueError, match="key_weight"):
    budget_layer_bits(3.5, 4, 64, key_weight=key_weight)


def test_budget_below_the_narrowest_width_raises():
  with pytest.raises(ValueError, match="narrowest"):
    budget_layer_bits(2.0, 4, 64)                 # 2 bits store 2.25 at d = 64
  with pytest.raises(ValueError, match="num_layers"):
    budget_layer_bits(3.0, 0, 64)


def test_decoder_caches_record_the_choice_and_cost_what_was_budgeted():
  cfg = TINY["gemma"]
  bits = budget_layer_bits(3.4, cfg.num_layers, cfg.head_dim, layer_window=cfg.layer_window)
  base = TurboQuantConfig(window=4)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  caches = model.init_caches(1, 64, turboquant_per_layer(base, layer_bits=bits))
  assert [(c.config.key_bits, c.config.value_bits) for c in caches] == list(bits.values())
  per_token = sum(c.memory_report()["bytes_per_token_per_head"] * c.num_kv_heads
                  for c in caches)
  coords = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
  assert per_token * 8 / coords == pytest.approx(mean_stored_bits(bits, cfg.head_dim, base))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 8), 0, cfg.vocab_size)
  logits, _ = forward(model, tokens, caches)
  assert bool(jnp.all(jnp.isfinite(logits)))
  # The global layer (index 2) is at least as wide as the local ones, on both sides.
  assert all(bits[2][s] >= bits[i][s] for i in (0, 1) for s in (0, 1))


def test_tiles_budgets_use_integer_widths_and_other_subsets_are_honoured():
  tiles = TurboQuantConfig(key_bits=3, value_bits=3, levels="cubic", layout="tiles")
  window = lambda i: None if i % 3 == 2 else 512  # noqa: E731
  for budget in (2.6, 3.0, 3.5, 3.9):
    bits = budget_layer_bits(budget, 9, 128, layer_window=window, config=tiles)
    assert {b for kv in bits.values() for b in kv} <= {2, 3, 4}
    assert mean_stored_bits(bits, 128, tiles) <= budget + 1e-9
  # 3.5 stored bits at d = 128: uniform 3 bits fit, and the global layers' keys rise first.
  bits = budget_layer_bits(3.5, 9, 128, layer_window=window, config=tiles)
  assert all(bits[i][0] == 4 for i in (2, 5, 8)) and min(min(b) for b in bits.values()) == 3
  assert mean_stored_bits(bits, 128, tiles) > 3.125      # more than uniform 3 bits
  planes = budget_layer_bits(3.3, 4, 64, widths=(2, 3))
  assert set(planes.values()) == {(3, 3)}
  with pytest.raises(ValueError, match="subset"):
    budget_layer_bits(3.0, 4, 64, widths=(3, 3.25))
  with pytest.raises(ValueError, match="subset"):
    budget_layer_bits(3.0, 4, 64, widths=())


def _upgrade_fits(bits, errors, costs, widths, budget):
  """Whether some side of some layer could still move to a wider width that removes error
  and stays within the budget."""
  spent = sum(costs[widths.index(b), side] for kv in bits.values()
              for side, b in enumerate(kv))
  for layer, kv in bits.items():
    for side, b in enumerate(kv):
      i = widths.index(b)
      for j in range(i + 1, len(widths)):
        fits = spent + costs[j, side] - costs[i, side] <= budget * 2 * len(bits) + 1e-9
        if fits and errors[layer][side][j] < errors[layer][side][i]:
          return True
  return False


def test_allocate_bits_spends_where_the_errors_fall():
  widths = [2, 3, 4]
  costs = np.array([[2.25, 2.25], [3.25, 3.25], [4.25, 4.25]])
  curve = np.array([0.1, 0.05, 0.025])
  errors = {layer: np.stack([curve, curve]) for layer in range(4)}
  errors[2] = errors[2] * 10                     # layer 2 loses 10x more on both sides
  errors[1] = np.stack([4 * curve, curve])       # layer 1's keys 4x
  bits = allocate_bits(errors, costs, 3.25, widths)   # the cost of uniform 3 bits
  assert bits[2] == (4, 4) and bits[1][0] == 4
  assert bits[3] == (2, 2)                       # the cheapest layers pay for them
  spent = sum(costs[widths.index(b), 0] for kv in bits.values() for b in kv) / 8
  assert spent <= 3.25 + 1e-9
  assert not _upgrade_fits(bits, errors, costs, widths, 3.25)


@pytest.mark.parametrize("seed", [0, 1])
def test_allocate_bits_leaves_no_useful_step_that_fits(seed):
  rng = np.random.default_rng(seed)
  widths = [2, 2.5, 3, 3.5, 4]
  costs = np.array([stored_bits(TurboQuantConfig(key_bits=b, value_bits=b), 64) for b in widths])
  errors = {layer: np.sort(rng.exponential(size=(2, 5)), axis=1)[:, ::-1] for layer in range(6)}
  errors[0][0, 2] = errors[0][0, 1] * 1.5        # not monotone: a wider width may be worse
  for budget in (2.5, 3.0, 3.5, 4.0):
    bits = allocate_bits(errors, costs, budget, widths)
    assert mean_stored_bits(bits, 64) <= budget + 1e-9
    assert not _upgrade_fits(bits, errors, costs, widths, budget)


def test_allocate_bits_rejects_bad_input():
  widths, costs = [2, 3], np.array([[2.25, 2.25], [3.25, 3.25]])
  good = {0: np.ones((2, 2))}
  with pytest.raises(ValueError, match="narrowest"):
    allocate_bits(good, costs, 2.0, widths)
  with pytest.raises(ValueError, match="finite"):
    allocate_bits({0: np.array([[1.0, np.nan], [1.0, 0.5]])}, costs, 3.0, widths)
  with pytest.raises(ValueError, match="finite"):
    allocate_bits({0: np.ones((2, 3))}, costs, 3.0, widths)
  with pytest.raises(ValueError, match="costs"):
    allocate_bits(good, costs[:1], 3.0, widths)
  with pytest.raises(ValueError, match="at least one"):
    allocate_bits({}, costs, 3.0, widths)


def random_qkv(seed: int, b=1, t=64, hq=4, hkv=2, d=32):
  """q [B, T, Hq, D], k (scale 2), v [B, T, Hkv, D] float32 normals."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, t, hkv, d)) * 2, jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
  return q, k, v


def test_width_errors_fall_with_width_and_keep_the_sides_apart():
  q, k, v = random_qkv(0)
  cfg = TurboQuantConfig()
  e = width_errors(q, k, v, config=cfg, widths=(2, 3, 4))
  assert e.shape == (2, 3) and np.all(e > 0)
  assert np.all(e[:, 2] < e[:, 0] / 4)                 # 4 bits lose far less than 2
  # Every token the same value: the keys cannot change the output, only the values can.
  same = jnp.broadcast_to(v[:, :1], v.shape)
  e = width_errors(q, k, same, config=cfg, widths=(2, 4))
  assert np.all(e[0] < 1e-10) and np.all(e[1] > 1e-6)


def test_readback_errors_by_layer_and_with_both_sides():
  q, k, v = random_qkv(1)
  cfg = TurboQuantConfig(key_bits=3, value_bits=3, window=0)
  e = readback_errors(q, k, v, [cfg], both=True)
  assert e.shape == (1, 3) and np.all(e > 0)
  # Its keys and values columns are width_errors' rows at that width.
  np.testing.assert_allclose(e[:, :2].T, width_errors(q, k, v, config=cfg, widths=(3,)))
  # Every token the same value (no exact sinks): the keys cannot move the output, so
  # reading both back errs exactly as reading the values back.
  same = jnp.broadcast_to(v[:, :1], v.shape)
  e = readback_errors(q, k, same, [dataclasses.replace(cfg, num_sinks=0)], both=True)
  assert e[0, 0] < 1e-10 and e[0, 1] > 1e-6
  np.testing.assert_allclose(e[0, 2], e[0, 1], rtol=1e-4)
  # Another layer index draws other rotations, hence other errors.
  other = readback_errors(q, k, v, [cfg], layer=1)
  assert not np.allclose(other, readback_errors(q, k, v, [cfg]))


def test_measured_budget_on_a_decoder():
  cfg = TINY["gemma"]
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 32), 0, cfg.vocab_size)
  qkv = evaluation.layer_qkv(model, tokens)
  base = TurboQuantConfig(window=4)
  bits, errors = measured_layer_bits(
      3.4, qkv, config=base, widths=(4, 2, 3), layer_window=cfg.layer_window,
      layer_rope=cfg.layer_rope, scale=cfg.scale, soft_cap=cfg.attn_soft_cap)
  assert mean_stored_bits(bits, cfg.head_dim, base) <= 3.4 + 1e-9
  assert set(errors) == {0, 1, 2} and {b for kv in bits.values() for b in kv} <= {2, 3, 4}
  # Local layers (5-token windows, 4 of them exact) weigh a fifth of their error.
  raw = width_errors(*qkv[0], config=base, widths=[2, 3, 4], rope=cfg.layer_rope(0),
                     scale=cfg.scale, sliding_window=5, soft_cap=cfg.attn_soft_cap)
  np.testing.assert_allclose(errors[0], raw * 0.2, rtol=1e-6)
  caches = model.init_caches(1, 64, turboquant_per_layer(base, layer_bits=bits))
  assert [(c.config.key_bits, c.config.value_bits) for c in caches] == list(bits.values())


# -- rings for sliding-window layers within the budget -----------------------------------

@pytest.mark.parametrize("max_len, kind", [(8, None), (16, "int8"), (25, "int8 exact"),
                                           (64, "bfloat16")])
def test_ring_budget_buys_finer_rings_as_capacity_grows_and_meets_the_budget(max_len, kind):
  """TINY gemma: two local layers (5-token window), one global. A ring costs its window
  whatever the capacity; the globals keep at least the budget; the bits counted from the
  caches' own buffers at max_len are what the choice says, within the budget."""
  from turboquant_jax.budget import budget_with_rings, ring_budget_cache
  from turboquant_jax.ring_cache import RingKVCache
  cfg, base = TINY["gemma"], TurboQuantConfig(window=4)
  choice = budget_with_rings(3.0, max_len, cfg.num_layers, cfg.head_dim,
                             layer_window=cfg.layer_window, config=base, exact_recent=2)
  assert choice.rings == kind
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  caches = model.init_caches(1, max_len, ring_budget_cache(choice, cfg.layer_window,
                                                           config=base))
  stored = 0.0
  for layer, c in enumerate(caches):
    if isinstance(c, RingKVCache):
      assert kind is not None and cfg.layer_window(layer) is not None
      assert c.quantized == (kind != "bfloat16")
      assert (c.recent_keys is not None) == (kind == "int8 exact")
      stored += c.memory_report()["keys_values"]
    else:
      assert (c.config.key_bits, c.config.value_bits) == choice.layer_bits[layer]
      stored += c.memory_report()["bytes_per_token_per_head"] * c.num_kv_heads * max_len
  coords = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * max_len
  assert stored * 8 / coords == pytest.approx(choice.bits_at_capacity)
  assert choice.bits_at_capacity <= 3.0 + 1e-9
  if kind is not None:
    kb, vb = stored_bits(dataclasses.replace(base, key_bits=choice.layer_bits[2][0],
                                             value_bits=choice.layer_bits[2][1]),
                         cfg.head_dim)
    assert (kb + vb) / 2 >= 3.0
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 7), 0, cfg.vocab_size)
  for t in range(7):              # past the window: the rings wrap
    logits, caches = forward(model, tokens[:, t:t + 1], caches)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_ring_budgets_take_five_bits_plain_budgets_stop_at_four():
  """The plain budget's default widths stop at 4 bits (its committed choices); beside
  rings the globals may take 5 (measured there): a 3.5 budget whose globals sat at 4 with
  bits to spare raises them, within the budget; tiles stay at 2-4."""
  from turboquant_jax.budget import BUDGET_WIDTHS, budget_with_rings
  assert max(BUDGET_WIDTHS) == 4
  window = lambda i: None if i % 6 == 5 else 512  # noqa: E731
  base = TurboQuantConfig(window=256)
  four = budget_with_rings(3.5, 2048, 18, 256, layer_window=window, config=base,
                           widths=BUDGET_WIDTHS)
  five = budget_with_rings(3.5, 2048, 18, 256, layer_window=window, config=base)
  assert set(four.layer_bits.values()) == {(4, 4)}
  assert set(five.layer_bits.values()) == {(5, 5)} and five.rings == four.rings
  assert four.bits_at_capacity < five.bits_at_capacity <= 3.5 + 1e-9
  for narrow in (TurboQuantConfig(window=256, layout="tiles", levels="cubic"),
                 TurboQuantConfig(window=256, levels="int8"),
                 TurboQuantConfig(window=256, key_quantizer="prod")):
    assert max(max(kv) for kv in budget_with_rings(
        3.5, 2048, 18, 256, layer_window=window, config=narrow).layer_bits.values()) == 4
  assert max(max(kv) for kv in budget_layer_bits(4.6, 4, 128).values()) == 4
  bits = budget_layer_bits(4.6, 4, 128, widths=(2, 3, 4, 5))
  assert 5 in {b for kv in bits.values() for b in kv}
  assert mean_stored_bits(bits, 128, TurboQuantConfig()) <= 4.6 + 1e-9


def test_ring_budget_rejects_bad_input():
  from turboquant_jax.budget import budget_with_rings, ring_bits
  with pytest.raises(ValueError, match="layer_window"):
    budget_with_rings(3.0, 64, 3, 32, layer_window=None)
  with pytest.raises(ValueError, match="max_len"):
    budget_with_rings(3.0, 0, 3, 32, layer_window=lambda i: 5)
  with pytest.raises(ValueError, match="kind"):
    ring_bits("fp8", 5, 64, 32)
