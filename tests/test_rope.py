"""RoPE as a spec: the decoders' rotation, and the split form the cache centres with."""

import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import rope


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_is_orthogonal_relative_and_split_agrees(interleaved, rng):
  spec = rope.RopeSpec(500.0, interleaved)
  x = jnp.asarray(rng.standard_normal((3, 40, 64)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((3, 40, 64)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 3000, (3, 40)))
  rx = rope.rotate(x, pos, spec)
  np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  # <R(t)x, R(t)y> = <x, y>: only relative positions matter.
  np.testing.assert_allclose(jnp.sum(rx * rope.rotate(y, pos, spec), -1), jnp.sum(x * y, -1),
                             rtol=1e-4, atol=1e-3)
  # R(h)·R(l) is R(h + l) up to float32 angle rounding (~ω·t·6e-8).
  np.testing.assert_allclose(rope.rotate_split(x, pos, spec), rx, atol=2e-3)
  np.testing.assert_allclose(rope.unrotate_split(rope.rotate_split(x, pos, spec), pos, spec),
                             x, atol=1e-5)


def test_pairs_round_trip_and_bad_specs():
  x = jnp.arange(8.0)
  for interleaved in (False, True):
    spec = rope.RopeSpec(interleaved=interleaved)
    np.testing.assert_array_equal(spec.unpairs(*spec.pairs(x)), x)
  with pytest.raises(ValueError, match="base"):
    rope.RopeSpec(base=1.0)
  with pytest.raises(ValueError, match="even"):
    rope.RopeSpec().frequencies(7)
