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


@pytest.mark.parametrize("soft_cap, splits, step_tokens", [
    (None, 4, None), (3.0, 4, None), (None, 3, 64), (3.0, 5, 32)])   # 3, 5: uneven runs
def test_reference_partials_merge_to_softmax_attention(rng, soft_cap, splits, step_tokens):
  r, t, bk, bv = 3, 256, 3, 2
  kc, vc, kn, vn, q = random_inputs(rng, r, t, bk, bv)
  a_k, c_k, a_v, c_v = 0.9, 0.03, 1.1, -0.02
  qoff = rng.standard_normal((r, dm.HEADS))
  bounds = np.array([[3, 250], [0, 64], [100, 101]])
  scale = 0.7
  o, l, m = dm.decode_partials_reference(
      jnp.asarray(kc), jnp.asarray(kn), jnp.asarray(vc), jnp.asarray(vn),
      jnp.asarray(q, jnp.float32), jnp.asarray(bounds), jnp.asarray(qoff, jnp.float32),
      bits_k=bk, bits_v=bv, key_levels=(a_k, c_k), value_levels=(a_v, c_v),
      num_splits=splits, scale=scale, soft_cap=soft_cap, step_tokens=step_tokens)
  assert o.shape == (r, splits, D, dm.HEADS) and l.shape == m.shape == (r, splits, dm.HEADS)
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


@pytest.mark.parametrize("t, block, rows", [(128, 128, None), (384, 128, None),
                                             (768, 256, 64), (512, 256, 128)])
