"""Measured D_mse and D_prod beside the paper's figures and bounds.

D_mse(b) = E‖x - x̂‖² and D_prod(b) = E(<y, x> - <y, x̂>)² for unit x and unit y.

    python -m benchmarks.distortion [--n 20000]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from turboquant_jax import codebook
from turboquant_jax.quantizers import MSEQuantizer, ProdQuantizer

# The paper's large-d figures (Fig. 3 / Thm. 1-2).
PAPER_D_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_D_PROD_TIMES_D = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}


def unit(key, n, d):
  x = jax.random.normal(key, (n, d))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def measure(d: int, bits: int, n: int, rotation: str, seed: int = 0) -> dict:
  kx, ky, kq = jax.random.split(jax.random.PRNGKey(seed), 3)
  x, y = unit(kx, n, d), unit(ky, n, d)
  mse_q = MSEQuantizer.create(kq, d, bits, rotation=rotation)
  prod_q = ProdQuantizer.create(kq, d, bits, rotation=rotation)
  x_mse = jax.jit(lambda v: mse_q.dequantize(mse_q.quantize(v)))(x)
  x_prod = jax.jit(lambda v: prod_q.dequantize(prod_q.quantize(v)))(x)
  truth = jnp.sum(x * y, -1)
  d_mse = float(jnp.mean(jnp.sum((x - x_mse) ** 2, -1)))
  err_prod = np.asarray(jnp.sum(x_prod * y, -1) - truth, np.float64)
  err_mse = np.asarray(jnp.sum(x_mse * y, -1) - truth, np.float64)
  return {
      "d": d, "bits": bits, "rotation": rotation, "n": n,
      "d_mse": d_mse,
      "d_mse_lloyd_max_exact": codebook.lloyd_max_codebook(d, bits).mse,
      "d_mse_paper": PAPER_D_MSE[bits],
      "d_mse_upper_bound": math.sqrt(3) * math.pi / 2 * 4.0**-bits,
      "d_mse_lower_bound": 4.0**-bits,
      "d_prod": float(np.mean(err_prod**2)),
      "d_prod_bias": float(err_prod.mean()),
      "d_prod_bias_stderr": float(err_prod.std() / math.sqrt(n)),
      "d_prod_predicted": (math.pi / 2) * codebook.lloyd_max_codebook(d, bits - 1).mse / d,
      "d_prod_paper": PAPER_D_PROD_TIMES_D[bits] / d,
      "d_prod_upper_bound": math.sqrt(3) * math.pi**2 / d * 4.0**-bits,
      "d_prod_lower_bound": 4.0**-bits / d,
      # The MSE quantizer's inner products, biased (shrunk by 1 - D_mse) but lower-variance.
      "mse_ip_error": float(np.mean(err_mse**2)),
      "mse_ip_bias_ratio": float(np.sum(err_mse * np.asarray(truth)) / np.sum(np.asarray(truth)**2)),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=int, default=20_000, help="unit vectors per setting")
  parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
  args = parser.parse_args(argv)
  rows = []
  for d in args.dims:
    for rotation in ("haar", "hadamard"):
      for bits in (1, 2, 3, 4):
        rows.append(measure(d, bits, args.n, rotation))
  path = common.write_result("distortion", {"rows": rows})
  table = [{
      "d": r["d"], "rot": r["rotation"], "b": r["bits"],
      "D_mse": r["d_mse"], "exact": r["d_mse_lloyd_max_exact"], "paper": r["d_mse_paper"],
      "bound": r["d_mse_upper_bound"],
      "d·D_prod": r["d_prod"] * r["d"], "d·pred": r["d_prod_predicted"] * r["d"],
      "d·paper": r["d_prod_paper"] * r["d"], "bias/se": r["d_prod_bias"] / r["d_prod_bias_stderr"],
  } for r in rows]
  common.print_table(table, list(table[0]))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
