"""The fused kernel against the jnp reference, in interpret mode on CPU, and its lowering
for CUDA on the CPU host (a change that breaks GPU lowering fails here, without a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention
from turboquant_jax import kernel_attention
from turboquant_jax import codebook
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache


def filled_cache(rng, b, max_len, hkv, d, config, lengths):
  t = max(lengths)
  k = jnp.asarray(rng.standard_normal((b, t, hkv, d)) + 0.5, jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
  return TurboQuantKVCache.create(b, max_len, hkv, d, config=config).update(
      k, v, num_tokens=jnp.array(lengths))


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


CASES = [
    # (d, hkv, hq, config, ragged lengths)
    (64, 2, 8, TurboQuantConfig(key_bits=3, value_bits=3, window=16, num_sinks=2,
                                levels="cubic"), [120, 57]),
    (64, 1, 4, TurboQuantConfig(key_bits=2.5, value_bits=3.5, window=8), [128, 90]),
    # QJL keys, no exact tokens at all (no window, no sinks), uncentred.
    (128, 2, 4, TurboQuantConfig(key_bits=4, value_bits=2.5, key_quantizer="prod", window=0,
                                 num_sinks=0, center_keys=False, rotation="hadamard"),
     [77, 3]),
    (256, 1, 2, TurboQuantConfig(key_bits=3.5, value_bits=2, window=8, num_sinks=1), [64, 33]),
]


def test_kernel_decodes_five_bit_codes(rng):
  """5-bit codes (planes of 4 and 1 bits) decode by the ladder ("auto"); "poly" refuses."""
  config = TurboQuantConfig(key_bits=5, value_bits=4, window=8, num_sinks=1)
  cache = filled_cache(rng, 2, 128, 2, 64, config, [100, 64])
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
  ref = cache.attend(q, implementation="reference")
  got = cache.attend(q, implementation="pallas", block_k=16, num_splits=4, poison=True)
  assert rel_err(got, ref) <= 1e-3
  with pytest.raises(ValueError, match="up to 4 bits"):
    cache.attend(q, implementation="pallas", block_k=16, num_splits=4, decode="poly")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(case, rng):
  d, hkv, hq, config, lengths = CASES[case]
  cache = filled_cache(rng, 2, 128, hkv, d, config, lengths)
  q = jnp.asarray(rng.standard_normal((2, 1, hq, d)), jnp.float32)
  ref = cache.attend(q, implementation="reference")
  for decode in ("ladder", "poly", "auto"):
    got = cache.attend(q, implementation="pallas", block_k=16, num_splits=4, poison=True,
                       decode=decode)
    assert not np.any(np.isnan(np.asarray(got)))
    assert rel_err(got, ref) <= 1e-3


def test_kernel_partials_match_jnp_partials(rng):
  d, hkv, hq, config, lengths = CASES[1]
  cache = filled_cache(rng, 2, 128, hkv, d, config, lengths)
  qf = jnp.asarray(rng.standard_normal((2, hkv, 5, d)), jnp.float32)
  pos = jnp.array([[127, 127, 100, 80, -1], [89, 89, 40, 0, 12]])
  kw = dict(scale=0.2, soft_cap=4.0, sliding_window=50, num_splits=4)
  o, l, m = kernel_attention.compressed_partials(cache, qf, pos, block_k=16, interpret=True,
                                                 compute_dtype=jnp.float32, poison=True, **kw)
  o_r, l_r, m_r = kernel_attention.compressed_partials_reference(cache, qf, pos, **kw)
  np.testing.assert_allclose(m, m_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l, l_r, rtol=1e-4, atol=1e-6)
  for a, b in zip(o, o_r):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(l[1, :, :, 3]) >= 0)  # a row at position 0 sees only sinks


def test_chunked_prefill_sliding_window_soft_cap_and_gqa(rng):
  config = TurboQuantConfig(key_bits=3, value_bits=3.5, window=8, num_sinks=2)
  cache = filled_cache(rng, 2, 96, 2, 64, config, [96, 70])
  q = jnp.asarray(rng.standard_normal((2, 3, 6, 64)), jnp.float32)
  kw = dict(sliding_window=40, soft_cap=3.0, scale=0.2)
  ref = cache.attend(q, implementation="reference", **kw)
  got = cache.attend(q, implementation="pallas", block_k=16, num_splits=2, poison=True, **kw)
  assert rel_err(got, ref) <= 1e-3


def test_bfloat16_dots_stay_close(rng):
  d, hkv, hq, config, lengths = CASES[0]
  cache = filled_cache(rng, 2, 128, hkv, d, config, lengths)
  q = jnp.asarray(rng.standard_normal((2, 1, hq, d)), jnp.float32)
  ref = cache.attend(q, implementation="reference")
  got = cache.attend(q, implementation="pallas", block_k=32, compute_dtype=jnp.bfloat16)
  assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 2e-2


def test_polynomial_decode_reproduces_codebooks():
  for d in (32, 64, 128, 256):
    for bits in (1, 2, 3, 4):
      cb = codebook.lloyd_max_codebook(d, bits)
      mags = cb.centroids[2 ** (bits - 1):]
      coef = np.float32(decode_attention.magnitude_polynomial(tuple(mags)))
      m = np.arange(len(mags), dtype=np.float32)
      value = np.zeros_like(m)
      for c in coef:
        value = value * m + c
      np.testing.assert_allclose(value, mags, rtol=2e-6)


def test_choose_blocks():
  assert decode_attention.choose_blocks(32768, 64) == (64, 16)
  assert decode_attention.choose_blocks(1024, 64, num_splits=64) == (64, 16)  # a cap
  assert decode_attention.choose_blocks(48, 1) == (16, 1)  # 3 blocks: no even split
  assert decode_attention.choose_blocks(96, 1) == (32, 1)
  with pytest.raises(ValueError, match="divisible by 16"):
    decode_attention.choose_blocks(40, 1)


def test_unsupported_shapes_are_refused():
  cache = TurboQuantKVCache.create(1, 40, 1, 64)
  with pytest.raises(ValueError, match="max_len"):
    cache.attend(jnp.ones((1, 1, 1, 64)), implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    cache.attend(jnp.ones((1, 1, 1, 64)), implementation="cuda")


@pytest.mark.parametrize("d,config", [
    (64, TurboQuantConfig()),
    (128, TurboQuantConfig(key_bits=3, value_bits=3)),
    (128, TurboQuantConfig(key_bits=2, value_bits=4)),
    (256, TurboQuantConfig(key_bits=2.5, value_bits=3.5, key_quantizer="prod")),
])
@pytest.mark.parametrize("decode", ["ladder", "poly"])
def test_lowers_for_cuda(d, config, decode):
  cache = jax.eval_shape(lambda: TurboQuantKVCache.create(2, 1024, 2, d, jnp.bfloat16,
                                                          config=config))
  q = jax.ShapeDtypeStruct((2, 1, 8, d), jnp.bfloat16)
  f = lambda c, q: kernel_attention.attend(c, q, interpret=False, decode=decode)  # noqa: E731
  lowered = jax.jit(f).trace(cache, q).lower(lowering_platforms=("cuda",))
  assert "turboquant_decode" in lowered.as_text()


@pytest.mark.parametrize("interleaved", [False, True])
def test_lowers_for_cuda_with_keys_centred_before_rope(interleaved):
  from turboquant_jax.rope import RopeSpec
  spec = RopeSpec(10000.0, interleaved)
  cache = jax.eval_shape(lambda: TurboQuantKVCache.create(
      2, 1024, 2, 128, jnp.bfloat16, config=TurboQuantConfig(key_bits=3.5), rope=spec))
  assert cache.rope == spec
  q = jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16)
  f = lambda c, q: kernel_attention.attend(c, q, interpret=False)  # noqa: E731
  lowered = jax.jit(f).trace(cache, q).lower(lowering_platforms=("cuda",))
  assert "turboquant_decode" in lowered.as_text()
