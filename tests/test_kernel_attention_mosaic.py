"""The cache side of the Mosaic GPU kernel on the CPU: the tiles layout's glue
(`kernel_attention.compressed_partials_mosaic`: queries, bounds, splits, the merge)
with the kernel replaced by its jnp twin, against the cache's reference attention; the
whole attention lowered for CUDA on the CPU host; and the dispatch's errors. The kernel
itself runs against its reference on the GPU (`benchmarks.mosaic_attend`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc
from turboquant_jax import kernel_attention as ka
from turboquant_jax import rope as rope_lib
from turboquant_jax.rope import RopeSpec
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache

B, L, H, D = 2, 512, 2, 128


def tiles_cache(rng, bits_k=3, bits_v=4, lengths=(500, 300), dtype=jnp.float32, **kw):
  kw.setdefault("center_keys", "plain")
  rope = RopeSpec(10000.0, interleaved=True) if kw["center_keys"] == "rope" else None
  kw.setdefault("levels", "cubic")
  cfg = TurboQuantConfig(key_bits=bits_k, value_bits=bits_v, layout="tiles",
                         window=kw.pop("window", 32), **kw)
  cache = TurboQuantKVCache.create(B, L, H, D, dtype, config=cfg, rope=rope)
  k = jnp.asarray(rng.standard_normal((B, L, H, D)) + 1.0, jnp.float32)
  if rope is not None:   # a mean before RoPE, so that centering has something to take
    k = rope_lib.rotate(k + 2.0, jnp.arange(L)[None, :, None], rope)
  v = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
  return cache.update(k, v, num_tokens=jnp.asarray(lengths))


def _unpack(words, spec, transposed, operand="fp16", levels=None):
  from pallas_kernels import byte_codes
  r = words.shape[0]
  words = words.reshape(r, -1, rc.WORD_ROWS, words.shape[-1])
  plain = levels is not None and dm.is_plain(levels)   # as the kernel's decoder reads them
  tiles = (byte_codes.unpack_tile(words, spec.bits, (spec.rows, spec.cols), plain=plain)
           if operand == "int8" else rc.unpack_tile(words, spec))
  if transposed:
    tiles = jnp.swapaxes(tiles, -1, -2)
  return tiles.reshape(r, -1, tiles.shape[-1])


def kernel_twin(k_words, k_norms, v_words, v_norms, q, bounds, qoff, *, key_spec,
                value_spec, operand="fp16", **kw):
  """decode_partials computed by decode_partials_reference on the unpacked tiles (the
  int8 path's byte tiles, int8 query parts and q_scale as they come)."""
  for unused in ("max_concurrent_steps", "overlap_values", "tokens_per_step", "serial_groups",
                 "sub_steps", "pack_q_parts"):   # pack_q_parts: the kernel's own operand
    kw.pop(unused, None)
  ks, vs = dm._groups(key_spec), dm._groups(value_spec)   # channel groups
  kw.pop("p_scale", None)
  u = kw.pop("q_rotation", None)
  if u is not None:   # the kernel rotates the float16 parts by U (float16) and splits them
    assert operand == "int8" and q.dtype == jnp.float16 and u.dtype == jnp.float16
    assert "q_scale" not in kw and "key_offsets" not in kw
    x = jnp.einsum("rpmd,ed->rme", q.astype(jnp.float32), u.astype(jnp.float32),
                   precision="highest")
    q, kw["q_scale"] = dm.quantize_query_s8(x)
  if operand == "int8" and q.shape[1] == 1:   # packed by the prologue: [hi 0-3 | lo 0-3]
    hi, lo = q[:, 0, :dm.HEADS // 2], q[:, 0, dm.HEADS // 2:]
    q = jnp.stack([jnp.concatenate([hi, hi], 1), jnp.concatenate([lo, lo], 1)], axis=1)
  koff = kw.pop("key_offsets", None)
  if koff is not None:   # `decode_prologue`'s: what the kernel would take from q itself
    units = q[:, 0].astype(jnp.float32) + q[:, 1].astype(jnp.float32) / 127.0
    starts = np.cumsum([0] + [s.cols for s in ks[:-1]])
    want = jnp.stack([lv.offset * units[..., at:at + s.cols].sum(-1)
                      for lv, at, s in zip(dm._groups(kw["key_levels"]), starts, ks)], axis=1)
    np.testing.assert_allclose(np.asarray(koff), np.asarray(want), rtol=1e-5, atol=1e-4)
  bound = kw.pop("value_bound", None)
  if bound is not None:
    want = jnp.stack([n.astype(jnp.float32).max(-1) for n in dm._groups(v_norms)], axis=1)
    np.testing.assert_array_equal(np.asarray(bound), np.asarray(want))
  if operand != "int8":
    q = tuple(x.astype(jnp.float32) for x in dm._groups(q))
  side_levels = {k: (dm._s8_levels(kw[k]) if operand == "int8" else [None] * 8)
                 for k in ("key_levels", "value_levels")}
  o, l, m = dm.decode_partials_reference(
      tuple(_unpack(w, s, False, operand, lv) for w, s, lv in zip(
          dm._groups(k_words), ks, side_levels["key_levels"])), k_norms,
      tuple(_unpack(w, s, True, operand, lv) for w, s, lv in zip(
          dm._groups(v_words), vs, side_levels["value_levels"])), v_norms,
      q, bounds, qoff, bits_k=tuple(s.bits for s in ks), bits_v=tuple(s.bits for s in vs),
      **kw)
  return o, l, m


GLUE_CASES = [
    (3, 4, 8, "plain", dict(soft_cap=None, sliding_window=None)),
    (2, 2, 16, "plain", dict(soft_cap=7.0, sliding_window=None)),
    (4, 3, 2, False, dict(soft_cap=None, sliding_window=200)),
    (3, 3, 4, "rope", dict(soft_cap=None, sliding_window=None, levels="quintic")),
    (4, 2, 8, "rope", dict(soft_cap=5.0, sliding_window=300)),
    # Fractional widths: two channel groups per side, 256-token tiles.
    (3.5, 2.5, 8, "plain", dict(soft_cap=None, sliding_window=None)),
    (2.5, 3, 4, False, dict(soft_cap=6.0, sliding_window=None)),
    # 256-token RoPE steps, their offsets by default from a 64-row table (angles composed
    # per block: test_mosaic_rope_table_rows).
    (3.5, 3, 8, "rope", dict(soft_cap=None, sliding_window=None, levels="quintic")),
]


# Cases 0, 4 and 7 run with the jnp merge in test_mosaic_exact_split_glue (its second
# call: the exact tokens' jnp partial, as a float32 cache's), on bf16 caches; the others
# here. merge_exact (interpret mode, slow on the CPU) on one case per feature: soft-cap and
# a window with RoPE offsets, value groups, value centering.
_IN_EXACT_SPLIT_GLUE = (0, 4, 7)


@pytest.mark.parametrize("bits_k, bits_v, hq, centering, kw, fused_merge", [
    *[(*case, False) for i, case in enumerate(GLUE_CASES) if i not in _IN_EXACT_SPLIT_GLUE],
    *[(*GLUE_CASES[i], True) for i in (4, 5, 1)]])
def test_mosaic_glue_matches_reference(rng, monkeypatch, bits_k, bits_v, hq, centering, kw,
                                       fused_merge):
  kw = dict(kw)
  cache = tiles_cache(rng, bits_k, bits_v, center_keys=centering, center_values=hq == 16,
                      levels=kw.pop("levels", "cubic"))
  assert (cache.rope is not None) == (centering == "rope")
  # merge_exact takes every case here, split values too (block-diagonal rotation, perm).
  assert ka.merge_unsupported(cache, hq // H) is None
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.float32)
  monkeypatch.setattr(ka.mosaic, "decode_partials", kernel_twin)
  kernel = kw.pop("kernel", {})
  got = ka.attend(cache, q, mosaic=True, num_splits=2, fused_merge=fused_merge, **kw, **kernel)
  ref = cache.attend(q, implementation="reference", **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)


# The exact window and sinks as the kernel's last splits (bf16 caches; the ring and the
# sinks as the cache holds them, a last block part-filled): the twin's exact splits are
# `decode_attention_mgpu._exact_reference`.
@pytest.mark.parametrize("bits_k, bits_v, hq, centering, kw", [
    (3, 4, 8, "plain", dict(soft_cap=None, sliding_window=None, window=64)),
    (4, 2, 8, "rope", dict(soft_cap=5.0, sliding_window=300, window=128)),
    (3.5, 2.5, 4, "plain", dict(soft_cap=None, sliding_window=None, window=256)),
    (3.5, 3, 8, "rope", dict(soft_cap=None, sliding_window=None, window=256,
                             levels="quintic")),
    (3, 3, 8, "plain", dict(soft_cap=None, sliding_window=None, window=64, num_sinks=0)),
    (3, 3, 2, "plain", dict(soft_cap=None, sliding_window=40, window=0, num_sinks=6)),
    (3.5, 3.5, 8, "rope", dict(soft_cap=None, sliding_window=None, window=104,
                               levels="quintic")),
])
def test_mosaic_exact_split_glue(rng, monkeypatch, bits_k, bits_v, hq, centering, kw):
  kw = dict(kw)
  cfg_kw = {k: kw.pop(k) for k in ("window", "num_sinks", "levels") if k in kw}
  cache = tiles_cache(rng, bits_k, bits_v, dtype=jnp.bfloat16, center_keys=centering,
                      **cfg_kw)
  assert ka.exact_unsupported(cache) is None
  seen = []

  def twin(*args, exact=None, **k):
    seen.append((exact, k.get("exact_blocks")))
    return kernel_twin(*args, exact=exact, **k)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  # bf16 queries (as a bf16 model's): the kernel's exact split reads them as bf16.
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.bfloat16).astype(jnp.float32)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, **kw)
  ref = cache.attend(q, implementation="reference", **kw)
  exact, blocks = seen[0]
  w, s = cache.window_keys.shape[2], cache.sink_keys.shape[2]
  assert [k.shape[1] for k in exact.keys] == [n for n in (w, s) if n]   # no copies
  # 128-token splits for a window of 256-token tiles (3.5 bits), else 64.
  wide = cache.key_codes[0].layout.tokens > 128 and w >= 128
  assert blocks == ((128 if wide else 64,) if w else ()) + ((64,) if s else ())
  assert exact.q.dtype == jnp.bfloat16 and len(exact.keys) == len(cache.exact_parts())
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  off = ka.attend(cache, q, mosaic=True, num_splits=2, exact_in_kernel=False, **kw)
  assert seen[-1][0] is None       # the jnp exact partial instead
  np.testing.assert_allclose(np.asarray(off), np.asarray(ref), rtol=2e-3, atol=2e-3)


