"""Tensor-parallel decoders (models/sharding.py) on 8 host devices: the same tokens as on
one device, and per layer two all-reduces of activations, nothing else between devices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from conftest import forward
from models import Decoder, decode_steps
from models.config import DecoderConfig
from models.generate import _decode_steps
from models.sharding import decoder_partition_specs, shard_decoder
from turboquant_jax import TurboQuantConfig, TurboQuantKVCache
from turboquant_jax.sharding import sharded

CFG = DecoderConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4,
                    head_dim=32, ffn_dim=128)
B = 4


def mesh():
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])


# The compressed cache only: the decoder's tensor parallelism is the same for every cache,
# and a dense one is what the TurboQuant cache's exact window already exercises.
@pytest.mark.parametrize("make", [functools.partial(
    TurboQuantKVCache.create, config=TurboQuantConfig(window=8, num_sinks=2))],
    ids=["turboquant"])
def test_tensor_parallel_decode_equals_one_device(make, rng):
  prompts = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, 20)), jnp.int32)
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  logits, caches = forward(model, prompts, model.init_caches(B, 64, make), prefill=True)
  want, _ = decode_steps(model, jnp.argmax(logits[:, -1], -1), caches, 12)

  m = mesh()
  tp = shard_decoder(Decoder(CFG, rngs=nnx.Rngs(0)), m)
  assert tp.layers[0].attn.q_proj.kernel[...].sharding.spec == P(None, "model")
  assert tp.layers[0].mlp.down_proj.kernel[...].sharding.spec == P("model", None)
  tp_logits, caches = forward(tp, prompts, tp.init_caches(B, 64, sharded(make, m)),
                              prefill=True)
  np.testing.assert_allclose(tp_logits, logits, rtol=1e-4, atol=1e-4)
  # One compile of the sharded loop, run and read (its collectives) both.
  graphdef, state = nnx.split(tp)
  first = jnp.argmax(tp_logits[:, -1], -1).astype(jnp.int32)
  compiled = _decode_steps.lower(graphdef, state, first, list(caches), num_steps=12).compile()
  got, caches = compiled(state, first, list(caches))   # graphdef is static
  np.testing.assert_array_equal(got, want)
  text = compiled.as_text()
  ops = {op: [ln for ln in text.splitlines() if re.search(rf"\b{op}(-start)?\(", ln)]
         for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter",
                    "all-reduce")}
  assert not any(ops[op] for op in ("all-gather", "all-to-all", "collective-permute",
                                    "reduce-scatter")), ops
  # One after attention's output projection, one after the MLP, per layer; each as small
  # as the activations of the step ([B / data devices, 1, d_model]).
  assert len(ops["all-reduce"]) == 2 * CFG.num_layers
  for line in ops["all-reduce"]:
    dims = re.search(r"= \w+\[([\d,]*)\]", line).group(1)
    assert np.prod([int(x) for x in dims.split(",")]) <= B * CFG.d_model, line


def test_partition_specs_and_errors():
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  specs = decoder_partition_specs(model)
  assert specs["layers"][0]["attn"]["k_proj"]["kernel"].get_value() == P(None, "model")
  assert specs["layers"][0]["attn"]["o_proj"]["kernel"].get_value() == P("model", None)
  assert specs["embed"]["embedding"].get_value() == P()
  odd = Decoder(DecoderConfig(vocab_size=16, d_model=32, num_layers=1, num_heads=6,
                              num_kv_heads=2, head_dim=16, ffn_dim=64), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads = 6 does not split"):
    shard_decoder(odd, mesh())


def test_decode_loop_compiles_once_on_a_mesh_with_an_axis_of_one():
  """A jitted step returns its caches with the shardings it took (XLA drops an axis of
  one device from its specs; so do the caches), so call after call hits the cache."""
  from jax.sharding import NamedSharding
  m = jax.make_mesh((1, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                    devices=jax.devices()[:4])
  model = shard_decoder(Decoder(CFG, rngs=nnx.Rngs(0)), m)
  make = functools.partial(TurboQuantKVCache.create, config=TurboQuantConfig(window=8))
  caches = model.init_caches(B, 32, sharded(make, m))
  assert caches[0].cache.lengths.sharding.spec == P()
  token = jax.device_put(jnp.zeros((B,), jnp.int32), NamedSharding(m, P()))
  before = _decode_steps._cache_size()
  for _ in range(3):
    out, caches = decode_steps(model, token, caches, 2)
    token = out[:, -1]
  assert _decode_steps._cache_size() == before + 1
