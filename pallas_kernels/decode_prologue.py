"""A decode step's prologue in one kernel: what the int8 Mosaic kernel reads besides codes.

Before `decode_attention_mgpu.decode_partials` (operand="int8") runs, each kv-head row
needs its query rotated and split into two int8 parts with a scale per head, the
4-bit groups' level offsets 1/2·Σq, the key-centering term q·μ, the compressed range
and the exact parts' visible ranges (from the window ring's positions). In jnp that is
eleven small XLA kernels per layer (one a gemm); here it is one Pallas (Triton) program
per kv-head row. (The value norms' bound it also reduced over every slot is now kept by
the cache on append: `tile_codes.TileCodes.norm_max`.) Measured (H200, Llama-3-8B
shapes, K4/V3, `decode_prologue_gpu.json`, `step_profile_prologue_8x4k_gpu.json`, with
the bound): one layer's attention at 8 x 4K takes 9 kernels and 45.1 us of device time
against 18 and 49.2 (this kernel 10.0 us there, 4-6 us alone with its operands in L2);
the decode step, run as CUDA graphs, moves within its noise (0.96-1.04x of the jnp
glue's step time). Without the bound, 9.8 us in the 8 x 32K step
(`step_profile_cache_bound_8x32k_gpu.json`), 8.5-9.7 us at 8 x 4K and 1 x 4K alike
(`step_profile_prologue_rotation_*_gpu.json`): the rotation's dot is most of it (with the
query rotated by the caller, `rotated`, the kernel takes 2.0-2.4 us). Triton's float32
dot with 8 columns runs on FMAs; neither TF32x3 nor 8 warps moved it
(`step_profile_prologue_variants_8x4k_gpu.json`: 43.1 / 45.5 against 44.2 us of attention
at 8 x 4K; alone, `decode_prologue_micro_tf32x3_gpu.json`), nor did broadcast products
summed 16 channels at a time (16-26 us).

Every output equals its jnp form (`decode_prologue_reference`, the functions the cache
used before): the rotation is a float32 product (IEEE), the int8 parts round half away
from zero as `quantize_query_s8` does, the ranges are integers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array

HEADS = 8               # query rows per kv head: wgmma's N (the Mosaic kernel's)
_HIGHEST = jax.lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))     # [a, k] x [b, k] -> [a, b]


class KeyGroup(NamedTuple):
  """A key channel group's columns [start, start + cols) and its level offset (1/2 for
  4-bit sign-magnitude levels, else 0: `decode_attention_mgpu.ByteLevels.offset`)."""

  start: int
  cols: int
  offset: float


class Ranges(NamedTuple):
  """What bounds a decode query's attention, per batch entry (`ranges_reference`).

  lengths: int32 [B], tokens each row holds; position: int32 [B], the query's position;
  window_positions: int32 [B, W], the position each ring slot holds (-1 empty; W = 0: no
  window); num_sinks: the first tokens kept exact (static); sink_slots: the sinks' slots
  (0: no sinks part); sliding_window: a query at p sees keys in (p - window, p] (static).
  """

  lengths: Array
  position: Array
  window_positions: Array
  num_sinks: int
  sink_slots: int
  sliding_window: int | None = None


class Prologue(NamedTuple):
  """The kernel's outputs, per kv-head row (R = batch x kv heads, batch-major).

  q: int8 [R, 2, 8, D], q_rotated ≈ scale·(q[:, 0] + q[:, 1]/127) (None, as scale and
  key_offsets, for parts "none"); scale: float32 [R, 8];
  key_offsets: float32 [R, groups, 8], offset_g·Σ over group g's columns of (q[:, 0] +
  q[:, 1]/127) (None when no group has an offset); qoff: float32 [R, 8], q·μ (zeros
  without a key mean); bounds: int32 [R, 2], the compressed range [lo, hi); limits: int32
  [R, 2^k >= 1 + 2·parts], the query's position then each exact part's visible range
  (window, then sinks; columns past them zero)."""

  q: Array
  scale: Array
  key_offsets: Array | None
  qoff: Array
  bounds: Array | None
  limits: Array | None


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def pow2_at_least(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(n - 1, 0).bit_length()


def round_half_away(x: Array) -> Array:
  """Round to the nearest integer, halves away from zero (Triton has no round-to-even;
  the jnp form uses this too, so both agree bit for bit)."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def quantize_rotated(x: Array) -> tuple[Array, Array, Array]:
  """x float32 [..., 8, D] -> (hi, lo float32 integers, scale [..., 8]): x ≈
  scale·(hi + lo/127), scale = max|x|/127 per head (1 for a zero row)."""
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  y = x / scale[..., None]
  hi = round_half_away(y)
  return hi, round_half_away((y - hi) * 127.0), scale