# Values the decoder rotated (`values_prerotated`): no inverse rotation after the kernel,
# in the jnp merge or merge_exact, with the exact tokens in jnp (float32 cache) or as the
# kernel's last splits (bfloat16); the output stays in the values' rotated domain, as the
# cache's reference returns it.
@pytest.mark.parametrize("dtype, fused_merge", [
    (jnp.float32, False), (jnp.float32, True), (jnp.bfloat16, False), (jnp.bfloat16, True)])
def test_mosaic_glue_prerotated_values(rng, monkeypatch, dtype, fused_merge):
  cache = tiles_cache(rng, 4, 3, dtype=dtype, levels="quintic", values_prerotated=True,
                      window=64)
  assert (ka.exact_unsupported(cache) is None) == (dtype == jnp.bfloat16)
  monkeypatch.setattr(ka.mosaic, "decode_partials", kernel_twin)
  merge, unrotations = ka.merge_exact.merge_exact, []

  def merge_spy(q, o, l, m, qpos, unrotation, *args, **kw):
    unrotations.append(unrotation)
    return merge(q, o, l, m, qpos, unrotation, *args, **kw)

  monkeypatch.setattr(ka.merge_exact, "merge_exact", merge_spy)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), dtype).astype(jnp.float32)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, fused_merge=fused_merge)
  ref = cache.attend(q, implementation="reference")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  assert unrotations == ([None] if fused_merge else [])   # no [D, D] operand


@pytest.mark.parametrize("hq, levels, center_values", [(8, ("uniform", "int8"), False),
                                                      (16, "int8", True)])
def test_split_merge_kernel_glue(rng, monkeypatch, hq, levels, center_values):
  """split_merge="kernel": the int8 kernel's partials (its exact splits included) merged by
  `merge_exact.merge_splits` in interpret mode, through the twin, against the reference;
  an overflowed entry reads NaN; unsupported calls are refused."""
  cache = tiles_cache(rng, 4, 3, dtype=jnp.bfloat16, levels=levels, tile_operand="int8",
                      values_prerotated=True, center_values=center_values, window=64)
  monkeypatch.setattr(ka.mosaic, "decode_partials", kernel_twin)
  merges = []
  merge = ka.merge_exact.merge_splits
  monkeypatch.setattr(ka.merge_exact, "merge_splits",
                      lambda *a, **k: merges.append(k) or merge(*a, **k))
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.float32).astype(jnp.bfloat16)
  kw = dict(sliding_window=300)
  ref = cache.attend(q, implementation="reference", **kw)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, split_merge="kernel", **kw)
  assert got.dtype == jnp.bfloat16 and got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-2, atol=1e-2)
  (k,) = merges
  assert k["exact_splits"] > 0 and (k["value_mean"] is not None) == center_values
  xla = ka.attend(cache, q, mosaic=True, num_splits=2, split_merge="xla", **kw)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(xla, np.float32),
                             rtol=1e-2, atol=1e-2)
  bad = cache.replace(overflowed=jnp.array([False, True]))
  out = np.asarray(ka.attend(bad, q, mosaic=True, num_splits=2, split_merge="kernel"),
                   np.float32)
  assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()
  with pytest.raises(ValueError, match="power of two"):
    ka.attend(cache, q[:, :, :6], mosaic=True, num_splits=2, split_merge="kernel")
  with pytest.raises(ValueError, match="split_merge must be"):
    ka.attend(cache, q, mosaic=True, num_splits=2, split_merge="triton")
  plain = tiles_cache(rng, 4, 3, dtype=jnp.bfloat16, levels="int8", tile_operand="int8",
                      window=64)
  with pytest.raises(ValueError, match="values_prerotated"):
    ka.attend(plain, q, mosaic=True, num_splits=2, split_merge="kernel")


