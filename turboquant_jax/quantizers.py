"""TurboQuant's two vector quantizers, as immutable pytrees with pure methods.

- `MSEQuantizer` (Algorithm 1): store ‖x‖, rotate y = Π·x/‖x‖, code each y_j by its
  nearest Lloyd-Max centroid. x̂ = ‖x‖·Πᵀ·c[idx]. D_mse(b) ≈ 0.36, 0.117, 0.034, 0.0093.
- `ProdQuantizer` (Algorithm 2): (b-1)-bit MSE codes, plus the 1-bit QJL sketch of the
  residual r = x - x̂_mse and its norm γ. Inner products are unbiased.

Everything lives in the rotated domain: the QJL sketch acts on the rotated residual
(S·Π·r; S·Π has the same law as S), so `inner_products` rotates and sketches the query
once and never de-rotates a stored vector:
<q, x̂> = ‖x‖·<Π·q, c[idx]> + γ·√(π/2)/m·<S·Π·q, sign(S·Π·r)>.

Shapes: vectors are [..., d]; codes carry the same leading axes. Inputs may be float32,
bfloat16 or float16; arithmetic is float32. Non-finite input raises a ValueError when the
input is concrete; under `jit` it cannot raise, so its norm is stored as NaN and decodes to
NaN instead of a plausible vector.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import codebook as codebook_lib
from turboquant_jax import packing
from turboquant_jax import qjl
from turboquant_jax import rotation as rotation_lib

Array = jax.Array

MIN_DIM = 16
MSE_BITS = (1, 2, 3, 4, 5)
PROD_BITS = (1, 2, 3, 4)
_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class MSECodes:
  """Packed codes of `MSEQuantizer`.

  Attributes:
    planes: bit-planes of the centroid indices, uint8 [..., d·w/8] each (see `packing`).
    norms: [...] ‖x‖ in the quantizer's norm dtype.
  """

  planes: tuple[Array, ...]
  norms: Array

  @property
  def nbytes(self) -> int:
    return sum(int(p.nbytes) for p in self.planes) + int(self.norms.nbytes)


@flax.struct.dataclass
class ProdCodes:
  """Packed codes of `ProdQuantizer`.

  Attributes:
    mse: the (b-1)-bit `MSECodes`, or None at b = 1 (the whole vector is sketched).
    signs: uint8 [..., m/8], sign(S·Π·r) as a 1-bit plane.
    residual_norms: [...] γ = ‖r‖ in the quantizer's norm dtype.
  """

  mse: MSECodes | None
  signs: Array
  residual_norms: Array

  @property
  def nbytes(self) -> int:
    mse = 0 if self.mse is None else self.mse.nbytes
    return mse + int(self.signs.nbytes) + int(self.residual_norms.nbytes)


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_input(x: Array, d: int, name: str = "x") -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
  if x.ndim < 1 or x.shape[-1] != d:
    raise ValueError(f"{name} must have shape [..., {d}], got {x.shape}")
  # numpy: under an outer trace jnp would return a tracer even for a concrete x.
  if _is_concrete(x) and not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise ValueError(f"{name} contains NaN or Inf; refusing to encode it")
  return x


# Storage dtypes of norms. float8_e4m3fn halves their bytes (0.125 bits per coordinate at
# d = 64 per group) for ~3.6% RMS relative error; it saturates at 448.
NORM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16),
               jnp.dtype(jnp.float8_e4m3fn))


def check_norm_dtype(dtype) -> None:
  if jnp.dtype(dtype) not in NORM_DTYPES:
    raise ValueError(f"norm_dtype must be one of {[d.name for d in NORM_DTYPES]}, "
                     f"got {dtype!r}")


def store_norms(norms: Array, dtype) -> Array:
  """Norms in their storage dtype; an 8-bit float saturates (its casts overflow to NaN)."""
  if jnp.dtype(dtype).itemsize == 1:
    norms = jnp.minimum(norms, float(jnp.finfo(dtype).max))
  return norms.astype(dtype)


def _norms_with_nan(x32: Array) -> Array:
  """‖x‖ over the last axis, NaN where any coordinate is not finite."""
  norms = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1))
  return jnp.where(jnp.all(jnp.isfinite(x32), axis=-1), norms, jnp.nan)


def code_of_level(level, bits: int):
  """Sign-magnitude code of the level-th smallest centroid (an involution on codes)."""
  if bits == 0:
    return level
  half = 1 << (bits - 1)
  return jnp.where(level >= half, level, half - 1 - level)


def level_of_code(bits: int) -> np.ndarray:
  """[2^bits] index of the increasing level that each code stands for."""
  codes = np.arange(1 << bits)
  if bits == 0:
    return codes
  half = 1 << (bits - 1)
  return np.where(codes >= half, codes, half - 1 - codes)


LEVELS = ("lloyd_max", "cubic", "quintic", "int8", "uniform")

# What a stored norm is (`MSEQuantizer.create(norm_fit=)`): the vector's norm (the paper's
# Algorithm 1), or that norm over the codes' projection on the rotated unit vector or
# over the codes' own norm.
NORM_FITS = ("exact", "projected", "matched")


def _codebook(d: int, bits: int, density, levels: str):
  if levels not in LEVELS:
    raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")
  if levels == "cubic" and bits >= 1:
    return codebook_lib.cubic_codebook(d, bits, density)
  if levels == "quintic" and bits >= 1:
    return codebook_lib.polynomial_codebook(d, bits, density, degree=5)
  if levels == "int8" and bits >= 1:
    return codebook_lib.int8_codebook(d, bits, density)
  if levels == "uniform" and bits >= 1:
    return codebook_lib.uniform_codebook(d, bits, density)
  return codebook_lib.lloyd_max_codebook(d, bits, density)


def _validate_config(d: int, bits: int, allowed: tuple[int, ...], name: str) -> None:
  if not isinstance(d, (int, np.integer)) or d < MIN_DIM:
    raise ValueError(f"{name} needs d >= {MIN_DIM}, got {d!r}")
  if bits not in allowed:
    raise ValueError(f"{name} supports bits in {allowed}, got {bits!r}")
  if d % 8:
    raise ValueError(f"{name} packs codes into bytes and needs d divisible by 8, got {d}")


@flax.struct.dataclass
class MSEQuantizer:
  """TurboQuant_mse (Algorithm 1).

  Codes are sign-magnitude: the top bit is the sign of the level, the low bits index its
  magnitude from the centre out. The codebook is symmetric, so a kernel decodes a code
  with a ladder over 2^(bits-1) magnitudes and one sign flip, and at 3 bits the 1-bit
  plane is exactly the sign plane.

  Attributes:
    rotation: the random rotation Π (`HaarRotation` or `HadamardRotation`).
    centroids: [2^bits] float32 Lloyd-Max levels for f_d, increasing.
    boundaries: [2^bits - 1] float32 decision thresholds.
    code_values: [2^bits] float32, the level each code stands for.
    bits: bits per coordinate (static).
    norm_dtype: dtype the norms are stored in (static).
    norm_fit: what the stored norm is (static; `create`).
  """

  rotation: rotation_lib.Rotation
  centroids: Array
  boundaries: Array
  code_values: Array
  bits: int = flax.struct.field(pytree_node=False)
  norm_dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
  levels: str = flax.struct.field(pytree_node=False, default="lloyd_max")
  density: str = flax.struct.field(pytree_node=False, default="sphere")
  norm_fit: str = flax.struct.field(pytree_node=False, default="exact")

  @classmethod
  def create(
      cls,
      key: Array,
      d: int,
      bits: int,
      *,
      rotation: str = "haar",
      density: codebook_lib.Density = "sphere",
      norm_dtype=jnp.float32,
      levels: str = "lloyd_max",
      norm_fit: str = "exact",
  ) -> "MSEQuantizer":
    """A quantizer for d-vectors at `bits` bits per coordinate (1..5).

    Args:
      key: PRNG key for the rotation.
      d: vector dimension (>= 16, divisible by 8; a power of two for "hadamard").
      bits: 1, 2, 3 or 4.
      rotation: "haar" (dense, any d) or "hadamard" (O(d log d), power-of-two d).
      density: codebook density, "sphere" (exact) or "gaussian" (large-d limit).
      norm_dtype: storage dtype of the norms (`NORM_DTYPES`: float32, float16, bfloat16,
        or float8_e4m3fn, saturating).
      levels: "lloyd_max" (the optimal levels), "quintic" (the best odd quintic of the
        centred code u, `codebook.polynomial_codebook`: D_mse within 0.002% of
        Lloyd-Max's at 3 bits, 0.16% at 4) or "cubic" (a·u + c·u³,
        `codebook.cubic_codebook`: 0.2% and 1.8%); the Mosaic GPU kernel decodes the
        polynomials without a table (and Lloyd-Max up to 2 bits, where it is a cubic);
        "int8" (`codebook.int8_codebook`: Lloyd-Max on an int8 grid, 0.05% at 3 bits,
        0.05% at 4: odd multiples of half a step, sign-magnitude) is what its int8
        path looks up exactly; "uniform" (`codebook.uniform_codebook`: evenly spaced,
        +18-21% at 4 bits) what it decodes at 4 bits without a lookup (plain nibbles).
      norm_fit: the norm stored with a vector x whose rotated unit vector y has the
        levels c: "exact" ‖x‖ (Algorithm 1: x̂ = ‖x‖·Πᵀc is shrunk, <x̂, x> = (1 -
        D)·‖x‖² on average), "projected" ‖x‖ / <y, c> (<x̂, x> = ‖x‖²: inner products
        along x unbiased, so a key's logits keep their scale) or "matched" ‖x‖ / ‖c‖
        (‖x̂‖ = ‖x‖). Only the stored number changes: readers need nothing new.
    """
    _validate_config(d, bits, MSE_BITS, "MSEQuantizer")
    return cls._create(key, d, bits, rotation=rotation, density=density, norm_dtype=norm_dtype,
                       levels=levels, norm_fit=norm_fit)

  @classmethod
  def _create(cls, key, d, bits, *, rotation, density, norm_dtype,
              levels="lloyd_max", norm_fit="exact") -> "MSEQuantizer":
    check_norm_dtype(norm_dtype)
    if norm_fit not in NORM_FITS:
      raise ValueError(f"norm_fit must be one of {NORM_FITS}, got {norm_fit!r}")
    cb = _codebook(d, bits, density, levels)
    return cls(
        rotation=rotation_lib.make_rotation(key, d, rotation),
        centroids=jnp.asarray(cb.centroids, jnp.float32),
        boundaries=jnp.asarray(cb.boundaries, jnp.float32),
        code_values=jnp.asarray(cb.centroids[level_of_code(bits)], jnp.float32),
        bits=bits,
        norm_dtype=norm_dtype,
        levels=levels,
        density=density,
        norm_fit=norm_fit,
    )

  @property
  def dim(self) -> int:
    return self.rotation.dim

  def static_codebook(self):
    """The numpy codebook of `centroids`, for kernels that bake the levels in."""
    return _codebook(self.dim, self.bits, self.density, self.levels)

  def bytes_per_vector(self) -> int:
    """Stored bytes per vector: packed codes plus one norm."""
    return packing.packed_bytes(self.dim, self.bits) + jnp.dtype(self.norm_dtype).itemsize

  def _levels(self, y: Array) -> Array:
    """int32 [..., d]: indices of the nearest centroids (0 = the smallest) of y [..., d]."""
    return jnp.sum(y[..., None] > self.boundaries, axis=-1).astype(jnp.int32)

  def encode_rotated(self, y: Array) -> Array:
    """Sign-magnitude codes of the nearest centroids. y: [..., d] -> uint8 [..., d]."""
    return code_of_level(self._levels(y), self.bits).astype(jnp.uint8)

  def _rotated_unit(self, x: Array) -> tuple[Array, Array]:
    x32 = x.astype(jnp.float32)
    norms = _norms_with_nan(x32)
    safe = jnp.where(norms > 0, norms, 1.0)[..., None]
    return self.rotation.rotate(x32 / safe), norms

  def fitted_norms(self, y: Array, level: Array, norms: Array) -> Array:
    """The norms to store (`norm_fit`), float32 [...]: y [..., d] rotated unit vectors,
    level [..., d] indices of their nearest levels, norms [...] the vectors' norms."""
    if self.norm_fit == "exact":
      return norms
    c = jnp.take(self.centroids, level.astype(jnp.int32), axis=0)
    fit = jnp.sum(y * c, -1) if self.norm_fit == "projected" else jnp.sqrt(jnp.sum(c * c, -1))
    # y = 0 (a zero vector) keeps its zero norm; otherwise fit > 0: a level has its
    # coordinate's sign.
    return norms / jnp.where(fit > 0, fit, 1.0)

  def quantize_levels(self, x: Array) -> tuple[Array, Array]:
    """(uint8 [..., d] indices of the nearest levels, 0 = the smallest; the stored norms
    [...]): what the tiles layout (`tile_codes`) packs. x: [..., d]."""
    x = _check_input(x, self.dim)
    y, norms = self._rotated_unit(x)
    level = self._levels(y)
    return level.astype(jnp.uint8), store_norms(self.fitted_norms(y, level, norms),
                                                self.norm_dtype)

  def _quantize_rotated(self, x: Array) -> tuple[MSECodes, Array, Array]:
    """Codes, plus the rotated input and the stored norms (both float32) for Algorithm 2."""
    y, norms = self._rotated_unit(x)
    level = self._levels(y)
    idx = code_of_level(level, self.bits).astype(jnp.uint8)
    stored = store_norms(self.fitted_norms(y, level, norms), self.norm_dtype)
    codes = MSECodes(planes=packing.pack_codes(idx, self.bits), norms=stored)
    return codes, y * norms[..., None], stored.astype(jnp.float32)

  def quantize(self, x: Array) -> MSECodes:
    """Encodes vectors. x: [..., d] float -> `MSECodes` with leading axes [...]."""
    x = _check_input(x, self.dim)
    return self._quantize_rotated(x)[0]

  def centroid_values(self, codes: MSECodes) -> Array:
    """c[idx]: [..., d] float32, the unit-norm reconstruction in the rotated domain."""
    idx = packing.unpack_codes(codes.planes, self.bits)
    return jnp.take(self.code_values, idx.astype(jnp.int32), axis=0)

  def rotated_values(self, codes: MSECodes) -> Array:
    """‖x‖·c[idx]: [..., d] float32, the reconstruction before the inverse rotation."""
    return self.centroid_values(codes) * codes.norms.astype(jnp.float32)[..., None]

  def dequantize(self, codes: MSECodes, dtype=jnp.float32) -> Array:
    """x̂ = ‖x‖·Πᵀ·c[idx]: [..., d] in `dtype`."""
    return self.rotation.unrotate(self.rotated_values(codes)).astype(dtype)

  def rotate_queries(self, q: Array) -> Array:
    """Π·q, float32 [..., d]: the one transform a query needs."""
    return self.rotation.rotate(_check_input(q, self.dim, "q").astype(jnp.float32))

  def inner_products_rotated(self, q_rot: Array, codes: MSECodes) -> Array:
    """<q, x̂> from rotated queries. q_rot: [..., nq, d], codes: [..., n] -> [..., nq, n]."""
    scores = jnp.einsum("...qd,...nd->...qn", q_rot, self.centroid_values(codes),
                        precision=_HIGHEST)
    return scores * codes.norms.astype(jnp.float32)[..., None, :]

  def inner_products(self, q: Array, codes: MSECodes) -> Array:
    """Estimates <q, x> from the codes. q: [..., nq, d], codes: [..., n] -> [..., nq, n]."""
    return self.inner_products_rotated(self.rotate_queries(q), codes)


@flax.struct.dataclass
class ProdQuantizer:
  """TurboQuant_prod (Algorithm 2): unbiased inner products at `bits` bits per coordinate.

  Attributes:
    mse: the (bits-1)-bit `MSEQuantizer` (at bits = 1 a 0-bit one: x̂_mse = 0).
    sketch: S, [m, d] i.i.d. N(0, 1), applied to rotated residuals.
    bits: total bits per coordinate (static).
  """

  mse: MSEQuantizer
  sketch: Array
  bits: int = flax.struct.field(pytree_node=False)

  @classmethod
  def create(
      cls,
      key: Array,
      d: int,
      bits: int,
      *,
      sketch_dim: int | None = None,
      rotation: str = "haar",
      density: codebook_lib.Density = "sphere",
      norm_dtype=jnp.float32,
      levels: str = "lloyd_max",
  ) -> "ProdQuantizer":
    """A quantizer for d-vectors at `bits` bits per coordinate (1..4).

    Args:
      key: PRNG key for the rotation and the sketch.
      d: vector dimension (>= 16, divisible by 8).
      bits: total bits per coordinate: bits-1 for the MSE codes, 1 for the QJL signs.
      sketch_dim: m, rows of the sketch (default d; a multiple of 8).
      rotation, density, norm_dtype, levels: as for `MSEQuantizer.create`.
    """
    _validate_config(d, bits, PROD_BITS, "ProdQuantizer")
    m = d if sketch_dim is None else sketch_dim
    if m < 8 or m % 8:
      raise ValueError(f"sketch_dim must be a positive multiple of 8, got {m}")
    rot_key, sketch_key = jax.random.split(key)
    mse = MSEQuantizer._create(rot_key, d, bits - 1, rotation=rotation, density=density,
                               norm_dtype=norm_dtype, levels=levels)
    return cls(mse=mse, sketch=qjl.gaussian_sketch(sketch_key, d, m), bits=bits)

  @property
  def dim(self) -> int:
    return self.mse.dim

  @property
  def sketch_dim(self) -> int:
    return self.sketch.shape[-2]

  @property
  def norm_dtype(self):
    return self.mse.norm_dtype

  def bytes_per_vector(self) -> int:
    """Stored bytes per vector: MSE codes, its norm (if any), sign bits, residual norm."""
    itemsize = jnp.dtype(self.norm_dtype).itemsize
    mse = self.mse.bytes_per_vector() if self.mse.bits else 0
    return mse + self.sketch_dim // 8 + itemsize

  def quantize(self, x: Array) -> ProdCodes:
    """Encodes vectors. x: [..., d] float -> `ProdCodes` with leading axes [...]."""
    x = _check_input(x, self.dim)
    if self.mse.bits:
      mse_codes, y_scaled, stored_norms = self.mse._quantize_rotated(x)
      # The residual against the reconstruction as stored (rounded norm included), so the
      # estimate stays unbiased whatever the norm dtype.
      r_rot = y_scaled - self.mse.centroid_values(mse_codes) * stored_norms[..., None]
    else:
      mse_codes = None
      r_rot = self.mse.rotation.rotate(x.astype(jnp.float32))
    gamma = _norms_with_nan(r_rot)
    signs = qjl.qjl_signs(self.sketch, r_rot)
    return ProdCodes(mse=mse_codes, signs=packing.pack_signs(signs),
                     residual_norms=store_norms(gamma, self.norm_dtype))

  def rotated_values(self, codes: ProdCodes) -> Array:
    """x̂ in the rotated domain: ‖x‖·c[idx] + γ·√(π/2)/m·(S·Π)ᵀ·signs. [..., d] float32."""
    signs = packing.unpack_signs(codes.signs)
    qjl_part = jnp.matmul(signs, self.sketch, precision=_HIGHEST)
    qjl_part = qjl_part * (qjl.qjl_scale(self.sketch_dim)
                           * codes.residual_norms.astype(jnp.float32)[..., None])
    if codes.mse is None:
      return qjl_part
    return self.mse.rotated_values(codes.mse) + qjl_part

  def dequantize(self, codes: ProdCodes, dtype=jnp.float32) -> Array:
    """x̂ = Πᵀ·(rotated values), in the original domain: [..., d] in `dtype`."""
    return self.mse.rotation.unrotate(self.rotated_values(codes)).astype(dtype)

  def rotate_queries(self, q: Array) -> tuple[Array, Array]:
    """(Π·q, S·Π·q), both float32: the query transforms, computed once per query."""
    q_rot = self.mse.rotate_queries(q)
    return q_rot, qjl.sketch(self.sketch, q_rot)

  def inner_products_rotated(self, q_rot: Array, q_sketch: Array, codes: ProdCodes) -> Array:
    """Unbiased <q, x> from transformed queries. q_*: [..., nq, ·], codes: [..., n] -> [..., nq, n]."""
    signs = packing.unpack_signs(codes.signs)
    scores = jnp.einsum("...qm,...nm->...qn", q_sketch, signs, precision=_HIGHEST)
    scores = scores * (qjl.qjl_scale(self.sketch_dim)
                       * codes.residual_norms.astype(jnp.float32)[..., None, :])
    if codes.mse is not None:
      scores = scores + self.mse.inner_products_rotated(q_rot, codes.mse)
    return scores

  def inner_products(self, q: Array, codes: ProdCodes) -> Array:
    """Unbiased estimates of <q, x>. q: [..., nq, d], codes: [..., n] -> [..., nq, n]."""
    return self.inner_products_rotated(*self.rotate_queries(q), codes)


Quantizer = MSEQuantizer | ProdQuantizer

