"""Fused decode attention over TurboQuant codes: a Pallas kernel (Triton lowering).

One program handles one (sequence, kv head, split of the sequence): FlashDecoding split-K,
so one long sequence still fills the GPU. All q heads of the kv head (times the query
tokens) are the rows of one tile, so each block of codes is read once (GQA). Per block of
`block_k` tokens the kernel

1. loads the packed key planes and unpacks them in registers into one natural-order
   [block_k, d_g] tile per channel group (one broadcast shift and mask per plane, see
   `turboquant_jax.packing`), decodes the sign-magnitude codes with a ladder over the
   2^(b-1) Lloyd-Max magnitudes and one sign flip,
2. scores the tile against the rotated query (plus the QJL term against the sketched
   query for "prod" keys), times the norms, plus the key-centering offset: q·μ, or
   q·R(t)·μ for keys centred before RoPE (one sine and cosine per block),
3. keeps an online softmax in float32 and accumulates the values' decoded tiles, weighted
   by probability × norm, in each group's rotated domain.

`decode_partials` takes arrays and static specs and returns the splits' partial results
(o, l, m); `turboquant_jax.kernel_attention` prepares them from a cache, merges them with
the exact window and sinks (one more partial of the same softmax) and rotates each
group's output back once, and holds the jnp reference of the same partials.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from turboquant_jax import packing
from turboquant_jax.quantizers import MSEQuantizer, ProdCodes

Array = jax.Array

_NEG = -1e30  # finite "minus infinity": exp(_NEG - x) is 0 with no inf arithmetic
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """What the kernel must know, statically, about one channel group's codes."""

  dim: int
  bits: int                      # bits of the MSE codes (0: none, prod at 1 bit)
  magnitudes: tuple[float, ...]  # the 2^(bits-1) Lloyd-Max magnitudes, increasing
  qjl_dim: int = 0               # sketch rows (0: no QJL term)
  # The polynomial through (m, magnitudes[m]), highest power first: float32 Horner in m
  # reproduces the magnitudes to ~5e-7 relative (checked in the tests).
  poly: tuple[float, ...] = ()

  @property
  def plane_widths(self) -> tuple[int, ...]:
    return packing.plane_widths(self.bits)

  @property
  def qjl_scale(self) -> float:
    return math.sqrt(math.pi / 2) / self.qjl_dim if self.qjl_dim else 0.0


def group_specs(split_quantizer) -> tuple[GroupSpec, ...]:
  specs = []
  for g in split_quantizer.groups:
    mse: MSEQuantizer = g if isinstance(g, MSEQuantizer) else g.mse
    half = (1 << mse.bits) // 2
    # Static floats baked into the kernel: they come from the cached numpy codebook.
    mags = tuple(float(x) for x in mse.static_codebook().centroids[
        half:]) if mse.bits else ()
    specs.append(GroupSpec(dim=mse.dim, bits=mse.bits, magnitudes=mags,
                           qjl_dim=0 if g is mse else g.sketch_dim,
                           poly=magnitude_polynomial(mags) if mse.bits <= 4 else ()))
  return tuple(specs)


def magnitude_polynomial(magnitudes: tuple[float, ...]) -> tuple[float, ...]:
  """Coefficients (highest power first) of the polynomial through (m, magnitudes[m])."""
  if len(magnitudes) <= 1:
    return tuple(magnitudes)
  m = np.arange(len(magnitudes), dtype=np.float64)
  return tuple(float(c) for c in np.polyfit(m, np.asarray(magnitudes), len(magnitudes) - 1))


# -- the kernel ---------------------------------------------------------------------------

def _unpack_plane(b: Array, w: int) -> Array:
  """[T, R] bytes -> [T, R·8/w] int32 codes, natural order."""
  k = 8 // w
  shifts = jax.lax.broadcasted_iota(jnp.int32, (1, 1, k), 2) * w
  codes = (b.astype(jnp.int32)[:, :, None] >> shifts) & ((1 << w) - 1)
  return codes.reshape(b.shape[0], b.shape[1] * k)


