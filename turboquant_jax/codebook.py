"""Lloyd-Max scalar codebooks for one coordinate of a random unit vector.

After a uniformly random rotation, each coordinate t of a unit vector in R^d has density

    f_d(t) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - t²)^((d-3)/2),   t ∈ [-1, 1],

which tends to N(0, 1/d) as d grows. TurboQuant quantizes every coordinate with the one
scalar codebook that minimises E[(t - c(t))²] under f_d (Lloyd-Max): no data, no training.

The codebooks are solved here in float64 numpy, once per (d, bits, density), and cached.
Integrals over each cell use Gauss-Legendre quadrature, so no scipy is needed.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import numpy as np

Density = Literal["sphere", "gaussian"]

_MIN_DIM = 3  # f_d is a proper density on [-1, 1] for d >= 3.
_MAX_BITS = 8


class LloydMaxCodebook(NamedTuple):
  """A scalar codebook for unit-vector coordinates (all arrays float64, read-only).

  Attributes:
    centroids: [2**bits] increasing reconstruction levels.
    boundaries: [2**bits - 1] decision thresholds, midpoints of neighbouring centroids.
    mse: D_mse of a unit vector, d · E[(t - c(t))²]: the expected squared error of the
      whole vector, not of one coordinate.
  """

  centroids: np.ndarray
  boundaries: np.ndarray
  mse: float


def sphere_coordinate_log_density(t: np.ndarray, d: int) -> np.ndarray:
  """log f_d(t) for one coordinate of a uniform point on the unit sphere in R^d."""
  log_norm = math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)
  with np.errstate(divide="ignore"):
    return log_norm + 0.5 * (d - 3) * np.log1p(-np.square(t))


def gaussian_log_density(t: np.ndarray, d: int) -> np.ndarray:
  """log of the N(0, 1/d) density, the large-d limit of f_d."""
  return 0.5 * math.log(d / (2 * math.pi)) - 0.5 * d * np.square(t)


def _support(d: int, density: Density) -> tuple[float, float]:
  if density == "sphere":
    return -1.0, 1.0
  # The Gaussian's mass beyond 40 standard deviations is below float64 resolution.
  half_width = 40.0 / math.sqrt(d)
  return -half_width, half_width


# Each cell is cut into this many pieces, each integrated with this many nodes: exact to
# float64 rounding for the smooth densities here (checked against finer rules in tests).
_PIECES = 16
_NODES = 48
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(_NODES)


def _cell_moments(edges: np.ndarray, d: int, density: Density) -> tuple[np.ndarray, ...]:
  """∫ f, ∫ t f and ∫ t² f over each cell [edges[k], edges[k+1]]."""
  log_density = sphere_coordinate_log_density if density == "sphere" else gaussian_log_density
  lo, hi = edges[:-1], edges[1:]
  # [cells, pieces + 1] piece edges, then [cells, pieces, nodes] quadrature points.
  piece_edges = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, _PIECES + 1)
  a, b = piece_edges[:, :-1, None], piece_edges[:, 1:, None]
  t = 0.5 * (b - a) * _GL_NODES + 0.5 * (a + b)
  w = 0.5 * (b - a) * _GL_WEIGHTS
  wf = w * np.exp(log_density(t, d))
  return wf.sum((1, 2)), (wf * t).sum((1, 2)), (wf * t * t).sum((1, 2))


def _validate(d: int, bits: int, density: str) -> None:
  if not isinstance(d, (int, np.integer)) or d < _MIN_DIM:
    raise ValueError(f"d must be an integer >= {_MIN_DIM}, got {d!r}")
  if not isinstance(bits, (int, np.integer)) or not 0 <= bits <= _MAX_BITS:
    raise ValueError(f"bits must be an integer in [0, {_MAX_BITS}], got {bits!r}")
  if density not in ("sphere", "gaussian"):
    raise ValueError(f"density must be 'sphere' or 'gaussian', got {density!r}")


def _validate_table(d: int, bits: int, density: str, kind: str) -> None:
  """`_validate`, and the 1-4 bits a kernel's table-free or int8 levels serve."""
  _validate(d, bits, density)
  if not 1 <= bits <= 4:
    raise ValueError(f"{kind} codebook takes 1 to 4 bits, got {bits}")