def test_merge_fits_head_dim_256_only_without_rotation():
  """merge_exact holds a float32 [D, D] unrotation in shared memory: at head_dim 256 only
  prerotated values (and the exact tokens attended by the kernel) leave it out."""
  for pre in (False, True):
    cfg = TurboQuantConfig(key_bits=4, value_bits=3, layout="tiles", levels="quintic",
                           center_keys="plain", values_prerotated=pre)
    cache = TurboQuantKVCache.create(1, 256, 1, 256, jnp.bfloat16, config=cfg)
    assert (ka.merge_unsupported(cache, 4, exact=False) is None) == pre
    assert "shared memory" in ka.merge_unsupported(cache, 4, exact=True)


def test_exact_split_reasons_and_errors(rng):
  f32 = tiles_cache(rng, window=64)
  assert "bfloat16" in ka.exact_unsupported(f32)
  assert ka.exact_unsupported(tiles_cache(rng, dtype=jnp.bfloat16, window=40)) is None
  assert "multiple of 8" in ka.exact_unsupported(
      tiles_cache(rng, dtype=jnp.bfloat16, window=36))
  assert "sinks" in ka.exact_unsupported(
      tiles_cache(rng, dtype=jnp.bfloat16, window=40, num_sinks=12))
  with pytest.raises(ValueError, match="exact tokens"):
    ka.attend(f32, jnp.ones((B, 1, 8, D)), mosaic=True, exact_in_kernel=True)
  r, n = 4, 40
  z = lambda *shape, dt=jnp.bfloat16: jnp.zeros(shape, dt)  # noqa: E731
  good = dm.ExactTokens(z(r, 8, D), z(2, 3, dt=jnp.int32), (z(r, n, D),), (z(r, n, D),),
                        (z(2, n, dt=jnp.int32),))
  dm._check_exact(good, r, D)
  dm._check_exact(good._replace(positions=(None,)), r, D)      # slot = position
  # Limits per row and wider than 1 + 2·parts (`decode_prologue`'s); positions per entry.
  dm._check_exact(good._replace(limits=z(r, 4, dt=jnp.int32)), r, D)
  assert dm.exact_splits(good, 64) == 1 and dm.exact_splits(good, (128,)) == 1
  for bad, match in [
      (good._replace(keys=(z(r, 0, D),)), "multiple of 8"),
      (good._replace(keys=(z(r, 12, D),)), "multiple of 8"),
      (good._replace(q=z(r, 8, D, dt=jnp.float32)), "bfloat16 or float16"),
      (good._replace(values=(z(r, n, D, dt=jnp.float16),)), r"exact.values\[0\]"),
      (good._replace(positions=()), "each part"),
      (good._replace(positions=(z(3, n, dt=jnp.int32),)), r"exact.positions\[0\]"),
      (good._replace(positions=(z(2, n + 8, dt=jnp.int32),)), r"exact.positions\[0\]"),
      (good._replace(limits=z(3, 3, dt=jnp.int32)), "dividing"),
      (good._replace(limits=z(2, 2, dt=jnp.int32)), "exact.limits"),
      (good._replace(limits=z(2, 3, dt=jnp.float32)), "exact.limits")]:
    with pytest.raises(ValueError, match=match):
      dm._check_exact(bad, r, D)
  with pytest.raises(ValueError, match="exact_blocks"):
    dm.exact_splits(good, 96)


@pytest.mark.parametrize("bits, kernel, rows", [
    ((3, 3), {}, 128),                          # 128-token tiles: the split's own table
    ((3.5, 3), {}, 64)])                        # 256: 64 rows, two CTAs per SM
def test_mosaic_rope_table_rows(rng, monkeypatch, bits, kernel, rows):
  cache = tiles_cache(rng, *bits, center_keys="rope", levels="quintic")
  seen = []

  def twin(*args, rope, **kw):
    seen.append(rope.table.shape[0])
    return kernel_twin(*args, rope=rope, **kw)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), jnp.float32)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, **kernel)
  ref = cache.attend(q, implementation="reference")
  assert seen == [rows]
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits, levels, exact", [((3, 4), "cubic", False),
                                                 ((3.5, 2.5), "quintic", True)])
def test_mosaic_attend_lowers_for_cuda(rng, bits, levels, exact):
  cache = tiles_cache(rng, *bits, levels=levels,
                      **(dict(dtype=jnp.bfloat16, window=256) if exact else {}))
  assert (ka.exact_unsupported(cache) is None) == exact
  q = jax.ShapeDtypeStruct((B, 1, 8, D), jnp.bfloat16)
  text = ka.attend_jit.trace(cache, q, mosaic=True, soft_cap=10.0).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_mosaic_reasons_and_errors(rng):
  cache = tiles_cache(rng)
  assert ka.mosaic_unsupported(cache, 4) is None
  assert "query token" in ka.mosaic_unsupported(cache, 8, query_tokens=2)
  assert "at most 8" in ka.mosaic_unsupported(cache, 16)
  planes = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(key_bits=3))
  assert "tiles" in ka.mosaic_unsupported(planes, 4)
  rope_cfg = TurboQuantConfig(key_bits=3, value_bits=3, levels="cubic", layout="tiles")
  roped = TurboQuantKVCache.create(B, L, H, D, config=rope_cfg, rope=RopeSpec(10000.0))
  assert ka.mosaic_unsupported(roped, 4) is None
  roped64 = TurboQuantKVCache.create(B, L, H, 64, config=rope_cfg, rope=RopeSpec(10000.0))
  assert ka.mosaic_unsupported(roped64, 4) is None     # 256-token tiles: one angle per step
  assert roped64.rope_split == roped64.code_block == 256 and roped.rope_split == 128
  lm = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=3, value_bits=2, layout="tiles", center_keys=False))
  assert "Lloyd-Max" in ka.mosaic_unsupported(lm, 4)
  lm2 = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=2, value_bits=2, layout="tiles", center_keys=False))
  assert ka.mosaic_unsupported(lm2, 4) is None      # 2-bit Lloyd-Max levels are a cubic
  f32 = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=2, value_bits=2, layout="tiles", center_keys=False, norm_dtype=jnp.float32))
  assert "float16 norms" in ka.mosaic_unsupported(f32, 4)
  frac = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=3.5, value_bits=3, levels="cubic", layout="tiles", center_keys=False))
  assert ka.mosaic_unsupported(frac, 4) is None    # two key groups, 256-token tiles
  frac_rope = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=3.5, value_bits=3, levels="cubic", layout="tiles"), rope=RopeSpec(10000.0))
  assert ka.mosaic_unsupported(frac_rope, 4) is None
  frac_lm = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=3, value_bits=2.5, layout="tiles", center_keys=False, levels="lloyd_max"))
  assert "Lloyd-Max" in ka.mosaic_unsupported(frac_lm, 4)  # values' 3 bits
  quintic = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=3.5, value_bits=3.5, layout="tiles", levels="quintic"), rope=RopeSpec(1e4))
  assert ka.mosaic_unsupported(quintic, 4) is None    # the defaults but the levels
  with pytest.MonkeyPatch.context() as mp:            # levels fp16 cannot hold
    mp.setattr(ka, "odd_levels", lambda q: (1.0, 1e-6))
    assert "overflow fp16" in ka.mosaic_unsupported(quintic, 4)
  with pytest.raises(ValueError, match="mosaic"):
    cache.attend(jnp.ones((B, 1, 8, D)), implementation="mosaic")   # no Hopper here
  with pytest.raises(ValueError, match="Triton kernel needs the planes layout"):
    cache.attend(jnp.ones((B, 1, 8, D)), implementation="triton")
  with pytest.raises(ValueError, match="implementation must be"):
    cache.attend(jnp.ones((B, 1, 8, D)), implementation="cuda")


