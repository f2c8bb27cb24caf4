import math

import numpy as np
import pytest

from turboquant_jax import codebook

# D_mse of unit vectors, Lloyd-Max on the exact f_d (../shared/turboquant-notes.md).
NOTES_D_MSE = {
    64: (0.3584, 0.1145, 0.0334, 0.0091),
    128: (0.3609, 0.1160, 0.0340, 0.0093),
    256: (0.3621, 0.1167, 0.0343, 0.0094),
}
# Max (1960), Lloyd-Max for N(0, 1): per-coordinate MSE and positive levels.
MAX_GAUSSIAN_MSE = (0.3634, 0.1175, 0.03454, 0.009497)
MAX_GAUSSIAN_LEVELS_2BIT = (0.4528, 1.510)


@pytest.mark.parametrize("d", sorted(NOTES_D_MSE))
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sphere_codebook_matches_notes(d, bits):
  cb = codebook.lloyd_max_codebook(d, bits)
  assert cb.mse == pytest.approx(NOTES_D_MSE[d][bits - 1], abs=5e-5 + 0.0005 * cb.mse)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_codebook_matches_max_table(bits):
  d = 100
  cb = codebook.lloyd_max_codebook(d, bits, "gaussian")
  assert cb.mse == pytest.approx(MAX_GAUSSIAN_MSE[bits - 1], rel=1e-3)
  if bits == 1:
    np.testing.assert_allclose(cb.centroids * math.sqrt(d), [-math.sqrt(2 / math.pi),
                                                             math.sqrt(2 / math.pi)], rtol=1e-9)
  if bits == 2:
    np.testing.assert_allclose(cb.centroids[2:] * math.sqrt(d), MAX_GAUSSIAN_LEVELS_2BIT,
                               rtol=1e-3)


def test_sphere_tends_to_gaussian_for_large_d():
  for bits in (1, 2, 3, 4):
    sphere = codebook.lloyd_max_codebook(4096, bits)
    gauss = codebook.lloyd_max_codebook(4096, bits, "gaussian")
    np.testing.assert_allclose(sphere.centroids, gauss.centroids, rtol=2e-3)
    # At small d the sphere density has lighter tails: lower distortion than the limit.
    assert codebook.lloyd_max_codebook(16, bits).mse < gauss.mse


def _fine_grid_moments(edges, d):
  """Independent check: the trapezoid rule on 200,001 points inside each cell."""
  mass, first = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    t = np.linspace(lo, hi, 200_001)
    f = np.exp(codebook.sphere_coordinate_log_density(t, d))
    mass.append(np.trapezoid(f, t))
    first.append(np.trapezoid(t * f, t))
  return np.array(mass), np.array(first)


@pytest.mark.parametrize("d,bits", [(16, 3), (128, 2), (64, 4)])
def test_lloyd_max_optimality_conditions(d, bits):
  cb = codebook.lloyd_max_codebook(d, bits)
  np.testing.assert_allclose(cb.boundaries, 0.5 * (cb.centroids[1:] + cb.centroids[:-1]))
  edges = np.concatenate([[-1.0], cb.boundaries, [1.0]])
  mass, first = _fine_grid_moments(edges, d)
  np.testing.assert_allclose(mass.sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(cb.centroids, first / mass, rtol=1e-7, atol=1e-12)
  assert np.all(np.diff(cb.centroids) > 0)
  np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=1e-15)


def test_distortion_within_paper_bounds():
  for bits in (1, 2, 3, 4):
    mse = codebook.lloyd_max_codebook(128, bits).mse
    assert 4.0**-bits <= mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_zero_bits_is_the_mean():
  cb = codebook.lloyd_max_codebook(64, 0)
  np.testing.assert_array_equal(cb.centroids, [0.0])
  assert cb.mse == pytest.approx(1.0, rel=1e-9)  # E‖x‖² of a unit vector


