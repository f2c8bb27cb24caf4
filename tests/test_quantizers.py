import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import codebook, packing, quantizers
from turboquant_jax.quantizers import MSEQuantizer, ProdQuantizer

from conftest import unit_vectors

D = 128
N = 20_000
# Exact-density Lloyd-Max D_mse at d = 128 (../shared/turboquant-notes.md).
D_MSE_128 = {0: 1.0, 1: 0.361, 2: 0.116, 3: 0.034, 4: 0.0093}


@pytest.fixture(scope="module")
def unit_data():
  x = unit_vectors(jax.random.PRNGKey(10), N, D)
  y = unit_vectors(jax.random.PRNGKey(11), N, D)
  return x, y


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_lloyd_max_and_paper_bound(bits, rotation, unit_data):
  x, _ = unit_data
  q = MSEQuantizer.create(jax.random.PRNGKey(0), D, bits, rotation=rotation)
  x_hat = jax.jit(lambda v: q.dequantize(q.quantize(v)))(x)
  d_mse = float(jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1)))
  assert d_mse == pytest.approx(D_MSE_128[bits], rel=0.03)
  assert d_mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_mse_five_bits_match_their_codebook_and_the_paper_bound(unit_data):
  """5 bits (a cache width): D_mse as its Lloyd-Max codebook predicts, about 4x below 4
  bits' and within the paper's bound."""
  x, _ = unit_data
  q = MSEQuantizer.create(jax.random.PRNGKey(0), D, 5)
  x_hat = jax.jit(lambda v: q.dequantize(q.quantize(v)))(x)
  d_mse = float(jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1)))
  assert d_mse == pytest.approx(codebook.lloyd_max_codebook(D, 5).mse, rel=0.03)
  assert 3.0 < D_MSE_128[4] / d_mse < 4.5
  assert d_mse <= math.sqrt(3) * math.pi / 2 * 4.0**-5


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_inner_products_unbiased_with_predicted_variance(bits, unit_data):
  x, y = unit_data
  q = ProdQuantizer.create(jax.random.PRNGKey(1), D, bits)
  est = jax.jit(lambda a, b: q.inner_products(a[:, None, :], jax.tree.map(
      lambda c: c[:, None], q.quantize(b)))[:, 0, 0])(y, x)
  err = np.asarray(est, np.float64) - np.sum(np.asarray(x, np.float64) * np.asarray(y), -1)
  assert abs(err.mean()) < 3 * err.std() / math.sqrt(N)
  predicted = (math.pi / 2) * D_MSE_128[bits - 1] / D
  assert err.var() == pytest.approx(predicted, rel=0.15)
  # And the paper's upper bound on D_prod.
  assert err.var() <= math.sqrt(3) * math.pi**2 / D * 4.0**-bits


@pytest.mark.parametrize("cls", [MSEQuantizer, ProdQuantizer])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_inner_products_equal_dequantize_the_slow_way(cls, bits, rng):
  q = cls.create(jax.random.PRNGKey(2), 64, bits)
  keys = jnp.asarray(rng.standard_normal((2, 50, 64)) * 3, jnp.float32)
  queries = jnp.asarray(rng.standard_normal((2, 7, 64)), jnp.float32)
  codes = q.quantize(keys)
  fast = jax.jit(q.inner_products)(queries, codes)
  slow = jnp.einsum("bqd,bnd->bqn", queries, q.dequantize(codes),
                    precision=jax.lax.Precision.HIGHEST)
  assert fast.shape == (2, 7, 50)
  np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def numpy_mse_quantize(q, x):
  """Algorithm 1 in float64 numpy with the quantizer's rotation and codebook."""
  pi = np.asarray(q.rotation.as_matrix(), np.float64)
  cb = codebook.lloyd_max_codebook(q.dim, q.bits)
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=-1)
  y = (x / norms[:, None]) @ pi.T
  idx = np.argmin(np.abs(y[..., None] - cb.centroids), axis=-1)
  return idx, norms, y, cb


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("bits", [2, 3])
def test_codes_match_float64_numpy(bits, rotation, rng):
  q = MSEQuantizer.create(jax.random.PRNGKey(3), 64, bits, rotation=rotation)
  x = rng.standard_normal((2000, 64))
  idx, norms, y, cb = numpy_mse_quantize(q, x)
  for fn in (q.quantize, jax.jit(q.quantize)):
    codes = fn(jnp.asarray(x, jnp.float32))
    got = quantizers.level_of_code(bits)[np.asarray(packing.unpack_codes(codes.planes, bits))]
    differ = got != idx
    # float32 vs float64 may only disagree for coordinates on a decision boundary.
    assert differ.mean() < 1e-4
    if differ.any():
      gap = np.min(np.abs(y[differ][:, None] - cb.boundaries), axis=-1)
      assert np.all(gap < 1e-5)
    np.testing.assert_allclose(codes.norms, norms, rtol=1e-6)
  x_hat = (norms[:, None] * cb.centroids[idx]) @ np.asarray(q.rotation.as_matrix(), np.float64)
  np.testing.assert_allclose(q.dequantize(q.quantize(jnp.asarray(x, jnp.float32))), x_hat,
                             atol=1e-4)