# -- the int8 path: byte tiles, int8 levels, queries in two int8 parts ----------------------

@pytest.mark.parametrize("bits_k, bits_v, hq, centering, kw", [
    (3, 3, 8, "rope", dict(soft_cap=None, sliding_window=None)),
    (2, 4, 4, "plain", dict(soft_cap=6.0, sliding_window=200)),
    (4, 2, 8, "rope", dict(soft_cap=None, sliding_window=None, window=128,
                           dtype=jnp.bfloat16)),
    # Fractional widths: two 64-channel groups per side, [256, 64] / [64, 256] byte tiles.
    (3.5, 3.5, 8, "rope", dict(soft_cap=None, sliding_window=None, window=256,
                               dtype=jnp.bfloat16)),
    (2.5, 3.5, 4, "plain", dict(soft_cap=5.0, sliding_window=None)),
    # 4-bit keys of evenly spaced levels as plain nibbles (offset -15/2·Σq), int8 values.
    (4, 3, 4, "plain", dict(soft_cap=None, sliding_window=None, window=128,
                            dtype=jnp.bfloat16, levels=("uniform", "int8"))),
])
def test_int8_tiles_glue_matches_reference(rng, monkeypatch, bits_k, bits_v, hq, centering,
                                           kw):
  kw = dict(kw)
  cfg = {k: kw.pop(k) for k in ("window", "dtype", "levels") if k in kw}
  cache = tiles_cache(rng, bits_k, bits_v, center_keys=centering, tile_operand="int8",
                      **{"levels": "int8", **cfg})
  assert cache.key_codes[0].layout.operand == "int8"
  assert ka.mosaic_unsupported(cache, hq // H) is None
  seen = []

  def twin(*args, **k):
    seen.append(k)
    assert k["operand"] == "int8"
    return kernel_twin(*args, **k)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.float32)
  if "dtype" in cfg:   # a bf16 model's queries: the exact split reads them as bf16
    q = q.astype(jnp.bfloat16).astype(jnp.float32)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, **kw)
  ref = cache.attend(q, implementation="reference", **kw)
  # One key group with a prologue: the kernel rotates the query itself (U, float16).
  own = len(cache.key_codes) == 1 and ka.prologue_unsupported(cache) is None
  assert ("q_rotation" in seen[0]) == own and ("q_scale" in seen[0]) != own
  if not own:
    assert seen[0]["q_scale"].shape == (B * H, dm.HEADS)
  assert all(isinstance(x, dm.ByteLevels) for x in seen[0]["key_levels"])
  assert len(seen[0]["key_levels"]) == len(cache.key_quantizer.groups)
  plain = cfg.get("levels") == ("uniform", "int8")
  assert [dm.is_plain(x) for x in seen[0]["key_levels"]] == [plain] * len(cache.key_codes)
  assert cache.key_codes[0].layout.plain == plain
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)


def test_int8_tiles_config_errors_and_reasons(rng):
  with pytest.raises(ValueError, match="levels 'int8'"):
    TurboQuantConfig(key_bits=3, value_bits=3, layout="tiles", tile_operand="int8")
  # Evenly spaced levels: plain nibbles at 4 bits only (an int8 table holds no others).
  with pytest.raises(ValueError, match="'uniform' on a 4-bit side"):
    TurboQuantConfig(key_bits=3, value_bits=3, layout="tiles", levels=("uniform", "int8"),
                     tile_operand="int8")
  with pytest.raises(ValueError, match="serves 1-4 bits"):
    TurboQuantConfig(key_bits=5, value_bits=3, levels=("uniform", "int8"))
  with pytest.raises(ValueError, match="pair"):
    TurboQuantConfig(levels=("uniform",))
  with pytest.raises(ValueError, match="levels must be one of"):
    TurboQuantConfig(levels=("uniform", "linear"))
  pair = TurboQuantConfig(levels=["uniform", "int8"])    # a list: kept hashable
  assert pair.levels == ("uniform", "int8") and pair.levels_pair == ("uniform", "int8")
  assert TurboQuantConfig(levels="cubic").levels_pair == ("cubic", "cubic")
  with pytest.raises(ValueError, match="both widths integer or both fractional"):
    TurboQuantConfig(key_bits=3.5, value_bits=3, layout="tiles", levels="int8",
                     tile_operand="int8")
  with pytest.raises(ValueError, match="tile_operand must be"):
    TurboQuantConfig(tile_operand="fp8")
  with pytest.raises(ValueError, match="int8 tiles are"):       # [128, 256]: 64 registers
    TurboQuantKVCache.create(B, L, H, 256, config=TurboQuantConfig(
        key_bits=3, value_bits=3, layout="tiles", levels="int8", tile_operand="int8"))
  with pytest.raises(ValueError, match="int8 byte tiles"):
    TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
        key_bits=3, value_bits=3, layout="tiles", levels="int8", tile_operand="int8",
        append_kernel=True))
  # int8 levels in fp16 tiles: not an odd polynomial, so no Mosaic path.
  fp16_tiles = TurboQuantKVCache.create(B, L, H, D, config=TurboQuantConfig(
      key_bits=3, value_bits=3, layout="tiles", levels="int8", center_keys=False))
  assert "Lloyd-Max" in ka.mosaic_unsupported(fp16_tiles, 4)


