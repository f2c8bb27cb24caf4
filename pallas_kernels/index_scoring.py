"""Index scoring: a batch of queries against packed TurboQuant codes, fused with top-k.

One Pallas program (Triton lowering) per block of `block_n` database rows:

1. loads the block's packed planes and unpacks and decodes them in registers into one
   [block_n, d] tile of Lloyd-Max levels (`decode_attention._decode_tile`: the same
   shifts, masks and ladder as the decode-attention kernel);
2. scores all queries at once on the matrix units, [Q, d] · [d, block_n], times the
   norms; "prod" codes add the QJL term (sketched queries · unpacked signs) the same way;
3. adds a per-row bias (minus ‖x̂‖² for l2, -inf for removed rows) and keeps the block's
   k best rows per query by k rounds of max-and-mask (a row index breaks ties: lowest
   first), written as [Q, k] scores and global row indices.

The per-block lists are merged in jnp with one `lax.top_k` over [Q, blocks · k], and
with the caller's running top-k. `block_scores_reference` is the same computation in jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import GroupSpec, _decode_tile, _unpack_signs
from pallas_kernels.decode_attention import magnitude_polynomial
from turboquant_jax import codebook
from turboquant_jax.quantizers import MSECodes, MSEQuantizer, ProdCodes, ProdQuantizer

Array = jax.Array
_TAKEN = -jnp.inf   # a row already picked: below every real or masked score
_MASKED = -1e30     # a removed row: below every real score, above _TAKEN


def spec_of(quantizer: MSEQuantizer | ProdQuantizer) -> GroupSpec:
  """The static description of a quantizer's codes that the kernel is compiled for."""
  mse = quantizer if isinstance(quantizer, MSEQuantizer) else quantizer.mse
  half = (1 << mse.bits) // 2
  mags = tuple(float(x) for x in codebook.lloyd_max_codebook(mse.dim, mse.bits).centroids[
      half:]) if mse.bits else ()
  qjl_dim = quantizer.sketch_dim if isinstance(quantizer, ProdQuantizer) else 0
  return GroupSpec(dim=mse.dim, bits=mse.bits, magnitudes=mags, qjl_dim=qjl_dim,
                   poly=magnitude_polynomial(mags))


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _score_kernel(*refs, spec: GroupSpec, k: int, block_n: int, scale: float, decode: str,
                  compute_dtype):
  refs = list(refs)
  q_ref = refs.pop(0)                                   # [Qp, d] rotated queries
  qs_ref = refs.pop(0) if spec.qjl_dim else None       # [Qp, m] sketched queries
  planes = [refs.pop(0) for _ in spec.plane_widths]    # [block_n, d·w/8] each
  norm_ref = refs.pop(0)                                # [block_n]
  sign_ref = refs.pop(0) if spec.qjl_dim else None     # [block_n, m/8]
  rnorm_ref = refs.pop(0) if spec.qjl_dim else None    # [block_n]
  bias_ref = refs.pop(0)                                # [block_n]
  out_s_ref, out_i_ref = refs                           # [Qp, Kp] each

  rows = pl.ds(0, block_n)
  q = q_ref[...].astype(compute_dtype)
  scores = jnp.zeros((q.shape[0], block_n), jnp.float32)
  if spec.bits:
    tile = _decode_tile(planes, rows, spec, decode).astype(compute_dtype)
    s = jnp.dot(q, tile.T, preferred_element_type=jnp.float32)
    scores += s * norm_ref[...].astype(jnp.float32)[None, :]
  if spec.qjl_dim:
    signs = _unpack_signs(sign_ref, rows).astype(compute_dtype)
    s = jnp.dot(qs_ref[...].astype(compute_dtype), signs.T,
                preferred_element_type=jnp.float32)
    scores += s * (spec.qjl_scale * rnorm_ref[...].astype(jnp.float32))[None, :]
  scores = scores * scale + bias_ref[...][None, :]

  rows_q, k_pad = out_s_ref.shape
  col = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  slot = jax.lax.broadcasted_iota(jnp.int32, (rows_q, k_pad), 1)

  def pick(j, carry):
    s, best_s, best_i = carry
    m = jnp.max(s, axis=1)
    i = jnp.min(jnp.where(s == m[:, None], col, block_n), axis=1)
    best_s = jnp.where(slot == j, m[:, None], best_s)
    best_i = jnp.where(slot == j, i[:, None], best_i)
    return jnp.where(col == i[:, None], _TAKEN, s), best_s, best_i

  init = (scores, jnp.full((rows_q, k_pad), _TAKEN, jnp.float32),
          jnp.zeros((rows_q, k_pad), jnp.int32))
  _, best_s, best_i = jax.lax.fori_loop(0, k, pick, init)
  out_s_ref[...] = best_s
  out_i_ref[...] = best_i + pl.program_id(0) * block_n


def _operands(codes: MSECodes | ProdCodes) -> list[Array]:
  mse = codes if isinstance(codes, MSECodes) else codes.mse
  ops = [] if mse is None else [*mse.planes, mse.norms]
  if isinstance(codes, ProdCodes):
    ops += [codes.signs, codes.residual_norms]
  return ops


