"""Index scoring: a batch of queries against packed TurboQuant codes, fused with top-k.

One Pallas program (Triton lowering) per `tiles_per_program` tiles of `tile_n` rows:

1. loads the block's packed planes and unpacks and decodes them in registers into one
   [block_n, d] tile of Lloyd-Max levels (`decode_attention._decode_tile`: the same
   shifts, masks and ladder as the decode-attention kernel);
2. scores all queries at once on the matrix units, [Q, d] · [d, block_n], times the
   norms; "prod" codes add the QJL term (sketched queries · unpacked signs) the same way;
3. adds a per-row bias (minus ‖x̂‖² for l2, -1e30 for removed rows) and merges the tile
   into the program's running k best per query (k rounds of take-the-larger-head; lowest
   row first on ties), skipping the merge when no score beats the running k-th best,
   which after the first tiles is almost always;
4. streams `tiles_per_program` tiles that way and writes one [Q, k] list per program.

The per-block lists are merged in jnp with one `lax.top_k` over [Q, blocks · k], and
with the caller's running top-k. `block_scores_reference` is the same computation in jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import GroupSpec, code_scores, magnitude_polynomial
from turboquant_jax.quantizers import MSECodes, MSEQuantizer, ProdCodes, ProdQuantizer

Array = jax.Array
_TAKEN = -jnp.inf   # a row already picked: below every real or masked score
_MASKED = -1e30     # a removed row: below every real score, above _TAKEN


def spec_of(quantizer: MSEQuantizer | ProdQuantizer) -> GroupSpec:
  """The static description of a quantizer's codes that the kernel is compiled for."""
  mse = quantizer if isinstance(quantizer, MSEQuantizer) else quantizer.mse
  half = (1 << mse.bits) // 2
  mags = tuple(float(x) for x in mse.static_codebook().centroids[
      half:]) if mse.bits else ()
  qjl_dim = quantizer.sketch_dim if isinstance(quantizer, ProdQuantizer) else 0
  return GroupSpec(dim=mse.dim, bits=mse.bits, magnitudes=mags, qjl_dim=qjl_dim,
                   poly=magnitude_polynomial(mags))


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _score_kernel(*refs, spec: GroupSpec, k: int, tile_n: int, num_tiles: int,
                  scale: float, decode: str, compute_dtype):
  refs = list(refs)
  q_ref = refs.pop(0)                                   # [Qp, d] rotated queries
  qs_ref = refs.pop(0) if spec.qjl_dim else None       # [Qp, m] sketched queries
  planes = [refs.pop(0) for _ in spec.plane_widths]    # [rows, d·w/8] each
  norm_ref = refs.pop(0)                                # [rows]
  sign_ref = refs.pop(0) if spec.qjl_dim else None     # [rows, m/8]
  rnorm_ref = refs.pop(0) if spec.qjl_dim else None    # [rows]
  bias_ref = refs.pop(0)                                # [rows]
  out_s_ref, out_i_ref = refs                           # [Qp, Kp] each

  q = q_ref[...].astype(compute_dtype)
  qs = None if qs_ref is None else qs_ref[...].astype(compute_dtype)
  rows_q, k_pad = out_s_ref.shape
  col = jax.lax.broadcasted_iota(jnp.int32, (rows_q, tile_n), 1)
  slot = jax.lax.broadcasted_iota(jnp.int32, (rows_q, k_pad), 1)
  base = pl.program_id(0) * (tile_n * num_tiles)

  def tile_scores(t):
    rows = pl.ds(t * tile_n, tile_n)
    scores = code_scores(q, qs, planes, norm_ref, sign_ref, rnorm_ref, rows, spec, decode,
                         compute_dtype)
    return scores * scale + bias_ref[rows][None, :]

  def merge(scores, t, best_s, best_i):
    """The k best of (running list ∪ this tile): k rounds of take-the-larger-head."""
    def pick(j, carry):
      s, old_s, new_s, new_i = carry
      m_tile, m_old = jnp.max(s, axis=1), jnp.max(old_s, axis=1)
      from_tile = m_tile > m_old
      c = jnp.min(jnp.where(s == m_tile[:, None], col, tile_n), axis=1)
      o = jnp.min(jnp.where(old_s == m_old[:, None], slot, k_pad), axis=1)
      o_i = jnp.sum(jnp.where(slot == o[:, None], best_i, 0), axis=1)
      value = jnp.where(from_tile, m_tile, m_old)
      index = jnp.where(from_tile, base + t * tile_n + c, o_i)
      new_s = jnp.where(slot == j, value[:, None], new_s)
      new_i = jnp.where(slot == j, index[:, None], new_i)
      s = jnp.where(from_tile[:, None] & (col == c[:, None]), _TAKEN, s)
      old_s = jnp.where(~from_tile[:, None] & (slot == o[:, None]), _TAKEN, old_s)
      return s, old_s, new_s, new_i
    init = (scores, best_s, jnp.full_like(best_s, _TAKEN), jnp.zeros_like(best_i))
    _, _, new_s, new_i = jax.lax.fori_loop(0, k, pick, init)
    return new_s, new_i

  def body(t, carry):
    best_s, best_i, kth = carry
    scores = tile_scores(t)
    # Most tiles hold nothing above the running k-th best: skip their merge.
    hit = jnp.max(scores - kth[:, None]) > 0
    best_s, best_i = jax.lax.cond(hit, lambda: merge(scores, t, best_s, best_i),
                                  lambda: (best_s, best_i))
    kth = jnp.max(jnp.where(slot == k - 1, best_s, _TAKEN), axis=1)
    return best_s, best_i, kth

  init = (jnp.full((rows_q, k_pad), _TAKEN, jnp.float32),
          jnp.zeros((rows_q, k_pad), jnp.int32), jnp.full((rows_q,), _TAKEN, jnp.float32))
  best_s, best_i, _ = jax.lax.fori_loop(0, num_tiles, body, init)
  out_s_ref[...] = best_s
  out_i_ref[...] = best_i