@pytest.mark.parametrize("bits, levels", [((3, 3), "int8"), ((3.5, 3.5), "int8"),
                                          ((4, 3), ("uniform", "int8"))])
def test_int8_tiles_attend_lowers_for_cuda(rng, bits, levels):
  from benchmarks.mosaic_lowering import module_asm, smem_bytes
  cache = tiles_cache(rng, *bits, levels=levels, tile_operand="int8", center_keys="rope",
                      dtype=jnp.bfloat16, window=256 if bits[0] == 3.5 else 128)
  q = jax.ShapeDtypeStruct((B, 1, 8, D), jnp.bfloat16)
  text = ka.attend_jit.trace(cache, q, mosaic=True).lower(
      lowering_platforms=("cuda",)).as_text()
  asm = module_asm(text)
  assert "prmt.b32" in asm and "m64n8k32.s32.s8.s8" in asm
  assert (str(0x0F0F0F0F) in asm) == (levels != "int8")   # plain nibbles' mask
  # Two CTAs per SM (228 KB, 1 KB reserved each): at 3.5 bits the fp16 RoPE operands and
  # 64-token exact blocks keep it there (128-token blocks: 116 KB, one CTA, 0.39 ms).
  assert 2 * (smem_bytes(asm) + 1024) <= 228 * 1024


def test_int8_tiles_glue_at_head_dim_64(rng, monkeypatch):
  """d = 64 heads (SmolLM2's) at an integer width: one group of [256, 64] byte tiles."""
  d = 64
  cfg = TurboQuantConfig(key_bits=3, value_bits=4, layout="tiles", levels="int8",
                         tile_operand="int8", window=32, center_keys="plain")
  cache = TurboQuantKVCache.create(B, L, H, d, config=cfg)
  assert cache.key_codes[0].layout.shape == (256, 64)
  k = jnp.asarray(rng.standard_normal((B, L, H, d)) + 1.0, jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, L, H, d)), jnp.float32)
  cache = cache.update(k, v, num_tokens=jnp.asarray((500, 300)))
  seen = []

  def twin(*args, **kw):
    seen.append(kw["operand"])
    return kernel_twin(*args, **kw)
  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  merges = []
  merge = ka.merge_exact.merge_exact

  def merge_spy(*args, **kw):
    merges.append(args[1].shape)
    return merge(*args, **kw)
  monkeypatch.setattr(ka.merge_exact, "merge_exact", merge_spy)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, d)), jnp.float32)
  ref = cache.attend(q, implementation="reference")
  got = ka.attend(cache, q, mosaic=True, num_splits=2)
  # Up to FUSED_MERGE_MAX_HEAD_DIM the default ends in merge_exact; False: the jnp merge.
  assert seen == ["int8"] and len(merges) == 1 and d <= ka.FUSED_MERGE_MAX_HEAD_DIM
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, fused_merge=False)
  assert seen == ["int8"] * 2 and len(merges) == 1
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)


def test_mosaic_splits_rules():
  """The fp16 path's rule (at most 512 CTAs) and the int8 path's waves: the divisor with
  the fewest waves x (steps per split + 2), ties to fewer splits."""
  # fp16: the largest divisor with rows x splits <= 512.
  assert [ka._mosaic_splits(s, r) for s, r in ((256, 64), (32, 64), (32, 8))] == [8, 8, 32]
  # int8, three CTAs per SM on 132 SMs (396 at once): 8 x 32K takes 16 splits (1,024 CTAs,
  # 3 waves of 16 + 2 steps) over 8 (512 CTAs, 2 waves of 32 + 2); 8 x 4K takes 4.
  div = dict(ctas_per_sm=3, rule="divisors")
  assert ka._mosaic_splits(256, 64, **div) == 16
  assert ka._mosaic_splits(32, 64, **div) == 4
  assert ka._mosaic_splits(32, 8, **div) == 32      # 1 x 4K: one wave
  assert ka._mosaic_splits(256, 8, **div) == 32     # 1 x 32K
  # One more CTA per SM moves 8 x 32K back to one wave of 8 splits.
  assert ka._mosaic_splits(256, 64, ctas_per_sm=4, rule="divisors") == 8
  for steps, rows in ((1, 3), (96, 24), (1024, 512)):
    s = ka._mosaic_splits(steps, rows, ctas_per_sm=3, sms=114, rule="divisors")
    assert steps % s == 0
    waves = lambda n: -(-rows * n // (3 * 114)) * (-(-steps // n) + 2)  # noqa: E731
    assert all(waves(s) <= waves(n) for n in range(1, steps + 1) if steps % n == 0)
    s = ka._mosaic_splits(steps, rows, ctas_per_sm=3, sms=114, rule="any")
    assert all(waves(s) <= waves(n) for n in range(1, steps + 1))
  with pytest.raises(ValueError, match="rule"):
    ka._mosaic_splits(32, 8, ctas_per_sm=3, rule="even")


def test_mosaic_splits_fill_one_wave_of_short_splits():
  """"fill" (the default), three CTAs per SM on 132 SMs (396 slots): a grid of more than
  one wave whose one wave would hold splits of at most FILL_MAX_STEPS steps takes that
  wave; a grid short of one wave then grows to the most divisor splits of four CTAs per
  SM (528) that keep FILL_MIN_STEPS steps. 1 x 128K (8 rows, 1,024 steps): 49 -> 64
  where the divisors' waves give 128; 8 x 4K 4 -> 8, 1 x 32K 32 -> 64; 8 x 32K keeps 16
  (one wave would be 43-step splits), 32 x 4K 4 (32-step splits), SmolLM2's 8 x 32K 16
  (32 would be 768 CTAs), 64 x 4K 2, 1 x 8K 32 (64 would be one-step splits), 1 x 4K 32."""
  fill, div = dict(ctas_per_sm=3, rule="fill"), dict(ctas_per_sm=3, rule="divisors")
  assert ka.DEFAULT_SPLITS_RULE == "fill"
  assert ka._mosaic_splits(1024, 8, **fill) == 64 and ka._mosaic_splits(1024, 8, **div) == 128
  assert ka._mosaic_splits(1024, 8, ctas_per_sm=3) == 64               # the default
  got = {(steps, rows): (ka._mosaic_splits(steps, rows, **div),
                         ka._mosaic_splits(steps, rows, **fill))
         for steps, rows in ((32, 64), (256, 8), (32, 256), (256, 64), (128, 24), (32, 512),
                             (64, 8), (32, 8), (1024, 64))}
  assert got == {(32, 64): (4, 8), (256, 8): (32, 64), (32, 256): (4, 4), (256, 64): (16, 16),
                 (128, 24): (16, 16), (32, 512): (2, 2), (64, 8): (32, 32), (32, 8): (32, 32),
                 (1024, 64): (16, 16)}
  # One wave of a count that divides nothing: 1,021 steps (a prime) over 8 rows -> 49.
  assert ka._mosaic_splits(1021, 8, **fill) == 49
  for steps, rows in ((1, 3), (96, 24), (1000, 8), (256, 100), (2048, 1)):
    n = ka._mosaic_splits(steps, rows, **fill)
    d = ka._mosaic_splits(steps, rows, **div)
    assert 1 <= n <= steps
    # never past four CTAs per SM, unless the divisors' own grid was
    assert rows * n <= 4 * 132 or n == d
  # "any" counts beyond the divisors: one wave of 6 at 8 x 4K instead of 4.
  assert ka._mosaic_splits(32, 64, ctas_per_sm=3, rule="any") == 6


# -- the int8 path's prologue (`pallas_kernels.decode_prologue`) and the fused merge --------

# None: DEFAULT_PROLOGUE ("all"), the default's resolution and that mode in one case.
@pytest.mark.parametrize("prologue", ["off", "query", None])
def test_int8_prologue_modes_and_fused_merge(rng, monkeypatch, prologue):
  """Every prologue mode, with the jnp merge and with `merge_exact` finishing the kernel's
  exact splits (unrotated), against the reference; what each mode hands the kernel."""
  cache = tiles_cache(rng, 4, 3, center_keys="plain", levels="int8", tile_operand="int8",
                      window=64, dtype=jnp.bfloat16)
  seen = []

  def twin(*args, **k):
    seen.append((args[5].shape, k))
    return kernel_twin(*args, **k)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), jnp.bfloat16).astype(jnp.float32)
  kw = dict(soft_cap=20.0, sliding_window=400)
  ref = cache.attend(q, implementation="reference", **kw)
  for fused in (False, True):
    got = ka.attend(cache, q, mosaic=True, num_splits=2, prologue=prologue,
                    fused_merge=fused, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  bounds_shape, k = seen[0]
  mode = ka.DEFAULT_PROLOGUE if prologue is None else prologue
  assert prologue is not None or mode == "all"   # else add "all" to the cases
  assert bounds_shape == ((B * H, 2) if mode == "all" else (B, 2))   # per row / per entry
  # 4-bit keys: the 1/2 offsets, made by the kernel from its own parts: with a prologue
  # (one key group) it rotates the query too; without, XLA hands it the int8 parts.
  assert "key_offsets" not in k and ("q_rotation" in k) == (mode != "off")
  assert "value_bound" in k    # the cache's running max, in every mode (checked by the twin)
  assert k["exact"].limits.shape[0] == (B * H if mode == "all" else B)


def test_prologue_default_and_errors(rng, monkeypatch):
  monkeypatch.setattr(ka.mosaic, "decode_partials", kernel_twin)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), jnp.float32)
  odd = tiles_cache(rng, 3, 3, center_keys="plain", levels="int8", tile_operand="int8",
                    window=104, dtype=jnp.bfloat16)   # not a power of two: no "all"
  assert "window of 104" in ka.prologue_unsupported(odd, "all")
  assert ka.prologue_unsupported(odd, "query") is None
  ref = odd.attend(q, implementation="reference")
  for mode in (None, "query"):      # the default falls back to the jnp glue
    got = ka.attend(odd, q, mosaic=True, num_splits=2, prologue=mode)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match="window of 104"):
    ka.attend(odd, q, mosaic=True, num_splits=2, prologue="all")
  rope = tiles_cache(rng, 3, 3, center_keys="rope", levels="int8", tile_operand="int8")
  with pytest.raises(ValueError, match="before RoPE"):
    ka.attend(rope, q, mosaic=True, num_splits=2, prologue="query")
  assert "int8 tiles" in ka.prologue_unsupported(tiles_cache(rng), "query")
  with pytest.raises(ValueError, match="prologue must be"):
    ka.attend(odd, q, mosaic=True, num_splits=2, prologue="yes")