def _assert_same_codes(a, b):
  """Integer codes bit-exact; norms up to float32 rounding (XLA fuses differently)."""
  if jnp.issubdtype(a.dtype, jnp.integer):
    np.testing.assert_array_equal(a, b)
  else:
    np.testing.assert_allclose(a, b, rtol=2e-6)


@pytest.mark.parametrize("cls", [MSEQuantizer, ProdQuantizer])
def test_jit_and_vmap_give_eager_codes(cls, rng):
  q = cls.create(jax.random.PRNGKey(4), 64, 3)
  x = jnp.asarray(rng.standard_normal((4, 9, 64)), jnp.float32)
  eager = q.quantize(x)
  for other in (jax.jit(q.quantize)(x), jax.vmap(q.quantize)(x),
                jax.jit(jax.vmap(jax.vmap(q.quantize)))(x)):
    jax.tree.map(_assert_same_codes, eager, other)


@pytest.mark.parametrize("cls", [MSEQuantizer, ProdQuantizer])
def test_vmap_over_heads_with_one_quantizer_per_head(cls, rng):
  heads = 4
  keys = jax.random.split(jax.random.PRNGKey(5), heads)
  make = functools.partial(cls.create, d=64, bits=3)
  stacked = jax.vmap(make)(keys)
  x = jnp.asarray(rng.standard_normal((heads, 30, 64)), jnp.float32)
  qs = jnp.asarray(rng.standard_normal((heads, 2, 64)), jnp.float32)
  scores = jax.jit(jax.vmap(lambda quant, k, qq: quant.inner_products(qq, quant.quantize(k))))(
      stacked, x, qs)
  for h in range(heads):
    one = make(keys[h])
    np.testing.assert_allclose(scores[h], one.inner_products(qs[h], one.quantize(x[h])),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype, rng):
  q = MSEQuantizer.create(jax.random.PRNGKey(6), 64, 4)
  x = jnp.asarray(rng.standard_normal((500, 64)), dtype)
  x_hat = q.dequantize(q.quantize(x))
  assert x_hat.dtype == jnp.float32
  rel = jnp.sum((x.astype(jnp.float32) - x_hat) ** 2) / jnp.sum(x.astype(jnp.float32) ** 2)
  assert float(rel) < 0.012
  assert q.dequantize(q.quantize(x), dtype=dtype).dtype == dtype


@pytest.mark.parametrize("d", [80, 96, 256])
def test_other_head_dims(d, rng):
  x = unit_vectors(jax.random.PRNGKey(7), 4000, d)
  q = MSEQuantizer.create(jax.random.PRNGKey(8), d, 3)
  d_mse = float(jnp.mean(jnp.sum((x - q.dequantize(q.quantize(x))) ** 2, -1)))
  assert d_mse == pytest.approx(codebook.lloyd_max_codebook(d, 3).mse, rel=0.06)


@pytest.mark.parametrize("cls", [MSEQuantizer, ProdQuantizer])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bytes_per_vector_are_real(cls, bits):
  q = cls.create(jax.random.PRNGKey(9), 128, bits, norm_dtype=jnp.float16)
  codes = q.quantize(jnp.ones((10, 128)))
  assert codes.nbytes == 10 * q.bytes_per_vector()
  norms = 2 if cls is MSEQuantizer or bits == 1 else 4
  assert q.bytes_per_vector() == 128 * bits // 8 + norms


