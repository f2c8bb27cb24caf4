"""Random rotations Π of R^d: Haar-random orthogonal matrices and randomized Hadamard.

Both act on the last axis of row vectors: `rotate(x) = x @ Πᵀ` (that is, Π·x for each
vector) and `unrotate(y) = y @ Π`, its exact inverse. Both are drawn from an explicit PRNG
key and are pytrees, so a stack of them (one per head or layer) vmaps.

- `HaarRotation`: QR of a Gaussian matrix with the sign fix (multiply each column of Q by
  the sign of R's diagonal), which makes Π exactly Haar-distributed. O(d²) per vector.
- `HadamardRotation`: `rounds` times "flip signs at random, then the orthonormal fast
  Walsh-Hadamard transform", O(d log d) per vector, d a power of two. One round maps a
  basis vector to a ±1/√d vector (two atoms, the worst input for a scalar codebook); two
  rounds spread it into a near-Gaussian vector, so two is the default.
"""

from __future__ import annotations

from typing import Union

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def _check_last_axis(x: Array, d: int, name: str) -> None:
  if x.ndim < 1 or x.shape[-1] != d:
    raise ValueError(f"{name} must have a last axis of size {d}, got shape {x.shape}")


def haar_orthogonal(key: Array, d: int, dtype=jnp.float32) -> Array:
  """A Haar-random d×d orthogonal matrix: QR of a Gaussian with the sign fix."""
  g = jax.random.normal(key, (d, d), dtype=jnp.float32)
  q, r = jnp.linalg.qr(g)
  # Without this fix QR's sign convention biases Q away from the Haar measure.
  q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]
  return q.astype(dtype)


def fast_walsh_hadamard(x: Array) -> Array:
  """Orthonormal Walsh-Hadamard transform over the last axis (a power of two), O(d log d).

  Args:
    x: [..., d].

  Returns:
    [..., d], H·x / √d for the Sylvester Hadamard matrix H; its own inverse.
  """
  d = x.shape[-1]
  if d & (d - 1) or d == 0:
    raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two size, got {d}")
  lead = x.shape[:-1]
  h = 1
  while h < d:
    # Butterflies on pairs (i, i + h) inside each block of 2h.
    y = x.reshape(*lead, d // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
    h *= 2
  return x * jnp.asarray(d**-0.5, x.dtype)


@flax.struct.dataclass
class HaarRotation:
  """A dense Haar-random rotation. `matrix` is Π, [d, d]."""

  matrix: Array

  @property
  def dim(self) -> int:
    return self.matrix.shape[-1]

  @classmethod
  def create(cls, key: Array, d: int) -> "HaarRotation":
    if d < 2:
      raise ValueError(f"d must be >= 2, got {d}")
    return cls(matrix=haar_orthogonal(key, d))

  def rotate(self, x: Array) -> Array:
    """Π·x for each vector. x: [..., d] -> [..., d]."""
    _check_last_axis(x, self.dim, "x")
    return jnp.matmul(x, self.matrix.T.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)

  def unrotate(self, y: Array) -> Array:
    """Πᵀ·y for each vector, the exact inverse of `rotate`. y: [..., d] -> [..., d]."""
    _check_last_axis(y, self.dim, "y")
    return jnp.matmul(y, self.matrix.astype(y.dtype), precision=jax.lax.Precision.HIGHEST)

  def as_matrix(self) -> Array:
    return self.matrix


@flax.struct.dataclass
class HadamardRotation:
  """Π = H·D_r ··· H·D_1 with random sign diagonals D_i. `signs` is [rounds, d] of ±1."""

  signs: Array

  @property
  def dim(self) -> int:
    return self.signs.shape[-1]

  @classmethod
  def create(cls, key: Array, d: int, rounds: int = 2) -> "HadamardRotation":
    if d < 2 or d & (d - 1):
      raise ValueError(
          f"the randomized Hadamard rotation needs a power-of-two d, got {d}; "
          "use rotation='haar' for other dimensions")
    if rounds < 1:
      raise ValueError(f"rounds must be >= 1, got {rounds}")
    signs = jax.random.rademacher(key, (rounds, d), dtype=jnp.float32)
    return cls(signs=signs)

  def rotate(self, x: Array) -> Array:
    """Π·x for each vector. x: [..., d] -> [..., d]."""
    _check_last_axis(x, self.dim, "x")
    return _hadamard_rotate(self.signs, x)

  def unrotate(self, y: Array) -> Array:
    """Πᵀ·y = D_1·H ··· D_r·H·y, the exact inverse of `rotate`."""
    _check_last_axis(y, self.dim, "y")
    return _hadamard_unrotate(self.signs, y)

  def as_matrix(self) -> Array:
    """Π as a dense [d, d] matrix (for tests and kernels that want one)."""
    return self.rotate(jnp.eye(self.dim, dtype=jnp.float32)).T


# Jitted so an eager call costs one dispatch, not 2·log2(d) per round.
@jax.jit
def _hadamard_rotate(signs: Array, x: Array) -> Array:
  for i in range(signs.shape[-2]):
    x = fast_walsh_hadamard(x * signs[..., i, :].astype(x.dtype))
  return x


@jax.jit
def _hadamard_unrotate(signs: Array, y: Array) -> Array:
  for i in reversed(range(signs.shape[-2])):
    y = fast_walsh_hadamard(y) * signs[..., i, :].astype(y.dtype)
  return y


Rotation = Union[HaarRotation, HadamardRotation]


def make_rotation(key: Array, d: int, kind: str = "haar", **kwargs) -> Rotation:
  """A random rotation of R^d: kind is "haar" or "hadamard"."""
  if kind == "haar":
    return HaarRotation.create(key, d)
  if kind == "hadamard":
    return HadamardRotation.create(key, d, **kwargs)
  raise ValueError(f"rotation kind must be 'haar' or 'hadamard', got {kind!r}")