def test_int8_overlap_values_default(rng, monkeypatch):
  """int8 tiles decode the value tile under the key wgmma on a grid of one wave or less
  and after the softmax on more (`int8_overlap_values`); a caller's choice passes through;
  the fp16 path keeps the kernel's own default."""
  assert ka.int8_overlap_values(256, 132) and ka.int8_overlap_values(396, 132)
  assert not ka.int8_overlap_values(397, 132) and not ka.int8_overlap_values(1024, 132)
  seen = []

  def twin(*args, **kw):
    seen.append(kw.get("overlap_values", "unset"))
    return kernel_twin(*args, **kw)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), jnp.float32)
  int8 = tiles_cache(rng, 4, 3, center_keys="plain", levels="int8", tile_operand="int8",
                     dtype=jnp.bfloat16)
  ref = int8.attend(q, implementation="reference")
  ctas = B * H * 2
  for sms, given in ((132, {}), (1, {}), (1, dict(overlap_values=True))):
    monkeypatch.setattr(ka, "_multiprocessors", lambda sms=sms: sms)
    got = ka.attend(int8, q, mosaic=True, num_splits=2, **given)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  ka.attend(tiles_cache(rng, 4, 3, levels="quintic"), q, mosaic=True, num_splits=2)
  assert ctas > ka.INT8_CTAS_PER_SM          # one SM: more than a wave
  assert seen == [True, False, True, "unset"]


@pytest.mark.parametrize("prologue, hq, pack_q", [("all", 8, True), ("all", 6, False),
                                                  ("query", 16, False)])
