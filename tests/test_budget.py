"""The bit budget spread over layers."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from models import Decoder
from tests.test_decoder import TINY
from turboquant_jax import TurboQuantConfig, turboquant_per_layer
from turboquant_jax.budget import budget_layer_bits, mean_stored_bits, stored_bits
from turboquant_jax.channel_split import CACHE_BITS


def test_stored_bits_count_norms():
  cfg = TurboQuantConfig(key_bits=3, value_bits=3.5)
  kb, vb = stored_bits(cfg, 64)
  assert kb == 3 + 16 / 64                   # one fp16 norm per vector
  assert vb == 3.5 + 2 * 16 / 64             # two groups, a norm each


@pytest.mark.parametrize("budget, head_dim", [(3.0, 64), (3.5, 64), (2.5, 256), (3.5, 256),
                                              (4.3, 64)])
def test_budget_is_never_exceeded_and_nothing_more_fits(budget, head_dim):
  window = lambda i: None if i % 3 == 2 else 512  # noqa: E731 - Gemma-like: 1 global in 3
  bits = budget_layer_bits(budget, 9, head_dim, layer_window=window)
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
  logits, _ = model(tokens, caches=caches)
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
