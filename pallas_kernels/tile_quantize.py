"""Quantize-on-append into the tiles layout: rotate, norm, nearest level and pack, fused.

Appending a chunk of tokens to a cache in the tiles layout (`turboquant_jax.tile_codes`)
in jnp rotates the chunk, compares it with the level boundaries, writes the level indices
into a zeroed window of tiles and packs them with a per-bit gather
(`register_codes.pack_tile`): several passes over arrays as large as the input. Here one
Pallas (Triton) program takes one tile of one kv-head row, [tokens, d] of input, and
writes its finished words [64, C] and norms:

- rotation and norms as `quantizers.MSEQuantizer.quantize_levels` computes them (the same
  float32 operations, products at IEEE precision), the level as the count of boundaries
  below the rotated coordinate;
- packing as a product: within a tile, word row r holds codes of the tile rows
  64·mt + r only, and which tile column and bit a word bit takes does not depend on r
  (`register_codes`' fragment layout). So each 16-bit half of every word is
  sum over mt of field[64·mt + r, :] @ M[mt], with M a static 0/2^p matrix and field the
  code's bits that land together in one word (all of them for 2 and 4 bits; the low two
  and the high one for 3). Fields (< 16) and powers of two are exact in bfloat16 and the
  sums (< 2^16) exact in the float32 accumulator: the tensor cores pack bit-exactly.

Triton tensors are power-of-two sized: a tile's word count per row is padded up (3 bits:
24 -> 32) and the caller keeps the first C columns. Channel groups of a fractional width
are one call per group (each its own rotation and tiles).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import register_codes

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
_TN = (((0,), (0,)), ((), ()))     # [k, a] x [k, b] -> [a, b]


def _next_pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class PackField:
  """Code bits that land in words together: (level >> shift) & mask, placed by `matrices`
  (float32 [tile rows / 64, 2, K, C padded]: 2^p in the low (0) or the high (1) 16-bit
  half of the word column it feeds, 0 elsewhere; K is the tile's column count)."""
  shift: int
  mask: int
  matrices: np.ndarray


@functools.lru_cache(maxsize=None)
def pack_fields(spec: register_codes.TileSpec) -> tuple[PackField, ...]:
  """The packing of `spec`'s tiles as products, derived from `register_codes.bit_sources`
  (so it cannot disagree with `pack_tile` or the kernel's decode)."""
  src_row, src_col, src_bit = register_codes.bit_sources(spec)
  c = spec.words_per_row
  shape = (register_codes.WORD_ROWS, c, 32)
  src_row, src_col, src_bit = (a.reshape(shape) for a in (src_row, src_col, src_bit))
  widths = ((0, 2), (2, 1)) if spec.bits == 3 else ((0, spec.bits),)
  mts = spec.rows // register_codes.WORD_ROWS
  fields = []
  for shift, width in widths:
    m = np.zeros((mts, 2, spec.cols, _next_pow2(c)), np.float32)
    for r in range(register_codes.WORD_ROWS):
      seen = np.zeros_like(m)
      words, pos = np.nonzero(src_bit[r] == shift)
      for w, p in zip(words, pos):
        row, col = src_row[r, w, p], src_col[r, w, p]
        if row % register_codes.WORD_ROWS != r:
          raise AssertionError(f"{spec}: word row {r} holds a code of tile row {row}")
        for i in range(1, width):   # the field's bits sit together above bit p
          if (src_row[r, w, p + i], src_col[r, w, p + i], src_bit[r, w, p + i]) != (
              row, col, shift + i):
            raise AssertionError(f"{spec}: code bits {shift}..{shift + width} are split")
        seen[row // register_codes.WORD_ROWS, p // 16, col, w] = 2.0 ** (p % 16)
      if r == 0:
        m = seen
      elif not np.array_equal(seen, m):
        raise AssertionError(f"{spec}: word row {r} packs unlike row 0")
    fields.append(PackField(shift, (1 << width) - 1, m))
  return tuple(fields)


# Shared memory per block on Hopper (H100 / H200: 227 KB).
SHARED_MEMORY_BYTES = 232448


def unsupported(spec: register_codes.TileSpec, dim: int | None = None) -> str | None:
  """Why the kernel cannot write `spec`'s tiles of `dim`-dimensional vectors (None: it
  can): Triton tensors are power-of-two sized, so the tile's rows and columns must be;
  and a program holds its float32 [tokens, dim] block and the [dim, dim] rotation in
  shared memory (at dim 256, Gemma 3's heads, Triton asked for 384 KB on the H200)."""
  for name, n in (("rows", spec.rows), ("cols", spec.cols)):
    if n & (n - 1):
      return f"a tile's {name} ({n}) is not a power of two"
  if dim is not None and 4 * (spec.rows * spec.cols + dim * dim) > SHARED_MEMORY_BYTES:
    return (f"its float32 block and [{dim}, {dim}] rotation need "
            f"{4 * (spec.rows * spec.cols + dim * dim)} bytes of shared memory, more than "
            f"a GPU block's {SHARED_MEMORY_BYTES}")
  return None


def _rotated_levels(x: Array, rotation_t: Array, bounds_ref, num_bounds: int, precision,
                    cents_ref=None, norm_fit: str = "exact"
                    ) -> tuple[Array, Array, Array | None]:
  """(levels int32 [T, n], norms float32 [T], fit float32 [T] or None) of x [T, d] float32
  against rotation_t [d, n], as `MSEQuantizer.quantize_levels` computes them; fit: these
  n coordinates' share of the `norm_fit` denominator (Σ y·c, or Σ c² for "matched")."""
  finite = jnp.logical_and(~jnp.isnan(x), ~jnp.isinf(x))
  bad = jnp.max(jnp.where(finite, 0, 1), axis=-1)
  norms = jnp.sqrt(jnp.sum(x * x, axis=-1))
  norms = jnp.where(bad > 0, jnp.nan, norms)
  safe = jnp.where(norms > 0, norms, 1.0)
  y = jnp.dot(x / safe[:, None], rotation_t, precision=precision,
              preferred_element_type=jnp.float32)
  level = jnp.zeros(y.shape, jnp.int32)
  for k in range(num_bounds):
    level += (y > bounds_ref[k]).astype(jnp.int32)
  if norm_fit == "exact":
    return level, norms, None
  c = jnp.zeros(y.shape, jnp.float32)     # the levels' values, exactly (a select each)
  for k in range(num_bounds + 1):
    c = jnp.where(level == k, cents_ref[k], c)
  return level, norms, jnp.sum((y if norm_fit == "projected" else c) * c, axis=-1)


def _fitted(norms: Array, fit: Array | None, norm_fit: str) -> Array:
  """`MSEQuantizer.fitted_norms` from the norms and the fit summed over every channel."""
  if fit is None:
    return norms
  fit = jnp.sqrt(fit) if norm_fit == "matched" else fit
  return norms / jnp.where(fit > 0, fit, 1.0)


def _kernel(x_ref,          # [tokens, d]
            rot_ref,        # [d, d]: rotate(x) = x @ rot
            bounds_ref,     # [nb]: level boundaries, +inf padded
            cents_ref,      # [nb + 1]: the levels' values (norm_fit's), 0 padded
            *refs,          # per field: its matrices [mts, 2, K, C]; then outputs
            spec: register_codes.TileSpec, fields: tuple[PackField, ...],
            num_bounds: int, transposed: bool, precision, norm_fit: str):
  mat_refs = refs[:len(fields)]
  words_ref, norms_ref = refs[len(fields):]   # [64, C padded], [tokens]
  wr = register_codes.WORD_ROWS
  c = words_ref.shape[-1]
  halves = [jnp.zeros((wr, c), jnp.float32) for _ in range(2)]

  def pack(halves, level, mt, transposed):
    for f, m_ref in zip(fields, mat_refs):
      field = ((level >> f.shift) & f.mask).astype(jnp.bfloat16)
      for h in range(2):
        m = m_ref[mt, h]
        if transposed:   # field [K, 64] -> [64, K] @ m
          halves[h] += jax.lax.dot_general(field, m, _TN,
                                           preferred_element_type=jnp.float32)
        else:
          halves[h] += jnp.dot(field, m, preferred_element_type=jnp.float32)
    return halves

  if not transposed:                  # keys: tile rows are tokens
    rot = rot_ref[...]
    for mt in range(spec.rows // wr):
      x = x_ref[pl.ds(mt * wr, wr), :].astype(jnp.float32)
      level, norms, fit = _rotated_levels(x, rot, bounds_ref, num_bounds, precision,
                                          cents_ref, norm_fit)
      norms_ref[pl.ds(mt * wr, wr)] = _fitted(norms, fit, norm_fit)
      halves = pack(halves, level, mt, transposed=False)
  else:                               # values: tile rows are channels
    x = x_ref[...].astype(jnp.float32)
    total = None
    for mt in range(spec.rows // wr):
      level, norms, fit = _rotated_levels(x, rot_ref[:, pl.ds(mt * wr, wr)], bounds_ref,
                                          num_bounds, precision, cents_ref, norm_fit)
      total = fit if total is None else total + fit
      halves = pack(halves, level, mt, transposed=True)
    norms_ref[...] = _fitted(norms, total, norm_fit)
  lo, hi = (h.astype(jnp.int32) for h in halves)
  words_ref[...] = lo | (hi << 16)


PRECISIONS = {
    # float32 products as XLA's HIGHEST computes them: bit-exact with the jnp quantizer
    # in interpret mode; on the GPU Triton runs them on the CUDA cores (FMA).
    "highest": _HIGHEST,
    # Three TF32 tensor-core products (the split-operand trick): float32 accuracy to
    # within rounding, so codes differ from "highest" only at boundary ties.
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


@functools.partial(jax.jit, static_argnames=("bits", "tokens", "transposed", "interpret",
                                             "num_warps", "precision", "norm_fit"))
def quantize_tiles(x: Array, rotation_t: Array, boundaries: Array, *, bits: int,
                   tokens: int, transposed: bool, interpret: bool = False,
                   num_warps: int = 4, precision: str = "highest",
                   centroids: Array | None = None, norm_fit: str = "exact"
                   ) -> tuple[Array, Array]:
  """Codes of whole tiles of tokens in the tiles layout.

  Args:
    x: [R, T, d] float (T a multiple of `tokens`): the vectors, as `quantize_levels` takes
      them (centred and channel-ordered by the caller).
    rotation_t: float32 [d, d] with rotate(x) = x @ rotation_t (a dense rotation's
      `matrix.T`).
    boundaries: float32 [2^bits - 1] ascending level boundaries.
    bits, tokens, transposed: the `tile_codes.TileLayout` (values: transposed).
    precision: of the rotation's products, a key of `PRECISIONS`.
    centroids, norm_fit: float32 [2^bits] ascending levels and what the stored norms are
      (`MSEQuantizer.create(norm_fit=)`; centroids needed unless "exact").

  Returns:
    words int32 [R, T / tokens · 64, C] (`register_codes.pack_tile` of each tile's levels)
    and norms float32 [R, T] (NaN where a vector holds NaN or Inf, whose levels are 0),
    before their storage dtype.
  """
  r, t, d = x.shape
  spec = (register_codes.TileSpec(bits, d, tokens) if transposed
          else register_codes.TileSpec(bits, tokens, d))
  why = unsupported(spec)
  if why is not None:
    raise ValueError(f"quantize_tiles cannot write these tiles: {why}")
  if t % tokens:
    raise ValueError(f"x holds {t} tokens, not a whole number of {tokens}-token tiles")
  if rotation_t.shape != (d, d) or boundaries.shape != ((1 << bits) - 1,):
    raise ValueError(f"rotation_t {rotation_t.shape} and boundaries {boundaries.shape} "
                     f"do not fit d = {d}, {bits} bits")
  if norm_fit not in ("exact", "projected", "matched"):
    raise ValueError(f"norm_fit must be 'exact', 'projected' or 'matched', got {norm_fit!r}")
  if norm_fit != "exact" and (centroids is None or centroids.shape != (1 << bits,)):
    raise ValueError(f"norm_fit={norm_fit!r} needs centroids [{1 << bits}], got "
                     f"{None if centroids is None else centroids.shape}")
  fields = pack_fields(spec)
  nb = (1 << bits) - 1
  bounds = jnp.concatenate([boundaries.astype(jnp.float32),
                            jnp.full((_next_pow2(nb + 1) - nb,), jnp.inf, jnp.float32)])
  cents = jnp.zeros((_next_pow2(nb + 1),), jnp.float32)
  if centroids is not None:
    cents = cents.at[:nb + 1].set(centroids.astype(jnp.float32))
  c = spec.words_per_row
  c_pad = fields[0].matrices.shape[-1]
  n_tiles = t // tokens
  wr = register_codes.WORD_ROWS
  full = lambda a: pl.BlockSpec(a.shape, lambda i, j, n=a.ndim: (0,) * n)  # noqa: E731
  mats = [jnp.asarray(f.matrices, jnp.bfloat16) for f in fields]   # exact: 0 and 2^p
  in_specs = [pl.BlockSpec((None, tokens, d), lambda i, j: (i, j, 0)),
              full(rotation_t), full(bounds), full(cents)] + [full(m) for m in mats]
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
  kernel = functools.partial(_kernel, spec=spec, fields=fields, num_bounds=nb,
                             transposed=transposed, precision=PRECISIONS[precision],
                             norm_fit=norm_fit)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
  words, norms = pl.pallas_call(
      kernel, grid=(r, n_tiles), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, wr, c_pad), lambda i, j: (i, j, 0)),
                 pl.BlockSpec((None, tokens), lambda i, j: (i, j))],
      out_shape=[jax.ShapeDtypeStruct((r, n_tiles * wr, c_pad), jnp.int32),
                 jax.ShapeDtypeStruct((r, t), jnp.float32)],
      compiler_params=compiler_params, interpret=interpret,
      name="turboquant_quantize_tiles",
  )(x, rotation_t.astype(jnp.float32), bounds, cents, *mats)
  return (words[..., :c] if c_pad != c else words), norms


def quantize_tiles_reference(x: Array, rotation_t: Array, boundaries: Array, *, bits: int,
                             tokens: int, transposed: bool, centroids: Array | None = None,
                             norm_fit: str = "exact", **unused) -> tuple[Array, Array]:
  """`quantize_tiles` in jnp: levels as `quantize_levels` computes them, packed by
  `register_codes.pack_tile`."""
  del unused
  r, t, d = x.shape
  x32 = x.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(x32), axis=-1)
  norms = jnp.where(finite, jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1)), jnp.nan)
  safe = jnp.where(norms > 0, norms, 1.0)[..., None]
  y = jnp.matmul(x32 / safe, rotation_t.astype(jnp.float32), precision=_HIGHEST)
  level = jnp.sum(y[..., None] > boundaries, axis=-1).astype(jnp.uint8)
  if norm_fit != "exact":
    c = jnp.take(centroids.astype(jnp.float32), level.astype(jnp.int32), axis=0)
    norms = _fitted(norms, jnp.sum((y if norm_fit == "projected" else c) * c, -1), norm_fit)
  tiles = level.reshape(r, t // tokens, tokens, d)
  if transposed:
    spec = register_codes.TileSpec(bits, d, tokens)
    tiles = jnp.swapaxes(tiles, -1, -2)
  else:
    spec = register_codes.TileSpec(bits, tokens, d)
  words = register_codes.pack_tile(tiles, spec)
  return words.reshape(r, -1, spec.words_per_row), norms