def _frozen_codebook(levels: np.ndarray, d: int, density: Density) -> LloydMaxCodebook:
  """The read-only `LloydMaxCodebook` of nearest-level quantization to `levels`."""
  boundaries, mse = _nearest_level_mse(levels, d, density)
  levels.setflags(write=False)
  boundaries.setflags(write=False)
  return LloydMaxCodebook(levels, boundaries, mse)


def _nearest_level_mse(levels: np.ndarray, d: int, density: Density):
  """(boundaries, D_mse of a unit vector) of nearest-level quantization to `levels`."""
  lo, hi = _support(d, density)
  boundaries = 0.5 * (levels[1:] + levels[:-1])
  mass, first, second = _cell_moments(np.concatenate([[lo], boundaries, [hi]]), d, density)
  # E[(t - c)²] per cell = ∫t²f - 2c∫tf + c²∫f.
  return boundaries, float(d * np.sum(second - 2 * levels * first + levels**2 * mass))


@functools.lru_cache(maxsize=None)
def _solve(d: int, bits: int, density: Density, tol: float, max_iter: int) -> LloydMaxCodebook:
  lo, hi = _support(d, density)
  levels = 2**bits
  sigma = 1.0 / math.sqrt(d)
  # Start from a uniform grid over ±3σ; Lloyd's iteration is monotone from any start.
  centroids = np.linspace(-3 * sigma, 3 * sigma, levels + 2)[1:-1] if levels > 1 else np.zeros(1)
  for _ in range(max_iter):
    boundaries = 0.5 * (centroids[1:] + centroids[:-1])
    edges = np.concatenate([[lo], boundaries, [hi]])
    mass, first, _ = _cell_moments(edges, d, density)
    new = first / mass
    # The density is symmetric: enforce it exactly so rounding never breaks the symmetry.
    new = 0.5 * (new - new[::-1])
    converged = np.max(np.abs(new - centroids)) < tol * sigma
    centroids = new
    if converged:
      break
  else:
    raise RuntimeError(f"Lloyd-Max did not converge for d={d}, bits={bits}, {density}")
  return _frozen_codebook(centroids, d, density)


def lloyd_max_codebook(
    d: int, bits: int, density: Density = "sphere", *, tol: float = 1e-12, max_iter: int = 200_000
) -> LloydMaxCodebook:
  """The Lloyd-Max codebook for one coordinate of a random unit vector in R^d.

  Args:
    d: dimension of the vectors (>= 3).
    bits: bits per coordinate, 0..8 (0 gives the single level 0, used by the
      inner-product quantizer at 1 bit).
    density: "sphere" for the exact coordinate density f_d, "gaussian" for its N(0, 1/d)
      limit.
    tol: stop when no centroid moves by more than tol · (1/√d).
    max_iter: Lloyd iterations before giving up.

  Returns:
    A cached, read-only `LloydMaxCodebook`.
  """
  _validate(d, bits, density)
  return _solve(int(d), int(bits), density, float(tol), int(max_iter))


def int8_codebook(d: int, bits: int, density: Density = "sphere") -> LloydMaxCodebook:
  """Lloyd-Max's levels rounded to multiples of max|level|/127 (4 bits: to odd multiples
  of half a step, symmetric, the kernel's sign-magnitude table, the step with the least
  D_mse: +0.05% at d = 128): levels an int8 table and one scale represent exactly (what
  the Mosaic kernel's int8 path looks up by byte permutes), nearest-level cells and D_mse
  recomputed for them. Bits 1..4.

  Returns: a cached, read-only `LloydMaxCodebook`.
  """
  _validate_table(d, bits, density, "an int8")
  return _int8(int(d), int(bits), density)