def window_start_reference(window_positions: Array, lengths: Array) -> Array:
  """[B]: positions [start, length) are held exactly by the ring (a trailing run); the
  same as `exact_tokens.window_start`, written per slot (no gather): slot j holds the
  run's k-th position when (j - length) mod W = k."""
  w = window_positions.shape[1]
  if w == 0:
    return lengths
  j = jnp.arange(w, dtype=jnp.int32)[None, :]
  k = jnp.mod(j - lengths[:, None], w)
  want = lengths[:, None] - w + k
  covered = (want >= 0) & (window_positions == want)
  last_gap = jnp.max(jnp.where(covered, -1, k), axis=1)
  return lengths - (w - 1 - last_gap)


def ranges_reference(ranges: Ranges) -> tuple[Array, Array]:
  """(bounds [B, 2], limits [B, 2^k]) int32 of `Ranges` in jnp."""
  lengths, pos = ranges.lengths.astype(jnp.int32), ranges.position.astype(jnp.int32)
  w = ranges.window_positions.shape[1]
  s = ranges.num_sinks
  start = window_start_reference(ranges.window_positions.astype(jnp.int32), lengths)
  lo = jnp.full_like(pos, s)
  if ranges.sliding_window is not None:
    lo = jnp.maximum(lo, pos - ranges.sliding_window + 1)
  hi = jnp.maximum(jnp.minimum(start, pos + 1), lo)
  cols = [pos]
  if w:
    cols += [jnp.maximum(start, s), lengths]
  if ranges.sink_slots:
    cols += [jnp.zeros_like(pos), lengths]
  width = pow2_at_least(len(cols))
  cols += [jnp.zeros_like(pos)] * (width - len(cols))
  return jnp.stack([lo, hi], axis=-1), jnp.stack(cols, axis=-1)


def unsupported(head_dim: int, key_groups: tuple[KeyGroup, ...], window: int) -> str | None:
  """Why the kernel cannot serve this call (None: it can). Triton tensors have
  power-of-two sizes."""
  if not is_pow2(head_dim) or head_dim < 16:
    return f"head_dim {head_dim} is not a power of two >= 16"
  if not is_pow2(len(key_groups)):
    return f"{len(key_groups)} key groups is not a power of two"
  if window and not is_pow2(window):
    return f"a window of {window} slots is not a power of two"
  return None


