"""The index scoring kernel (interpret mode) against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import index_scoring
from turboquant_jax.quantizers import MSEQuantizer, ProdQuantizer


def setup(rng, cls, d, bits, n=512, q=5):
  quantizer = cls.create(jax.random.PRNGKey(1), d, bits)
  codes = quantizer.quantize(jnp.asarray(rng.standard_normal((n, d)), jnp.float32))
  sq = jnp.sum(quantizer.rotated_values(codes) ** 2, axis=-1)
  valid = jnp.asarray(rng.random(n) > 0.2)
  q_t = quantizer.rotate_queries(jnp.asarray(rng.standard_normal((q, d)), jnp.float32))
  return quantizer, (q_t if isinstance(q_t, tuple) else (q_t,)), codes, sq, valid


@pytest.mark.parametrize("cls,d,bits", [(MSEQuantizer, 64, 1), (MSEQuantizer, 128, 2),
                                        (MSEQuantizer, 64, 3), (MSEQuantizer, 32, 4),
                                        (ProdQuantizer, 64, 2), (ProdQuantizer, 128, 4)])
@pytest.mark.parametrize("metric,k", [("ip", 1), ("l2", 10), ("ip", 37)])
def test_block_top_k_matches_reference(cls, d, bits, metric, k, rng):
  quantizer, q_t, codes, sq, valid = setup(rng, cls, d, bits)
  s, i = index_scoring.block_top_k(quantizer, q_t, codes, sq, valid, k=k, metric=metric,
                                   interpret=True)
  ref = index_scoring.block_scores_reference(quantizer, q_t, codes, sq, valid, metric=metric)
  want_s, want_i = jax.lax.top_k(ref, k)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)
  assert bool(jnp.all(valid[i]))


@pytest.mark.parametrize("cls,bits", [(MSEQuantizer, 4), (ProdQuantizer, 3)])
def test_lowers_for_cuda(cls, bits):
  quantizer = cls.create(jax.random.PRNGKey(0), 128, bits)
  codes = jax.eval_shape(quantizer.quantize, jax.ShapeDtypeStruct((4096, 128), jnp.float32))
  q_t = jax.eval_shape(quantizer.rotate_queries, jax.ShapeDtypeStruct((32, 128), jnp.float32))
  q_t = q_t if isinstance(q_t, tuple) else (q_t,)
  f = lambda c, q, s, v: index_scoring.block_top_k(  # noqa: E731
      quantizer, q, c, s, v, k=10, metric="ip", interpret=False, compute_dtype=jnp.bfloat16)
  lowered = jax.jit(f).trace(codes, q_t, jax.ShapeDtypeStruct((4096,), jnp.float32),
                             jax.ShapeDtypeStruct((4096,), bool)).lower(
                                 lowering_platforms=("cuda",))
  assert "turboquant_index_scores" in lowered.as_text()


def test_query_tiles_and_program_streams(rng):
  """More than one 64-query tile, several tiles per program, removed rows."""
  quantizer, q_t, codes, sq, valid = setup(rng, MSEQuantizer, 64, 3, n=1024, q=150)
  s, i = index_scoring.block_top_k(quantizer, q_t, codes, sq, valid, k=7, metric="ip",
                                   interpret=True, tiles_per_program=4)
  ref = index_scoring.block_scores_reference(quantizer, q_t, codes, sq, valid, metric="ip")
  want_s, want_i = jax.lax.top_k(ref, 7)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)