@functools.lru_cache(maxsize=None)
def _int8(d: int, bits: int, density: Density) -> LloydMaxCodebook:
  lm = _solve(d, bits, density, 1e-12, 200_000).centroids
  if bits == 4:   # (y + 1/2)·step, y = T or -T - 1: symmetric by construction
    peak = float(np.max(np.abs(lm)))
    best = None     # the step with the least D_mse, the largest level at 100.5-127.5 steps
    for step in peak / np.linspace(127.5, 100.5, 271):
      half = np.round((lm[8:] - lm[7::-1]) / 2 / step - 0.5) + 0.5
      candidate = np.concatenate([-half[::-1], half]) * step
      _, mse = _nearest_level_mse(candidate, d, density)
      if best is None or mse < best[0]:
        best = (mse, candidate)
    levels = best[1]
  else:
    step = float(np.max(np.abs(lm))) / 127.0
    levels = np.round(lm / step) * step
  return _frozen_codebook(levels, d, density)


def uniform_codebook(d: int, bits: int, density: Density = "sphere") -> LloydMaxCodebook:
  """2^bits evenly spaced levels (n - (2^bits - 1)/2)·Δ, Δ the step with the least D_mse
  under the density (nearest-level cells). At 4 bits the Mosaic kernel's int8 path decodes
  such codes with a mask and a shift per eight codes, where Lloyd-Max's levels take a
  table lookup (`pallas_kernels.byte_codes`, plain nibbles); the price is D_mse: +18-21%
  at 4 bits, +8% at 3 (for a Gaussian, Max's uniform quantizer: 0.01154 and 0.03744).
  Bits 1..4.

  Returns: a cached, read-only `LloydMaxCodebook`.
  """
  _validate_table(d, bits, density, "a uniform")
  return _uniform(int(d), int(bits), density)


@functools.lru_cache(maxsize=None)
def _uniform(d: int, bits: int, density: Density) -> LloydMaxCodebook:
  u = np.arange(2**bits) - (2**bits - 1) / 2
  mse = lambda step: _nearest_level_mse(u * step, d, density)[1]  # noqa: E731
  # D_mse is unimodal in the step: golden-section search from Lloyd-Max's outermost level.
  peak = float(_solve(d, bits, density, 1e-12, 200_000).centroids[-1])
  lo, hi = 0.3 * peak / u[-1], 2.0 * peak / u[-1]
  ratio = (math.sqrt(5) - 1) / 2
  a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  fa, fb = mse(a), mse(b)
  for _ in range(200):
    if hi - lo < 1e-13 * peak:
      break
    if fa < fb:
      hi, b, fb = b, a, fa
      a = hi - ratio * (hi - lo)
      fa = mse(a)
    else:
      lo, a, fa = a, b, fb
      b = lo + ratio * (hi - lo)
      fb = mse(b)
  return _frozen_codebook(u * (0.5 * (lo + hi)), d, density)


class CubicCodebook(NamedTuple):
  """A codebook whose levels are an odd cubic of the centred code index.

  Level n is a·u + c·u³ with u = n - (2^bits - 1)/2: the form the Mosaic GPU kernel
  decodes exactly (u from a few bit operations, u³ by two multiplies, a and c folded into
  its products). Nearest-level cells, as for Lloyd-Max.

  Attributes:
    centroids: [2**bits] increasing levels. boundaries: [2**bits - 1] midpoints.
    mse: D_mse of a unit vector (as `LloydMaxCodebook.mse`).
    linear, cubic: a and c.
  """

  centroids: np.ndarray
  boundaries: np.ndarray
  mse: float
  linear: float
  cubic: float


class PolynomialCodebook(NamedTuple):
  """A codebook whose levels are an odd polynomial of the centred code index.

  Level n is Σ_k c_k·u^(2k+1), u = n - (2^bits - 1)/2, k < (degree + 1)/2: what the Mosaic
  GPU kernel decodes with a few fp16 multiply-adds per pair of codes. With as many
  coefficients as positive levels (degree 7 up to 3 bits) it is Lloyd-Max's codebook.

  Attributes:
    centroids: [2**bits] increasing levels. boundaries: [2**bits - 1] midpoints.
    mse: D_mse of a unit vector (as `LloydMaxCodebook.mse`).
    coefficients: (c_0, c_1, ...) of u, u³, u⁵, ...
  """

  centroids: np.ndarray
  boundaries: np.ndarray
  mse: float
  coefficients: tuple[float, ...]


