"""What the int8 kernel's 4-bit key decode costs: a speed probe on the GPU (H200).

The K4/V3 int8 path (`decode_attention_mgpu.byte_decoder`) turns a word of eight 4-bit
sign-magnitude codes into two int8x4 wgmma registers with 9 instructions (a PRMT table
lookup, a sign PRMT and an XOR per four codes). This times the whole `attend` call at
Llama-3-8B shapes with the key decoder swapped, everything else the library's:

- "default": the library's decode;
- "plain": a nibble-per-byte decode, ``w & 0x0F0F0F0F`` and ``(w >> 4) & 0x0F0F0F0F``
  (3 instructions per word): what keys of 16 evenly spaced levels cost (this probe
  measured it first; the library now has it: `TurboQuantConfig(levels=("uniform",
  "int8"))`, plain nibbles, `decode_e2e`'s "tq3.5-k4uv3-int8-prerotated");
- "raw": the key words' bytes as they are (no decode: the floor);
- "allraw": keys and values raw.

Only the speed means anything: the swapped decoders read the tiles' bits wrongly, so the
outputs are not attention. A first "default" and a last one bracket the run's noise.

    python -m benchmarks.key_decode_probe                  # 8 x 32768
    python -m benchmarks.key_decode_probe --points 8x4096,8x32768

`patch(mode)` swaps the decoder for any other benchmark in the same process (then
`jax.clear_caches()`: kernels are traced once per shape).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels import byte_codes
from pallas_kernels import decode_attention_mgpu as dm

MODES = ("default", "plain", "raw", "allraw")
_LIBRARY_DECODER = dm.byte_decoder


def patch(mode: str) -> None:
  """Swaps `decode_attention_mgpu.byte_decoder` for the mode's decoder (see the module
  docstring); "default" restores the library's."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

  def decoder(bits, table, raw=False, shape=(byte_codes.ROWS, byte_codes.COLS)):
    if mode == "allraw" or (mode == "raw" and bits == 4):
      return _LIBRARY_DECODER(bits, table, True, shape)
    if mode == "plain" and bits == 4:   # the library's plain-nibble decode, on any tile
      return _LIBRARY_DECODER(bits, dm.PLAIN_TABLE, False, shape)
    return _LIBRARY_DECODER(bits, table, raw, shape)

  dm.byte_decoder = _LIBRARY_DECODER if mode == "default" else decoder
  jax.clear_caches()


def main(argv=None) -> None:
  from benchmarks import mgpu_decode as md
  from benchmarks.decode_attention import make_cache
  from benchmarks.kernel_sweep import CONFIGS, kernel_time, shapes
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama3_8b")
  p.add_argument("--config", default="k4v3-int8-prerotated", choices=sorted(CONFIGS))
  p.add_argument("--points", default="8x32768")
  p.add_argument("--calls", type=int, default=7)
  args = p.parse_args(argv)
  hq, hkv, d = shapes(args.model)
  ceiling = md.read_ceiling()
  rows = []
  for point in args.points.split(","):
    b, t = (int(x) for x in point.split("x"))
    cache = make_cache(jax.random.PRNGKey(0), b, t, CONFIGS[args.config], kv_heads=hkv,
                       head_dim=d)
    q = jax.random.normal(jax.random.PRNGKey(1), (b, 1, hq, d), jnp.bfloat16)
    nbytes = int(cache.memory_report()["bytes_per_token_per_head"] * b * hkv * t)
    for mode in (*MODES, "default"):
      patch(mode)
      fn = jax.jit(lambda q, c: c.attend(q, implementation="mosaic"))
      got = kernel_time(fn, q, cache, calls=args.calls)
      rows.append(dict(batch=b, tokens=t, mode=mode, us=got["us"], kernel_us=got["kernel_us"],
                       ceiling_frac=nbytes / got["kernel_us"] / 1e-6 / ceiling))
      print(rows[-1], flush=True)
    patch("default")
    del cache
  path = common.write_result("key_decode_probe", dict(
      model=args.model, config=repr(CONFIGS[args.config]), read_ceiling_bytes_per_s=ceiling,
      rows=rows))
  print(f"wrote {path}")
  common.print_table(rows, ["batch", "tokens", "mode", "us", "kernel_us", "ceiling_frac"])


if __name__ == "__main__":
  main()