@pytest.mark.parametrize("cls", [MSEQuantizer, ProdQuantizer])
def test_zero_vector_round_trips_to_zero(cls):
  q = cls.create(jax.random.PRNGKey(10), 32, 2)
  x = jnp.zeros((3, 32)).at[1].set(1.0)
  x_hat = jax.jit(lambda v: q.dequantize(q.quantize(v)))(x)
  assert not np.any(np.isnan(np.asarray(x_hat)))
  np.testing.assert_array_equal(x_hat[0], 0.0)
  np.testing.assert_array_equal(x_hat[2], 0.0)


@pytest.mark.parametrize("cls", [MSEQuantizer, ProdQuantizer])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_reported(cls, bad):
  q = cls.create(jax.random.PRNGKey(11), 32, 2)
  x = jnp.ones((4, 32)).at[2, 5].set(bad)
  with pytest.raises(ValueError, match="NaN or Inf"):
    q.quantize(x)
  # Under jit nothing can raise: the bad row decodes to NaN, the others are untouched.
  x_hat = jax.jit(lambda v: q.dequantize(q.quantize(v)))(x)
  assert np.all(np.isnan(np.asarray(x_hat[2])))
  assert np.all(np.isfinite(np.asarray(x_hat[np.array([0, 1, 3])])))


def test_bad_configuration_and_input():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="bits"):
    MSEQuantizer.create(key, 64, 6)
  with pytest.raises(ValueError, match="bits"):
    MSEQuantizer.create(key, 64, 0)
  with pytest.raises(ValueError, match="bits"):
    ProdQuantizer.create(key, 64, 5)
  with pytest.raises(ValueError, match="d >= 16"):
    MSEQuantizer.create(key, 8, 2)
  with pytest.raises(ValueError, match="power-of-two"):
    MSEQuantizer.create(key, 96, 2, rotation="hadamard")
  with pytest.raises(ValueError, match="sketch_dim"):
    ProdQuantizer.create(key, 64, 2, sketch_dim=12)
  q = MSEQuantizer.create(key, 64, 2)
  with pytest.raises(ValueError, match=r"shape \[..., 64\]"):
    q.quantize(jnp.ones((3, 32)))
  with pytest.raises(ValueError, match="floating"):
    q.quantize(jnp.ones((3, 64), jnp.int32))
  with pytest.raises(ValueError, match="q must"):
    q.inner_products(jnp.ones((2, 32)), q.quantize(jnp.ones((3, 64))))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codes_are_sign_magnitude(bits):
  q = MSEQuantizer.create(jax.random.PRNGKey(12), 64, bits)
  half = 2 ** (bits - 1)
  values = np.asarray(q.code_values)
  mags = np.asarray(q.centroids)[half:]
  np.testing.assert_array_equal(values[half:], mags)       # top bit set: +magnitude[m]
  np.testing.assert_array_equal(values[:half], -mags)      # top bit clear: -magnitude[m]
  assert np.all(np.diff(mags) > 0)


@pytest.mark.parametrize("bits", [3, 4])
def test_cubic_levels_distortion_matches_their_codebook(bits, unit_data):
  """levels="cubic": the codebook the Mosaic GPU kernel decodes; measured D_mse on random
  unit vectors equals the codebook's own figure, a little above Lloyd-Max's."""
  x, _ = unit_data
  q = MSEQuantizer.create(jax.random.PRNGKey(0), D, bits, levels="cubic")
  cb = codebook.cubic_codebook(D, bits)
  np.testing.assert_allclose(q.centroids, cb.centroids, rtol=1e-6)
  assert q.static_codebook() is cb
  x_hat = jax.jit(lambda v: q.dequantize(q.quantize(v)))(x)
  d_mse = float(jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1)))
  assert d_mse == pytest.approx(cb.mse, rel=0.03)
  with pytest.raises(ValueError, match="levels"):
    MSEQuantizer.create(jax.random.PRNGKey(0), D, bits, levels="linear")


def test_uniform_levels_distortion_matches_their_codebook(unit_data):
  """levels="uniform": evenly spaced levels (the int8 kernel's plain nibbles at 4 bits);
  measured D_mse on random unit vectors is the codebook's own, ~20% above Lloyd-Max's."""
  x, _ = unit_data
  q = MSEQuantizer.create(jax.random.PRNGKey(0), D, 4, levels="uniform")
  cb = codebook.uniform_codebook(D, 4)
  assert q.static_codebook() is cb
  np.testing.assert_allclose(np.diff(q.centroids), np.diff(q.centroids)[0], rtol=1e-5)
  x_hat = jax.jit(lambda v: q.dequantize(q.quantize(v)))(x)
  d_mse = float(jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1)))
  assert d_mse == pytest.approx(cb.mse, rel=0.03)
  assert d_mse > 1.1 * codebook.lloyd_max_codebook(D, 4).mse
  with pytest.raises(ValueError, match="1 to 4 bits"):
    MSEQuantizer.create(jax.random.PRNGKey(0), D, 5, levels="uniform")