@functools.partial(jax.jit, static_argnames=("k", "metric", "block_n", "num_warps",
                                             "num_stages", "compute_dtype", "interpret",
                                             "decode"))
def block_top_k(quantizer, q_t: tuple[Array, ...], codes, sq_norms: Array, valid: Array, *,
                k: int, metric: str, block_n: int = 128, num_warps: int = 4,
                num_stages: int = 2, compute_dtype=jnp.float32, interpret: bool = False,
                decode: str = "auto") -> tuple[Array, Array]:
  """Top k rows of one storage block for each query.

  Args:
    quantizer: the index's `MSEQuantizer` or `ProdQuantizer`.
    q_t: (Π·q [Q, d],) or (Π·q, S·Π·q [Q, m]): the transformed queries.
    codes: the block's codes, leaves [N, ...] (N a multiple of block_n).
    sq_norms: [N] ‖x̂‖² (used for "l2"). valid: [N] bool.
    k: results per query (≤ N). metric: "ip"/"cosine" (score <q, x̂>) or "l2"
      (2<q, x̂> - ‖x̂‖²).

  Returns:
    (scores [Q, k] float32, rows [Q, k] int32 within the block), best first.
  """
  spec = spec_of(quantizer)
  n = sq_norms.shape[0]
  if n % block_n:
    raise ValueError(f"block rows {n} must be a multiple of block_n {block_n}")
  if k > n:
    raise ValueError(f"k={k} exceeds the block's {n} rows")
  block_n = max(block_n, _next_pow2(k))
  if n % block_n:
    raise ValueError(f"block rows {n} must be a multiple of {block_n} for k={k}")
  num_q = q_t[0].shape[0]
  rows_q = max(16, _next_pow2(num_q))
  k_pad = max(16, _next_pow2(min(k, block_n)))
  k_block = min(k, block_n)
  pad = lambda x: jnp.pad(x.astype(jnp.float32), ((0, rows_q - num_q), (0, 0)))  # noqa: E731
  queries = [pad(q_t[0])] + ([pad(q_t[1])] if spec.qjl_dim else [])
  bias = jnp.where(valid, -sq_norms if metric == "l2" else 0.0, _MASKED).astype(jnp.float32)
  ops = _operands(codes) + [bias]
  in_specs = [pl.BlockSpec(x.shape, lambda j: (0, 0)) for x in queries]
  in_specs += [pl.BlockSpec((block_n, *x.shape[1:]),
                            lambda j, nd=x.ndim: (j,) + (0,) * (nd - 1)) for x in ops]
  grid = n // block_n
  out_shape = [jax.ShapeDtypeStruct((grid, rows_q, k_pad), jnp.float32),
               jax.ShapeDtypeStruct((grid, rows_q, k_pad), jnp.int32)]
  out_specs = [pl.BlockSpec((None, rows_q, k_pad), lambda j: (j, 0, 0))] * 2
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  kernel = functools.partial(_score_kernel, spec=spec, k=k_block, block_n=block_n,
                             scale=2.0 if metric == "l2" else 1.0, decode=decode,
                             compute_dtype=compute_dtype)
  s, i = pl.pallas_call(kernel, grid=(grid,), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=compiler_params,
                        interpret=interpret, name="turboquant_index_scores")(*queries, *ops)
  s = s[:, :num_q, :k_block].transpose(1, 0, 2).reshape(num_q, grid * k_block)
  i = i[:, :num_q, :k_block].transpose(1, 0, 2).reshape(num_q, grid * k_block)
  top, pick = jax.lax.top_k(s, k)
  return top, jnp.take_along_axis(i, pick, axis=1)


def block_scores_reference(quantizer, q_t, codes, sq_norms, valid, *, metric) -> Array:
  """[Q, N] the scores the kernel ranks by, in jnp (removed rows at -1e30)."""
  scores = quantizer.inner_products_rotated(*q_t, codes)
  if metric == "l2":
    scores = 2.0 * scores - sq_norms[None, :]
  return jnp.where(valid[None, :], scores, _MASKED)


def search_block(quantizer, q_t, codes, sq_norms, valid, best_s, best_i, offset, *, k,
                 metric, interpret=False, **kernel_kwargs):
  """The index's streaming step on the kernel: a block's top k merged into the running
  (best_s, best_i) [Q, k] (global rows: block rows + offset)."""
  s, i = block_top_k(quantizer, q_t, codes, sq_norms, valid, k=k, metric=metric,
                     interpret=interpret, **kernel_kwargs)
  return _merge(best_s, best_i, s, i + offset, k)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge(best_s, best_i, s, i, k):
  all_s = jnp.concatenate([best_s, s], axis=1)
  all_i = jnp.concatenate([best_i, i.astype(jnp.int32)], axis=1)
  top, pick = jax.lax.top_k(all_s, k)
  return top, jnp.take_along_axis(all_i, pick, axis=1)
