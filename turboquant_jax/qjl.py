"""QJL: a 1-bit Gaussian sketch with an unbiased inner-product estimator (arXiv 2406.03482).

For S ∈ R^{m×d} with i.i.d. N(0, 1) entries and any r, q ∈ R^d,

    E[ sign(S·r) · (S·q) ] = m · √(2/π) · <q, r> / ‖r‖,

so  <q, r>  ≈  √(π/2) / m · ‖r‖ · <S·q, sign(S·r)>  is unbiased, with variance
((π/2)‖q‖²‖r‖² - <q, r>²) / m. The query side stays in full precision: only r is
reduced to m sign bits and one norm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def gaussian_sketch(key: Array, d: int, m: int | None = None) -> Array:
  """S: [m, d] with i.i.d. N(0, 1) entries (m = d by default)."""
  m = d if m is None else m
  if d < 1 or m < 1:
    raise ValueError(f"sketch sizes must be positive, got d={d}, m={m}")
  return jax.random.normal(key, (m, d), dtype=jnp.float32)


def sketch(s: Array, x: Array) -> Array:
  """S·x for each vector. s: [m, d], x: [..., d] -> [..., m] float32."""
  if x.shape[-1] != s.shape[-1]:
    raise ValueError(f"x must have a last axis of size {s.shape[-1]}, got shape {x.shape}")
  return jnp.matmul(x.astype(jnp.float32), s.T, precision=jax.lax.Precision.HIGHEST)


def qjl_signs(s: Array, r: Array) -> Array:
  """sign(S·r) as ±1 float32, [..., m]. A zero projection counts as +1."""
  return jnp.where(sketch(s, r) >= 0, 1.0, -1.0).astype(jnp.float32)


def qjl_scale(m: int) -> float:
  """√(π/2) / m, the factor that makes the sign estimator unbiased."""
  return math.sqrt(math.pi / 2) / m


def qjl_inner_product(sketched_q: Array, signs: Array, r_norm: Array) -> Array:
  """Unbiased estimate of <q, r> from S·q, sign(S·r) and ‖r‖.

  Args:
    sketched_q: [..., m], S·q (compute once per query with `sketch`).
    signs: [..., m], ±1.
    r_norm: [...], ‖r‖.

  Returns:
    [...] estimates, broadcast over the leading axes.
  """
  m = signs.shape[-1]
  return qjl_scale(m) * r_norm * jnp.sum(sketched_q * signs, axis=-1)