def test_int8_prologue_rotations(rng, monkeypatch, prologue, hq, pack_q):
  """prologue_rotation "xla" (an XLA gemm before the prologue): the prologue takes the
  real rows only and hands the kernel the same operands as Triton's dot in it does
  ("dot", the default: repeated rows, and the query's parts packed into one when asked);
  both against the reference."""
  cache = tiles_cache(rng, 4, 3, center_keys="plain", levels="int8", tile_operand="int8",
                      window=64, dtype=jnp.bfloat16)
  seen = []

  def twin(*args, **k):
    seen.append((args[4], args[6], k))
    return kernel_twin(*args, **k)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.bfloat16).astype(jnp.float32)
  kw = dict(soft_cap=20.0, sliding_window=400, prologue=prologue, num_splits=2)
  if hq // H <= dm.HEADS // 2:    # at most 4 rows per kv head: packed operands
    kw.update(pack_p_parts=True, pack_q_parts=pack_q)
  ref = cache.attend(q, implementation="reference", soft_cap=20.0, sliding_window=400)
  assert ka.DEFAULT_PROLOGUE_ROTATION == "kernel"   # the kernel's own: tested below
  for rotation in ("xla", "dot"):
    got = ka.attend(cache, q, mosaic=True, prologue_rotation=rotation, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  (q_xla, qoff_xla, k_xla), (q_ker, qoff_ker, k_ker) = seen
  assert q_xla.shape[1] == (1 if pack_q else 2) and q_xla.dtype == jnp.int8
  if pack_q:   # the kernel's own packing of the in-kernel rotation's parts
    rows = np.arange(dm.HEADS)[None, :, None] < dm.HEADS // 2
    q_ker = jnp.where(rows, q_ker[:, 0], q_ker[:, 1])[:, None]
  # The same products up to summation order: the query within one low step (a carry
  # between the parts aside: compared as hi + lo/127), a packed one part by part.
  def units(x):
    x = np.asarray(x, np.float64)
    return x[:, 0] if x.shape[1] == 1 else x[:, 0] + x[:, 1] / 127
  assert np.max(np.abs(units(q_xla) - units(q_ker))) <= (1 if pack_q else 1.01 / 127)
  np.testing.assert_allclose(np.asarray(k_xla["q_scale"]), np.asarray(k_ker["q_scale"]),
                             rtol=1e-5)
  # Each from its own parts (the twin checks that): a low step apart in a few channels.
  np.testing.assert_allclose(np.asarray(k_xla["key_offsets"]),
                             np.asarray(k_ker["key_offsets"]), rtol=0, atol=0.5 * 8 / 127)
  np.testing.assert_allclose(np.asarray(qoff_xla), np.asarray(qoff_ker), rtol=1e-5, atol=1e-5)
  for prologue in ("all", "off"):   # refused even where no prologue runs
    with pytest.raises(ValueError, match="prologue_rotation must be"):
      ka.attend(cache, q, mosaic=True, prologue_rotation="cublas",
                **dict(kw, prologue=prologue))


@pytest.mark.parametrize("hq, dtype", [(8, jnp.bfloat16), (16, jnp.float32)])
def test_int8_kernel_rotation_glue(rng, monkeypatch, hq, dtype):
  """prologue_rotation "kernel": the prologue keeps q·μ and the ranges, the kernel gets the
  unrotated query as float16 parts (one for a bfloat16 query, two for float32: the
  float16 rounding and its remainder) and U in float16, and nothing rotated; through the
  twin (the kernel's product in jnp) against the reference."""
  cache = tiles_cache(rng, 4, 3, center_keys="plain", levels="int8", tile_operand="int8",
                      window=64, dtype=jnp.bfloat16)
  seen = []

  def twin(*args, **k):
    seen.append((args[4], k))
    return kernel_twin(*args, **k)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.float32).astype(dtype)
  kw = dict(soft_cap=20.0, sliding_window=400)
  ref = cache.attend(q, implementation="reference", **kw)
  got = ka.attend(cache, q, mosaic=True, num_splits=2, prologue_rotation="kernel", **kw)
  # float16 U: the rotated query within ~1e-3 of float32's, the scores likewise.
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=4e-3, atol=4e-3)
  (q_in, k), = seen
  parts = 1 if dtype == jnp.bfloat16 else 2
  assert q_in.shape == (B * H, parts, dm.HEADS, D) and q_in.dtype == jnp.float16
  assert "q_scale" not in k and "key_offsets" not in k
  qf = np.asarray(q, np.float32).reshape(B, H, hq // H, D)
  rows = np.asarray(q_in, np.float32).sum(1).reshape(B, H, dm.HEADS, D)
  np.testing.assert_allclose(rows[:, :, :hq // H], qf, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(k["q_rotation"], np.float32),
                             np.asarray(cache.key_quantizer.unrotation_matrix()),
                             atol=2 ** -11)
  assert k["q_rotation"] is cache.key_quantizer.blocks_f16   # the cache's copy, no cast
  two = tiles_cache(rng, 3.5, 3.5, center_keys="plain", levels="int8", tile_operand="int8",
                    window=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="one key channel group"):
    ka.attend(two, q, mosaic=True, num_splits=2, prologue_rotation="kernel")
  with pytest.raises(ValueError, match="needs a prologue"):
    ka.attend(cache, q, mosaic=True, num_splits=2, prologue_rotation="kernel",
              prologue="off")


def test_fused_merge_takes_exact_splits(rng):
  """use_kernel=False: the reference partials with the exact tokens' jnp partial as the
  kernel's unrotated last split, finished by `merge_exact` (interpret mode)."""
  cache = tiles_cache(rng, 3, 4, center_keys="plain", center_values=True, window=64,
                      dtype=jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), jnp.float32)
  ref = cache.attend(q, implementation="reference", sliding_window=300)
  got = ka.attend(cache, q, mosaic=True, use_kernel=False, fused_merge=True,
                  exact_in_kernel=True, sliding_window=300)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)


def test_int8_prologue_attend_lowers_for_cuda(rng):
  """The default int8 path (keys centred after RoPE): the Triton prologue and the Mosaic
  kernel in one lowered module (the kernel rotating the query; Triton's dot on request)."""
  cache = tiles_cache(rng, 4, 3, levels="int8", tile_operand="int8", center_keys="plain",
                      dtype=jnp.bfloat16, window=128)
  q = jax.ShapeDtypeStruct((B, 1, 8, D), jnp.bfloat16)
  text = ka.attend_jit.trace(cache, q, mosaic=True, prologue_interpret=False).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "turboquant_decode_offsets" in text    # q·μ and the ranges
  from benchmarks.mosaic_lowering import module_asm
  asm = module_asm(text)
  assert "m64n8k32.s32.s8.s8" in asm and "m64n8k16.f32.f16.f16" in asm  # + the rotation
  # U reaches the kernel as the cache keeps it: no float32 -> float16 cast per call.
  assert f"tensor<{D}x{D}xf32>) -> tensor<{D}x{D}xf16>" not in text
  # ... and the split merge (the default with prerotated values) the overflow flags as
  # they are.
  pre = tiles_cache(rng, 4, 3, levels="int8", tile_operand="int8", center_keys="plain",
                    dtype=jnp.bfloat16, window=128, values_prerotated=True)
  text = ka.attend_jit.trace(pre, q, mosaic=True, prologue_interpret=False,
                             merge_interpret=False).lower(
                                 lowering_platforms=("cuda",)).as_text()
  assert "turboquant_merge_splits" in text
  assert f"tensor<{B}xi1>) -> tensor<{B}xi32>" not in text
  text = ka.attend_jit.trace(cache, q, mosaic=True, prologue_interpret=False,
                             prologue_rotation="dot").lower(
                                 lowering_platforms=("cuda",)).as_text()
  assert "turboquant_decode_prologue" in text


# -- p·‖v‖'s two int8 parts as one value operand (pack_p_parts) ---------------------------