def test_cached_and_read_only():
  a = codebook.lloyd_max_codebook(128, 3)
  assert a is codebook.lloyd_max_codebook(128, 3)
  with pytest.raises(ValueError):
    a.centroids[0] = 0.0


@pytest.mark.parametrize("kwargs", [dict(d=2, bits=2), dict(d=64, bits=9), dict(d=64, bits=-1),
                                    dict(d=64, bits=2, density="laplace"),
                                    dict(d=64.0, bits=2)])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    codebook.lloyd_max_codebook(**kwargs)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_cubic_codebook_against_lloyd_max(d):
  """Levels a·u + c·u³ of the centred code: exact at 2 bits (two magnitudes, two
  coefficients), within 0.3% of the optimum at 3 bits and 2.5% at 4, never below it."""
  for bits, slack in [(2, 1e-9), (3, 3e-3), (4, 2.5e-2)]:
    cub, lm = codebook.cubic_codebook(d, bits), codebook.lloyd_max_codebook(d, bits)
    assert lm.mse * (1 - 1e-9) <= cub.mse <= lm.mse * (1 + slack)
    u = np.arange(2**bits) - (2**bits - 1) / 2
    np.testing.assert_allclose(cub.centroids, cub.linear * u + cub.cubic * u**3, rtol=1e-12)
    np.testing.assert_allclose(cub.boundaries, 0.5 * (cub.centroids[1:] + cub.centroids[:-1]))
    if bits == 2:
      np.testing.assert_allclose(cub.centroids, lm.centroids, rtol=1e-6)


def test_cubic_codebook_beats_its_starting_fit():
  """The alternation lowers D_mse below the least-squares fit to the Lloyd-Max levels."""
  d, bits = 128, 4
  lm = codebook.lloyd_max_codebook(d, bits)
  u = np.arange(2**bits) - (2**bits - 1) / 2
  basis = np.stack([u, u**3], axis=1)
  fit = basis @ np.linalg.lstsq(basis, lm.centroids, rcond=None)[0]
  _, fit_mse = codebook._nearest_level_mse(fit, d, "sphere")
  assert codebook.cubic_codebook(d, bits).mse < fit_mse


@pytest.mark.parametrize("d", [64, 128])
def test_polynomial_codebook_against_lloyd_max(d):
  """Odd polynomials of the centred code: Lloyd-Max exactly while there is a coefficient
  per positive level; else between Lloyd-Max and the cubic (quintic: within 2e-5 at 3
  bits, 0.2% at 4), and degree 3 is the cubic codebook."""
  u = {b: np.arange(2**b) - (2**b - 1) / 2 for b in (1, 2, 3, 4)}
  for bits in (1, 2, 3, 4):
    lm = codebook.lloyd_max_codebook(d, bits)
    for degree in (3, 5, 7):
      book = codebook.polynomial_codebook(d, bits, degree=degree)
      c = np.asarray(book.coefficients)
      assert c.size == (degree + 1) // 2
      np.testing.assert_allclose(
          book.centroids, sum(ck * u[bits]**(2 * i + 1) for i, ck in enumerate(c)),
          rtol=1e-9, atol=1e-12)
      if (degree + 1) // 2 >= 2**(bits - 1):
        np.testing.assert_allclose(book.centroids, lm.centroids, rtol=1e-9)
      assert lm.mse * (1 - 1e-9) <= book.mse
    cubic = codebook.cubic_codebook(d, bits)
    quintic = codebook.polynomial_codebook(d, bits, degree=5)
    np.testing.assert_allclose(codebook.polynomial_codebook(d, bits, degree=3).centroids,
                               cubic.centroids, rtol=1e-12)
    assert quintic.mse <= cubic.mse * (1 + 1e-9)
  optimum = {b: codebook.lloyd_max_codebook(d, b).mse for b in (3, 4)}
  assert codebook.polynomial_codebook(d, 3, degree=5).mse <= optimum[3] * (1 + 2e-5)
  assert codebook.polynomial_codebook(d, 4, degree=5).mse <= optimum[4] * 1.002
  assert codebook.cubic_codebook(d, 4).mse > optimum[4] * 1.01


