"""The rotary position embedding (RoPE), as a static spec a decoder hands to its caches.

Keys reach the cache after RoPE: pair p of a key at position t is turned by the angle
ω_p·t, ω_p = base^(-2p/D). A cache that centres keys before RoPE (`TurboQuantConfig(
center_keys="rope")`) needs the same rotation to move a fixed mean μ to R(t)·μ.

`rotate` is the decoders' own embedding. `rotate_split` is the rotation the cache uses for
its centering offsets: R(t) = R(h)·R(l) with h = t - t mod n and l = t mod n (n = 128, or
the tiles' 256 tokens: `TurboQuantKVCache.rope_split`), each angle rounded to float32 on
its own. Mathematically the same; in float32 it lets a kernel get R(t)·μ for every token
of a block from one sine and cosine per n tokens (angles at h) and a table at l < n, with
no trigonometry per key, and still agree with the cache to rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

SPLIT = 128  # the default period of `rotate_split`; a kernel's blocks divide the period


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Static description of a decoder's RoPE.

  Attributes:
    base: θ in ω_p = θ^(-2p/D).
    interleaved: pairs are (2p, 2p+1) (llama.cpp's Llama Q/K layout) instead of the
      halves (p, p + D/2).
  """

  base: float = 10000.0
  interleaved: bool = False

  def __post_init__(self):
    if not self.base > 1:
      raise ValueError(f"the RoPE base must be > 1, got {self.base!r}")

  def frequencies(self, d: int) -> Array:
    """[D/2] float32 ω_p."""
    if d % 2:
      raise ValueError(f"RoPE needs an even head dim, got {d}")
    return self.base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)

  def pairs(self, x: Array) -> tuple[Array, Array]:
    """The two coordinates of every pair: x [..., D] -> ([..., D/2], [..., D/2])."""
    d = x.shape[-1]
    if self.interleaved:
      return x[..., 0::2], x[..., 1::2]
    return x[..., : d // 2], x[..., d // 2:]

  def unpairs(self, a: Array, b: Array) -> Array:
    """Inverse of `pairs`."""
    if self.interleaved:
      return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
    return jnp.concatenate([a, b], axis=-1)


def rotate(x: Array, positions: Array, spec: RopeSpec) -> Array:
  """R(t)·x: x [..., D], positions broadcastable to x.shape[:-1]; float32 angles."""
  angles = positions.astype(jnp.float32)[..., None] * spec.frequencies(x.shape[-1])
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = spec.pairs(x.astype(jnp.float32))
  return spec.unpairs(x1 * cos - x2 * sin, x2 * cos + x1 * sin).astype(x.dtype)


def rotate_split(x: Array, positions: Array, spec: RopeSpec, split: int = SPLIT) -> Array:
  """R(h)·R(l)·x with h = t - t mod split, l = t mod split (see the module docstring)."""
  positions = jnp.asarray(positions, jnp.int32)
  low = positions % split
  return rotate(rotate(x, low, spec), positions - low, spec)


def unrotate_split(x: Array, positions: Array, spec: RopeSpec, split: int = SPLIT) -> Array:
  """The inverse of `rotate_split`: R(-l)·R(-h)·x."""
  positions = jnp.asarray(positions, jnp.int32)
  low = positions % split
  return rotate(rotate(x, low - positions, spec), -low, spec)