@functools.lru_cache(maxsize=None)
def _solve_odd(d: int, bits: int, degree: int, density: Density, tol: float,
               max_iter: int) -> PolynomialCodebook:
  lo, hi = _support(d, density)
  sigma = 1.0 / math.sqrt(d)
  u = np.arange(2**bits) - (2**bits - 1) / 2
  top = max(u[-1], 1.0)   # the basis in u / top stays well conditioned at 4+ bits
  basis = np.stack([(u / top)**k for k in range(1, degree + 1, 2)], axis=1)
  # Start from the least-squares fit to the Lloyd-Max levels (exact when the basis has a
  # coefficient per positive level: then Lloyd-Max is the answer).
  lm = _solve(d, bits, density, 1e-12, 200_000).centroids
  coef = np.linalg.lstsq(basis, lm, rcond=None)[0]
  if basis.shape[1] < 2**(bits - 1):
    for _ in range(max_iter):
      levels = basis @ coef
      edges = np.concatenate([[lo], 0.5 * (levels[1:] + levels[:-1]), [hi]])
      mass, first, _ = _cell_moments(edges, d, density)
      # For fixed cells, E[(t - ℓ)²] = const + Σ_k P_k (ℓ_k - m_k)²: weighted least
      # squares of the levels to the cells' conditional means m_k.
      w = np.sqrt(mass)
      new = np.linalg.lstsq(basis * w[:, None], first / mass * w, rcond=None)[0]
      converged = np.max(np.abs(basis @ (new - coef))) < tol * sigma
      coef = new
      if converged:
        break
    else:
      raise RuntimeError(f"the degree-{degree} codebook did not converge for d={d}, "
                         f"bits={bits}")
    levels = basis @ coef
  else:
    levels = lm.copy()
  boundaries, mse = _nearest_level_mse(levels, d, density)
  levels.setflags(write=False)
  boundaries.setflags(write=False)
  coefficients = tuple(float(c / top**k) for c, k in zip(coef, range(1, degree + 1, 2)))
  return PolynomialCodebook(levels, boundaries, mse, coefficients)


def polynomial_codebook(d: int, bits: int, density: Density = "sphere", *, degree: int = 7,
                        tol: float = 1e-12, max_iter: int = 100_000) -> PolynomialCodebook:
  """The odd polynomial codebook of `degree` with the least D_mse for one coordinate of a
  unit vector.

  Alternates nearest-level cells with a weighted least-squares fit of the coefficients to
  the cells' conditional means, from the fit to the Lloyd-Max levels; each step lowers
  D_mse. Up to (degree + 1)/2 positive levels it reproduces Lloyd-Max exactly (degree 7:
  up to 3 bits); at 4 bits degree 7 is within 0.01% of Lloyd-Max's D_mse, the cubic 1.8%.

  Args: as `lloyd_max_codebook` (bits 1..8); degree: an odd degree >= 1.
  Returns: a cached, read-only `PolynomialCodebook`.
  """
  _validate(d, bits, density)
  if bits < 1:
    raise ValueError(f"a polynomial codebook needs bits >= 1, got {bits}")
  if not isinstance(degree, (int, np.integer)) or degree < 1 or degree % 2 == 0:
    raise ValueError(f"degree must be an odd integer >= 1, got {degree!r}")
  return _solve_odd(int(d), int(bits), int(degree), density, float(tol), int(max_iter))


def cubic_codebook(d: int, bits: int, density: Density = "sphere", *, tol: float = 1e-12,
                   max_iter: int = 100_000) -> CubicCodebook:
  """The odd-cubic codebook with the least D_mse for one coordinate of a unit vector
  (`polynomial_codebook` of degree 3). At 1 and 2 bits the cubic reproduces Lloyd-Max
  exactly (one or two magnitudes).

  Args: as `lloyd_max_codebook` (bits 1..8).
  Returns: a cached, read-only `CubicCodebook`.
  """
  _validate(d, bits, density)
  if bits < 1:
    raise ValueError(f"a cubic codebook needs bits >= 1, got {bits}")
  return _cubic(int(d), int(bits), density, float(tol), int(max_iter))


@functools.lru_cache(maxsize=None)
def _cubic(d: int, bits: int, density: Density, tol: float, max_iter: int) -> CubicCodebook:
  book = _solve_odd(d, bits, 3, density, tol, max_iter)
  return CubicCodebook(book.centroids, book.boundaries, book.mse, *book.coefficients)