def _write_ranges(len_ref, pos_ref, wpos_ref, bounds_ref, limits_ref, *, window,
                  sink_slots, num_sinks, sliding_window):
  """One batch entry's compressed range and the exact parts' visible ranges
  (`ranges_reference` per slot, no gather)."""
  length = jnp.max(len_ref[...])
  pos = jnp.max(pos_ref[...])
  start = length
  if window:
    slot = jax.lax.broadcasted_iota(jnp.int32, (window,), 0)
    k = jax.lax.rem(slot - length + window * (1 + jnp.abs(length) // window), window)
    want = length - window + k
    covered = (want >= 0) & (wpos_ref[...] == want)
    last_gap = jnp.max(jnp.where(covered, -1, k))
    start = length - (window - 1 - last_gap)
  lo = jnp.full((), num_sinks, jnp.int32)
  if sliding_window is not None:
    lo = jnp.maximum(lo, pos - sliding_window + 1)
  hi_ = jnp.maximum(jnp.minimum(start, pos + 1), lo)
  col = jax.lax.broadcasted_iota(jnp.int32, (2,), 0)
  bounds_ref[...] = jnp.where(col == 0, lo, hi_)
  cols = [pos]
  if window:
    cols += [jnp.maximum(start, num_sinks), length]
  if sink_slots:
    cols += [jnp.zeros((), jnp.int32), length]
  col = jax.lax.broadcasted_iota(jnp.int32, limits_ref.shape, 0)
  limits = jnp.zeros(limits_ref.shape, jnp.int32)
  for c, v in enumerate(cols):
    limits = jnp.where(col == c, v, limits)
  limits_ref[...] = limits


def _write_qoff_and_ranges(qoff_ref, q, mean_ref, range_refs, **range_kw) -> None:
  """q·μ of q's rows (float32 [8, D]; zeros without a mean) into qoff_ref [8], and the
  ranges (`_write_ranges`) where range_refs (its five refs) is not None."""
  if mean_ref is not None:
    qoff_ref[...] = jnp.sum(q * mean_ref[...][None, :], axis=1)
  else:
    qoff_ref[...] = jnp.zeros(qoff_ref.shape, jnp.float32)
  if range_refs is not None:
    _write_ranges(*range_refs, **range_kw)


def _kernel(*refs, key_groups, has_mean, has_ranges, window, sink_slots, num_sinks,
            sliding_window):
  q_ref, rot_ref = refs[:2]   # [8, D] unrotated rows (zeros past the real ones), [D, D]
  rest = list(refs[2:])
  mean_ref = rest.pop(0) if has_mean else None             # [D]
  if has_ranges:
    len_ref, pos_ref = rest.pop(0), rest.pop(0)            # [1], [1]
    wpos_ref = rest.pop(0) if window else None             # [W]
  q8_ref, scale_ref, qoff_ref = rest[:3]                   # [2, 8, D], [8], [8]
  rest = rest[3:]
  koff_ref = rest.pop(0) if any(g.offset for g in key_groups) else None  # [groups, 8]
  if has_ranges:
    bounds_ref, limits_ref = rest.pop(0), rest.pop(0)      # [2], [2^k]

  q = q_ref[...].astype(jnp.float32)
  # Rotated, transposed [D, 8]: unrotation·q^T (the orientation Triton's dot takes with 8
  # columns, as merge_exact's; an [8, D] x [D, D] product would need 16 rows).
  x = jax.lax.dot_general(rot_ref[...], q, _NT, precision=_HIGHEST,
                          preferred_element_type=jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=0) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  y = x / scale[None, :]
  hi = round_half_away(y)
  lo = round_half_away((y - hi) * 127.0)
  q8_ref[0, :, :] = hi.T.astype(jnp.int8)
  q8_ref[1, :, :] = lo.T.astype(jnp.int8)
  scale_ref[...] = scale
  if koff_ref is not None:
    units = hi + lo / 127.0
    chan = jax.lax.broadcasted_iota(jnp.int32, units.shape, 0)
    row = jax.lax.broadcasted_iota(jnp.int32, koff_ref.shape, 0)
    koff = jnp.zeros(koff_ref.shape, jnp.float32)
    for g, grp in enumerate(key_groups):
      inside = (chan >= grp.start) & (chan < grp.start + grp.cols)
      part = grp.offset * jnp.sum(jnp.where(inside, units, 0.0), axis=0)
      koff = jnp.where(row == g, part[None, :], koff)
    koff_ref[...] = koff
  _write_qoff_and_ranges(
      qoff_ref, q, mean_ref,
      (len_ref, pos_ref, wpos_ref, bounds_ref, limits_ref) if has_ranges else None,
      window=window, sink_slots=sink_slots, num_sinks=num_sinks,
      sliding_window=sliding_window)


def _kernel_rotated(*refs, key_groups, has_mean, has_ranges, window, sink_slots,
                    num_sinks, sliding_window, parts):
  """`_kernel` for a query rotated by the caller (no product here), rows [n, D] in the
  natural orientation; parts "repeat" and "packed" write each of the n = 4 rows twice
  (`decode_prologue`)."""
  rest = list(refs)
  x_ref = rest.pop(0)                                      # [n, D] rotated rows
  q_ref = rest.pop(0) if has_mean else None                # [n, D] unrotated rows
  mean_ref = rest.pop(0) if has_mean else None             # [D]
  len_ref = pos_ref = wpos_ref = bounds_ref = limits_ref = None
  if has_ranges:
    len_ref, pos_ref = rest.pop(0), rest.pop(0)            # [1], [1]
    wpos_ref = rest.pop(0) if window else None             # [W]
  # "rows": [2, n, D], [n], [n]; "repeat": [2, 2, n, D], [2, n], [2, n]; "packed":
  # [2, n, D] (high parts, then low), [2, n], [2, n]
  q8_ref, scale_ref, qoff_ref = rest[:3]
  rest = rest[3:]
  koff_ref = rest.pop(0) if any(g.offset for g in key_groups) else None
  if has_ranges:
    bounds_ref, limits_ref = rest.pop(0), rest.pop(0)      # [2], [2^k]
  twice = parts != "rows"

  def store(ref, v):    # v [..., n]: once, or in both halves (the second-to-last axis)
    if twice:
      ref[..., 0, :] = v
      ref[..., 1, :] = v
    else:
      ref[...] = v

  x = x_ref[...].astype(jnp.float32)
  hi, lo, scale = quantize_rotated(x)
  if parts == "repeat":
    for i, part in enumerate((hi, lo)):
      q8_ref[i, 0, :, :] = part.astype(jnp.int8)
      q8_ref[i, 1, :, :] = part.astype(jnp.int8)
  else:   # "rows": [hi; lo] per part; "packed": one operand [hi rows | lo rows]
    q8_ref[0, :, :] = hi.astype(jnp.int8)
    q8_ref[1, :, :] = lo.astype(jnp.int8)
  store(scale_ref, scale)
  if koff_ref is not None:
    units = hi + lo / 127.0
    chan = jax.lax.broadcasted_iota(jnp.int32, units.shape, 1)
    shape = (len(key_groups), units.shape[0])
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    koff = jnp.zeros(shape, jnp.float32)
    for g, grp in enumerate(key_groups):
      inside = (chan >= grp.start) & (chan < grp.start + grp.cols)
      part = grp.offset * jnp.sum(jnp.where(inside, units, 0.0), axis=1)
      koff = jnp.where(row == g, part[None, :], koff)
    if twice:   # [groups, 2, n]
      koff_ref[:, 0, :] = koff
      koff_ref[:, 1, :] = koff
    else:
      koff_ref[...] = koff
  if has_mean:
    store(qoff_ref, jnp.sum(q_ref[...].astype(jnp.float32) * mean_ref[...][None, :], axis=1))
  else:
    store(qoff_ref, jnp.zeros(x.shape[:1], jnp.float32))
  if has_ranges:
    _write_ranges(len_ref, pos_ref, wpos_ref, bounds_ref, limits_ref, window=window,
                  sink_slots=sink_slots, num_sinks=num_sinks,
                  sliding_window=sliding_window)


def _kernel_offsets(*refs, has_mean, has_ranges, window, sink_slots, num_sinks,
                    sliding_window):
  """`_kernel` without the query's parts (parts "none": the Mosaic kernel rotates and
  splits the query itself): q·μ of the rows as given, and the ranges."""
  rest = list(refs)
  q_ref = rest.pop(0) if has_mean else None                # [8, D] unrotated rows
  mean_ref = rest.pop(0) if has_mean else None             # [D]
  len_ref = pos_ref = wpos_ref = bounds_ref = limits_ref = None
  if has_ranges:
    len_ref, pos_ref = rest.pop(0), rest.pop(0)            # [1], [1]
    wpos_ref = rest.pop(0) if window else None             # [W]
  qoff_ref = rest.pop(0)                                   # [8]
  if has_ranges:
    bounds_ref, limits_ref = rest.pop(0), rest.pop(0)      # [2], [2^k]
  _write_qoff_and_ranges(
      qoff_ref, q_ref[...].astype(jnp.float32) if has_mean else None, mean_ref,
      (len_ref, pos_ref, wpos_ref, bounds_ref, limits_ref) if has_ranges else None,
      window=window, sink_slots=sink_slots, num_sinks=num_sinks,
      sliding_window=sliding_window)


def _launch(kernel, r: int, in_specs, out_specs, out_shapes, args, *, interpret: bool,
            num_warps: int, name: str) -> list:
  """One Triton program per row (interpret mode off the GPU); the outputs as a list."""
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
  return list(pl.pallas_call(
      kernel, grid=(r,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
      compiler_params=compiler_params, interpret=interpret, name=name)(*args))


def _add_ranges(ranges: Ranges | None, r: int, heads: int, in_specs: list, args: list,
                out_shapes: list, out_specs: list) -> None:
  """Appends the ranges' inputs (per batch entry) and outputs (bounds [R, 2], limits
  [R, 2^k], per row) to a prologue call's lists; nothing for ranges None."""
  if ranges is None:
    return
  b, window = r // heads, ranges.window_positions.shape[1]
  row = lambda i: (i, 0)  # noqa: E731
  entry = lambda i: (i // heads, 0)  # noqa: E731
  for name, x in (("lengths", ranges.lengths), ("position", ranges.position)):
    if x.shape != (b,):
      raise ValueError(f"ranges.{name} must be [{b}], got {list(x.shape)}")
  if ranges.window_positions.shape[0] != b:
    raise ValueError(f"ranges.window_positions must be [{b}, W], got "
                     f"{list(ranges.window_positions.shape)}")
  in_specs += [pl.BlockSpec((None, 1), entry)] * 2
  args += [ranges.lengths.astype(jnp.int32).reshape(b, 1),
           ranges.position.astype(jnp.int32).reshape(b, 1)]
  if window:
    in_specs.append(pl.BlockSpec((None, window), entry))
    args.append(ranges.window_positions.astype(jnp.int32))
  width = pow2_at_least(1 + 2 * ((window > 0) + (ranges.sink_slots > 0)))
  out_shapes += [jax.ShapeDtypeStruct((r, 2), jnp.int32),
                 jax.ShapeDtypeStruct((r, width), jnp.int32)]
  out_specs += [pl.BlockSpec((None, 2), row), pl.BlockSpec((None, width), row)]


PARTS = ("rows", "repeat", "packed", "none")


def decode_prologue(q: Array, unrotation: Array | None, *, heads: int,
                    key_groups: tuple[KeyGroup, ...], key_mean: Array | None = None,
                    ranges: Ranges | None = None, rotated: Array | None = None,
                    parts: str = "rows", interpret: bool = False,
                    num_warps: int = 4) -> Prologue:
  """The int8 decode kernel's per-row inputs in one launch (`Prologue`).

  Args:
    q: float [R, n, D], each kv head's query rows (q heads x query tokens, zeros past the
      real ones), unrotated, in the key quantizer's channel order; n = 8 for parts
      "rows", 4 otherwise.
    unrotation: float32 [D, D]: the rotated query is q @ unrotation^T (the key quantizer's
      `unrotation_matrix`: its groups' rotations side by side); None with `rotated`.
    heads: kv heads per batch entry (R = B x heads).
    key_groups: the key channel groups (`KeyGroup`), in order, covering D.
    key_mean: float32 [R, D] in q's channel order, or None: qoff = q·μ per head.
    ranges: `Ranges` (per batch entry), or None: no bounds or limits.
    rotated: float32 [R, n, D], q @ unrotation^T made by the caller (an XLA gemm), or
      None: the kernel rotates q itself by Triton's dot (float32 FMAs, rows [D, 8]: 8.5-9.8
      us in the H200 decode step, 2.0-2.4 without it; the gemm before it costs as much,
      `kernel_attention.PROLOGUE_ROTATIONS`). With it q is read only for q·μ.
    parts: the layout of the outputs (without `rotated`: "rows" only): "rows", as q's
      rows; "repeat", q's 4 rows then the same 4 again (the Mosaic kernel's
      `pack_p_parts`), scale, offsets and q·μ likewise; "packed", that and the int8
      parts as one operand, q [R, 1, 8, D] = [high parts of rows 0-3 | low parts of the
      same rows] (`pack_q_parts`); "none", no parts at all (q, scale and key_offsets
      None; unrotation and rotated unused): q·μ of q's 8 rows and the ranges, for the
      Mosaic kernel that rotates the query itself (`decode_partials(q_rotation=)`).
  """
  if parts not in PARTS:
    raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
  if parts == "none":
    return _offsets_only(q, heads=heads, key_mean=key_mean, ranges=ranges,
                         interpret=interpret, num_warps=num_warps)
  dot = rotated is None
  if dot and parts != "rows":
    raise ValueError(f"parts={parts!r} needs the query rotated by the caller (rotated)")
  n = HEADS if parts == "rows" else HEADS // 2
  r, rows, d = q.shape
  if rows != n:
    raise ValueError(f"q must hold {n} rows per kv head (zero padded) for parts={parts!r}, "
                     f"got {q.shape}")
  if r % heads:
    raise ValueError(f"{r} rows do not split into batch entries of {heads} heads")
  if rotated is None and (unrotation is None or unrotation.shape != (d, d)):
    raise ValueError(f"unrotation must be [{d}, {d}], got "
                     f"{None if unrotation is None else list(unrotation.shape)}")
  if rotated is not None and rotated.shape != q.shape:
    raise ValueError(f"rotated must be {list(q.shape)} as q, got {list(rotated.shape)}")
  if sum(g.cols for g in key_groups) != d or any(
      g.start != sum(x.cols for x in key_groups[:i]) for i, g in enumerate(key_groups)):
    raise ValueError(f"key groups {key_groups} must cover the {d} channels in order")
  window = 0 if ranges is None else ranges.window_positions.shape[1]
  why = unsupported(d, key_groups, window)
  if why is not None:
    raise ValueError(f"decode_prologue cannot take this call: {why}")
  row = lambda i: (i, 0)  # noqa: E731
  rows_spec = pl.BlockSpec((None, n, d), lambda i: (i, 0, 0))
  if dot:
    in_specs = [rows_spec, pl.BlockSpec((d, d), lambda i: (0, 0))]
    args = [q.astype(jnp.float32), unrotation.astype(jnp.float32)]
  else:   # q in its own dtype, read for q·μ only (a bfloat16 q stays one XLA operand)
    in_specs, args = [rows_spec], [rotated.astype(jnp.float32)]
    if key_mean is not None:
      in_specs.append(rows_spec)
      args.append(q)
  if key_mean is not None:
    if key_mean.shape != (r, d):
      raise ValueError(f"key_mean must be [{r}, {d}], got {list(key_mean.shape)}")
    in_specs.append(pl.BlockSpec((None, d), row))
    args.append(key_mean.astype(jnp.float32))
  # Per row: "rows" [n]; "repeat" and "packed" [2, n] (reshaped to [8] below).
  head = (HEADS,) if parts == "rows" else (2, n)
  at = lambda k: lambda i: (i,) + (0,) * k  # noqa: E731
  q8_block = {"rows": (2, HEADS, d), "repeat": (2, 2, n, d), "packed": (2, n, d)}[parts]
  out_shapes = [jax.ShapeDtypeStruct((r, *q8_block), jnp.int8),
                jax.ShapeDtypeStruct((r, *head), jnp.float32),
                jax.ShapeDtypeStruct((r, *head), jnp.float32)]
  out_specs = [pl.BlockSpec((None, *q8_block), at(len(q8_block))),
               pl.BlockSpec((None, *head), at(len(head))),
               pl.BlockSpec((None, *head), at(len(head)))]
  has_koff = any(g.offset for g in key_groups)
  if has_koff:
    gk = len(key_groups)
    out_shapes.append(jax.ShapeDtypeStruct((r, gk, *head), jnp.float32))
    out_specs.append(pl.BlockSpec((None, gk, *head), at(1 + len(head))))
  _add_ranges(ranges, r, heads, in_specs, args, out_shapes, out_specs)
  common = dict(key_groups=tuple(key_groups), has_mean=key_mean is not None,
                has_ranges=ranges is not None, window=window,
                sink_slots=0 if ranges is None else ranges.sink_slots,
                num_sinks=0 if ranges is None else ranges.num_sinks,
                sliding_window=None if ranges is None else ranges.sliding_window)
  if dot:
    kernel = functools.partial(_kernel, **common)
  else:
    kernel = functools.partial(_kernel_rotated, **common, parts=parts)
  outs = _launch(kernel, r, in_specs, out_specs, out_shapes, args, interpret=interpret,
                 num_warps=num_warps, name="turboquant_decode_prologue")
  q8, scale, qoff = outs[:3]
  outs = outs[3:]
  koff = outs.pop(0) if has_koff else None
  bounds, limits = (outs.pop(0), outs.pop(0)) if ranges is not None else (None, None)
  if parts != "rows":   # contiguous: reshapes, no copies
    q8 = q8.reshape(r, 2 if parts == "repeat" else 1, HEADS, d)
    scale, qoff = scale.reshape(r, HEADS), qoff.reshape(r, HEADS)
    koff = None if koff is None else koff.reshape(r, -1, HEADS)
  return Prologue(q8, scale, koff, qoff, bounds, limits)


def _offsets_only(q: Array, *, heads: int, key_mean: Array | None, ranges: Ranges | None,
                  interpret: bool, num_warps: int) -> Prologue:
  """`decode_prologue(parts="none")`: one program per row, q·μ and the ranges."""
  r, rows, d = q.shape
  if rows != HEADS:
    raise ValueError(f"q must hold {HEADS} rows per kv head for parts='none', got {q.shape}")
  if r % heads:
    raise ValueError(f"{r} rows do not split into batch entries of {heads} heads")
  window = 0 if ranges is None else ranges.window_positions.shape[1]
  why = unsupported(d, (KeyGroup(0, d, 0.0),), window)
  if why is not None:
    raise ValueError(f"decode_prologue cannot take this call: {why}")
  row = lambda i: (i, 0)  # noqa: E731
  in_specs, args = [], []
  if key_mean is not None:
    if key_mean.shape != (r, d):
      raise ValueError(f"key_mean must be [{r}, {d}], got {list(key_mean.shape)}")
    in_specs += [pl.BlockSpec((None, rows, d), lambda i: (i, 0, 0)),
                 pl.BlockSpec((None, d), row)]
    args += [q, key_mean.astype(jnp.float32)]
  out_shapes = [jax.ShapeDtypeStruct((r, HEADS), jnp.float32)]
  out_specs = [pl.BlockSpec((None, HEADS), row)]
  _add_ranges(ranges, r, heads, in_specs, args, out_shapes, out_specs)
  kernel = functools.partial(
      _kernel_offsets, has_mean=key_mean is not None, has_ranges=ranges is not None,
      window=window, sink_slots=0 if ranges is None else ranges.sink_slots,
      num_sinks=0 if ranges is None else ranges.num_sinks,
      sliding_window=None if ranges is None else ranges.sliding_window)
  outs = _launch(kernel, r, in_specs, out_specs, out_shapes, args, interpret=interpret,
                 num_warps=num_warps, name="turboquant_decode_offsets")
  qoff = outs.pop(0)
  bounds, limits = (outs.pop(0), outs.pop(0)) if ranges is not None else (None, None)
  return Prologue(None, None, None, qoff, bounds, limits)


def decode_prologue_reference(q: Array, unrotation: Array | None, *, heads: int,
                              key_groups: tuple[KeyGroup, ...],
                              key_mean: Array | None = None, ranges: Ranges | None = None,
                              rotated: Array | None = None, parts: str = "rows",
                              **unused) -> Prologue:
  """`decode_prologue` in plain jnp: the ground truth of the tests."""
  del unused
  qf = q.astype(jnp.float32)
  q8 = scale = koff = None
  if parts != "none":
    x = (jnp.einsum("rmd,ed->rme", qf, unrotation.astype(jnp.float32), precision=_HIGHEST)
         if rotated is None else rotated.astype(jnp.float32))
    if parts != "rows":   # rows 4-7 repeat rows 0-3
      qf, x = (jnp.concatenate([a, a], axis=1) for a in (qf, x))
    hi, lo, scale = quantize_rotated(x)
    q8 = jnp.stack([hi, lo], axis=1).astype(jnp.int8)
    if parts == "packed":
      q8 = jnp.concatenate([q8[:, 0, :HEADS // 2], q8[:, 1, HEADS // 2:]], axis=1)[:, None]
    if any(g.offset for g in key_groups):
      units = hi + lo / 127.0
      koff = jnp.stack([g.offset * units[..., g.start:g.start + g.cols].sum(-1)
                        for g in key_groups], axis=1)
  qoff = (jnp.zeros(qf.shape[:2], jnp.float32) if key_mean is None else
          jnp.einsum("rmd,rd->rm", qf, key_mean.astype(jnp.float32), precision=_HIGHEST))
  bounds = limits = None
  if ranges is not None:
    bounds, limits = (jnp.repeat(x, heads, axis=0) for x in ranges_reference(ranges))
  return Prologue(q8, scale, koff, qoff, bounds, limits)
