"""A decode step's epilogue in one kernel: exact tokens, split merge, inverse rotation.

After the split-K kernel over the compressed tokens (`decode_attention_mgpu`) a decode step
still attends over the tokens the cache keeps exact (the window ring and the sinks),
merges them with the splits' partial softmax results in one softmax, rotates the
compressed share back from the value quantizer's domain, adds the value mean's share and
normalises. In jnp that is about twenty small XLA kernels per layer, five of them f32
matmuls, which at short contexts cost more device time and launches than the attention
kernel; here it is one Pallas (Triton) program per kv-head row.

The partials arrive as the Mosaic kernel writes them, transposed (channel rows, query-row
columns), so every product here is oriented [*, M] and nothing is transposed in HBM.
Products run in float32 (IEEE): the exact tokens stay exact, as in the jnp merge.
(bfloat16 products ran 2.5x faster on the H200 but were wrong there, 0.46 relative
error against 2e-3 in interpret mode: Triton's tensor-core path with 8-column operands is
not to be trusted here; see `mosaic_attend_splits_gpu.json`.)

Measured (H200, 8 kv-head rows x 8, 32 splits, `benchmarks/mosaic_attend.py`): 23-25 us,
against 35-44 us for the jnp merge compiled by XLA; inside the whole attention the two tie
(+-5%), so `kernel_attention.attend` keeps the jnp merge unless asked (fused_merge=True).
Channel groups (fractional widths) take a block-diagonal unrotation and each row's value
order (`value_perm`, applied as a one-hot product); at 3.5 bits, 8 x 4K, the kernel took
31 us of a 91 us attention and tied the jnp merge again (0.0914 vs 0.0908 ms,
`mosaic_attend_merge_groups_gpu.json`): its float32 products' latency bounds it.
With the exact tokens attended by the Mosaic kernel (its last splits, merged here as
`unrotated_splits`, no exact parts) it is slower still: 64-87 us for 12-36 splits of 8 or
64 rows, where XLA merges the same partials in 3-4 us (`decode_prologue_gpu.json`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import tile_quantize
from pallas_kernels.decode_prologue import is_pow2 as _pow2

Array = jax.Array

_NEG = -1e30            # finite "minus infinity": exp(_NEG - x) is 0 with no inf arithmetic
HIDDEN = 2**30          # an exact slot's position when no query may see it
_HIGHEST = jax.lax.Precision.HIGHEST
_NN = (((1,), (0,)), ((), ()))     # [a, k] x [k, b]
_TN = (((0,), (0,)), ((), ()))     # [k, a] x [k, b] -> [a, b]
_NT = (((1,), (1,)), ((), ()))     # [a, k] x [b, k] -> [a, b]


# Shared memory beside the [D, D] unrotation: H200, head_dim 256, Triton asked for 270,336
# bytes (4·256² + 8,192) and the launch failed (`kernel_sweep_gemma3_270m_k4v3_quintic_gpu
# .json`).
SCRATCH_BYTES = 8192


def unsupported(rows: int, head_dim: int, exact_sizes: tuple[int, ...],
                rotated: bool = True) -> str | None:
  """Why the kernel cannot merge this call (None: it can). Triton tensors have
  power-of-two sizes: the query rows (padded up by the caller), head_dim and every exact
  part's slot count; and a program holds the float32 [head_dim, head_dim] unrotation in
  shared memory (head_dim 256, Gemma 3's, does not fit) unless the partials need none
  (rotated=False: values the decoder rotated, `TurboQuantConfig.values_prerotated`) and
  the call has no exact parts (the Mosaic kernel attended them)."""
  if not _pow2(head_dim):
    return f"head_dim {head_dim} is not a power of two"
  for n in exact_sizes:
    if not _pow2(n):
      return f"an exact part of {n} slots (window or sinks) is not a power of two"
  if rows > 128:
    return f"{rows} query rows per kv head is more than 128"
  need = 4 * head_dim * head_dim + SCRATCH_BYTES
  # Without the unrotation the exact parts' float32 operands are as large (window 256):
  # only a call with neither is known to fit at 256 (H200, `kernel_sweep_*_prerotated`).
  if (rotated or exact_sizes) and need > tile_quantize.SHARED_MEMORY_BYTES:
    what = "unrotation" if rotated else "exact parts' operands"
    return (f"the float32 [{head_dim}, {head_dim}] {what} take {need} bytes of shared "
            f"memory, more than a GPU block's {tile_quantize.SHARED_MEMORY_BYTES}")
  return None


def _split_chunk(splits: int) -> int:
  """Splits reduced per vector load: the largest power of two dividing `splits`, <= 8
  (one load of many splits keeps many in flight; a loop of single splits waits on each)."""
  c = 1
  while c < 8 and splits % (2 * c) == 0:
    c *= 2
  return c


def _unrolled(n, body, init):
  for i in range(n):
    init = body(i, init)
  return init


def _kernel(*refs, num_parts, num_splits, unrotated_splits, scale, soft_cap, sliding_window,
            has_mean, has_perm, has_rotation):
  q_ref, o_ref, l_ref, m_ref, qpos_ref = refs[:5]
  rest = list(refs[5:])
  rot_ref = rest.pop(0) if has_rotation else None
  parts = [rest[3 * i: 3 * i + 3] for i in range(num_parts)]
  rest = rest[3 * num_parts:]
  mean_ref = rest.pop(0) if has_mean else None
  perm_ref = rest.pop(0) if has_perm else None
  out_ref = rest[-1]
  d = o_ref.shape[1]

  def dot(a, b, dims):
    return jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                               precision=_HIGHEST, preferred_element_type=jnp.float32)

  q = q_ref[...]
  qpos = qpos_ref[...]
  rows = q.shape[0]

  def over_splits(first, count, body, init):
    """body(rows of a chunk of splits, carry) over splits [first, first + count)."""
    chunk = _split_chunk(count)
    steps = count // chunk
    split_rows = lambda i: pl.ds(first + i * chunk, chunk)  # noqa: E731
    # A few chunks unroll (straight-line loads the compiler can issue together); many loop.
    if steps <= 8:
      return _unrolled(steps, lambda i, c: body(split_rows(i), c), init)
    return jax.lax.fori_loop(0, steps, lambda i, c: body(split_rows(i), c), init)

  m_all = over_splits(0, num_splits, lambda sr, m: jnp.maximum(m, m_ref[sr, :].max(axis=0)),
                      jnp.full((rows,), _NEG, jnp.float32))

  # Scores of the exact parts, transposed: [n, M].
  scored = []
  for k_ref, v_ref, pos_ref in parts:
    s = dot(k_ref[...], q, _NT) * scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    kpos = pos_ref[...][:, None]
    mask = kpos <= qpos[None, :]
    if sliding_window is not None:
      mask &= qpos[None, :] - kpos < sliding_window
    s = jnp.where(mask, s, _NEG)
    m_all = jnp.maximum(m_all, s.max(axis=0))
    scored.append((s, mask, v_ref))

  # The splits' partials at the common maximum: acc [D, M] in the rotated domain.
  def add_chunk(sr, carry):
    acc, l_c = carry
    w = jnp.exp(m_ref[sr, :] - m_all[None, :])                    # [chunk, M]
    return (acc + (o_ref[sr, :, :] * w[:, None, :]).sum(axis=0),
            l_c + (l_ref[sr, :] * w).sum(axis=0))

  zeros = (jnp.zeros((d, rows), jnp.float32), jnp.zeros((rows,), jnp.float32))
  acc, l_total = over_splits(0, num_splits - unrotated_splits, add_chunk, zeros)
  out = dot(rot_ref[...], acc, _TN) if has_rotation else acc   # rotated back
  if has_perm:   # rotated channel i is output channel perm[i]: a one-hot product
    perm = perm_ref[...]
    onehot = (perm[:, None] == jax.lax.broadcasted_iota(jnp.int32, (d, d), 1))
    out = dot(onehot.astype(jnp.float32), out, _TN)
  if has_mean:
    out += mean_ref[...][:, None] * l_total[None, :]
  if unrotated_splits:   # already in the output's channel order
    acc_e, l_e = over_splits(num_splits - unrotated_splits, unrotated_splits, add_chunk,
                             zeros)
    out += acc_e
    l_total += l_e
  for s, mask, v_ref in scored:
    p = jnp.where(mask, jnp.exp(s - m_all[None, :]), 0.0)
    l_total += p.sum(axis=0)
    out += dot(v_ref[...], p, _TN)
  out_ref[...] = out / jnp.where(l_total > 0, l_total, 1.0)[None, :]


def merge_exact(q: Array, o: Array, l: Array, m: Array, q_positions: Array,
                unrotation: Array | None, exact: tuple[tuple[Array, Array, Array], ...], *,
                heads: int, scale: float, soft_cap: float | None = None,
                sliding_window: int | None = None, value_mean: Array | None = None,
                value_perm: Array | None = None, unrotated_splits: int = 0,
                interpret: bool = False, num_warps: int = 8) -> Array:
  """Attention output of each kv-head row: its split partials and its exact tokens merged.

  R = batch x `heads` kv-head rows, M query rows each (a power of two), S splits, D
  channels.

  Args:
    q: float32 [R, M, D], the query rows, unrotated (the exact tokens' channel order).
    o: float32 [R, S, D, M], the splits' unnormalised sums of p·values in the value
      quantizer's rotated domain, transposed; l, m float32 [R, S, M] their sums of p and
      maxima (`decode_attention_mgpu`'s outputs; an empty split has l = 0, o = 0).
    q_positions: int32 [B, M], each row's position.
    unrotation: float32 [D, D]: a rotated-domain row vector x maps to x @ unrotation in
      the output's channel order (or value_perm's order; block-diagonal for channel
      groups); None: the output stays in the partials' domain (the decoder rotates it
      back: `TurboQuantConfig.values_prerotated`).
    exact: per exact part (window, sinks), keys and values [R, n, D] (any float dtype) and
      int32 positions [B, n] (HIDDEN for a slot no query may see: a slot is seen by a row
      at position p when its position is <= p and, with a sliding window, > p - window).
    value_mean: float32 [R, D], added to the compressed tokens' values (value centering).
    value_perm: int32 [R, D]: per row, channel i of x @ unrotation is output channel
      value_perm[i] (channel groups' outlier order, `channel_split`); None: identity.
    unrotated_splits: the last splits of o are already in the output's channel order
      (the exact tokens the Mosaic kernel attended, `decode_attention_mgpu.ExactTokens`):
      merged in the same softmax, neither rotated nor given the value mean.

  Returns:
    float32 [R, D, M]: softmax(scores) · values over all tokens, transposed; 0 for a row
    that sees no token.
  """
  r, rows, d = q.shape
  s_splits = o.shape[1]
  b = q_positions.shape[0]
  if (r != b * heads or o.shape != (r, s_splits, d, rows) or l.shape != (r, s_splits, rows)
      or m.shape != l.shape or q_positions.shape != (b, rows)):
    raise ValueError(f"q {q.shape}, o {o.shape}, q_positions {q_positions.shape} and "
                     f"heads={heads} do not fit together")
  if unrotation is not None and unrotation.shape != (d, d):
    raise ValueError(f"unrotation must be [{d}, {d}], got {list(unrotation.shape)}")
  why = unsupported(rows, d, tuple(k.shape[1] for k, _, _ in exact),
                    rotated=unrotation is not None)
  if why is not None:
    raise ValueError(f"merge_exact cannot take this call: {why}")
  if not 0 <= unrotated_splits <= s_splits:
    raise ValueError(f"unrotated_splits must lie in [0, {s_splits}], got {unrotated_splits}")
  row = lambda i: (i, 0, 0)  # noqa: E731
  batch = lambda i: (i // heads, 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, rows, d), row),
              pl.BlockSpec((None, s_splits, d, rows), lambda i: (i, 0, 0, 0)),
              pl.BlockSpec((None, s_splits, rows), row),
              pl.BlockSpec((None, s_splits, rows), row),
              pl.BlockSpec((None, rows), batch)]
  args = [q, o, l, m, q_positions.astype(jnp.int32)]
  if unrotation is not None:
    in_specs.append(pl.BlockSpec((d, d), lambda i: (0, 0)))
    args.append(unrotation.astype(jnp.float32))
  for keys, values, pos in exact:
    n = keys.shape[1]
    if keys.shape != (r, n, d) or values.shape != (r, n, d) or pos.shape != (b, n):
      raise ValueError(f"exact keys {keys.shape}, values {values.shape}, positions "
                       f"{pos.shape} do not fit q {q.shape}")
    in_specs += [pl.BlockSpec((None, n, d), row)] * 2 + [pl.BlockSpec((None, n), batch)]
    args += [keys, values, pos.astype(jnp.int32)]
  for name, x, dtype in (("value_mean", value_mean, jnp.float32),
                         ("value_perm", value_perm, jnp.int32)):
    if x is None:
      continue
    if x.shape != (r, d):
      raise ValueError(f"{name} must be [{r}, {d}], got {list(x.shape)}")
    in_specs.append(pl.BlockSpec((None, d), lambda i: (i, 0)))
    args.append(x.astype(dtype))
  kernel = functools.partial(
      _kernel, num_parts=len(exact), num_splits=s_splits, unrotated_splits=unrotated_splits,
      scale=scale, soft_cap=soft_cap,
      sliding_window=sliding_window, has_mean=value_mean is not None,
      has_perm=value_perm is not None, has_rotation=unrotation is not None)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
  return pl.pallas_call(
      kernel, grid=(r,), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, d, rows), row),
      out_shape=jax.ShapeDtypeStruct((r, d, rows), jnp.float32),
      compiler_params=compiler_params, interpret=interpret, name="turboquant_merge_exact",
  )(*args)


def _pow2_parts(n: int) -> list[tuple[int, int]]:
  """(start, size) of n's binary decomposition, largest first: 33 = 32 + 1, 12 = 8 + 4."""
  parts, start = [], 0
  for k in reversed(range(n.bit_length())):
    if n >> k & 1:
      parts.append((start, 1 << k))
      start += 1 << k
  return parts


def _splits_kernel(o_ref, l_ref, m_ref, *refs, num_splits, compressed, has_mean,
                   has_poison):
  refs = list(refs)
  out_ref = refs.pop()
  mean_ref = refs.pop(0) if has_mean else None
  poison_ref = refs.pop(0) if has_poison else None
  # Every split in a few wide loads (the binary parts of S): one load per split would wait
  # on each in turn, and Triton's tensors are powers of two.
  parts = [(pl.ds(a, n), a, n) for a, n in _pow2_parts(num_splits)]
  m_all = None
  for sr, _, _ in parts:
    mx = m_ref[sr, :].max(axis=0)
    m_all = mx if m_all is None else jnp.maximum(m_all, mx)
  acc = l_total = l_comp = None
  for sr, a, n in parts:
    w = jnp.exp(m_ref[sr, :] - m_all[None, :])                     # [n, M]
    wl = l_ref[sr, :] * w
    part = (o_ref[sr, :, :] * w[:, None, :]).sum(axis=0)            # [BD, M]
    acc = part if acc is None else acc + part
    l_part = wl.sum(axis=0)
    l_total = l_part if l_total is None else l_total + l_part
    if has_mean and a < compressed:   # the compressed splits' share of the value mean
      if a + n > compressed:
        keep = a + jax.lax.broadcasted_iota(jnp.int32, wl.shape, 0) < compressed
        l_part = jnp.where(keep, wl, 0.0).sum(axis=0)
      l_comp = l_part if l_comp is None else l_comp + l_part
  out = acc.T                                                        # [M, BD]
  if has_mean and l_comp is not None:
    out += l_comp[:, None] * mean_ref[...][None, :]
  out = out / jnp.where(l_total > 0, l_total, 1.0)[:, None]
  if has_poison:   # rows of an overflowed cache read NaN, as the jnp merge's
    out = jnp.where(poison_ref[0], jnp.nan, out)
  out_ref[...] = out.astype(out_ref.dtype)


# merge_splits' programs: blocks of channels are made as small as keeps the grid within
# this many (and one warp each). H200, the decode path's shapes, device time
# (`merge_splits_probe_gpu.log`): 32 channels and 4 warps read 1.9 / 2.1 / 2.9 / 3.7 us at
# Llama-3-8B's 1 x 4K / 8 x 4K / 8 x 32K / 64 x 4K; one warp and this rule's 16 / 16 / 16 /
# 128 channels 1.6 / 1.7 / 2.1 / 2.5 (Gemma 3 1 x 4K: 2.1 -> 1.3).
SPLITS_PROGRAMS = 512


def splits_block_d(r: int, d: int) -> int:
  """The smallest power of two of channels (16 or more, dividing d) that gives at most
  `SPLITS_PROGRAMS` programs over r rows."""
  block = min(16, d)
  while r * d // block > SPLITS_PROGRAMS and block < d:
    block *= 2
  return block


def merge_splits(o: Array, l: Array, m: Array, *, rows: int, heads: int,
                 value_mean: Array | None = None, exact_splits: int = 0,
                 poison: Array | None = None, out_dtype=jnp.float32,
                 block_d: int | None = None, interpret: bool = False,
                 num_warps: int = 1) -> Array:
  """The split merge alone, for partials that need no rotation back (values the decoder
  rotated) and no exact tokens beyond the kernel's own splits: one program per kv-head
  row and `block_d` channels, out in the layout the output projection reads.

  R = batch x `heads` kv-head rows, S splits, D channels, M query columns of which the
  first `rows` are real (a power of two).

  Args:
    o: float32 [R, S, D, M], the splits' unnormalised sums of p·values, transposed (as
      `decode_attention_mgpu` writes them); l, m: float32 [R, S, M], their sums of p and
      maxima (natural-log units; an empty split has l = 0).
    value_mean: float32 [R, D], the value mean added to the compressed tokens (all but
      the last `exact_splits` splits), or None.
    poison: [batch] bool, entries whose output becomes NaN (an overflowed cache), or None.
    out_dtype: the output's dtype (the query's).
    block_d: channels per program (None: `splits_block_d`); num_warps: each program's.

  Returns:
    out_dtype [R, rows, D]: softmax(scores)·values over every split; 0 for a row that
    sees no token.
  """
  r, s_splits, d, cols = o.shape
  if l.shape != (r, s_splits, cols) or m.shape != l.shape:
    raise ValueError(f"o {o.shape}, l {l.shape} and m {m.shape} do not fit together")
  if block_d is None:
    block_d = splits_block_d(r, d)
  if not (_pow2(rows) and rows <= cols):
    raise ValueError(f"rows must be a power of two <= {cols}, got {rows}")
  if d % block_d or not _pow2(block_d):
    raise ValueError(f"block_d must be a power of two dividing {d}, got {block_d}")
  if r % heads:
    raise ValueError(f"{r} rows are not batch x {heads} heads")
  if not 0 <= exact_splits <= s_splits:
    raise ValueError(f"exact_splits must lie in [0, {s_splits}], got {exact_splits}")
  in_specs = [pl.BlockSpec((None, s_splits, block_d, rows), lambda i, c: (i, 0, c, 0)),
              pl.BlockSpec((None, s_splits, rows), lambda i, c: (i, 0, 0)),
              pl.BlockSpec((None, s_splits, rows), lambda i, c: (i, 0, 0))]
  args = [o, l, m]
  if value_mean is not None:
    if value_mean.shape != (r, d):
      raise ValueError(f"value_mean must be [{r}, {d}], got {list(value_mean.shape)}")
    in_specs.append(pl.BlockSpec((None, block_d), lambda i, c: (i, c)))
    args.append(value_mean.astype(jnp.float32))
  if poison is not None:
    if poison.shape != (r // heads,) or poison.dtype != jnp.bool_:
      raise ValueError(f"poison must be bool [{r // heads}], got {poison.dtype}"
                       f"{list(poison.shape)}")
    # The cache's flags as they are (Triton loads bools as bytes): a cast here was one more
    # XLA kernel per call, 0.9-1.3 us (`kernel_sweep_split_merge_llama3_8b_gpu.json`).
    in_specs.append(pl.BlockSpec((1,), lambda i, c: (i // heads,)))   # the row's entry
    args.append(poison)
  kernel = functools.partial(_splits_kernel, num_splits=s_splits,
                             compressed=s_splits - exact_splits,
                             has_mean=value_mean is not None, has_poison=poison is not None)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
  return pl.pallas_call(
      kernel, grid=(r, d // block_d), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, rows, block_d), lambda i, c: (i, 0, c)),
      out_shape=jax.ShapeDtypeStruct((r, rows, d), out_dtype),
      compiler_params=compiler_params, interpret=interpret, name="turboquant_merge_splits",
  )(*args)


def merge_exact_reference(q, o, l, m, q_positions, unrotation, exact, *, heads, scale,
                          soft_cap=None, sliding_window=None, value_mean=None,
                          value_perm=None, unrotated_splits=0, **unused):
  """`merge_exact` in plain jnp (float32, HIGHEST): the ground truth of the tests."""
  del unused
  r, rows, d = q.shape
  qpos = jnp.repeat(q_positions, heads, axis=0)                     # [R, M]
  m_all = m.max(axis=1)
  scores = []
  for keys, values, pos in exact:
    s = jnp.einsum("rmd,rnd->rmn", q, keys.astype(jnp.float32), precision=_HIGHEST) * scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    kpos = jnp.repeat(pos, heads, axis=0)[:, None, :]
    mask = kpos <= qpos[:, :, None]
    if sliding_window is not None:
      mask &= qpos[:, :, None] - kpos < sliding_window
    s = jnp.where(mask, s, _NEG)
    m_all = jnp.maximum(m_all, s.max(axis=-1))
    scores.append((s, mask, values))
  w = jnp.exp(m - m_all[:, None])                                   # [R, S, M]
  sc = o.shape[1] - unrotated_splits
  l_total = (l[:, :sc] * w[:, :sc]).sum(axis=1)
  acc = (o[:, :sc] * w[:, :sc, None, :]).sum(axis=1)                # [R, D, M]
  out = (jnp.swapaxes(acc, 1, 2) if unrotation is None else
         jnp.einsum("rdm,de->rme", acc, unrotation, precision=_HIGHEST))
  if value_perm is not None:
    idx = jnp.broadcast_to(value_perm[:, None, :], out.shape)
    out = jnp.put_along_axis(jnp.zeros_like(out), idx, out, axis=-1, inplace=False)
  if value_mean is not None:
    out += l_total[..., None] * value_mean[:, None, :]
  if unrotated_splits:
    out += jnp.swapaxes((o[:, sc:] * w[:, sc:, None, :]).sum(axis=1), 1, 2)
    l_total += (l[:, sc:] * w[:, sc:]).sum(axis=1)
  for s, mask, values in scores:
    p = jnp.where(mask, jnp.exp(s - m_all[..., None]), 0.0)
    l_total += p.sum(axis=-1)
    out += jnp.einsum("rmn,rnd->rmd", p, values.astype(jnp.float32), precision=_HIGHEST)
  out = out / jnp.where(l_total > 0, l_total, 1.0)[..., None]
  return jnp.swapaxes(out, 1, 2)
