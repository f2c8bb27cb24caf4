"""`pallas_kernels.decode_prologue` in interpret mode against its jnp reference and the
cache's own forms (`exact_tokens.window_start`, `quantize_query_s8`); its speed is
measured on the GPU (`benchmarks.decode_prologue_check`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import decode_prologue as dp
from turboquant_jax import exact_tokens

D = 128
ONE = (dp.KeyGroup(0, D, 0.5),)
TWO = (dp.KeyGroup(0, 64, 0.0), dp.KeyGroup(64, 64, 0.5))


def ring(rng, lengths, w, gaps=0):
  """[B, W] slot positions of rings holding each row's last W tokens (slot p mod W holds
  p), with `gaps` slots per row overwritten by stale or empty positions."""
  pos = np.full((len(lengths), w), -1, np.int32)
  for i, n in enumerate(lengths):
    for p in range(max(0, n - w), n):
      pos[i, p % w] = p
    for _ in range(gaps):
      pos[i, rng.integers(0, w)] = rng.choice([-1, 3, n - w - 5, n + 7])
  return jnp.asarray(pos)


def inputs(rng, r, heads, w, groups, sliding=None, sinks=4, gaps=0):
  b = r // heads
  q = np.zeros((r, 8, D), np.float32)
  q[:, :heads // 2 or 1] = rng.standard_normal((r, heads // 2 or 1, D)) * 0.3
  unrot = np.linalg.qr(rng.standard_normal((D, D)))[0]
  lengths = rng.integers(1, 3 * max(w, 64), b).astype(np.int32)
  ranges = dp.Ranges(jnp.asarray(lengths), jnp.asarray(lengths) - 1,
                     ring(rng, lengths, w, gaps) if w else jnp.zeros((b, 0), jnp.int32),
                     sinks, sinks, sliding)
  return jnp.asarray(q), jnp.asarray(unrot, jnp.float32), dict(
      heads=heads, key_groups=groups, key_mean=jnp.asarray(rng.standard_normal((r, D)),
                                                           jnp.float32),
      ranges=ranges)


@pytest.mark.parametrize("r, heads, w, groups, sliding, gaps", [
    (16, 8, 64, ONE, None, 0),
    (8, 4, 128, TWO, 90, 2),       # a stale slot or two: the run ends at the gap
    (4, 2, 0, ONE, None, 0),         # no window
])
def test_prologue_matches_reference(rng, r, heads, w, groups, sliding, gaps):
  q, unrot, kw = inputs(rng, r, heads, w, groups, sliding, gaps=gaps)
  got = dp.decode_prologue(q, unrot, interpret=True, **kw)
  ref = dp.decode_prologue_reference(q, unrot, **kw)
  x = np.einsum("rmd,ed->rme", np.asarray(q, np.float64), np.asarray(unrot, np.float64))
  deq = lambda p: (np.asarray(p.scale)[..., None]  # noqa: E731
                   * (np.asarray(p.q[:, 0], np.float64) + np.asarray(p.q[:, 1]) / 127.0))
  scale = np.asarray(ref.scale)[..., None]
  # Both within half a low-part step of the rotated query (about 14 bits); the int8 parts
  # may differ where a product lands on a rounding boundary.
  assert np.max(np.abs(deq(got) - x) / scale) < 0.51 / 127
  assert np.max(np.abs(deq(ref) - x) / scale) < 0.51 / 127
  np.testing.assert_allclose(np.asarray(got.scale), np.asarray(ref.scale), rtol=1e-6)
  # The offsets are exactly those of the kernel's own parts.
  units = np.asarray(got.q[:, 0], np.float64) + np.asarray(got.q[:, 1]) / 127.0
  want = np.stack([g.offset * units[..., g.start:g.start + g.cols].sum(-1) for g in groups], 1)
  np.testing.assert_allclose(np.asarray(got.key_offsets), want, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(got.qoff), np.asarray(ref.qoff), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.bounds), np.asarray(ref.bounds))
  np.testing.assert_array_equal(np.asarray(got.limits), np.asarray(ref.limits))
  assert got.q.dtype == jnp.int8 and got.q.shape == (r, 2, 8, D)
  assert not np.any(np.asarray(got.q)[:, :, heads // 2 or 1:])    # zero rows stay zero


def test_window_start_matches_the_cache(rng):
  """The per-slot form (no gather) equals `exact_tokens.window_start` on rings with
  stale and empty slots."""
  for w in (8, 64):
    for _ in range(20):
      lengths = rng.integers(0, 4 * w, 5).astype(np.int32)
      pos = ring(rng, lengths, w, gaps=int(rng.integers(0, 3)))
      np.testing.assert_array_equal(
          np.asarray(dp.window_start_reference(pos, jnp.asarray(lengths))),
          np.asarray(exact_tokens.window_start(pos, jnp.asarray(lengths), w)))


def test_ranges_match_the_kernel_glue(rng):
  """`ranges_reference` is `kernel_attention._limits`'s arithmetic: compared on a cache's
  own state through `attend` elsewhere (test_kernel_attention_mosaic); here its edge
  cases: a sliding window, no sinks, an empty row."""
  lengths = jnp.asarray([0, 5, 300], jnp.int32)
  pos = ring(rng, np.asarray(lengths), 64)
  bounds, limits = dp.ranges_reference(dp.Ranges(lengths, lengths - 1, pos, 0, 0, 100))
  np.testing.assert_array_equal(np.asarray(bounds), [[0, 0], [0, 0], [200, 236]])
  # position, window range, padded to a power of two
  np.testing.assert_array_equal(np.asarray(limits), [[-1, 0, 0, 0], [4, 0, 5, 0],
                                                     [299, 236, 300, 0]])


def test_kernel_quantizer_is_the_mosaic_one(rng):
  q = jnp.asarray(rng.standard_normal((3, 8, D)) * 5, jnp.float32)
  q8, scale = dm.quantize_query_s8(q)
  out = dp.decode_prologue(q, jnp.eye(D), heads=1, key_groups=ONE, interpret=True)
  np.testing.assert_allclose(np.asarray(out.scale), np.asarray(scale), rtol=1e-6)
  assert np.max(np.abs(np.asarray(out.q, np.int32) - np.asarray(q8, np.int32))) <= 1
  assert out.bounds is None and out.limits is None


def test_round_half_away():
  x = jnp.asarray([-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 2.49], jnp.float32)
  np.testing.assert_array_equal(np.asarray(dp.round_half_away(x)),
                                [-3, -2, -1, 0, 1, 2, 3, 2])


def test_errors_and_reasons():
  q, eye = jnp.zeros((8, 8, D)), jnp.eye(D)
  with pytest.raises(ValueError, match="8 rows"):
    dp.decode_prologue(jnp.zeros((8, 4, D)), eye, heads=8, key_groups=ONE)
  with pytest.raises(ValueError, match="4 rows"):
    dp.decode_prologue(q, None, rotated=q, parts="repeat", heads=8, key_groups=ONE)
  with pytest.raises(ValueError, match="rotated by the caller"):
    dp.decode_prologue(q[:, :4], eye, parts="packed", heads=8, key_groups=ONE)
  with pytest.raises(ValueError, match="rotated must be"):
    dp.decode_prologue(q, None, rotated=q[:, :4], heads=8, key_groups=ONE)
  with pytest.raises(ValueError, match="parts must be"):
    dp.decode_prologue(q, None, rotated=q, parts="twice", heads=8, key_groups=ONE)
  with pytest.raises(ValueError, match="batch entries"):
    dp.decode_prologue(q, eye, heads=3, key_groups=ONE)
  with pytest.raises(ValueError, match="unrotation"):
    dp.decode_prologue(q, jnp.eye(64), heads=8, key_groups=ONE)
  with pytest.raises(ValueError, match="cover"):
    dp.decode_prologue(q, eye, heads=8, key_groups=(dp.KeyGroup(0, 64, 0.5),))
  with pytest.raises(ValueError, match="key_mean"):
    dp.decode_prologue(q, eye, heads=8, key_groups=ONE, key_mean=jnp.zeros((8, 64)))
  bad = dp.Ranges(jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), jnp.zeros((1, 8), jnp.int32),
                  4, 4)
  with pytest.raises(ValueError, match="lengths"):
    dp.decode_prologue(q, eye, heads=8, key_groups=ONE, ranges=bad)
  with pytest.raises(ValueError, match="window of 96"):
    dp.decode_prologue(q, eye, heads=8, key_groups=ONE, ranges=dp.Ranges(
        jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), jnp.zeros((1, 96), jnp.int32), 4, 4))
  assert "power of two" in dp.unsupported(96, ONE, 0)
  assert "3 key groups" in dp.unsupported(D, (dp.KeyGroup(0, 64, 0.5),) * 3, 0)
  assert "window of 96" in dp.unsupported(D, ONE, 96)
  assert dp.unsupported(D, TWO, 256) is None


QUANTIZED = [p for p in dp.PARTS if p != "none"]


@pytest.mark.parametrize("parts", QUANTIZED)
def test_rotated_by_the_caller(rng, parts):
  """`rotated` (the XLA gemm's product): the same outputs as the reference in each layout;
  "repeat" and "packed" take the 4 real rows and write each twice, "packed" as one
  operand [high parts | low parts]; q (a bfloat16 one too) is read for q·μ only."""
  q, unrot, kw = inputs(rng, 16, 8, 64, TWO, 90, gaps=1)
  q = (q if parts == "rows" else q[:, :4]).astype(jnp.bfloat16)
  x = jnp.einsum("rmd,ed->rme", q.astype(jnp.float32), unrot, precision="highest")
  got = dp.decode_prologue(q, None, rotated=x, parts=parts, interpret=True, **kw)
  ref = dp.decode_prologue_reference(q, None, rotated=x, parts=parts, **kw)
  for name, a, b in zip(got._fields, got, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=1e-5, atol=1e-4, err_msg=name)
  assert got.q.shape == (16, 1 if parts == "packed" else 2, 8, D)
  if parts != "rows":   # each row's outputs twice
    for a in (got.scale, got.qoff, got.key_offsets):
      np.testing.assert_array_equal(np.asarray(a[..., 4:]), np.asarray(a[..., :4]))
  # The layout against the rows' own parts: the same product, rows repeated by hand.
  rows = dp.decode_prologue_reference(jnp.concatenate([q, q], 1) if parts != "rows" else q,
                                      unrot, **kw)
  hi, lo = np.asarray(rows.q[:, 0]), np.asarray(rows.q[:, 1])
  want = {"rows": np.stack([hi, lo], 1), "repeat": np.stack([hi, lo], 1),
          "packed": np.concatenate([hi[:, :4], lo[:, 4:]], 1)[:, None]}[parts]
  assert np.max(np.abs(np.asarray(got.q, np.int32) - want)) <= 1   # summation order


@pytest.mark.parametrize("w, sliding", [(64, 90), (0, None)])
def test_offsets_only_for_the_rotating_kernel(rng, w, sliding):
  """parts "none" (the Mosaic kernel rotates the query itself): q·μ of the 8 rows as given
  and the ranges, as the reference; no parts, scale or offsets; a Triton lowering."""
  q, _, kw = inputs(rng, 16, 8, w, ONE, sliding, gaps=1)
  q = q.astype(jnp.bfloat16)
  got = dp.decode_prologue(q, None, parts="none", interpret=True, **kw)
  ref = dp.decode_prologue_reference(q, None, parts="none", **kw)
  assert got.q is None and got.scale is None and got.key_offsets is None
  np.testing.assert_allclose(np.asarray(got.qoff), np.asarray(ref.qoff), rtol=1e-5,
                             atol=1e-5)
  want = np.einsum("rmd,rd->rm", np.asarray(q, np.float64), np.asarray(kw["key_mean"]))
  np.testing.assert_allclose(np.asarray(got.qoff), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got.bounds), np.asarray(ref.bounds))
  np.testing.assert_array_equal(np.asarray(got.limits), np.asarray(ref.limits))
  plain = dp.decode_prologue(q, None, parts="none", interpret=True,
                             **dict(kw, key_mean=None))
  assert not np.any(np.asarray(plain.qoff))
  s = jax.ShapeDtypeStruct
  text = jax.jit(lambda q, mean: dp.decode_prologue(
      q, None, parts="none", heads=8, key_groups=ONE, key_mean=mean,
      ranges=kw["ranges"])).trace(s(q.shape, q.dtype), s((16, D), jnp.float32)).lower(
          lowering_platforms=("cuda",)).as_text()
  assert "turboquant_decode_offsets" in text
  with pytest.raises(ValueError, match="8 rows"):
    dp.decode_prologue(q[:, :4], None, parts="none", interpret=True, **kw)


def test_rotated_lowers_for_cuda():
  """The rotated kernel's Triton lowering takes every primitive in each layout."""
  s = jax.ShapeDtypeStruct
  for parts in QUANTIZED:
    n = 8 if parts == "rows" else 4

    def f(q, x, mean, lengths, pos, wpos, parts=parts):
      return dp.decode_prologue(q, None, rotated=x, parts=parts, heads=8, key_groups=TWO,
                                key_mean=mean, ranges=dp.Ranges(lengths, pos, wpos, 4, 4, 200))
    text = jax.jit(f).trace(
        s((16, n, D), jnp.bfloat16), s((16, n, D), jnp.float32), s((16, D), jnp.float32),
        s((2,), jnp.int32), s((2,), jnp.int32), s((2, 64), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "turboquant_decode_prologue" in text


def test_lowers_for_cuda():
  """The Triton lowering takes every primitive (the GPU compiles it: benchmarks)."""
  r, b, w = 16, 2, 64
  s = jax.ShapeDtypeStruct

  def f(q, unrot, mean, lengths, pos, wpos):
    return dp.decode_prologue(q, unrot, heads=8, key_groups=TWO, key_mean=mean,
                              ranges=dp.Ranges(lengths, pos, wpos, 4, 4, 200))
  text = jax.jit(f).trace(
      s((r, 8, D), jnp.float32), s((D, D), jnp.float32), s((r, D), jnp.float32),
      s((b,), jnp.int32), s((b,), jnp.int32), s((b, w), jnp.int32)).lower(
          lowering_platforms=("cuda",)).as_text()
  assert "turboquant_decode_prologue" in text
