"""What the int8 kernel's own query rotation costs: a speed probe on the GPU (H200).

With `prologue_rotation="kernel"` (the default where it serves) each CTA copies U (float16
[D, D], 32 KB at D = 128) into shared memory and rotates its kv head's query by a wgmma
before its pipeline starts. This times the whole `attend` call at Llama-3-8B shapes:

- "kernel": the library's path;
- "kernel, U/2" and "kernel, U/8": the same kernel copying only the first half or eighth
  of U's rows (wrong outputs: speed only), so what U's bytes cost shows apart from the
  rest of the rotation;
- "dot": the query rotated by the Triton prologue instead (no U in the Mosaic kernel).

A first "kernel" and a last one bracket the run's noise.

    python -m benchmarks.rotation_probe --points 8x32768,1x4096
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MODES = {"kernel": None, "kernel, U/2": 2, "kernel, U/8": 8}
_COPY = plgpu.copy_gmem_to_smem


def patch(divisor: int | None) -> None:
  """Copies only the first 1 / divisor of the rows of any square float16 operand (U: the
  kernel copies no other) into shared memory; None restores the full copy. Kernels are
  traced once per shape: clear JAX's caches after patching."""
  def copy(src, dst, *args, **kwargs):
    if (divisor and src.ndim == 2 and src.shape[0] == src.shape[1]
        and src.dtype == jnp.float16):
      part = pl.ds(0, src.shape[0] // divisor)
      return _COPY(src.at[part], dst.at[part], *args, **kwargs)
    return _COPY(src, dst, *args, **kwargs)
  plgpu.copy_gmem_to_smem = copy if divisor else _COPY


def main(argv=None) -> None:
  from benchmarks.kernel_sweep import probe_modes

  def setup(mode):
    patch(MODES.get(mode))
    jax.clear_caches()
    return {"prologue_rotation": "dot" if mode == "dot" else "kernel"}
  probe_modes("rotation_probe", __doc__.split("\n")[0], (*MODES, "dot", "kernel"), setup,
              argv, config="k4uv3-int8-prerotated")


if __name__ == "__main__":
  main()