# Packing is the default wherever it applies, so the int8 glue tests above run it too;
# here the explicit option on 3 rows per kv head (zero-padded to 4, then repeated), two
# channel groups and the "query" prologue.
@pytest.mark.parametrize("bits_k, bits_v, hq, prologue", [(3.5, 3.5, 6, "query")])
def test_int8_packed_p_parts_glue(rng, monkeypatch, bits_k, bits_v, hq, prologue):
  """The kernel sees the query's rows 4-7 repeat rows 0-3 (jnp merge and `merge_exact`),
  against the reference."""
  cache = tiles_cache(rng, bits_k, bits_v, center_keys="plain", levels="int8",
                      tile_operand="int8", window=64, dtype=jnp.bfloat16)
  seen = []

  def twin(*args, **k):
    seen.append(k)
    q8 = np.asarray(args[4])
    np.testing.assert_array_equal(q8[:, :, 4:], q8[:, :, :4])
    return kernel_twin(*args, **k)

  monkeypatch.setattr(ka.mosaic, "decode_partials", twin)
  q = jnp.asarray(rng.standard_normal((B, 1, hq, D)), jnp.bfloat16).astype(jnp.float32)
  kw = dict(soft_cap=20.0, sliding_window=400)
  ref = cache.attend(q, implementation="reference", **kw)
  for fused in (False, True):
    got = ka.attend(cache, q, mosaic=True, num_splits=2, prologue=prologue,
                    fused_merge=fused, pack_p_parts=True, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
  assert all(k["pack_p_parts"] for k in seen)


def test_pack_q_parts_default_by_steps_per_split(rng, monkeypatch):
  """The query's parts are packed by default where the p parts are and a split holds at
  least PACK_Q_MIN_STEPS steps; an explicit True without packed p parts is refused."""
  cache = tiles_cache(rng, 4, 3, center_keys="plain", levels="int8", tile_operand="int8",
                      window=64, dtype=jnp.bfloat16)
  seen = []
  monkeypatch.setattr(ka.mosaic, "decode_partials",
                      lambda *a, **k: seen.append(k) or kernel_twin(*a, **k))
  monkeypatch.setattr(ka, "PACK_Q_MIN_STEPS", 2)
  q = jnp.asarray(rng.standard_normal((B, 1, 8, D)), jnp.float32)
  ref = cache.attend(q, implementation="reference")
  steps = L // 128
  for splits, packed_p, want in ((steps // 2, None, True), (steps, None, False),
                                 (steps // 2, False, False)):
    got = ka.attend(cache, q, mosaic=True, num_splits=splits, pack_p_parts=packed_p)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-3)
    assert seen[-1].get("pack_q_parts", False) == want, (splits, packed_p)
  with pytest.raises(ValueError, match="pack_q_parts needs"):
    ka.attend(cache, q, mosaic=True, num_splits=2, pack_p_parts=False, pack_q_parts=True)


def test_packed_p_parts_reference_and_errors(rng):
  """The reference takes pack_p_parts (outputs as without it) and refuses a query whose
  rows 4-7 do not repeat rows 0-3; the glue refuses what cannot pack."""
  r, t, d = 4, 256, 128
  kc = jnp.asarray(rng.integers(0, 16, (r, t, d)), jnp.uint8)
  vc = jnp.asarray(rng.integers(0, 8, (r, t, d)), jnp.uint8)
  kn = jnp.asarray(rng.uniform(0.5, 2, (r, t)), jnp.float16)
  vn = jnp.asarray(rng.uniform(0.5, 2, (r, t)), jnp.float16)
  q4 = rng.standard_normal((r, 4, d)).astype(np.float32)
  hi, lo, scale = dm.decode_prologue.quantize_rotated(jnp.asarray(np.concatenate([q4, q4], 1)))
  q8 = jnp.stack([hi, lo], 1).astype(jnp.int8)
  from turboquant_jax.codebook import int8_codebook
  lv = lambda bits: dm.byte_levels(int8_codebook(d, bits).centroids)  # noqa: E731
  common = dict(bits_k=4, bits_v=3, key_levels=lv(4), value_levels=lv(3), num_splits=2,
                scale=0.1, q_scale=scale)
  args = (kc, kn, vc, vn, q8, jnp.asarray([[0, 200]] * r, jnp.int32), jnp.zeros((r, dm.HEADS)))
  want = dm.decode_partials_reference(*args, **common)
  got = dm.decode_partials_reference(*args, **common, pack_p_parts=True)
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="repeat rows 0-3"):
    dm.decode_partials_reference(*args[:4], q8.at[:, :, 5].add(1), *args[5:], **common,
                                 pack_p_parts=True)
  with pytest.raises(ValueError, match="pack_q_parts needs pack_p_parts"):
    dm.decode_partials(*args, key_spec=rc.TileSpec(4, 128, 128),
                       value_spec=rc.TileSpec(3, 128, 128), key_levels=common["key_levels"],
                       value_levels=common["value_levels"], num_splits=2, scale=0.1,
                       operand="int8", q_scale=common["q_scale"], pack_q_parts=True)
  with pytest.raises(ValueError, match="operand='int8' only"):
    dm.decode_partials(*args, key_spec=rc.TileSpec(4, 128, 128),
                       value_spec=rc.TileSpec(3, 128, 128), key_levels=(1.0, 0.0),
                       value_levels=(1.0, 0.0), num_splits=2, scale=0.1, pack_p_parts=True)
  cache = tiles_cache(rng, 4, 3, center_keys="plain", levels="int8", tile_operand="int8",
                      window=64)
  q = jnp.asarray(rng.standard_normal((B, 1, 16, D)), jnp.float32)   # 8 rows per kv head
  with pytest.raises(ValueError, match="at most 4 query rows"):
    ka.attend(cache, q, mosaic=True, num_splits=2, pack_p_parts=True)
  with pytest.raises(ValueError, match="at most 4 query rows"):
    ka.attend(tiles_cache(rng), q[:, :, :8], mosaic=True, num_splits=2, pack_p_parts=True)


def test_packed_p_parts_lowers_for_cuda(rng):
  """The packed kernel lowers (Mosaic GPU, CUDA) with one value wgmma per step where the
  unpacked one issues two, and folds its halves with butterfly shuffles; with the query's
  parts packed too, one key wgmma where it issues two, and a shuffle per score register."""
  cache = tiles_cache(rng, 4, 3, levels="int8", tile_operand="int8", center_keys="plain",
                      dtype=jnp.bfloat16, window=128)
  q = jax.ShapeDtypeStruct((B, 1, 8, D), jnp.bfloat16)
  from benchmarks.mosaic_lowering import module_asm
  counts = {}
  for packed, packed_q in ((False, False), (True, False), (True, True)):
    text = ka.attend_jit.trace(cache, q, mosaic=True, prologue_interpret=False,
                               pack_p_parts=packed, pack_q_parts=packed_q).lower(
        lowering_platforms=("cuda",)).as_text()
    asm = module_asm(text)
    counts[packed + packed_q] = (asm.count("m64n8k32.s32.s8.s8"),
                                 asm.count("shfl.sync.bfly.b32 a, a, 2"))
  # Per step: 2 key + 2 value wgmma calls unpacked, 2 + 1 with p packed, 1 + 1 with both
  # (each call the same number of instructions: 128 tokens x 128 channels).
  wgmma = [counts[n][0] for n in range(3)]
  assert wgmma[0] > 0 and wgmma[0] * 3 == wgmma[1] * 4 and wgmma[0] * 2 == wgmma[2] * 4, counts
  assert counts[0][1] == 0 < counts[1][1] < counts[2][1], counts
