"""Fractional bit widths by channel splitting: b + 0.5 bits as two quantizers.

The channels are split into two groups, each with its own rotation, codebook and norm:
the outlier channels (largest magnitude) get ⌈b⌉ bits, the rest ⌊b⌋. We split d in
halves, which gives exactly b + 0.5 bits (2.5 = d/2 at 3 bits + d/2 at 2; 3.5 = d/2 at 4 +
d/2 at 3) and keeps every bit-plane row a power of two for power-of-two d. (The paper's
"32 of 128 channels at 3 bits, 96 at 2" averages 2.25 bits, not 2.5.) Integer widths are
one group.

A `SplitQuantizer` works on vectors whose channels are already ordered outliers first
(see `outlier_permutation`); the cache keeps that permutation per (sequence, head).
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from turboquant_jax.quantizers import MSEQuantizer, ProdQuantizer, _check_input
from turboquant_jax.rotation import HaarRotation

Array = jax.Array

CACHE_BITS = (2, 2.5, 3, 3.5, 4, 5)
_HIGHEST = jax.lax.Precision.HIGHEST


def group_layout(d: int, bits: float) -> tuple[tuple[int, int], ...]:
  """(channels, integer bits) per group, outlier group first."""
  if bits not in CACHE_BITS:
    raise ValueError(f"bits must be one of {CACHE_BITS}, got {bits!r}")
  if float(bits).is_integer():
    return ((d, int(bits)),)
  if d % 16 or d < 32:
    raise ValueError("fractional bits split d in halves of >= 16 channels and need d >= 32 "
                     f"divisible by 16, got {d}")
  return ((d // 2, math.ceil(bits)), (d // 2, math.floor(bits)))


@flax.struct.dataclass
class SplitQuantizer:
  """One quantizer per channel group; codes are a tuple with one entry per group.

  Attributes:
    groups: the per-group `MSEQuantizer`s or `ProdQuantizer`s.
    bits: average bits per coordinate (static).
    kind: "mse" or "prod" (static).
    blocks: [d, d] float32, the groups' dense rotations as one block-diagonal matrix
      (`unrotation_matrix`), kept where `create` made two or more Haar groups: built
      from the traced rotations it cost three small XLA kernels per decode step; None:
      built on demand.
    blocks_f16: [d, d] float16, the same matrix rounded once, kept where `create` was
      asked for it (`float16_blocks`): the int8 Mosaic kernel rotates its query by a
      float16 wgmma against it, and a cast per decode call cost an XLA kernel per layer.
  """

  groups: tuple[Any, ...]
  bits: float = flax.struct.field(pytree_node=False)
  kind: str = flax.struct.field(pytree_node=False)
  blocks: Array | None = None
  blocks_f16: Array | None = None

  @classmethod
  def create(cls, key: Array, d: int, bits: float, kind: str = "mse", *,
             rotation: str = "haar", norm_dtype=jnp.float16,
             levels: str = "lloyd_max", float16_blocks: bool = False,
             norm_fit: str = "exact") -> "SplitQuantizer":
    """Quantizers for d-vectors at `bits` in `CACHE_BITS` bits per coordinate;
    `levels` and `norm_fit` (each group's own) as for `MSEQuantizer.create`;
    float16_blocks: keep `blocks_f16` too (dense rotations only)."""
    if kind not in ("mse", "prod"):
      raise ValueError(f"quantizer kind must be 'mse' or 'prod', got {kind!r}")
    if kind == "prod" and norm_fit != "exact":
      raise ValueError(f"norm_fit={norm_fit!r} is for MSE codes; QJL keys' residual sketch "
                       "keeps their inner products unbiased already (use 'exact')")
    make = MSEQuantizer.create if kind == "mse" else ProdQuantizer.create
    fit = {} if kind == "prod" else dict(norm_fit=norm_fit)
    groups = tuple(
        make(jax.random.fold_in(key, g), size, b, rotation=rotation, norm_dtype=norm_dtype,
             levels=levels, **fit)
        for g, (size, b) in enumerate(group_layout(d, bits)))
    quantizer = cls(groups=groups, bits=bits, kind=kind)
    if quantizer._dense_blocks():
      quantizer = quantizer.replace(blocks=quantizer._block_diagonal())
    if float16_blocks and all(isinstance(r, HaarRotation) for r in quantizer._rotations()):
      quantizer = quantizer.replace(
          blocks_f16=quantizer.unrotation_matrix().astype(jnp.float16))
    return quantizer

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(g.dim for g in self.groups)

  @property
  def dim(self) -> int:
    return sum(self.sizes)

  @property
  def is_split(self) -> bool:
    return len(self.groups) > 1

  def bytes_per_vector(self) -> int:
    return sum(g.bytes_per_vector() for g in self.groups)

  def _split(self, x: Array) -> list[Array]:
    bounds, start = [], 0
    for size in self.sizes:
      bounds.append(x[..., start:start + size])
      start += size
    return bounds

  def quantize(self, x: Array) -> tuple[Any, ...]:
    """x: [..., d] (outliers first) -> one codes pytree per group."""
    return tuple(g.quantize(part) for g, part in zip(self.groups, self._split(x)))

  def dequantize(self, codes: tuple[Any, ...], dtype=jnp.float32) -> Array:
    return jnp.concatenate([g.dequantize(c, dtype) for g, c in zip(self.groups, codes)], -1)

  def _rotations(self) -> list[Any]:
    return [g.rotation if self.kind == "mse" else g.mse.rotation for g in self.groups]

  def unrotation_matrix(self, dtype=jnp.float32) -> Array:
    """[d, d] block-diagonal: a row vector of the groups' rotated parts side by side, times
    this, is the vector in the groups' channel order (each group's Πᵀ applied); float32,
    or float16 (`blocks_f16` where kept, else rounded here)."""
    if jnp.dtype(dtype) == jnp.float16 and self.blocks_f16 is not None:
      return self.blocks_f16
    u = self._block_diagonal() if self.blocks is None else self.blocks
    return u.astype(dtype)

  def _block_diagonal(self) -> Array:
    return jax.scipy.linalg.block_diag(*(r.as_matrix() for r in self._rotations()))

  def _dense_blocks(self) -> bool:
    # Dense rotations of two or more groups: one product with the block-diagonal matrix
    # costs one small matmul kernel where one per group cost several (decode glue).
    return self.is_split and all(isinstance(r, HaarRotation) for r in self._rotations())

  def transform_queries(self, q: Array) -> tuple[Any, ...]:
    """Per group, the query transforms its estimator needs (Π·q, and S·Π·q for prod)."""
    if self.kind == "mse" and self._dense_blocks():
      # The checks each group's rotate_queries makes (dtype, shape, NaN), on the whole q.
      return tuple(self._split(self.rotated_queries(q)))    # Π_g·q_g side by side
    return tuple(g.rotate_queries(part) for g, part in zip(self.groups, self._split(q)))

  def rotated_queries(self, q: Array) -> Array:
    """[..., d] float32: the groups' Π_g·q_g side by side (the first part of each
    `transform_queries` entry), one product where the rotations are dense blocks."""
    if self._dense_blocks():
      q = _check_input(q, self.dim, "q")
      return jnp.matmul(q.astype(jnp.float32), self.unrotation_matrix().T,
                        precision=_HIGHEST)
    parts = self.transform_queries(q)
    return jnp.concatenate([p[0] if isinstance(p, tuple) else p for p in parts], axis=-1)

  def scores(self, q_transformed: tuple[Any, ...], codes: tuple[Any, ...]) -> Array:
    """<q, x̂> summed over groups. q: [..., nq, ·], codes: [..., n] -> [..., nq, n]."""
    total = 0.0
    for g, qt, c in zip(self.groups, q_transformed, codes):
      qt = qt if isinstance(qt, tuple) else (qt,)
      total = total + g.inner_products_rotated(*qt, c)
    return total

  def weighted_sums_rotated(self, weights: Array, codes: tuple[Any, ...]) -> tuple[Array, ...]:
    """Σ_n w[..., q, n]·x̂_n kept in each group's rotated domain: [..., nq, d_g] per group."""
    return tuple(
        jnp.einsum("...qn,...nd->...qd", weights, g.rotated_values(c), precision=_HIGHEST)
        for g, c in zip(self.groups, codes))

  def unrotate(self, parts: tuple[Array, ...]) -> Array:
    """One inverse rotation per group, then the groups side by side: [..., d]."""
    if self._dense_blocks():
      return jnp.matmul(jnp.concatenate(parts, axis=-1), self.unrotation_matrix(),
                        precision=_HIGHEST)
    return jnp.concatenate([r.unrotate(p) for r, p in zip(self._rotations(), parts)],
                           axis=-1)