def test_polynomial_codebook_rejects_bad_degree():
  for degree in (0, 2, 4.0):
    with pytest.raises(ValueError, match="degree"):
      codebook.polynomial_codebook(64, 3, degree=degree)
  with pytest.raises(ValueError):
    codebook.polynomial_codebook(64, 0)


def test_cubic_codebook_rejects_zero_bits():
  with pytest.raises(ValueError):
    codebook.cubic_codebook(64, 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_int8_codebook_is_lloyd_max_on_an_int8_grid(bits):
  lm = codebook.lloyd_max_codebook(128, bits)
  book = codebook.int8_codebook(128, bits)
  c = book.centroids
  if bits < 4:   # integers times max|level| / 127
    step, grid = np.max(np.abs(c)) / 127, c / (np.max(np.abs(c)) / 127)
  else:          # sign-magnitude: symmetric, odd multiples of step / 2, at most 127.5 steps
    np.testing.assert_allclose(c[:8], -c[:7:-1], rtol=0, atol=1e-12)
    tops = [t for t in range(64, 128)
            if np.allclose(c / (c[-1] / (t + 0.5)) - 0.5,
                           np.round(c / (c[-1] / (t + 0.5)) - 0.5), atol=1e-9)]
    assert tops, "4-bit levels are on no half-integer int8 grid"
    step = c[-1] / (tops[0] + 0.5)
    grid = c / step - 0.5
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)
  assert np.all(np.abs(c - lm.centroids) <= step / 2 + 1e-12)
  np.testing.assert_allclose(book.boundaries, (c[1:] + c[:-1]) / 2)
  # At most +0.2% D_mse (4 bits, the step chosen for it: +0.1%).
  assert lm.mse <= book.mse <= lm.mse * (1.001 if bits == 4 else 1.002)


def test_int8_codebook_errors():
  with pytest.raises(ValueError, match="1 to 4 bits"):
    codebook.int8_codebook(128, 5)


@pytest.mark.parametrize("bits, step, mse", [(2, 0.9957, 0.1188), (3, 0.5860, 0.03744),
                                             (4, 0.3352, 0.01154)])
def test_uniform_codebook_is_maxs_uniform_quantizer(bits, step, mse):
  """Evenly spaced levels at the step of least D_mse: for a Gaussian (d large, N(0, 1/d)
  coordinates) Max's (1960) optimal uniform quantizers' steps and distortions, in units
  of σ; worse than Lloyd-Max's, better than the step a little off either way."""
  d = 4096
  cb = codebook.uniform_codebook(d, bits, "gaussian")
  sigma = d ** -0.5
  gaps = np.diff(cb.centroids)
  np.testing.assert_allclose(gaps, gaps[0], rtol=1e-12)
  np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=1e-15)
  np.testing.assert_allclose(gaps[0] / sigma, step, rtol=2e-4)
  np.testing.assert_allclose(cb.mse, mse, rtol=5e-4)
  assert cb.mse > codebook.lloyd_max_codebook(d, bits, "gaussian").mse
  u = cb.centroids / gaps[0]
  for f in (0.99, 1.01):
    assert codebook._nearest_level_mse(u * gaps[0] * f, d, "gaussian")[1] > cb.mse
  # The sphere's exact density at d = 128: 4 bits cost ~20% more D_mse than Lloyd-Max.
  if bits == 4:
    ratio = codebook.uniform_codebook(128, 4).mse / codebook.lloyd_max_codebook(128, 4).mse
    assert 1.15 < ratio < 1.25
  with pytest.raises(ValueError, match="1 to 4 bits"):
    codebook.uniform_codebook(d, 5)
