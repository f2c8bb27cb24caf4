"""`pallas_kernels.merge_exact` in interpret mode against its jnp reference, on fresh
random partials and exact parts (hidden slots, empty splits, a row that sees nothing)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import merge_exact as me

B, H, D = 2, 3, 64


def inputs(rng, rows=4, splits=5, sizes=(16, 4)):
  r, cols = B * H, rows
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  m = f32(r, splits, cols)
  l = jnp.asarray(rng.uniform(0.5, 3.0, (r, splits, cols)), jnp.float32)
  # An empty split as the kernel writes it: l = 0, m = -1e30, o = 0.
  o = f32(r, splits, D, cols).at[1, 2].set(0.0)
  l, m = l.at[1, 2].set(0.0), m.at[1, 2].set(-1e30)
  qpos = jnp.asarray(rng.integers(20, 120, (B, 1)) + np.zeros((1, rows), int), jnp.int32)
  exact = []
  for n in sizes:
    pos = rng.integers(0, 140, (B, n))
    pos = np.where(rng.uniform(size=(B, n)) < 0.2, me.HIDDEN, pos)
    exact.append((jnp.asarray(rng.standard_normal((r, n, D)), jnp.bfloat16),
                  jnp.asarray(rng.standard_normal((r, n, D)), jnp.bfloat16),
                  jnp.asarray(pos, jnp.int32)))
  rot = jnp.asarray(np.linalg.qr(rng.standard_normal((D, D)))[0], jnp.float32)
  return f32(r, rows, D), o, l, m, qpos, rot, tuple(exact)


@pytest.mark.parametrize("rows, splits, sizes, kw", [
    (4, 5, (16, 4), dict()),
    (8, 12, (32,), dict(soft_cap=3.0, sliding_window=25)),
    (2, 32, (16, 1), dict(mean=True)),
    (4, 3, (16, 4), dict(mean=True, perm=True)),    # channel groups' outlier order
    (4, 6, (16,), dict(mean=True, prerotated=True)),  # no unrotation operand
    (8, 4, (), dict(prerotated=True)),
])
def test_merge_matches_reference(rng, rows, splits, sizes, kw):
  q, o, l, m, qpos, rot, exact = inputs(rng, rows=rows, splits=splits, sizes=sizes)
  if kw.pop("mean", False):
    kw["value_mean"] = jnp.asarray(rng.standard_normal((B * H, D)), jnp.float32)
  if kw.pop("perm", False):
    kw["value_perm"] = jnp.asarray(np.stack([rng.permutation(D) for _ in range(B * H)]),
                                   jnp.int32)
  if kw.pop("prerotated", False):
    rot = None
  got = me.merge_exact(q, o, l, m, qpos, rot, exact, heads=H, scale=0.3, interpret=True,
                       **kw)
  ref = me.merge_exact_reference(q, o, l, m, qpos, rot, exact, heads=H, scale=0.3, **kw)
  assert got.shape == (B * H, D, rows)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_reference_is_one_softmax(rng):
  """The reference against a softmax written out over every token: the partials'
  tokens (decoded values given explicitly) and the exact ones."""
  r, n_c, rows = B * H, 24, 2
  q = jnp.asarray(rng.standard_normal((r, rows, D)), jnp.float32)
  s_c = jnp.asarray(rng.standard_normal((r, rows, n_c)), jnp.float32)
  v_c = jnp.asarray(rng.standard_normal((r, n_c, D)), jnp.float32)   # rotated domain
  rot = jnp.asarray(np.linalg.qr(rng.standard_normal((D, D)))[0], jnp.float32)
  k_e = jnp.asarray(rng.standard_normal((r, 8, D)), jnp.float32)
  v_e = jnp.asarray(rng.standard_normal((r, 8, D)), jnp.float32)
  pos_e = jnp.asarray(np.r_[[[0, 1, 2, 3, 4, me.HIDDEN, 6, 7]] * B], jnp.int32)
  qpos = jnp.full((B, rows), 5, jnp.int32)
  # Partials over two splits of the compressed tokens.
  halves = np.split(np.arange(n_c), 2)
  m = jnp.stack([s_c[..., i].max(-1) for i in halves], 1)             # [R, 2, M]
  p = [jnp.exp(s_c[..., i] - m[:, j, :, None]) for j, i in enumerate(halves)]
  l = jnp.stack([x.sum(-1) for x in p], 1)
  o = jnp.stack([jnp.einsum("rmn,rnd->rdm", x, v_c[:, i]) for x, i in zip(p, halves)], 1)
  got = me.merge_exact_reference(q, o, l, m, qpos, rot, ((k_e, v_e, pos_e),), heads=H,
                                 scale=1.0)
  s_e = jnp.einsum("rmd,rnd->rmn", q, k_e)
  s_e = jnp.where((pos_e <= 5)[0][None, None], s_e, -jnp.inf)
  w = jax_softmax(jnp.concatenate([s_c, s_e], -1))
  want = (jnp.einsum("rmn,rnd->rmd", w[..., :n_c], v_c @ rot)
          + jnp.einsum("rmn,rnd->rmd", w[..., n_c:], v_e))
  np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.swapaxes(want, 1, 2)),
                             rtol=1e-4, atol=1e-5)


def jax_softmax(x):
  e = jnp.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_row_that_sees_nothing_is_zero(rng):
  q, o, l, m, qpos, rot, exact = inputs(rng, sizes=(16,))
  l, m, o = jnp.zeros_like(l), jnp.full_like(m, -1e30), jnp.zeros_like(o)
  qpos = jnp.full_like(qpos, -1)
  got = me.merge_exact(q, o, l, m, qpos, rot, exact, heads=H, scale=0.3, interpret=True)
  assert np.all(np.asarray(got) == 0)


def test_errors(rng):
  q, o, l, m, qpos, rot, exact = inputs(rng)
  with pytest.raises(ValueError, match="do not fit together"):
    me.merge_exact(q, o, l, m, qpos, rot, exact, heads=2, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="do not fit together"):   # o with other columns
    me.merge_exact(q, jnp.pad(o, [(0, 0)] * 3 + [(0, 4)]), l, m, qpos, rot, exact,
                   heads=H, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    bad = ((exact[0][0][:, :12], exact[0][1][:, :12], exact[0][2][:, :12]),)
    me.merge_exact(q, o, l, m, qpos, rot, bad, heads=H, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="do not fit q"):
    bad = ((exact[0][0], exact[0][1][:, :8], exact[0][2]),)
    me.merge_exact(q, o, l, m, qpos, rot, bad, heads=H, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="value_perm must be"):
    me.merge_exact(q, o, l, m, qpos, rot, exact, heads=H, scale=1.0, interpret=True,
                   value_perm=jnp.zeros((B * H, D - 1), jnp.int32))
  assert "head_dim" in me.unsupported(4, 96, (16,))
  assert me.unsupported(4, 128, (128, 4)) is None
  # Gemma 3's head_dim 256: the unrotation alone takes more than a block's shared memory
  # (the H200 refused the launch), so the caller keeps its jnp merge.
  assert "shared memory" in me.unsupported(4, 256, ())
  # Values the decoder rotated need no unrotation: 256 fits without exact parts.
  assert me.unsupported(4, 256, (), rotated=False) is None
  assert "shared memory" in me.unsupported(4, 256, (256,), rotated=False)
  with pytest.raises(ValueError, match="unrotation must be"):
    me.merge_exact(q, o, l, m, qpos, rot[:8], exact, heads=H, scale=1.0, interpret=True)


@pytest.mark.parametrize("splits, unrotated, sizes", [(12, 4, ()), (6, 1, (16,)), (3, 3, ())])
def test_unrotated_splits(rng, splits, unrotated, sizes):
  """The Mosaic kernel's exact splits (already in the output's channel order) merged in
  the same softmax: against the reference, and against the same partials given as
  rotated splits of o·rotᵀ (so the kernel's rotation maps them back) with no mean."""
  q, o, l, m, qpos, rot, exact = inputs(rng, rows=4, splits=splits, sizes=sizes)
  mean = jnp.asarray(rng.standard_normal((B * H, D)), jnp.float32)
  kw = dict(heads=H, scale=0.3, unrotated_splits=unrotated)
  got = me.merge_exact(q, o, l, m, qpos, rot, exact, interpret=True, value_mean=mean, **kw)
  ref = me.merge_exact_reference(q, o, l, m, qpos, rot, exact, value_mean=mean, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Without a mean, an unrotated split equals a rotated one holding rot·o.
  rotated = o.at[:, splits - unrotated:].set(
      jnp.einsum("ed,rsdm->rsem", rot, o[:, splits - unrotated:], precision="highest"))
  plain = me.merge_exact(q, rotated, l, m, qpos, rot, exact, heads=H, scale=0.3,
                         interpret=True)
  mixed = me.merge_exact(q, o, l, m, qpos, rot, exact, interpret=True, **kw)
  np.testing.assert_allclose(np.asarray(mixed), np.asarray(plain), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unrotated_splits"):
    me.merge_exact(q, o, l, m, qpos, rot, exact, heads=H, scale=0.3,
                   unrotated_splits=splits + 1, interpret=True)


# -- merge_splits: the split merge alone (values prerotated, exact tokens as splits) -------

@pytest.mark.parametrize("splits, exact, rows, mean", [(17, 1, 4, False), (33, 2, 4, True),
                                                       (12, 0, 2, True), (1, 1, 8, False)])
def test_merge_splits_matches_reference(rng, splits, exact, rows, mean):
  """Interpret mode against `merge_exact_reference` (no rotation, no exact parts, the last
  `exact` splits unrotated: the value mean skips them), the first `rows` of 8 columns, a
  split that saw nothing (l = 0) and a poisoned batch entry."""
  b, heads, d, cols = 2, 3, 64, 8
  r = b * heads
  o = jnp.asarray(rng.standard_normal((r, splits, d, cols)), jnp.float32)
  l = jnp.asarray(rng.uniform(0.5, 3.0, (r, splits, cols)), jnp.float32)
  m = jnp.asarray(rng.standard_normal((r, splits, cols)) * 4, jnp.float32)
  l = l.at[1, 0].set(0.0)
  o, m = o.at[1, 0].set(0.0), m.at[1, 0].set(-1e30)
  value_mean = jnp.asarray(rng.standard_normal((r, d)), jnp.float32) if mean else None
  poison = jnp.array([False, True])
  got = me.merge_splits(o, l, m, rows=rows, heads=heads, value_mean=value_mean,
                        exact_splits=exact, poison=poison, out_dtype=jnp.bfloat16,
                        block_d=16, interpret=True)
  q = jnp.zeros((r, cols, d), jnp.float32)
  qpos = jnp.zeros((b, cols), jnp.int32)
  ref = me.merge_exact_reference(q, o, l, m, qpos, None, (), heads=heads, scale=1.0,
                                 value_mean=value_mean, unrotated_splits=exact)
  ref = jnp.swapaxes(ref, 1, 2)[:, :rows]                           # [R, rows, D]
  assert got.shape == (r, rows, d) and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got[:heads], np.float32), ref[:heads],
                             rtol=1e-2, atol=1e-2)
  assert np.isnan(np.asarray(got[heads:], np.float32)).all()


def test_splits_block_d_keeps_the_grid_small():
  """16 channels while the grid stays within SPLITS_PROGRAMS, wider blocks past it, never
  wider than the head."""
  assert me.splits_block_d(8, 128) == 16            # Llama-3-8B heads at batch 1: 64
  assert me.splits_block_d(64, 128) == 16           # batch 8: 512 programs
  assert me.splits_block_d(65, 128) == 32
  assert me.splits_block_d(512, 128) == 128         # batch 64
  assert me.splits_block_d(4096, 64) == 64
  assert me.splits_block_d(1, 8) == 8
  for r, d in ((8, 128), (300, 256), (2048, 128)):
    b = me.splits_block_d(r, d)
    assert d % b == 0 and (r * d // b <= me.SPLITS_PROGRAMS or b == d)


def test_merge_splits_default_block_matches_explicit(rng):
  """The default block (`splits_block_d`) merges as an explicit one does."""
  r, s, d, cols = 6, 9, 64, 8
  o = jnp.asarray(rng.standard_normal((r, s, d, cols)), jnp.float32)
  l = jnp.asarray(rng.uniform(0.5, 3.0, (r, s, cols)), jnp.float32)
  m = jnp.asarray(rng.standard_normal((r, s, cols)), jnp.float32)
  got = me.merge_splits(o, l, m, rows=4, heads=3, exact_splits=1, interpret=True)
  want = me.merge_splits(o, l, m, rows=4, heads=3, exact_splits=1, block_d=64,
                         interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_merge_splits_errors(rng):
  o = jnp.zeros((6, 5, 64, 8))
  l = m = jnp.zeros((6, 5, 8))
  with pytest.raises(ValueError, match="power of two"):
    me.merge_splits(o, l, m, rows=3, heads=3, interpret=True)
  with pytest.raises(ValueError, match="block_d"):
    me.merge_splits(o, l, m, rows=4, heads=3, block_d=24, interpret=True)
  with pytest.raises(ValueError, match="do not fit"):
    me.merge_splits(o, l[:, :4], m, rows=4, heads=3, interpret=True)
  with pytest.raises(ValueError, match="exact_splits"):
    me.merge_splits(o, l, m, rows=4, heads=3, exact_splits=6, interpret=True)
  with pytest.raises(ValueError, match="poison"):
    me.merge_splits(o, l, m, rows=4, heads=3, poison=jnp.zeros(3, bool), interpret=True)
  with pytest.raises(ValueError, match="poison must be bool"):
    me.merge_splits(o, l, m, rows=4, heads=3, poison=jnp.zeros(2, jnp.int32),
                    interpret=True)
