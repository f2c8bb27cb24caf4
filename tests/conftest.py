"""Shared test settings: float32 JAX on CPU, deterministic keys."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


def unit_vectors(key, n, d):
  x = jax.random.normal(key, (n, d))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)