def _decode_tile(plane_refs, rows, spec: GroupSpec, decode: str) -> Array:
  """Decoded Lloyd-Max levels (no norm) of one block: [block_k, dim] float32.

  decode="poly": Horner in the magnitude index, 2^(b-1) - 1 FMAs, then the sign;
  decode="ladder": 2^(b-1) - 1 compare-and-selects, then the sign;
  decode="auto": poly at 4 bits, ladder else (H100, batch 8, 32K tokens: 4 bits 0.76 vs
  1.0 ms, 3 bits 0.61 vs 0.59, 2 bits 0.47 vs 0.42; benchmarks/results).
  """
  if decode == "auto":
    decode = "poly" if spec.bits == 4 else "ladder"
  if decode == "poly" and spec.bits > 4:   # a degree-15 fit would not hold in float32
    raise ValueError(f"decode='poly' serves up to 4 bits, got {spec.bits}")
  code, shift = None, 0
  for ref, w in zip(plane_refs, spec.plane_widths):
    c = _unpack_plane(ref[rows, :], w)
    code = c if code is None else code | (c << shift)
    shift += w
  half = 1 << (spec.bits - 1)
  magnitude = code & (half - 1)
  if decode == "poly":
    m = magnitude.astype(jnp.float32)
    value = jnp.zeros(code.shape, jnp.float32) + spec.poly[0]
    for coefficient in spec.poly[1:]:
      value = value * m + coefficient
    sign = ((code >> (spec.bits - 1)) * 2 - 1).astype(jnp.float32)
    return value * sign
  value = jnp.zeros(code.shape, jnp.float32) + spec.magnitudes[0]
  for j in range(1, half):
    value = jnp.where(magnitude == j, spec.magnitudes[j], value)
  return jnp.where(code >= half, value, -value)


def _unpack_signs(sign_ref, rows) -> Array:
  return (_unpack_plane(sign_ref[rows, :], 1) * 2 - 1).astype(jnp.float32)


def code_scores(q, qs, planes, norm_ref, sign_ref, rnorm_ref, rows, spec: GroupSpec,
                decode: str, compute_dtype) -> Array:
  """[Q, block] estimated <q, x> of one block of one channel group's codes: the decoded
  levels times the norms, plus the QJL term (sketched queries qs · signs) for "prod"
  codes. Shared by this kernel and the index's scoring kernel."""
  block = rows.size
  scores = jnp.zeros((q.shape[0], block), jnp.float32)
  if spec.bits:
    tile = _decode_tile(planes, rows, spec, decode).astype(compute_dtype)
    s = jnp.dot(q, tile.T, preferred_element_type=jnp.float32)
    scores += s * norm_ref[rows].astype(jnp.float32)[None, :]
  if spec.qjl_dim:
    signs = _unpack_signs(sign_ref, rows).astype(compute_dtype)
    s = jnp.dot(qs, signs.T, preferred_element_type=jnp.float32)
    scores += s * (spec.qjl_scale * rnorm_ref[rows].astype(jnp.float32))[None, :]
  return scores


