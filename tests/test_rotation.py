import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import rotation


def sylvester_hadamard(d):
  h = np.ones((1, 1))
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  return h


@pytest.mark.parametrize("d", [2, 16, 64, 256])
def test_fwht_matches_dense_hadamard_in_float64(d, rng):
  x = rng.standard_normal((5, d))
  want = x @ sylvester_hadamard(d).T / np.sqrt(d)
  with jax.enable_x64(True):
    got = jax.jit(rotation.fast_walsh_hadamard)(jnp.asarray(x))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_fwht_is_an_involution(rng):
  x = jnp.asarray(rng.standard_normal((3, 4, 128)), jnp.float32)
  np.testing.assert_allclose(rotation.fast_walsh_hadamard(rotation.fast_walsh_hadamard(x)), x,
                             atol=1e-5)


@pytest.mark.parametrize("kind,d", [("haar", 96), ("haar", 128), ("hadamard", 64),
                                    ("hadamard", 256)])
def test_rotation_is_orthogonal_with_exact_inverse(kind, d, rng):
  rot = rotation.make_rotation(jax.random.PRNGKey(3), d, kind)
  m = np.asarray(rot.as_matrix(), np.float64)
  np.testing.assert_allclose(m @ m.T, np.eye(d), atol=2e-5)
  x = rng.standard_normal((7, d)).astype(np.float32)
  y = jax.jit(rot.rotate)(x)
  # Against numpy float64 with the same matrix.
  np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ m.T, atol=2e-5)
  np.testing.assert_allclose(jax.jit(rot.unrotate)(y), x, atol=2e-5)
  np.testing.assert_allclose(rot.rotate(x), y, atol=1e-6)  # eager == jit


def test_haar_sign_fix_gives_unbiased_entries():
  # Without the sign fix, QR's convention skews the diagonal of Q; Haar entries have mean 0
  # and variance 1/d.
  d, n = 16, 4000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  mats = jax.vmap(functools.partial(rotation.haar_orthogonal, d=d))(keys)
  diag = np.asarray(jnp.diagonal(mats, axis1=-2, axis2=-1)).ravel()
  se = np.sqrt(1.0 / d / diag.size)
  assert abs(diag.mean()) < 4 * se
  np.testing.assert_allclose(np.var(diag), 1.0 / d, rtol=0.05)


def test_rotated_coordinates_follow_sphere_moments():
  # A fixed vector rotated by many draws: coordinates have E[t²] = 1/d and
  # E[t⁴] = 3/(d(d+2)) under f_d, for both rotations (Hadamard with two rounds).
  d, n = 64, 3000
  x = jnp.zeros((d,)).at[0].set(1.0)  # a basis vector, the hardest case for Hadamard
  for kind in ("haar", "hadamard"):
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    y = jax.vmap(lambda k: rotation.make_rotation(k, d, kind).rotate(x))(keys)
    y = np.asarray(y).ravel()
    np.testing.assert_allclose(np.mean(y**2), 1.0 / d, rtol=0.03)
    np.testing.assert_allclose(np.mean(y**4), 3.0 / (d * (d + 2)), rtol=0.1)


def test_one_hadamard_round_leaves_two_atoms():
  rot = rotation.HadamardRotation.create(jax.random.PRNGKey(0), 64, rounds=1)
  y = rot.rotate(jnp.zeros((64,)).at[5].set(1.0))
  np.testing.assert_allclose(np.abs(y), 1 / 8, rtol=1e-6)


def test_vmap_over_stacked_rotations(rng):
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  for kind in ("haar", "hadamard"):
    rots = jax.vmap(lambda k: rotation.make_rotation(k, 32, kind))(keys)
    x = jnp.asarray(rng.standard_normal((4, 10, 32)), jnp.float32)
    got = jax.vmap(lambda r, v: r.rotate(v))(rots, x)
    want = jnp.stack([rotation.make_rotation(k, 32, kind).rotate(v) for k, v in zip(keys, x)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="power-of-two"):
    rotation.make_rotation(jax.random.PRNGKey(0), 96, "hadamard")
  with pytest.raises(ValueError, match="kind"):
    rotation.make_rotation(jax.random.PRNGKey(0), 64, "fourier")
  rot = rotation.make_rotation(jax.random.PRNGKey(0), 64)
  with pytest.raises(ValueError, match="last axis"):
    rot.rotate(jnp.ones((3, 32)))
