import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import attention


def test_joint_softmax_equals_softmax_of_concatenation(rng):
  a = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((2, 3, 7)), jnp.float32)
  ma = jnp.asarray(rng.random((2, 3, 5)) > 0.3)
  mb = jnp.asarray(rng.random((2, 3, 7)) > 0.3)
  pa, pb = attention.joint_softmax([(a, ma), (b, mb)])
  want = jax.nn.softmax(jnp.where(jnp.concatenate([ma, mb], -1), jnp.concatenate([a, b], -1),
                                  -jnp.inf), axis=-1)
  want = jnp.where(jnp.isnan(want), 0.0, want)
  np.testing.assert_allclose(jnp.concatenate([pa, pb], -1), want, atol=1e-6)


def test_fully_masked_rows_give_zeros_not_nan():
  (p,) = attention.joint_softmax([(jnp.ones((2, 4)), jnp.zeros((2, 4), bool))])
  np.testing.assert_array_equal(p, 0.0)


def test_group_ungroup_round_trip(rng):
  q = jnp.asarray(rng.standard_normal((2, 3, 8, 16)), jnp.float32)
  g = attention.group_queries(q, 2)
  assert g.shape == (2, 2, 4, 3, 16)
  # q head h belongs to kv head h // group.
  np.testing.assert_array_equal(g[:, 1, 2], q[:, :, 6])
  np.testing.assert_array_equal(attention.ungroup_output(g), q)


def test_key_mask_causal_and_sliding():
  q_pos = jnp.array([[3, 4]])
  k_pos = jnp.arange(6)[None]
  m = attention.key_mask(q_pos, k_pos, k_pos < 5, sliding_window=2)[0, 0, 0]
  np.testing.assert_array_equal(m, [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