def _decode_kernel(*refs, key_specs, value_specs, split_len, block_k, scale, soft_cap,
                   sliding_window, compute_dtype, num_aliased, decode, rope):
  refs = list(refs)
  lo_ref, hi_ref = refs.pop(0), refs.pop(0)   # [] compressed range [lo, hi) of this row
  qpos_ref = refs.pop(0)                       # [M] query positions (-1: padding row)
  qoff_ref = refs.pop(0)                       # [M] q·μ, added to every compressed score
  if rope:  # keys centred before RoPE: q·R(t)·μ per token (`rope_offset_inputs`)
    coef_a_ref, coef_b_ref = refs.pop(0), refs.pop(0)        # [M, D/2] each
    freq_ref = refs.pop(0)                                   # [D/2]
    cos_ref, sin_ref = refs.pop(0), refs.pop(0)              # [D/2, split] each
  keys = []
  for spec in key_specs:
    q_ref = refs.pop(0)                        # [M, dim] rotated query
    qs_ref = refs.pop(0) if spec.qjl_dim else None            # [M, qjl_dim] sketched query
    planes = [refs.pop(0) for _ in spec.plane_widths]         # [split_len, dim·w/8] each
    norm_ref = refs.pop(0) if spec.bits else None             # [split_len]
    sign_ref = refs.pop(0) if spec.qjl_dim else None          # [split_len, qjl_dim/8]
    rnorm_ref = refs.pop(0) if spec.qjl_dim else None         # [split_len]
    keys.append((spec, q_ref, qs_ref, planes, norm_ref, sign_ref, rnorm_ref))
  values = []
  for spec in value_specs:
    planes = [refs.pop(0) for _ in spec.plane_widths]         # [split_len, dim·w/8] each
    values.append((spec, planes, refs.pop(0)))                # norms [split_len]
  del refs[:num_aliased]                       # poisoned output buffers, aliased below
  o_refs = [refs.pop(0) for _ in value_specs]  # [M, dim] each, rotated domain
  l_ref, m_ref = refs                          # [M], [M]

  base = pl.program_id(0) * split_len
  lo = jnp.maximum(lo_ref[...], base)
  hi = jnp.minimum(hi_ref[...], base + split_len)
  qpos = qpos_ref[...]
  qoff = qoff_ref[...]
  rows_q = qpos.shape[0]
  if rope:
    coef_a, coef_b = coef_a_ref[...], coef_b_ref[...]
    freq = freq_ref[...]
    split = cos_ref.shape[-1]
  queries = [(q_ref[...].astype(compute_dtype),
              None if qs_ref is None else qs_ref[...].astype(compute_dtype))
             for _, q_ref, qs_ref, *_ in keys]

  def body(i, carry):
    outs, m_prev, l_prev = carry
    rows = pl.ds(i * block_k, block_k)
    scores = jnp.zeros((rows_q, block_k), jnp.float32)
    for (spec, _, _, planes, norm_ref, sign_ref, rnorm_ref), (q, qs) in zip(keys, queries):
      scores += code_scores(q, qs, planes, norm_ref, sign_ref, rnorm_ref, rows, spec,
                            decode, compute_dtype)
    if rope:
      # The block lies in one run h..h+split-1: one sine and cosine of the angle at h and
      # the tables at l < split: q·R(h)·R(l)·μ = (A·cθ + B·sθ)·cos φ_l + (B·cθ - A·sθ)·sin φ_l.
      start = base + i * block_k
      angle = freq * (start - start % split).astype(jnp.float32)
      c, s_ = jnp.cos(angle)[None, :], jnp.sin(angle)[None, :]
      cols = (slice(None), pl.ds(start % split, block_k))
      scores += (jnp.dot(coef_a * c + coef_b * s_, cos_ref[cols],
                         preferred_element_type=jnp.float32, precision=_HIGHEST)
                 + jnp.dot(coef_b * c - coef_a * s_, sin_ref[cols],
                           preferred_element_type=jnp.float32, precision=_HIGHEST))
    scores = (scores + qoff[:, None]) * scale
    if soft_cap is not None:
      scores = soft_cap * jnp.tanh(scores / soft_cap)
    idx = base + i * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    mask = (idx >= lo) & (idx < hi) & (idx <= qpos[:, None])
    if sliding_window is not None:
      mask &= qpos[:, None] - idx < sliding_window
    scores = jnp.where(mask, scores, _NEG)
    m_next = jnp.maximum(m_prev, scores.max(axis=-1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.where(mask, jnp.exp(scores - m_next[:, None]), 0.0)
    l_next = correction * l_prev + p.sum(axis=-1)
    new_outs = []
    for (spec, planes, norm_ref), o in zip(values, outs):
      tile = _decode_tile(planes, rows, spec, decode).astype(compute_dtype)
      pv = (p * norm_ref[rows].astype(jnp.float32)[None, :]).astype(compute_dtype)
      new_outs.append(correction[:, None] * o
                      + jnp.dot(pv, tile, preferred_element_type=jnp.float32))
    return tuple(new_outs), m_next, l_next

  first = jnp.maximum(lo - base, 0) // block_k
  last = jnp.maximum(pl.cdiv(hi - base, block_k), first)
  init = (tuple(jnp.zeros((rows_q, spec.dim), jnp.float32) for spec in value_specs),
          jnp.full((rows_q,), _NEG, jnp.float32), jnp.zeros((rows_q,), jnp.float32))
  outs, m, l = jax.lax.fori_loop(first, last, body, init)
  for o_ref, o in zip(o_refs, outs):
    o_ref[...] = o
  l_ref[...] = l
  m_ref[...] = m


# -- wrappers -----------------------------------------------------------------------------

def _flatten_inputs(key_specs, value_specs, q_parts, key_codes, value_codes):
  """The kernel's operands after the four row inputs, in the order it pops them.

  Returns a list of (array, has_token_axis) pairs; arrays with a token axis are split
  across the programs, the others (queries) are whole in each.
  """
  ops = []  # (array, has_token_axis)
  for spec, (q_rot, q_sketch), codes in zip(key_specs, q_parts, key_codes):
    ops.append((q_rot, False))
    if spec.qjl_dim:
      ops.append((q_sketch, False))
    mse = codes.mse if isinstance(codes, ProdCodes) else codes
    if spec.bits:
      ops += [(p, True) for p in mse.planes] + [(mse.norms, True)]
    if spec.qjl_dim:
      ops += [(codes.signs, True), (codes.residual_norms, True)]
  for codes in value_codes:
    ops += [(p, True) for p in codes.planes] + [(codes.norms, True)]
  return ops


def _unbatched(lo, hi, qpos, qoff, *operands, key_specs, value_specs, has_token_axis,
               num_splits, block_k, scale, soft_cap, sliding_window, compute_dtype,
               num_warps, num_stages, interpret, poison, decode, rope):
  """One (sequence, kv head): operands with a token axis are [L, ...]."""
  rows_q = qpos.shape[0]
  length = next(x.shape[0] for x, t in zip(operands, has_token_axis) if t)
  split_len = length // num_splits
  in_specs = [pl.BlockSpec((), lambda j: ()), pl.BlockSpec((), lambda j: ()),
              pl.BlockSpec((rows_q,), lambda j: (0,)), pl.BlockSpec((rows_q,), lambda j: (0,))]
  args = [lo, hi, qpos, qoff]
  for x, token_axis in zip(operands, has_token_axis):
    if token_axis:
      x = x.reshape(num_splits, split_len, *x.shape[1:])
      in_specs.append(pl.BlockSpec((None, split_len, *x.shape[2:]),
                                   lambda j, n=x.ndim - 1: (j,) + (0,) * n))
    else:
      in_specs.append(pl.BlockSpec(x.shape, lambda j, n=x.ndim: (0,) * n))
    args.append(x)
  out_shape = [jax.ShapeDtypeStruct((num_splits, rows_q, s.dim), jnp.float32)
               for s in value_specs]
  out_shape += [jax.ShapeDtypeStruct((num_splits, rows_q), jnp.float32)] * 2
  out_specs = [pl.BlockSpec((None, rows_q, s.dim), lambda j: (j, 0, 0)) for s in value_specs]
  out_specs += [pl.BlockSpec((None, rows_q), lambda j: (j, 0))] * 2
  aliases = {}
  if poison:
    # Outputs start as NaN: an element the kernel fails to write fails the tests.
    for i, (shape, spec) in enumerate(zip(out_shape, out_specs)):
      aliases[len(args)] = i
      args.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
      in_specs.append(spec)
  kernel = functools.partial(
      _decode_kernel, key_specs=key_specs, value_specs=value_specs, split_len=split_len,
      block_k=block_k, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
      compute_dtype=compute_dtype, num_aliased=len(aliases), decode=decode, rope=rope)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(
      kernel, grid=(num_splits,), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases, compiler_params=compiler_params,
      interpret=interpret, name="turboquant_decode")(*args)


def _pad_rows(x: Array, rows: int, value) -> Array:
  pad = rows - x.shape[2]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[2] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def choose_blocks(max_len: int, batch_heads: int, block_k: int | None = None,
                  num_splits: int | None = None, target_programs: int = 1024) -> tuple[int, int]:
  """(block_k, num_splits) that tile max_len: powers of two, splits filling the GPU."""
  if block_k is None:
    block_k = next((b for b in (64, 32, 16) if max_len % b == 0), None)
    if block_k is None:
      raise ValueError(f"the Pallas kernel needs max_len divisible by 16, got {max_len}")
  if max_len % block_k:
    raise ValueError(f"max_len {max_len} is not a multiple of block_k {block_k}")
  blocks = max_len // block_k
  # num_splits, if given, is a cap: the largest power of two under it that tiles max_len.
  cap = num_splits or max(1, target_programs // batch_heads)
  num_splits = 1
  while num_splits * 2 <= min(cap, blocks) and blocks % (num_splits * 2) == 0:
    num_splits *= 2
  return block_k, num_splits


def decode_partials(lo: Array, hi: Array, q_positions: Array, qoff: Array, q_parts,
                    key_codes, value_codes, *, key_specs, value_specs, rope_inputs=(),
                    scale: float, soft_cap: float | None = None,
                    sliding_window: int | None = None, block_k: int, num_splits: int,
                    num_warps: int = 4, num_stages: int = 2, compute_dtype=jnp.bfloat16,
                    interpret: bool = False, poison: bool = False, decode: str = "auto"):
  """Split-K partial softmax results over the compressed tokens, from the kernel.

  Args:
    lo, hi: [B, H] int32, the compressed range [lo, hi) of each (sequence, kv head).
    q_positions: [B, H, M] position of each query row (-1: a row that sees nothing).
    qoff: [B, H, M] float32, added to every compressed score (plain key centering).
    q_parts: per key group (rotated queries [B, H, M, d_g], sketched queries or None).
    key_codes, value_codes: per channel group, the codes with leaves [B, H, L, ...].
    key_specs, value_specs: `group_specs` of the quantizers (static).
    rope_inputs: the five arrays of `kernel_attention.rope_offset_inputs` when keys are
      centred before RoPE, else ().
    block_k, num_splits: tokens per block and splits of L (`choose_blocks`).

  Returns:
    (o, l, m): o a tuple with one [B, H, splits, M, d_g] per value group (rotated,
    unnormalised), l and m [B, H, splits, M].
  """
  b, h, rows = q_positions.shape
  rows_pad = max(16, 1 << (rows - 1).bit_length())
  pad = lambda x, v: _pad_rows(x, rows_pad, v)  # noqa: E731
  q_parts = [(pad(a, 0.0).astype(compute_dtype),
              None if s is None else pad(s, 0.0).astype(compute_dtype)) for a, s in q_parts]
  rope = bool(rope_inputs)
  if rope and rope_inputs[3].shape[-1] % block_k:
    raise ValueError(f"keys centred before RoPE need block_k dividing the tables' "
                     f"{rope_inputs[3].shape[-1]} offsets, got {block_k}")
  ops = [(pad(x, 0.0) if i < 2 else x, False) for i, x in enumerate(rope_inputs)]
  ops += _flatten_inputs(key_specs, value_specs, q_parts, key_codes, value_codes)
  fn = functools.partial(
      _unbatched, key_specs=key_specs, value_specs=value_specs,
      has_token_axis=tuple(t for _, t in ops), num_splits=num_splits, block_k=block_k,
      scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
      compute_dtype=compute_dtype, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret, poison=poison, decode=decode, rope=rope)
  qpos = jnp.pad(q_positions, ((0, 0), (0, 0), (0, rows_pad - rows)), constant_values=-1)
  outs = jax.vmap(jax.vmap(fn))(lo, hi, qpos.astype(jnp.int32), pad(qoff, 0.0),
                                *(x for x, _ in ops))
  *o, l, m = outs
  return tuple(x[:, :, :, :rows] for x in o), l[..., :rows], m[..., :rows]
