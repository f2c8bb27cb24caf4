"""The Mosaic GPU decode kernel without a GPU: its jnp reference against plain softmax
attention, and its lowering for CUDA on the CPU host (Pallas → Mosaic GPU, the decode's
inline PTX included), so a change that breaks the GPU build fails here. The kernel itself
is checked against the reference on the GPU by `benchmarks.mgpu_decode` (Mosaic GPU's
interpret mode runs no inline Mosaic code)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc

D = 128


def specs(bits_k, bits_v):
  tt = 128 if 3 in (bits_k, bits_v) else 64
  return rc.TileSpec(bits_k, tt, D), rc.TileSpec(bits_v, D, tt)


def random_inputs(rng, r, t, bits_k, bits_v):
  kc = rng.integers(0, 1 << bits_k, (r, t, D))
  vc = rng.integers(0, 1 << bits_v, (r, t, D))
  kn = rng.uniform(0.5, 1.5, (r, t)).astype(np.float16)
  vn = rng.uniform(0.5, 1.5, (r, t)).astype(np.float16)
  q = rng.standard_normal((r, dm.HEADS, D)) * 0.05
  return kc, vc, kn, vn, q


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_reference_partials_merge_to_softmax_attention(rng, soft_cap):
  r, t, splits, bk, bv = 3, 256, 4, 3, 2
  kc, vc, kn, vn, q = random_inputs(rng, r, t, bk, bv)
  a_k, c_k, a_v, c_v = 0.9, 0.03, 1.1, -0.02
  qoff = rng.standard_normal((r, dm.HEADS))
  bounds = np.array([[3, 250], [0, 64], [100, 101]])
  scale = 0.7
  o, l, m = dm.decode_partials_reference(
      jnp.asarray(kc), jnp.asarray(kn), jnp.asarray(vc), jnp.asarray(vn),
      jnp.asarray(q, jnp.float32), jnp.asarray(bounds), jnp.asarray(qoff, jnp.float32),
      bits_k=bk, bits_v=bv, key_levels=(a_k, c_k), value_levels=(a_v, c_v),
      num_splits=splits, scale=scale, soft_cap=soft_cap)
  # Merge the splits as the cache does.
  w = np.exp(m - m.max(axis=1, keepdims=True))
  out = np.sum(np.asarray(o) * w[:, :, None, :], 1)
  out = out / np.sum(np.asarray(l) * w, axis=1)[:, None, :]
  # Direct: levels from the codes, one softmax over [lo, hi).
  uk = kc - ((1 << bk) - 1) / 2
  uv = vc - ((1 << bv) - 1) / 2
  keys = (a_k * uk + c_k * uk**3) * kn[..., None].astype(np.float64)
  vals = (a_v * uv + c_v * uv**3) * vn[..., None].astype(np.float64)
  for i, (lo, hi) in enumerate(bounds):
    s = (keys[i, lo:hi] @ q[i].T + qoff[i]) * scale           # [n, heads]
    if soft_cap is not None:
      s = soft_cap * np.tanh(s / soft_cap)
    p = np.exp(s - s.max(axis=0))
    expect = (vals[i, lo:hi].T @ p) / p.sum(axis=0)           # [D, heads]
    np.testing.assert_allclose(out[i], expect, rtol=2e-4, atol=1e-6)


def lowered(bits_k, bits_v, soft_cap=None, r=4, t=1024, splits=2):
  ks, vs = specs(bits_k, bits_v)
  s = jax.ShapeDtypeStruct
  args = (s((r, t // ks.rows * rc.WORD_ROWS, ks.words_per_row), jnp.int32),
          s((r, t), jnp.float16),
          s((r, t // vs.cols * rc.WORD_ROWS, vs.words_per_row), jnp.int32),
          s((r, t), jnp.float16), s((r, dm.HEADS, D), jnp.float16),
          s((r, 2), jnp.int32), s((r, dm.HEADS), jnp.float32))
  fn = jax.jit(lambda *a: dm.decode_partials(
      *a, key_spec=ks, value_spec=vs, key_levels=(0.04, 0.001), value_levels=(0.02, 0.0),
      num_splits=splits, scale=0.1, soft_cap=soft_cap))
  return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bits", [(4, 4), (3, 2), (2, 3)])
def test_kernel_lowers_for_cuda(bits):
  text = lowered(*bits, soft_cap=5.0 if bits == (3, 2) else None)
  assert "mosaic_gpu" in text


def _call_with(ks, vs, t=1024, splits=1, q_heads=dm.HEADS, norm_dtype=jnp.float16,
               levels=(1.0, 0.1)):
  """decode_partials on zero inputs of the shapes the specs ask for (checks come first)."""
  r = 2
  z = lambda *shape, dt=jnp.int32: jnp.zeros(shape, dt)  # noqa: E731
  return dm.decode_partials(
      z(r, t // ks.rows * 64, ks.words_per_row), z(r, t, dt=norm_dtype),
      z(r, t // vs.cols * 64, vs.words_per_row), z(r, t, dt=jnp.float16),
      z(r, q_heads, D, dt=jnp.float16), z(r, 2), z(r, q_heads, dt=jnp.float32),
      key_spec=ks, value_spec=vs, key_levels=levels, value_levels=(1.0, 0.0),
      num_splits=splits, scale=1.0)


def test_bad_inputs_raise():
  ks, vs = specs(4, 4)
  with pytest.raises(ValueError, match="value tiles"):
    _call_with(ks, rc.TileSpec(4, D, 128))
  with pytest.raises(ValueError, match="do not split"):
    _call_with(ks, vs, t=64 * 3, splits=2)
  with pytest.raises(ValueError, match="overflow fp16"):
    _call_with(ks, vs, levels=(1.0, 1e-6))
  with pytest.raises(ValueError, match="q must"):
    _call_with(ks, vs, q_heads=4)
  with pytest.raises(ValueError, match="k_norms"):
    _call_with(ks, vs, norm_dtype=jnp.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fp16_level_decode_matches_cubic_codebook(bits):
  """The kernel's level arithmetic, c·fp16(fp16(u·u + a/c)·u) with one rounding per fp16
  op, gives the cubic codebook's levels to fp16 precision."""
  from turboquant_jax import codebook
  book = codebook.cubic_codebook(D, bits)
  k, factor = dm.level_form((book.linear, book.cubic))
  u = np.arange(1 << bits) - ((1 << bits) - 1) / 2
  u16 = u.astype(np.float16)
  assert np.array_equal(u16.astype(np.float64), u)       # the decode's u is exact
  y = (u16.astype(np.float64) ** 2 + float(np.float16(k))).astype(np.float16)
  lev = (y.astype(np.float64) * u).astype(np.float16).astype(np.float64) * factor
  np.testing.assert_allclose(lev, book.centroids, rtol=1.5e-3)
  assert dm.level_form((0.3, 0.0)) == (None, 0.3)
