import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import packing


def pack_codes_numpy(codes, bits):
  """The documented layout, bit by bit: code c of a w-bit plane sits in byte c div k at bit
  offset w·(c mod k), k = 8/w."""
  d = codes.shape[-1]
  planes, shift = [], 0
  for w in packing.plane_widths(bits):
    r = d * w // 8
    row = np.zeros(codes.shape[:-1] + (r,), np.uint8)
    for c in range(d):
      value = (codes[..., c].astype(np.int64) >> shift) & ((1 << w) - 1)
      k = 8 // w
      row[..., c // k] |= (value << (w * (c % k))).astype(np.uint8)
    planes.append(row)
    shift += w
  return planes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("d", [16, 64, 80, 96, 128, 256])
def test_round_trip_and_layout(bits, d, rng):
  codes = rng.integers(0, 2**bits, size=(3, 5, d)).astype(np.uint8)
  planes = jax.jit(lambda c: packing.pack_codes(c, bits))(codes)
  assert [p.shape for p in planes] == [(3, 5, d * w // 8) for w in packing.plane_widths(bits)]
  assert all(p.dtype == jnp.uint8 for p in planes)
  assert sum(p.shape[-1] for p in planes) == packing.packed_bytes(d, bits) == d * bits // 8
  for got, want in zip(planes, pack_codes_numpy(codes, bits)):
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(packing.unpack_codes(planes, bits)), codes)
  if d & (d - 1) == 0:
    assert all(p.shape[-1] & (p.shape[-1] - 1) == 0 for p in planes)


def test_planes_unpack_to_natural_order_with_one_broadcast_shift(rng):
  # The property a kernel relies on: every plane unpacks the same way, in natural order,
  # so a 3-bit code is lo | hi << 2 element by element.
  codes = rng.integers(0, 8, size=(128,)).astype(np.uint8)
  lo, hi = (np.asarray(p) for p in packing.pack_codes(codes, 3))
  unpack = lambda row, w: ((row[:, None] >> (np.arange(8 // w) * w)) & ((1 << w) - 1)).ravel()  # noqa: E731
  np.testing.assert_array_equal(unpack(lo, 2) | (unpack(hi, 1) << 2), codes)


def test_signs_round_trip(rng):
  signs = np.where(rng.standard_normal((4, 64)) > 0, 1.0, -1.0).astype(np.float32)
  packed = packing.pack_signs(signs)
  assert packed.shape == (4, 8)
  np.testing.assert_array_equal(np.asarray(packing.unpack_signs(packed)), signs)


def test_errors():
  with pytest.raises(ValueError, match="0..5"):
    packing.pack_codes(jnp.zeros((16,), jnp.uint8), 6)
  with pytest.raises(ValueError, match="divisible by 8"):
    packing.pack_codes(jnp.zeros((12,), jnp.uint8), 1)
  with pytest.raises(ValueError, match="planes"):
    packing.unpack_codes((jnp.zeros((8,), jnp.uint8),), 3)