def test_rope_offsets_match_rotated_mean(rng, t, block, rows):
  """The kernel's q·R(t)·μ operands (W per table block, the offset table) give q·R(t)·μ,
  R(t) turning each pair by t·ω: in float32, and with the kernel's fp16; with a table
  shorter than the split block too (angles composed R(θ_h)·R(φ_b))."""
  r, pairs = 2, D // 2
  freq = 10000.0 ** (-np.arange(pairs) * 2.0 / D)
  qa, qb, ma, mb = (rng.standard_normal((r, dm.HEADS, pairs)) for _ in range(4))
  coef_a, coef_b = qa * ma + qb * mb, qb * ma - qa * mb
  ang = np.arange(t)[:, None] * freq[None, :]                       # [T, D/2]
  # R(t)·μ pair-wise, dotted with q.
  rot_a = ma[:, :, None] * np.cos(ang) - mb[:, :, None] * np.sin(ang)
  rot_b = mb[:, :, None] * np.cos(ang) + ma[:, :, None] * np.sin(ang)
  expect = np.einsum("rhp,rhtp->rth", qa, rot_a) + np.einsum("rhp,rhtp->rth", qb, rot_b)
  args = [jnp.asarray(x, jnp.float32) for x in (coef_a, coef_b, freq)]
  ops = dm.rope_offsets(*args, t, block=block, table_rows=rows)
  n = rows or block
  assert ops.table.shape[0] == n and ops.trig.shape[0] == t // n
  scale = np.abs(expect).max()
  # The table is fp16 (wgmma's operand): ~2^-12 absolute per entry.
  np.testing.assert_allclose(dm.rope_offsets_dense(ops), expect, atol=1e-3 * scale)
  # What the kernel computes, in numpy: per block W = coef·trig in fp16, then table · W.
  coef, sc, trig = (np.asarray(x, np.float64) for x in ops[:3])
  table = np.asarray(ops.table, np.float64)
  got = np.zeros((r, t, dm.HEADS))
  for blk in range(t // n):
    w = coef[:, 0] * trig[blk, 0][None, :, None] + coef[:, 1] * trig[blk, 1][None, :, None]
    w = w.astype(np.float16).astype(np.float64)                     # [R, D, 8]
    got[:, blk * n:(blk + 1) * n] = np.einsum("ld,rdh->rlh", table, w) * sc[:, None]
  np.testing.assert_allclose(got, expect, atol=2e-3 * scale)


def lowered(bits_k, bits_v, soft_cap=None, r=4, t=1024, splits=2, rope=False,
            key_levels=(0.04, 0.001), value_levels=(0.02, 0.0)):
  ks, vs = specs(bits_k, bits_v)
  s = jax.ShapeDtypeStruct
  args = (s((r, t // ks.rows * rc.WORD_ROWS, ks.words_per_row), jnp.int32),
          s((r, t), jnp.float16),
          s((r, t // vs.cols * rc.WORD_ROWS, vs.words_per_row), jnp.int32),
          s((r, t), jnp.float16), s((r, dm.HEADS, D), jnp.float16),
          s((r, 2), jnp.int32), s((r, dm.HEADS), jnp.float32))
  if rope:
    args += (s((r, dm.HEADS, D // 2), jnp.float32),) * 2
  def call(*a):
    offsets = None
    if rope:
      *a, ca, cb = a
      freq = 10000.0 ** (-jnp.arange(D // 2) * 2.0 / D)
      offsets = dm.rope_offsets(ca, cb, freq, t)
    return dm.decode_partials(
        *a, key_spec=ks, value_spec=vs, key_levels=key_levels, value_levels=value_levels,
        num_splits=splits, scale=0.1, soft_cap=soft_cap, rope=offsets)
  return jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bits", [(4, 4), (3, 2), (2, 3)])
def test_kernel_lowers_for_cuda(bits):
  text = lowered(*bits, soft_cap=5.0 if bits == (3, 2) else None)
  assert "mosaic_gpu" in text


def test_kernel_with_quintic_levels_lowers_for_cuda():
  from turboquant_jax import codebook
  k4, v3 = (codebook.polynomial_codebook(D, b, degree=5).coefficients for b in (4, 3))
  assert "mosaic_gpu" in lowered(4, 3, key_levels=k4, value_levels=v3, rope=True)


@pytest.mark.parametrize("bits", [(4, 4), (3, 3)])
def test_kernel_with_rope_offsets_lowers_for_cuda(bits):
  assert "mosaic_gpu" in lowered(*bits, rope=True)


def lowered_groups(key_groups, value_groups, tt, **kw):
  """decode_partials lowered with channel groups: (bits, channels) per group and side."""
  from benchmarks import mosaic_lowering
  return mosaic_lowering.lower(key_groups, value_groups, tt, **kw)


@pytest.mark.parametrize("groups", [
    # 3.5 / 3.5 bits at d = 128: groups of 64 channels at 4 and 3 bits, 256-token tiles.
    dict(key_groups=((4, 64), (3, 64)), value_groups=((4, 64), (3, 64)), tt=256),
    # 3.5-bit keys, 3-bit values, soft-cap.
    dict(key_groups=((4, 64), (3, 64)), value_groups=((3, 128),), tt=256, soft_cap=4.0),
    # 3.5 bits at d = 128 with RoPE offsets: one angle per 256-token step; groups decoded
    # one after the other (the default with RoPE) or together.
    dict(key_groups=((4, 64), (3, 64)), value_groups=((4, 64), (3, 64)), tt=256, rope=True),
    dict(key_groups=((4, 64), (3, 64)), value_groups=((3, 128),), tt=256, rope=True,
         serial_groups=False, overlap_values=False),
    # ... in one 256-token pass per tile instead of the default two 128-token passes.
    dict(key_groups=((4, 64), (3, 64)), value_groups=((4, 64), (3, 64)), tt=256, rope=True,
         sub_steps=1),
    # ... with a 64-row RoPE table, two W per pass (111,616 bytes of shared memory: two
    # CTAs per SM; the 256-row table takes 152,576).
    dict(key_groups=((4, 64), (3, 64)), value_groups=((4, 64), (3, 64)), tt=256, rope=True,
         table_rows=64),
    # d = 256 (Gemma 3): groups of 128 channels keep 128-token tiles.
    dict(key_groups=((3, 128), (2, 128)), value_groups=((3, 128), (2, 128)), tt=128,
         t=2048, rope=True),
])
def test_kernel_with_channel_groups_lowers_for_cuda(groups):
  assert "mosaic_gpu" in lowered_groups(**groups)


def test_short_rope_table_fits_two_ctas_per_sm():
  """3.5 bits centred before RoPE: a 256-row table leaves room for one CTA per SM (228 KB,
  1 KB reserved per CTA), the measured bound on the H200; a 64-row table fits two."""
  from benchmarks import mosaic_lowering as ml
  groups = (((4, 64), (3, 64)), ((4, 64), (3, 64)), 256)
  try:
    full, short = (ml.smem_bytes(ml.module_asm(lowered_groups(*groups, rope=True, **kw)))
                   for kw in ({}, dict(table_rows=64)))
  except (AttributeError, ImportError, ValueError) as e:   # JAX internals moved
    pytest.skip(f"cannot read the Mosaic module here: {e}")
  per_cta = lambda smem: smem + ml.RESERVED_PER_CTA  # noqa: E731
  assert 2 * per_cta(full) > ml.SMEM_PER_SM >= 2 * per_cta(short)
  assert full - short >= 32 * 1024   # the table's 64 KB became 16 (more trig and W rows)


@pytest.mark.parametrize("sliding_window, blocks", [(None, 64), (90, (128, 64))])
def test_reference_exact_split_is_one_more_partial(rng, sliding_window, blocks):
  """With ExactTokens the reference's last splits are the exact tokens' softmax partials,
  one per block: merged with the compressed splits they are softmax attention over both
  token sets. Two batch entries of two rows each (limits, positions and bounds per entry),
  a ring of 200 slots with stale and empty ones (its last block part-filled) and 5
  sinks (slot = position, one block read past its end)."""
  r, heads, t, splits, bk, bv = 4, 2, 256, 2, 3, 3
  kc, vc, kn, vn, q = random_inputs(rng, r, t, bk, bv)
  levels = (0.9, 0.03)
  bounds = np.array([[5, 200], [5, 120]])                       # per batch entry
  qpos = np.array([260, 150])
  ring = np.stack([np.arange(200) + 100, np.where(np.arange(200) < 60, np.arange(200) + 100, -1)])
  limits = np.array([[260, 200, 300, 0, 300], [150, 120, 160, 0, 3]], np.int32)
  ek = [rng.standard_normal((r, n, D)).astype(np.float32) * 0.5 for n in (200, 5)]
  ev = [rng.standard_normal((r, n, D)).astype(np.float32) for n in (200, 5)]
  exact = dm.ExactTokens(jnp.asarray(q, jnp.float32), jnp.asarray(limits),
                         tuple(map(jnp.asarray, ek)), tuple(map(jnp.asarray, ev)),
                         (jnp.asarray(ring, jnp.int32), None))
  scale = 0.3
  o, l, m = dm.decode_partials_reference(
      jnp.asarray(kc), jnp.asarray(kn), jnp.asarray(vc), jnp.asarray(vn),
      jnp.asarray(q, jnp.float32), jnp.asarray(bounds, jnp.int32), jnp.zeros((r, dm.HEADS)),
      bits_k=bk, bits_v=bv, key_levels=levels, value_levels=levels, num_splits=splits,
      scale=scale, exact=exact, exact_blocks=blocks, sliding_window=sliding_window)
  e = dm.exact_splits(exact, blocks)
  assert e == (2 if blocks == (128, 64) else 4) + 1
  assert o.shape == (r, splits + e, D, dm.HEADS) and l.shape == (r, splits + e, dm.HEADS)
  w = np.exp(m - m.max(axis=1, keepdims=True))
  out = np.sum(np.asarray(o) * w[:, :, None, :], 1) / np.sum(np.asarray(l) * w, 1)[:, None]
  uk, uv = kc - 3.5, vc - 3.5
  keys = (0.9 * uk + 0.03 * uk**3) * kn[..., None].astype(np.float64)
  vals = (0.9 * uv + 0.03 * uv**3) * vn[..., None].astype(np.float64)
  for i in range(r):
    bi = i // heads
    lo, hi = bounds[bi]
    pos = [ring[bi], np.arange(5)]
    seen = [(p >= limits[bi, 1 + 2 * k]) & (p < limits[bi, 2 + 2 * k]) & (p <= qpos[bi])
            for k, p in enumerate(pos)]
    if sliding_window is not None:   # (the compressed range comes windowed in bounds)
      seen = [x & (p > qpos[bi] - sliding_window) for x, p in zip(seen, pos)]
    seen = np.concatenate([np.arange(lo, hi) <= qpos[bi], *seen])
    k_all = np.concatenate([keys[i, lo:hi], *[x[i] for x in ek]])
    v_all = np.concatenate([vals[i, lo:hi], *[x[i] for x in ev]])
    s = np.where(seen[:, None], k_all @ q[i].T * scale, -np.inf)
    p = np.exp(s - s.max(axis=0))
    np.testing.assert_allclose(out[i], v_all.T @ p / p.sum(axis=0), rtol=2e-4, atol=1e-6)


def test_exact_split_lowers_without_costing_ctas_per_sm():
  """The exact split reuses the shared memory of the compressed splits' pipeline (its
  own scope): every configuration keeps its CTAs per SM."""
  from benchmarks import mosaic_lowering as ml
  try:
    pairs = [(ml.smem_bytes(ml.module_asm(ml.CONFIGS[base]())),
              ml.smem_bytes(ml.module_asm(ml.CONFIGS[base + " exact"]())))
             for base in ("K3/V3 rope", "3.5/3.5 rope")]
  except (AttributeError, ImportError, ValueError) as e:   # JAX internals moved
    pytest.skip(f"cannot read the Mosaic module here: {e}")
  for base, exact in pairs:
    ctas = lambda smem: ml.SMEM_PER_SM // (smem + ml.RESERVED_PER_CTA)  # noqa: E731
    assert ctas(exact) == ctas(base) >= 2


def test_sub_steps_must_cut_whole_fragments():
  with pytest.raises(ValueError, match="sub_steps"):
    lowered_groups(((4, 64), (3, 64)), ((4, 64), (3, 64)), 256, sub_steps=3)
  with pytest.raises(ValueError, match="whole fragments"):
    dm.tile_decoder(rc.TileSpec(3, 256, 64), "affine", rows=(32, 64))


def test_groups_must_fit_together():
  ks = (rc.TileSpec(4, 256, 64), rc.TileSpec(3, 256, 64))
  vs = (rc.TileSpec(3, 128, 256),)
  z = lambda *shape, dt=jnp.int32: jnp.zeros(shape, dt)  # noqa: E731
  r, t = 2, 512
  args = ((z(r, 128, ks[0].words_per_row), z(r, 128, ks[1].words_per_row)),
          (z(r, t, dt=jnp.float16),) * 2, (z(r, 128, vs[0].words_per_row),),
          (z(r, t, dt=jnp.float16),), (z(r, 8, 64, dt=jnp.float16),) * 2, z(r, 2),
          z(r, 8, dt=jnp.float32))
  common = dict(key_spec=ks, value_spec=vs, num_splits=1, scale=1.0)
  with pytest.raises(ValueError, match="as many"):       # one key level pair for two groups
    dm.decode_partials(*args, key_levels=(1.0, 0.1), value_levels=(1.0, 0.0), **common)
  bad_q = args[:4] + ((z(r, 8, 64, dt=jnp.float16), z(r, 8, 32, dt=jnp.float16)),) + args[5:]
  with pytest.raises(ValueError, match=r"q\[1\]"):
    dm.decode_partials(*bad_q, key_levels=((1.0, 0.1),) * 2, value_levels=(1.0, 0.0),
                       **common)


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
  with pytest.raises(ValueError, match="do not split"):   # more splits than steps
    _call_with(ks, vs, t=1024, splits=9)
  with pytest.raises(ValueError, match="overflow fp16"):
    _call_with(ks, vs, levels=(1.0, 1e-6))
  with pytest.raises(ValueError, match="q must"):
    _call_with(ks, vs, q_heads=4)
  with pytest.raises(ValueError, match="k_norms"):
    _call_with(ks, vs, norm_dtype=jnp.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("degree", [3, 5])
def test_fp16_level_decode_matches_polynomial_codebook(bits, degree):
  """The kernel's level arithmetic (`form_levels_fp16`: u·(u² + k₀), or v·((v² + k₀)² +
  k₁) with v = u/2^s, one fp16 rounding per op) gives the codebook's levels to fp16
  precision, from v's that the bit decode gives exactly."""
  from turboquant_jax import codebook
  book = codebook.polynomial_codebook(D, bits, degree=degree)
  form = dm.level_form(book.coefficients, bits)
  assert form.kind == {3: "cubic", 5: "quintic"}[degree]
  u = np.arange(1 << bits) - ((1 << bits) - 1) / 2
  v = u * 2.0 ** -form.shift
  assert np.array_equal(v.astype(np.float16).astype(np.float64), v)
  assert degree == 3 or np.max(np.abs(v)) < 2         # quintic: v under 2, in range
  lev = dm.form_levels_fp16(form, bits)
  np.testing.assert_allclose(lev, book.centroids, rtol=1.5e-3, atol=1e-4 * book.centroids[-1])
  # Written out once for 3 bits, against the polynomial itself.
  if bits == 3 and degree == 5:
    c1, c3, c5 = book.coefficients
    np.testing.assert_allclose(lev, c1 * u + c3 * u**3 + c5 * u**5, rtol=1.5e-3)


def test_level_form_kinds_and_errors():
  assert dm.level_form((0.3, 0.0), 3) == dm.LevelForm("linear", (), 0.3)
  assert dm.level_form((0.3, 0.01, 0.0), 3).kind == "cubic"
  with pytest.raises(ValueError, match="overflow fp16"):
    dm.level_form((1.0, 1e-6), 4)
  with pytest.raises(ValueError, match="odd coefficients"):
    dm.level_form((1.0, 0.1, 0.01, 0.001), 3)


# -- the int8 operand path (byte codes, PRMT decode) ---------------------------------------

def lowered_s8(bits_k, bits_v, rope=False, soft_cap=None, r=4, t=1024, splits=2,
               **options):
  s = jax.ShapeDtypeStruct
  ks, vs = rc.TileSpec(bits_k, 128, D), rc.TileSpec(bits_v, 128, D)
  args = (s((r, t // 128 * rc.WORD_ROWS, 8 * bits_k), jnp.int32), s((r, t), jnp.float16),
          s((r, t // 128 * rc.WORD_ROWS, 8 * bits_v), jnp.int32), s((r, t), jnp.float16),
          s((r, 2, dm.HEADS, D), jnp.int8), s((r, 2), jnp.int32),
          s((r, dm.HEADS), jnp.float32), s((r, dm.HEADS), jnp.float32))
  kl = dm.byte_levels(np.linspace(-1.0, 1.0, 1 << bits_k))
  vl = dm.byte_levels(np.linspace(-2.0, 2.0, 1 << bits_v))

  def call(kw, kn, vw, vn, q, b, qoff, qs):
    offsets = None
    if rope:
      freq = 10000.0 ** (-jnp.arange(D // 2) * 2.0 / D)
      offsets = dm.rope_offsets(qoff[:, :, None] * jnp.ones(D // 2),
                                qoff[:, :, None] * jnp.ones(D // 2), freq, t)
    return dm.decode_partials(kw, kn, vw, vn, q, b, qoff, key_spec=ks, value_spec=vs,
                              key_levels=kl, value_levels=vl, num_splits=splits,
                              scale=0.1, soft_cap=soft_cap, rope=offsets, operand="int8",
                              q_scale=qs,
                              **options)
  return jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_split_steps_are_runs_of_whole_steps_differing_by_one_at_most():
  for steps in (1, 7, 32, 256):
    for splits in {1, 2, 3, 5, 6, 12, steps} - {n for n in (2, 3, 5, 6, 12) if n > steps}:
      b = dm.split_steps(steps, splits)
      runs = np.diff(b)
      assert b[0] == 0 and b[-1] == steps and len(runs) == splits
      assert runs.min() >= 1 and runs.max() - runs.min() <= 1
  assert dm.split_steps(256, 6).tolist() == [0, 42, 85, 128, 170, 213, 256]
  for bad in (0, 33):
    with pytest.raises(ValueError, match="num_splits"):
      dm.split_steps(32, bad)


def test_reference_splits_where_the_kernel_does(rng):
  """Split j's partial holds exactly the tokens of steps [b[j], b[j + 1]) (`split_steps`):
  a split's l is the sum of p over those tokens and no other."""
  r, t, bk, bv, splits, st = 1, 7 * 32, 2, 2, 3, 32
  kc, vc, kn, vn, q = random_inputs(rng, r, t, bk, bv)
  q = np.zeros_like(q)       # every score 0: p = 1 on each visible token
  _, l, m = dm.decode_partials_reference(
      jnp.asarray(kc), jnp.asarray(kn), jnp.asarray(vc), jnp.asarray(vn),
      jnp.asarray(q, jnp.float32), jnp.asarray([[0, t]]), jnp.zeros((r, dm.HEADS)),
      bits_k=bk, bits_v=bv, key_levels=(1.0, 0.0), value_levels=(1.0, 0.0),
      num_splits=splits, scale=1.0, step_tokens=st)
  np.testing.assert_allclose(np.asarray(l)[0, :, 0], np.diff(dm.split_steps(7, 3)) * st)
  with pytest.raises(ValueError, match="step_tokens"):
    dm.decode_partials_reference(
        jnp.asarray(kc), jnp.asarray(kn), jnp.asarray(vc), jnp.asarray(vn),
        jnp.asarray(q, jnp.float32), jnp.asarray([[0, t]]), jnp.zeros((r, dm.HEADS)),
        bits_k=bk, bits_v=bv, key_levels=(1.0, 0.0), value_levels=(1.0, 0.0),
        num_splits=splits, scale=1.0)


@pytest.mark.parametrize("splits", [3, 8])   # 3 does not divide the 8 steps
def test_int8_path_lowers_with_uneven_splits(splits):
  assert "mosaic_gpu" in lowered_s8(4, 3, rope=True, splits=splits)


@pytest.mark.parametrize("bits, rope", [((3, 3), True), ((2, 4), False)])
def test_int8_path_lowers_for_cuda_with_byte_permutes_and_int8_wgmma(bits, rope):
  from benchmarks.mosaic_lowering import module_asm
  asm = module_asm(lowered_s8(*bits, rope=rope, soft_cap=None if rope else 4.0))
  assert "prmt.b32" in asm
  assert "wgmma.mma_async.sync.aligned.m64n8k32.s32.s8.s8" in asm


def test_int8_p_scale_bound_drops_the_per_step_reduction():
  """p_scale="bound" scales p·‖v‖ by the row's largest ‖v‖: the loop loses the cross-warp
  max over the step's tokens (its two barriers and its max ops), and the value bound
  becomes an input."""
  from benchmarks.mosaic_lowering import module_asm
  step, bound = (module_asm(lowered_s8(4, 3, p_scale=p)) for p in ("step", "bound"))
  assert bound.count('"bar.sync') == step.count('"bar.sync') - 2
  assert 0 < bound.count('"max.') < step.count('"max.')
  given = lowered_s8(4, 3, p_scale="bound", value_bound=jnp.ones((4, 1), jnp.float32))
  assert module_asm(given) == bound


def test_int8_kernel_places_its_own_barriers(monkeypatch):
  """Without Pallas's automatic barriers (around every SMEM store, before every TMA copy)
  the kernel keeps the ones it needs: a commit per pass, `column_max`'s one exchange where
  Mosaic's reduction takes two, and one more per step where the value tiles are decoded
  after the commit (overlap_values=False). Their placement is checked on the GPU
  (`benchmarks.barrier_probe --check`)."""
  from benchmarks.mosaic_lowering import module_asm

  def barriers(**options):
    return module_asm(lowered_s8(4, 3, **options)).count('"bar.sync')
  own = barriers()
  assert own < barriers(auto_barriers=True) - 10
  assert barriers(overlap_values=False) == own + 1
  monkeypatch.setattr(dm, "column_max", lambda x, scratch: x.max(axis=0))
  jax.clear_caches()
  assert barriers() == own + 1
  jax.clear_caches()


def test_int8_kernel_masks_only_the_edge_steps():
  """By default the scores' mask (iota, compares, selects) sits under a branch taken only
  by steps holding tokens outside the row's range; the masks' correctness at ragged edges
  is checked on the GPU (`benchmarks.barrier_probe --check --check-mode edges`)."""
  from benchmarks.mosaic_lowering import module_asm
  edges, every = (module_asm(lowered_s8(4, 3, mask_edges_only=m)) for m in (True, False))
  assert module_asm(lowered_s8(4, 3)) == edges
  assert edges.count("scf.index_switch") == every.count("scf.index_switch") + 1


def lowered_s8_rotating(bits_k, bits_v, parts=2, r=4, t=1024, **options):
  """`lowered_s8` with the query rotated in the kernel (`q_rotation`)."""
  s = jax.ShapeDtypeStruct
  ks, vs = rc.TileSpec(bits_k, 128, D), rc.TileSpec(bits_v, 128, D)
  args = (s((r, t // 128 * rc.WORD_ROWS, 8 * bits_k), jnp.int32), s((r, t), jnp.float16),
          s((r, t // 128 * rc.WORD_ROWS, 8 * bits_v), jnp.int32), s((r, t), jnp.float16),
          s((r, parts, dm.HEADS, D), jnp.float16), s((r, 2), jnp.int32),
          s((r, dm.HEADS), jnp.float32), s((D, D), jnp.float16))
  kl = dm.byte_levels(np.linspace(-1.0, 1.0, 1 << bits_k))
  vl = dm.byte_levels(np.linspace(-2.0, 2.0, 1 << bits_v))

  def call(kw, kn, vw, vn, q, b, qoff, u):
    return dm.decode_partials(kw, kn, vw, vn, q, b, qoff, key_spec=ks, value_spec=vs,
                              key_levels=kl, value_levels=vl, num_splits=2, scale=0.1,
                              operand="int8", q_rotation=u, **options)
  return jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("parts, packed", [(2, False), (1, True)])
def test_int8_kernel_rotates_the_query_itself_in_the_pipelines_memory(parts, packed):
  """With q_rotation each CTA rotates its query by float16 wgmmas (one per part) and
  makes the int8 parts itself, in shared memory the pipeline takes afterwards: U's 32 KB
  (and the float16 parts') cost a CTA only what they exceed the pipeline's buffers by.
  Its numbers are checked on the GPU (`benchmarks.kernel_sweep --check`)."""
  from benchmarks.mosaic_lowering import module_asm, smem_bytes
  opts = dict(pack_p_parts=True, pack_q_parts=True) if packed else {}
  asm = module_asm(lowered_s8_rotating(4, 3, parts=parts, **opts))
  given = module_asm(lowered_s8(4, 3, **opts))
  f16 = "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16"
  assert f16 not in given and asm.count(f16) >= parts
  assert "wgmma.mma_async.sync.aligned.m64n8k32.s32.s8.s8" in asm
  assert smem_bytes(given) < smem_bytes(asm) < smem_bytes(given) + D * D * 2 // 4


def test_rotation_probe_copies_an_eighth_of_u_then_restores_the_kernel():
  """`benchmarks.rotation_probe` times the kernel copying part of U: its patch turns the
  copy's 32 KB into 4 KB in the lowered kernel, and undoing it gives back the library's
  kernel, so the probe's other modes time what ships."""
  from benchmarks import rotation_probe
  from benchmarks.mosaic_lowering import module_asm
  full = module_asm(lowered_s8_rotating(4, 3))
  try:
    rotation_probe.patch(8)
    jax.clear_caches()
    part = module_asm(lowered_s8_rotating(4, 3))
  finally:
    rotation_probe.patch(None)
    jax.clear_caches()
  assert full.count("32768 : i32") == 1 and part.count("32768 : i32") == 0
  assert part.count("4096 : i32") == full.count("4096 : i32") + 1
  assert module_asm(lowered_s8_rotating(4, 3)) == full


def test_int8_kernel_rotation_rejects_bad_input():
  with pytest.raises(ValueError, match="float16"):
    lowered_s8_rotating(4, 3, parts=3)
  kw = dict(key_spec=rc.TileSpec(4, 128, D), value_spec=rc.TileSpec(3, 128, D),
            key_levels=dm.byte_levels(np.linspace(-1, 1, 16)),
            value_levels=dm.byte_levels(np.linspace(-1, 1, 8)), num_splits=1, scale=0.1)
  z = jnp.zeros
  args = (z((1, 16, 32), jnp.int32), z((1, 128), jnp.float16), z((1, 16, 24), jnp.int32),
          z((1, 128), jnp.float16), z((1, 1, dm.HEADS, D), jnp.float16),
          z((1, 2), jnp.int32), z((1, dm.HEADS), jnp.float32))
  with pytest.raises(ValueError, match="q_rotation is for operand='int8' only"):
    dm.decode_partials(*args, **kw, q_rotation=z((D, D), jnp.float16))
  with pytest.raises(ValueError, match="pass None"):
    dm.decode_partials(*args, **kw, operand="int8", q_rotation=z((D, D), jnp.float16),
                       q_scale=z((1, dm.HEADS), jnp.float32))


def test_quantize_query_s8_keeps_about_14_bits(rng):
  q = jnp.asarray(rng.standard_normal((3, dm.HEADS, D)), jnp.float32)
  q = q.at[1, 2].set(0.0)                                     # a zero row stays zero
  q8, scale = dm.quantize_query_s8(q)
  assert q8.shape == (3, 2, dm.HEADS, D) and q8.dtype == jnp.int8
  back = scale[..., None] * (q8[:, 0].astype(jnp.float32) + q8[:, 1] / 127.0)
  err = jnp.max(jnp.abs(back - q), axis=-1) / jnp.max(jnp.abs(q), axis=-1).clip(1e-30)
  assert float(jnp.max(err)) <= 0.5 / 127 / 127 + 1e-7
  assert float(jnp.max(jnp.abs(back[1, 2]))) == 0.0


def test_int8_reference_is_the_float_reference_of_the_dequantized_operands(rng):
  r, t, bk, bv = 2, 256, 3, 2
  kc, vc, kn, vn, q = random_inputs(rng, r, t, bk, bv)
  q8, qs = dm.quantize_query_s8(jnp.asarray(q * 20, jnp.float32))
  kl = dm.ByteLevels((-127, -79, -45, -14, 14, 45, 79, 127), 0.01)
  vl = dm.ByteLevels((-127, -38, 38, 127), 0.02)
  bounds = jnp.array([[3, 250], [0, 256]], jnp.int32)
  args = (jnp.asarray(kc), jnp.asarray(kn), jnp.asarray(vc), jnp.asarray(vn))
  got = dm.decode_partials_reference(*args, q8, bounds, jnp.zeros((r, dm.HEADS)), bits_k=bk,
                                     bits_v=bv, key_levels=kl, value_levels=vl, num_splits=2,
                                     scale=0.3, q_scale=qs)
  # The same through the polynomial reference: levels as odd polynomials would not fit
  # these tables, so compare with plain float32 attention per split.
  qf = qs[..., None] * (q8[:, 0].astype(jnp.float32) + q8[:, 1] / 127.0)
  keys = jnp.asarray(kl.table, jnp.float32)[kc] * kl.scale * jnp.asarray(kn, jnp.float32)[..., None]
  vals = jnp.asarray(vl.table, jnp.float32)[vc] * vl.scale * jnp.asarray(vn, jnp.float32)[..., None]
  s = jnp.einsum("rtd,rhd->rth", keys, qf, precision="highest") * 0.3
  pos = jnp.arange(t)[None, :, None]
  valid = (pos >= bounds[:, :1, None]) & (pos < bounds[:, 1:, None])
  s = jnp.where(valid, s, -1e30).reshape(r, 2, t // 2, dm.HEADS)
  m = s.max(axis=2)
  p = jnp.where(valid.reshape(r, 2, t // 2, 1), jnp.exp(s - m[:, :, None]), 0.0)
  o = jnp.einsum("rstd,rsth->rsdh", vals.reshape(r, 2, t // 2, D), p, precision="highest")
  np.testing.assert_allclose(got[2], m, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[1], p.sum(axis=2), rtol=1e-5)
  np.testing.assert_allclose(got[0], o, rtol=1e-4, atol=1e-5)


def test_int8_path_bad_inputs_raise():
  ks = rc.TileSpec(3, 128, D)
  z = lambda *shape, dt=jnp.float16: jnp.zeros(shape, dt)  # noqa: E731
  kl = dm.ByteLevels((-127, -79, -45, -14, 14, 45, 79, 127), 0.01)
  args = (z(2, 64, 24, dt=jnp.int32), z(2, 128), z(2, 64, 24, dt=jnp.int32), z(2, 128),
          z(2, 2, dm.HEADS, D, dt=jnp.int8), z(2, 2, dt=jnp.int32), z(2, dm.HEADS, dt=jnp.float32))
  kw = dict(key_spec=ks, value_spec=ks, key_levels=kl, value_levels=kl, num_splits=1,
            scale=0.1, operand="int8")
  with pytest.raises(ValueError, match="needs q_scale"):
    dm.decode_partials(*args, **kw)
  with pytest.raises(ValueError, match="one ByteLevels per key group"):
    dm.decode_partials(*args, **dict(kw, key_levels=(0.3, 0.01)), q_scale=z(2, 8, dt=jnp.float32))
  with pytest.raises(ValueError, match="ByteLevels of 8 levels"):
    dm.decode_partials(*args, **dict(kw, key_levels=dm.ByteLevels((1, 2), 0.1)),
                       q_scale=z(2, 8, dt=jnp.float32))
  with pytest.raises(ValueError, match="byte tiles of"):
    dm.decode_partials(*args, **dict(kw, key_spec=rc.TileSpec(4, 64, D)),
                       q_scale=z(2, 8, dt=jnp.float32))
  with pytest.raises(ValueError, match="one tile at a time"):
    dm.decode_partials(*args, **kw, q_scale=z(2, 8, dt=jnp.float32), tokens_per_step=256)
  with pytest.raises(ValueError, match="operand must be"):
    dm.decode_partials(*args, **dict(kw, operand="fp8"), q_scale=z(2, 8, dt=jnp.float32))
  with pytest.raises(ValueError, match="q must be int8"):
    dm.decode_partials(*args[:4], z(2, dm.HEADS, D), *args[5:], **kw,
                       q_scale=z(2, 8, dt=jnp.float32))
  with pytest.raises(ValueError, match="p_scale must be"):
    dm.decode_partials(*args, **kw, q_scale=z(2, 8, dt=jnp.float32), p_scale="head")
  with pytest.raises(ValueError, match="value_bound must be float32"):
    dm.decode_partials(*args, **kw, q_scale=z(2, 8, dt=jnp.float32), value_bound=z(2, 1))
  with pytest.raises(ValueError, match="value_bound must be float32"):
    dm.decode_partials(*args, **kw, q_scale=z(2, 8, dt=jnp.float32),
                       value_bound=z(2, dt=jnp.float32))
  with pytest.raises(ValueError, match="value_bound is read with"):
    dm.decode_partials(*args, **kw, q_scale=z(2, 8, dt=jnp.float32), p_scale="step",
                       value_bound=z(2, 1, dt=jnp.float32))
  with pytest.raises(ValueError, match="not all zero"):
    dm.byte_levels(np.zeros(8))
  # Offsets: 4-bit tables are sign-magnitude with offset 1/2, narrower ones offset 0.
  with pytest.raises(ValueError, match="with offset 0.0"):
    dm.decode_partials(*args, **dict(kw, key_levels=kl._replace(offset=0.5)),
                       q_scale=z(2, 8, dt=jnp.float32))
  k4 = rc.TileSpec(4, 128, D)
  t4 = dm.byte_levels(np.linspace(-1, 1, 16))
  args4 = (z(2, 64, 32, dt=jnp.int32),) + args[1:]
  with pytest.raises(ValueError, match="with offset 0.5"):
    dm.decode_partials(*args4, **dict(kw, key_spec=k4, key_levels=t4._replace(offset=0.0)),
                       q_scale=z(2, 8, dt=jnp.float32))
  with pytest.raises(ValueError, match="sign-magnitude"):
    dm.decode_partials(*args4, **dict(kw, key_spec=k4, key_levels=t4._replace(
        table=tuple(range(-8, 8)[::-1]))), q_scale=z(2, 8, dt=jnp.float32))


@pytest.mark.parametrize("bits, shape", [(3, (256, 64)), (4, (64, 256))])
def test_byte_decoder_lowers_for_channel_group_tiles(bits, shape):
  """The 64-channel groups' byte tiles (keys [256, 64], values [64, 256]) decode and meet
  an int8 wgmma (swizzle 64 for 64-byte rows): what the int8 path needs for fractional
  widths, lowered for CUDA (the kernel's int8 path itself takes one group per side)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  from benchmarks.mosaic_lowering import module_asm
  rows, cols = shape
  dec = dm.byte_decoder(bits, list(range(-(1 << bits) // 2, (1 << bits) // 2)), shape=shape)

  def kernel(w_gmem, q_gmem, o_gmem, w_smem, q_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(w_gmem, w_smem, bar)
    plgpu.copy_gmem_to_smem(q_gmem, q_smem, bar)
    plgpu.barrier_wait(bar)
    a = dec(plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA, optimized=8 * bits <= 24))

    def scores(acc):
      plgpu.wgmma(acc, a, plgpu.transpose_ref(q_smem, (1, 0)))
      return acc[...]
    o_smem[...] = pl.run_scoped(scores, plgpu.ACC((rows, 8), jnp.int32)).astype(jnp.float32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)

  b_tiles = (plgpu.TilingTransform((8, min(cols, 128))), plgpu.SwizzleTransform(min(cols, 128)))
  call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((rows, 8), jnp.float32),
                      grid=(1,), grid_names=("x",),
                      scratch_types=[plgpu.SMEM((64, 8 * bits), jnp.int32),
                                     plgpu.SMEM((8, cols), jnp.int8, transforms=b_tiles),
                                     plgpu.SMEM((rows, 8), jnp.float32),
                                     plgpu.Barrier(num_arrivals=2)])
  text = jax.jit(call).trace(jax.ShapeDtypeStruct((64, 8 * bits), jnp.int32),
                             jax.ShapeDtypeStruct((8, cols), jnp.int8)).lower(
                                 lowering_platforms=("cuda",)).as_text()
  asm = module_asm(text)
  # One PRMT per output register; at 4 bits two (the magnitude and the sign bytes).
  assert asm.count("prmt.b32") == (64 if bits == 4 else 32)
  assert "m64n8k32.s32.s8.s8" in asm


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_byte_levels_hold_the_int8_codebook_exactly(d, bits):
  """The int8 codebook's levels are the kernel's table: (table + offset)·scale, 4 bits in
  sign-magnitude (offset 1/2) on the step `codebook.int8_codebook` chose."""
  from pallas_kernels import byte_codes as bc
  from turboquant_jax import codebook
  book = codebook.int8_codebook(d, bits)
  lv = dm.byte_levels(book.centroids)
  assert lv.offset == (0.5 if bits == 4 else 0.0)
  bc.level_pools(lv.table, bits)                  # a valid PRMT table (raises if not)
  np.testing.assert_allclose((np.asarray(lv.table) + lv.offset) * lv.scale, book.centroids,
                             rtol=1e-9, atol=1e-12)
  # Symmetric levels off the grid get the nearest table (within half a step).
  u = np.abs(np.arange(1 << bits) - ((1 << bits) - 1) / 2)
  off_grid = book.centroids * (1 + 0.002 * np.cos(3 * u))
  near = dm.byte_levels(off_grid)
  got = (np.asarray(near.table) + near.offset) * near.scale
  assert not np.allclose(got, off_grid, rtol=0, atol=1e-9)
  assert np.max(np.abs(got - off_grid)) <= near.scale / 2 + 1e-12
