import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import channel_split, codebook


@pytest.mark.parametrize("bits,layout", [(2, ((128, 2),)), (2.5, ((64, 3), (64, 2))),
                                         (3.5, ((64, 4), (64, 3))), (4, ((128, 4),))])
def test_layout_gives_exact_average_bits(bits, layout):
  assert channel_split.group_layout(128, bits) == layout
  assert sum(n * b for n, b in layout) == 128 * bits


@pytest.mark.parametrize("kind", ["mse", "prod"])
@pytest.mark.parametrize("bits", [2.5, 3.5])
def test_split_quantizer_round_trip_and_scores(kind, bits, rng):
  q = channel_split.SplitQuantizer.create(jax.random.PRNGKey(0), 64, bits, kind)
  x = jnp.asarray(rng.standard_normal((3, 40, 64)), jnp.float32)
  codes = q.quantize(x)
  assert q.bytes_per_vector() * 120 == sum(l.nbytes for l in jax.tree.leaves(codes))
  qs = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
  fast = q.scores(q.transform_queries(qs), codes)
  slow = jnp.einsum("bqd,bnd->bqn", qs, q.dequantize(codes))
  np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)
  w = jax.nn.softmax(fast, -1)
  np.testing.assert_allclose(q.unrotate(q.weighted_sums_rotated(w, codes)),
                             jnp.einsum("bqn,bnd->bqd", w, q.dequantize(codes)), atol=1e-5)


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_group_rotations_as_one_block_diagonal_product(rotation, rng):
  """Dense rotations go through one block-diagonal product (decode glue): the same
  transforms as each group's own, and the unrotation matrix inverts them."""
  q = channel_split.SplitQuantizer.create(jax.random.PRNGKey(3), 64, 3.5, rotation=rotation)
  x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
  got = q.transform_queries(x)
  for g, part, want in zip(q.groups, got, q._split(x)):
    np.testing.assert_allclose(part, g.rotate_queries(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(q.unrotate(got), x, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="NaN"):   # the groups' own input checks, kept
    q.transform_queries(x.at[0, 0, 0].set(jnp.nan))
  np.testing.assert_allclose(jnp.concatenate(got, -1) @ q.unrotation_matrix(), x,
                             rtol=1e-5, atol=1e-5)
  perm = jnp.asarray(np.stack([rng.permutation(64) for _ in range(6)]).reshape(2, 3, 64))
  y = jnp.asarray(rng.standard_normal((2, 3, 4, 64)), jnp.float32)
  back = channel_split.unpermute_channels(channel_split.permute_channels(y, perm), perm)
  np.testing.assert_array_equal(back, y)


@pytest.mark.parametrize("bits", [4, 3.5])
def test_float16_blocks_are_kept_rounded_once(bits):
  """float16_blocks: the unrotation matrix rounded to float16 once, at create, and returned
  as kept (the int8 kernel's rotation reads it every decode call); not kept unless asked,
  nor for Hadamard rotations (rounded on demand there)."""
  key = jax.random.PRNGKey(5)
  q = channel_split.SplitQuantizer.create(key, 64, bits, float16_blocks=True)
  plain = channel_split.SplitQuantizer.create(key, 64, bits)
  assert plain.blocks_f16 is None and q.blocks_f16.dtype == jnp.float16
  np.testing.assert_array_equal(q.blocks_f16, plain.unrotation_matrix().astype(jnp.float16))
  assert q.unrotation_matrix(jnp.float16) is q.blocks_f16
  np.testing.assert_array_equal(plain.unrotation_matrix(jnp.float16), q.blocks_f16)
  assert q.unrotation_matrix().dtype == jnp.float32
  had = channel_split.SplitQuantizer.create(key, 64, bits, rotation="hadamard",
                                            float16_blocks=True)
  assert had.blocks_f16 is None and had.unrotation_matrix(jnp.float16).dtype == jnp.float16


def test_fractional_distortion_sits_between_integer_widths():
  x = jax.random.normal(jax.random.PRNGKey(1), (4000, 128))
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  err = {}
  for bits in (2, 2.5, 3, 3.5, 4):
    q = channel_split.SplitQuantizer.create(jax.random.PRNGKey(2), 128, bits)
    err[bits] = float(jnp.mean(jnp.sum((x - q.dequantize(q.quantize(x))) ** 2, -1)))
  assert err[2] > err[2.5] > err[3] > err[3.5] > err[4]
  # Each half carries half the energy of an isotropic vector: the average of both widths.
  for lo in (2, 3):
    want = 0.5 * (codebook.lloyd_max_codebook(64, lo).mse + codebook.lloyd_max_codebook(64, lo + 1).mse)
    assert err[lo + 0.5] == pytest.approx(want, rel=0.05)


def test_outlier_permutation_puts_large_channels_first(rng):
  x = rng.standard_normal((2, 50, 32))
  x[..., [3, 17, 20]] *= 30
  perm = channel_split.outlier_permutation(jnp.asarray(x), jnp.ones((2, 50), bool), 16)
  for row in np.asarray(perm):
    assert sorted(row) == list(range(32))
    assert {3, 17, 20} <= set(row[:16])
    assert list(row[:16]) == sorted(row[:16]) and list(row[16:]) == sorted(row[16:])


def test_bad_bits():
  with pytest.raises(ValueError, match="bits"):
    channel_split.group_layout(64, 3.25)
  with pytest.raises(ValueError, match="divisible by 16"):
    channel_split.group_layout(72, 2.5)
  with pytest.raises(ValueError, match="d >= 32"):
    channel_split.group_layout(16, 3.5)
