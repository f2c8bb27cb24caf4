"""Keys-only probe kernels: how fast Mosaic GPU decodes register-layout codes.

Each probe decodes a key tile (`decode_attention_mgpu.tile_decoder`), scores it against
the queries with wgmma, scales by the norms and keeps a running max per thread register:
the key half of decode attention with no softmax. Three ways to feed the tiles:

- `key_scores_probe`: one warpgroup, a TMA pipeline into shared memory (`emit_pipeline`);
- `key_scores_probe_ws`: one copy warpgroup and `compute_wgs` decoding warpgroups;
- `key_scores_probe_direct`: every thread loads its own words from HBM into registers,
  one step ahead, with no pipeline and no barrier per step.

Measurement tools for `benchmarks.mgpu_probe`, not library kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import register_codes
from pallas_kernels.decode_attention_mgpu import HEADS, q_transforms, tile_decoder

Array = jax.Array
WR = register_codes.WORD_ROWS


def _plan(words, norms, q, spec, num_splits, per_step):
  bh, word_rows, c = words.shape
  tiles = word_rows // WR
  if c != spec.words_per_row or q.shape != (bh, HEADS, spec.cols) or \
      norms.shape != (bh, tiles * spec.rows):
    raise ValueError(f"shapes do not match {spec}: {words.shape}, {norms.shape}, {q.shape}")
  if tiles % (num_splits * per_step):
    raise ValueError(f"{tiles} tiles do not split in {num_splits} x {per_step}")
  return bh, c, tiles // num_splits // per_step


def _fold_scores(decoded, q_smem, norms, carry, *, variant, rows, per_step, use_wgmma=True):
  """Scores of the decoded tiles (u, plus u³ for "cubic") times the norms, folded into
  the running max carry [rows, 8]."""
  a = decoded[0] if variant == "cubic" else decoded
  if use_wgmma:
    def scores(acc_ref):
      plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(q_smem, (1, 0)))
      if variant == "cubic":
        plgpu.wgmma(acc_ref, decoded[1], plgpu.transpose_ref(q_smem, (1, 0)))
      return acc_ref[...]
    s = pl.run_scoped(scores, plgpu.ACC((rows * per_step, HEADS), jnp.float32))
  else:
    # No tensor cores: fold the decoded tile into the carry's shape by a cheap sum.
    s = a[:, :HEADS].astype(jnp.float32)
    for k in range(1, a.shape[1] // HEADS):
      s = s + a[:, k * HEADS:(k + 1) * HEADS].astype(jnp.float32)
  s = s * jax.lax.broadcast_in_dim(norms.astype(jnp.float32), s.shape, [0])
  for k in range(per_step):
    carry = jnp.maximum(carry, s[k * rows:(k + 1) * rows])
  return carry


def _init(rows):
  return plgpu.layout_cast(jnp.full((rows, HEADS), -jnp.inf, jnp.float32),
                           plgpu.Layout.WGMMA)


def _write(out_smem, out_gmem, carry):
  out_smem[...] = carry
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem)
  plgpu.wait_smem_to_gmem(0)


def _launch(kernel, args, out_shape, grid, scratch_rows, d, **kw):
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32),
      grid=grid, grid_names=("bh", "split"),
      scratch_types=[plgpu.SMEM((HEADS, d), jnp.float16, transforms=q_transforms()),
                     plgpu.SMEM(scratch_rows, jnp.float32),
                     plgpu.Barrier(num_arrivals=1)], **kw)(*args)


def key_scores_probe(words: Array, norms: Array, q: Array, *, spec, num_splits: int,
                     variant: str = "affine", max_concurrent_steps: int = 4,
                     use_wgmma: bool = True, tiles_per_step: int = 1, decoder=None) -> Array:
  """Running max of norm·(q·u) per (kv head, split): decode, scores, norms, max.

  Args:
    words: int32 [BH, tiles·64, C], each tile's codes by `register_codes.pack_tile`.
    norms: float16 [BH, tiles·rows], one per token.
    q: float16 [BH, 8, D] queries (rows past the real heads are zero).
  Returns:
    float32 [BH, num_splits, rows, 8]: per split, the largest score seen by each thread's
    (token slot, head) register; reduce with max over axis 2 for the split's max per head.
    With variant="cubic" the score is q·(u + u³).
    decoder: the tile decoder to use (default `tile_decoder(spec, variant, tiles_per_step)`).
  """
  bh, c, steps = _plan(words, norms, q, spec, num_splits, tiles_per_step)
  rows = spec.rows
  decode = decoder or tile_decoder(spec, variant, tiles_per_step)
  step_rows, step_words = rows * tiles_per_step, WR * tiles_per_step

  def kernel(words_gmem, norms_gmem, q_gmem, out_gmem, q_smem, out_smem, q_barrier):
    i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("split")
    plgpu.copy_gmem_to_smem(q_gmem.at[i], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def body(_, words_smem, norms_smem, carry):
      w = plgpu.load(words_smem, (), layout=plgpu.Layout.WGMMA)
      n = plgpu.load(norms_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
      return _fold_scores(decode(w), q_smem, n, carry, variant=variant, rows=rows,
                          per_step=tiles_per_step, use_wgmma=use_wgmma)

    pipeline = plgpu.emit_pipeline(
        body, grid=(steps,),
        in_specs=[plgpu.BlockSpec((step_words, c), lambda t: (t, 0)),
                  plgpu.BlockSpec((step_rows,), lambda t: (t,))],
        max_concurrent_steps=max_concurrent_steps, init_carry=_init(rows))
    first = j * steps
    carry = pipeline(words_gmem.at[i, pl.ds(first * step_words, steps * step_words)],
                     norms_gmem.at[i, pl.ds(first * step_rows, steps * step_rows)])
    _write(out_smem, out_gmem.at[i, j], carry)

  return _launch(kernel, (words, norms, q), (bh, num_splits, rows, HEADS),
                 (bh, num_splits), (rows, HEADS), spec.cols)


def key_scores_probe_ws(words: Array, norms: Array, q: Array, *, spec, num_splits: int,
                        variant: str = "affine", max_concurrent_steps: int = 4,
                        compute_wgs: int = 2, tiles_per_wg: int = 1) -> Array:
  """`key_scores_probe` with warp specialization: one warpgroup issues the copies,
  `compute_wgs` warpgroups each decode and score `tiles_per_wg` tiles of every step.

  Returns float32 [BH, num_splits, compute_wgs, rows, 8] (reduce axes 2 and 3 with max).
  """
  per_step = compute_wgs * tiles_per_wg
  bh, c, steps = _plan(words, norms, q, spec, num_splits, per_step)
  rows = spec.rows
  decode = tile_decoder(spec, variant, tiles_per_wg)
  wg_rows, wg_words = rows * tiles_per_wg, WR * tiles_per_wg

  def kernel(words_gmem, norms_gmem, q_gmem, out_gmem, q_smem, out_smem, q_barrier):
    i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("split")
    wg = jax.lax.axis_index("wg")

    @pl.when(wg == 0)
    def _():
      plgpu.copy_gmem_to_smem(q_gmem.at[i], q_smem, q_barrier)

    def body(_, words_smem, norms_smem, carry):
      w = plgpu.load(words_smem.at[pl.ds(wg * wg_words, wg_words)], (),
                     layout=plgpu.Layout.WGMMA)
      n = plgpu.load(norms_smem.at[pl.ds(wg * wg_rows, wg_rows)], (),
                     layout=plgpu.Layout.WGMMA.reduce(1))
      return _fold_scores(decode(w), q_smem, n, carry, variant=variant, rows=rows,
                          per_step=tiles_per_wg)

    def compute_context(eval_pipeline):
      plgpu.barrier_wait(q_barrier)
      _write(out_smem.at[wg], out_gmem.at[i, j, wg], eval_pipeline(_init(rows)))

    def pipeline(body_, context):
      return plgpu.emit_pipeline_warp_specialized(
          body_, grid=(steps,), memory_registers=40,
          in_specs=[plgpu.BlockSpec((per_step * WR, c), lambda t: (t, 0)),
                    plgpu.BlockSpec((per_step * rows,), lambda t: (t,))],
          wg_axis="wg", num_compute_wgs=compute_wgs,
          max_concurrent_steps=max_concurrent_steps, compute_context=context)

    first = j * steps
    gmem = (words_gmem.at[i, pl.ds(first * per_step * WR, steps * per_step * WR)],
            norms_gmem.at[i, pl.ds(first * per_step * rows, steps * per_step * rows)])
    ignore = lambda *_, **__: None  # noqa: E731

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore).get_allocations(*gmem),
                       collective_axes="wg")
    def _(allocs):
      pipeline(body, compute_context)(*gmem, allocations=allocs)

  return _launch(kernel, (words, norms, q), (bh, num_splits, compute_wgs, rows, HEADS),
                 (bh, num_splits), (compute_wgs, rows, HEADS), spec.cols,
                 num_threads=compute_wgs + 1, thread_name="wg")


def key_scores_probe_direct(words: Array, norms: Array, q: Array, *, spec, num_splits: int,
                            variant: str = "affine", tiles_per_step: int = 1) -> Array:
  """`key_scores_probe` with no shared-memory pipeline: each thread loads its own words
  straight from HBM into the fragment layout, one step ahead (a loop-carried prefetch),
  so many loads are in flight per warp and no barrier is crossed per step."""
  bh, c, steps = _plan(words, norms, q, spec, num_splits, tiles_per_step)
  rows = spec.rows
  decode = tile_decoder(spec, variant, tiles_per_step)
  step_rows, step_words = rows * tiles_per_step, WR * tiles_per_step

  def kernel(words_gmem, norms_gmem, q_gmem, out_gmem, q_smem, out_smem, q_barrier):
    i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("split")
    plgpu.copy_gmem_to_smem(q_gmem.at[i], q_smem, q_barrier)
    first = j * steps

    def load(t):
      # optimized=False: Mosaic's bank-conflict-free transfer plans are for SMEM only.
      w = plgpu.load(words_gmem.at[i, pl.ds((first + t) * step_words, step_words)], (),
                     layout=plgpu.Layout.WGMMA, optimized=False)
      n = plgpu.load(norms_gmem.at[i, pl.ds((first + t) * step_rows, step_rows)], (),
                     layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
      return w, n

    def body(t, carry):
      (w, n), m = carry
      nxt = load(jnp.minimum(t + 1, steps - 1))
      return nxt, _fold_scores(decode(w), q_smem, n, m, variant=variant, rows=rows,
                               per_step=tiles_per_step)

    first_load = load(0)
    plgpu.barrier_wait(q_barrier)
    _, m = jax.lax.fori_loop(0, steps, body, (first_load, _init(rows)))
    _write(out_smem, out_gmem.at[i, j], m)

  return _launch(kernel, (words, norms, q), (bh, num_splits, rows, HEADS),
                 (bh, num_splits), (rows, HEADS), spec.cols)


def key_scores_probe_reference(codes: Array, norms: Array, q: Array, *, bits: int,
                               num_splits: int, variant: str = "affine") -> Array:
  """[BH, num_splits, 8]: the max over each split's tokens of norm·(q·u) (u³ added for
  "cubic"), from level indices codes [BH, T, D]."""
  u = codes.astype(jnp.float32) - ((1 << bits) - 1) / 2
  if variant == "cubic":
    u = u + u**3
  s = jnp.einsum("btd,bhd->bth", u, q.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * norms.astype(jnp.float32)[..., None]
  b, t, _ = s.shape
  return s.reshape(b, num_splits, t // num_splits, HEADS).max(axis=2)
