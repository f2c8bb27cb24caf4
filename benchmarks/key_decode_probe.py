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

import jax
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
  from benchmarks.kernel_sweep import probe_modes

  def setup(mode):
    patch(mode or "default")
    return {}
  probe_modes("key_decode_probe", __doc__.split("\n")[0], (*MODES, "default"), setup, argv)


if __name__ == "__main__":
  main()
