"""Putting checkpoint arrays onto the module tree: what both loaders share."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def assign_param(module, dotted: str, attr: str, value: np.ndarray, dtype) -> None:
  """Sets module.<dotted>.<attr> from a checkpoint array.

  Checkpoints store Linear weights as [out, in]; Flax kernels are [in, out], so a
  "kernel" is transposed. Shapes must then match exactly.
  """
  for part in dotted.split("."):
    module = getattr(module, part)
  param = getattr(module, attr)
  value = value.T if attr == "kernel" else value
  want = param.get_value().shape   # an array, or a ShapeDtypeStruct (`nnx.eval_shape`)
  if value.shape != want:
    raise ValueError(f"{dotted}.{attr}: checkpoint shape {value.shape}, model wants {want}")
  param.set_value(jnp.asarray(value, dtype))