def _operands(codes: MSECodes | ProdCodes) -> list[Array]:
  mse = codes if isinstance(codes, MSECodes) else codes.mse
  ops = [] if mse is None else [*mse.planes, mse.norms]
  if isinstance(codes, ProdCodes):
    ops += [codes.signs, codes.residual_norms]
  return ops


@functools.partial(jax.jit, static_argnames=("k", "metric", "tile_n", "tiles_per_program",
                                             "num_warps", "num_stages", "compute_dtype",
                                             "interpret", "decode"))
def block_top_k(quantizer, q_t: tuple[Array, ...], codes, sq_norms: Array, valid: Array, *,
                k: int, metric: str, tile_n: int = 128, tiles_per_program: int = 16,
                num_warps: int = 4, num_stages: int = 2, compute_dtype=jnp.float32,
                interpret: bool = False, decode: str = "auto") -> tuple[Array, Array]:
  """Top k rows of one storage block for each query.

  Args:
    quantizer: the index's `MSEQuantizer` or `ProdQuantizer`.
    q_t: (Π·q [Q, d],) or (Π·q, S·Π·q [Q, m]): the transformed queries.
    codes: the block's codes, leaves [N, ...] (N a multiple of tile_n).
    sq_norms: [N] ‖x̂‖² (used for "l2"). valid: [N] bool.
    k: results per query (k ≤ tile_n). metric: "ip"/"cosine" (score <q, x̂>) or "l2"
      (2<q, x̂> - ‖x̂‖²).
    tile_n: rows decoded and scored at once; tiles_per_program: tiles one program
      streams with its running top k (fewer, larger programs write fewer partial lists).

  Returns:
    (scores [Q, k] float32, rows [Q, k] int32 within the block), best first.
  """
  spec = spec_of(quantizer)
  n = sq_norms.shape[0]
  if n % tile_n:
    raise ValueError(f"block rows {n} must be a multiple of tile_n {tile_n}")
  if k > tile_n:
    raise ValueError(f"k={k} exceeds tile_n={tile_n}")
  tiles = n // tile_n
  per_program = max(t for t in range(1, min(tiles_per_program, tiles) + 1) if tiles % t == 0)
  grid = tiles // per_program
  rows = per_program * tile_n
  num_q = q_t[0].shape[0]
  rows_q = max(16, _next_pow2(num_q))
  k_pad = max(16, _next_pow2(k))
  pad = lambda x: jnp.pad(x.astype(jnp.float32), ((0, rows_q - num_q), (0, 0)))  # noqa: E731
  queries = [pad(q_t[0])] + ([pad(q_t[1])] if spec.qjl_dim else [])
  bias = jnp.where(valid, -sq_norms if metric == "l2" else 0.0, _MASKED).astype(jnp.float32)
  ops = _operands(codes) + [bias]
  # Queries in tiles of at most 64 rows, a second grid axis: a [Q, tile_n] score tile
  # and its running top k stay in registers.
  q_tile = min(rows_q, 64)
  in_specs = [pl.BlockSpec((q_tile, x.shape[1]), lambda j, qi: (qi, 0)) for x in queries]
  in_specs += [pl.BlockSpec((rows, *x.shape[1:]),
                            lambda j, qi, nd=x.ndim: (j,) + (0,) * (nd - 1)) for x in ops]
  out_shape = [jax.ShapeDtypeStruct((grid, rows_q, k_pad), jnp.float32),
               jax.ShapeDtypeStruct((grid, rows_q, k_pad), jnp.int32)]
  out_specs = [pl.BlockSpec((None, q_tile, k_pad), lambda j, qi: (j, qi, 0))] * 2
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  kernel = functools.partial(_score_kernel, spec=spec, k=k, tile_n=tile_n,
                             num_tiles=per_program, scale=2.0 if metric == "l2" else 1.0,
                             decode=decode, compute_dtype=compute_dtype)
  s, i = pl.pallas_call(kernel, grid=(grid, rows_q // q_tile), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=compiler_params,
                        interpret=interpret, name="turboquant_index_scores")(*queries, *ops)
  s = s[:, :num_q, :k].transpose(1, 0, 2).reshape(num_q, grid * k)
  i = i[:, :num_q, :k].transpose(1, 0, 2).reshape(num_q, grid * k)
  top, pick = jax.lax.top_k(s, k)
  return top, jnp.take_along_axis(i, pick, axis=1)


def block_scores_reference(quantizer, q_t, codes, sq_norms, valid, *, metric) -> Array:
  """[Q, N] the scores the kernel ranks by, in jnp (removed rows at -1e30)."""
  scores = quantizer.inner_products_rotated(*q_t, codes)
  if metric == "l2":
    scores = 2.0 * scores - sq_norms[None, :]
  return jnp.where(valid[None, :], scores, _MASKED)