def test_norm_dtypes_checked_and_float8_saturates():
  """8-bit norms: checked dtypes, no NaN past float8's largest value (its casts overflow
  to NaN), and a distortion a few percent above float16 norms' (~3.6% RMS on ‖x‖)."""
  from turboquant_jax.turboquant_cache import TurboQuantConfig
  with pytest.raises(ValueError, match="norm_dtype"):
    MSEQuantizer.create(jax.random.PRNGKey(0), 64, 3, norm_dtype=jnp.int8)
  with pytest.raises(ValueError, match="norm_dtype"):
    TurboQuantConfig(norm_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (2048, 64))
  rel = {}
  for nd in (jnp.float16, jnp.float8_e4m3fn):
    q = MSEQuantizer.create(jax.random.PRNGKey(2), 64, 3, norm_dtype=nd)
    xh = q.dequantize(q.quantize(x))
    rel[nd] = float(jnp.mean(jnp.sum((x - xh) ** 2, -1) / jnp.sum(x ** 2, -1)))
  assert rel[jnp.float16] < rel[jnp.float8_e4m3fn] < 1.06 * rel[jnp.float16]
  big = MSEQuantizer.create(jax.random.PRNGKey(2), 64, 3, norm_dtype=jnp.float8_e4m3fn)
  codes = big.quantize(x * 1000.0)
  assert codes.norms.dtype == jnp.float8_e4m3fn
  assert not bool(jnp.any(jnp.isnan(codes.norms.astype(jnp.float32))))


@pytest.mark.parametrize("levels", ["lloyd_max", "int8"])
@pytest.mark.parametrize("bits", [2, 4])
def test_norm_fit_projected_and_matched_norms(bits, levels, unit_data):
  """"projected": <x̂, x> = ‖x‖² per vector (the paper's norms shrink it by ~1 - D_mse);
  "matched": ‖x̂‖ = ‖x‖; the codes are the exact quantizer's, only the norm differs."""
  x, y = unit_data
  x = x[:2000] * jnp.linspace(0.5, 3.0, 2000)[:, None]
  key = jax.random.PRNGKey(3)
  exact = MSEQuantizer.create(key, D, bits, levels=levels)
  shrink = []
  for fit in ("projected", "matched"):
    q = MSEQuantizer.create(key, D, bits, levels=levels, norm_fit=fit)
    codes, base = q.quantize(x), exact.quantize(x)
    np.testing.assert_array_equal(codes.planes, base.planes)
    x_hat = q.dequantize(codes)
    norms = jnp.sum(x * x, -1)
    if fit == "projected":
      np.testing.assert_allclose(jnp.sum(x_hat * x, -1), norms, rtol=1e-5)
      shrink = jnp.sum(exact.dequantize(base) * x, -1) / norms
      np.testing.assert_allclose(jnp.mean(shrink), 1 - D_MSE_128[bits], rtol=0.02)
      # Inner products with fresh unit vectors: the exact norms' are shrunk by the same
      # factor on average, the projected ones' are not (least squares slope through 0).
      qy = y[:2000]
      true = jnp.sum(qy * x, -1)
      slope = lambda est: float(jnp.sum(est * true) / jnp.sum(true * true))  # noqa: E731
      assert slope(jnp.sum(qy * x_hat, -1)) == pytest.approx(1.0, abs=0.02)
      assert slope(jnp.sum(qy * exact.dequantize(base), -1)) == pytest.approx(
          1 - D_MSE_128[bits], abs=0.02)
    else:
      np.testing.assert_allclose(jnp.sum(x_hat * x_hat, -1), norms, rtol=1e-5)
  # Zero and (under jit, where NaN is not refused) NaN vectors keep their norms.
  q = MSEQuantizer.create(key, D, bits, norm_fit="projected")
  special = jnp.zeros((2, D)).at[1, 0].set(jnp.nan)
  stored = jax.jit(q.quantize)(special).norms
  assert float(stored[0]) == 0.0 and bool(jnp.isnan(stored[1]))
  with pytest.raises(ValueError, match="norm_fit"):
    MSEQuantizer.create(key, D, bits, norm_fit="unbiased")