def outlier_permutation(x: Array, valid: Array, num_outliers: int) -> Array:
  """Channel order that puts the `num_outliers` largest-RMS channels first.

  Args:
    x: [..., T, d] vectors.
    valid: [..., T] bool, which of the T vectors count.
    num_outliers: size of the first group.

  Returns:
    [..., d] int32 permutation: outliers in increasing channel order, then the rest.
  """
  w = valid.astype(jnp.float32)[..., None]
  power = jnp.sum(jnp.square(x.astype(jnp.float32)) * w, axis=-2)
  d = x.shape[-1]
  rank = jnp.argsort(-power, axis=-1, stable=True)
  is_outlier = jnp.zeros(power.shape, bool)
  is_outlier = jnp.put_along_axis(is_outlier, rank[..., :num_outliers], True, axis=-1,
                                  inplace=False)
  # Sort by (not outlier, channel index): a deterministic, index-ordered split.
  order_key = jnp.where(is_outlier, 0, d) + jnp.arange(d)
  return jnp.argsort(order_key, axis=-1).astype(jnp.int32)


def permute_channels(x: Array, perm: Array | None) -> Array:
  """x: [B, H, T, D], perm: [B, H, D] (or None: identity) -> x[..., perm]."""
  if perm is None:
    return x
  return jnp.take_along_axis(x, perm[:, :, None, :], axis=-1)


def unpermute_channels(x: Array, perm: Array | None) -> Array:
  """The inverse of `permute_channels`."""
  if perm is None:
    return x
  # A scatter: the inverse order by argsort costs a sort kernel per call (decode glue).
  idx = jnp.broadcast_to(perm[:, :, None, :], x.shape)
  return jnp.put_along_axis(jnp.zeros_like(x), idx, x, axis=-1, inplace=False)
