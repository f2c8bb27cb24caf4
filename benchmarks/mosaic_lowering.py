"""The Mosaic GPU decode kernel as lowered on this host (no GPU needed): a hash of each
configuration's module and the shared memory it asks per CTA.

A kernel change that should not touch a configuration must leave its hash unchanged
(compare the table before and after the change); the shared memory says how many CTAs an
SM can hold (228 KB per SM on Hopper, 1 KB reserved per CTA), which bounded the 3.5-bit
kernel with keys centred before RoPE on the H200.

    python -m benchmarks.mosaic_lowering
"""

from __future__ import annotations

import hashlib
import re
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention_mgpu as dm
from pallas_kernels import register_codes as rc

SMEM_PER_SM = 228 * 1024
RESERVED_PER_CTA = 1024


def module_asm(lowered_text: str) -> str:
  """The Mosaic GPU module inside a lowered computation, printed without locations."""
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib.mlir import ir
  raw = re.search(r'module = "((?:[^"\\]|\\.)*)"', lowered_text).group(1)
  data, i = bytearray(), 0
  while i < len(raw):          # MLIR's string escapes: \\, \", \XX
    if raw[i] == "\\" and raw[i + 1] in "\\\"":
      data.append(ord(raw[i + 1]))
      i += 2
    elif raw[i] == "\\":
      data.append(int(raw[i + 1:i + 3], 16))
      i += 3
    else:
      data.append(ord(raw[i]))
      i += 1
  ctx = jax_mlir.make_ir_context()
  ctx.allow_unregistered_dialects = True
  with ctx:
    return ir.Module.parse(bytes(data)).operation.get_asm(enable_debug_info=False)


def smem_bytes(asm: str) -> int:
  """Shared memory the module asks per CTA (its scratch view)."""
  return max(int(n) for n in re.findall(r"memref<(\d+)xi8, #gpu.address_space<workgroup>>",
                                        asm))


def lower(key_groups, value_groups, tt: int, *, rope: bool = False, table_rows=None,
          key_levels=(0.04, 0.001), value_levels=(0.02, 0.0), r: int = 4, t: int = 1024,
          splits: int = 2, exact: tuple[int, ...] = (), **kw) -> str:
  """`decode_partials` lowered for CUDA: (bits, channels) per group and side, `tt`-token
  tiles, bf16 exact parts of the given slot counts (none: no exact split); the text of
  the lowered computation."""
  s = jax.ShapeDtypeStruct
  ks = tuple(rc.TileSpec(b, tt, c) for b, c in key_groups)
  vs = tuple(rc.TileSpec(b, c, tt) for b, c in value_groups)
  d = sum(c for _, c in key_groups)
  words = t // tt * rc.WORD_ROWS
  args = (tuple(s((r, words, x.words_per_row), jnp.int32) for x in ks),
          tuple(s((r, t), jnp.float16) for _ in ks),
          tuple(s((r, words, x.words_per_row), jnp.int32) for x in vs),
          tuple(s((r, t), jnp.float16) for _ in vs),
          tuple(s((r, dm.HEADS, x.cols), jnp.float16) for x in ks),
          s((r, 2), jnp.int32), s((r, dm.HEADS), jnp.float32),
          s((r, dm.HEADS, d // 2), jnp.float32), s((r, dm.HEADS, d // 2), jnp.float32))
  bf16 = jnp.bfloat16
  exact_args = None
  if exact:
    b = r // 2        # two kv heads per batch entry; the first part a ring, the rest sinks
    exact_args = dm.ExactTokens(
        s((r, dm.HEADS, d), bf16), s((b, 1 + 2 * len(exact)), jnp.int32),
        tuple(s((r, n, d), bf16) for n in exact), tuple(s((r, n, d), bf16) for n in exact),
        (s((b, exact[0]), jnp.int32),) + (None,) * (len(exact) - 1))

  def call(*a, exact=None):
    *a, ca, cb = a
    freq = 10000.0 ** (-jnp.arange(d // 2) * 2.0 / d)
    return dm.decode_partials(
        *a, key_spec=ks, value_spec=vs, key_levels=(key_levels,) * len(ks),
        value_levels=(value_levels,) * len(vs), num_splits=splits, scale=0.1,
        rope=dm.rope_offsets(ca, cb, freq, t, block=tt, table_rows=table_rows) if rope
        else None, exact=exact, **kw)
  return jax.jit(call).trace(*args, exact=exact_args).lower(
      lowering_platforms=("cuda",)).as_text()


G35 = (((4, 64), (3, 64)), ((4, 64), (3, 64)), 256)   # 3.5 / 3.5 bits at d = 128
CONFIGS = {
    "K4/V4": lambda: lower(((4, 128),), ((4, 128),), 128),
    "K3/V2 soft-cap": lambda: lower(((3, 128),), ((2, 128),), 128, soft_cap=5.0),
    "K3/V3 rope": lambda: lower(((3, 128),), ((3, 128),), 128, rope=True),
    "K4/V4 rope": lambda: lower(((4, 128),), ((4, 128),), 128, rope=True),
    "3.5/3.5": lambda: lower(*G35),
    # kernel_attention's default for 256-token steps: a 64-row RoPE table.
    "3.5/3.5 rope": lambda: lower(*G35, rope=True, table_rows=64),
    "3.5/3.5 rope, 256-row table": lambda: lower(*G35, rope=True),
    "3.5/3.5 rope, one pass": lambda: lower(*G35, rope=True, table_rows=64, sub_steps=1),
    # The exact window (256 slots at 3.5 bits in 128-token splits, 128 at 3 in 64) and 4
    # sinks, as more splits (`ExactTokens`): kernel_attention's default on the GPU.
    "K3/V3 rope exact": lambda: lower(((3, 128),), ((3, 128),), 128, rope=True,
                                      exact=(128, 4)),
    "3.5/3.5 rope exact": lambda: lower(*G35, rope=True, table_rows=64, exact=(256, 4),
                                        exact_blocks=(128, 64)),
}


def main(argv=None) -> int:
  del argv
  print(f"{'configuration':30s} {'module sha1':14s} {'smem bytes':>10s}  CTAs/SM by smem")
  for name, make in CONFIGS.items():
    asm = module_asm(make())
    smem = smem_bytes(asm)
    print(f"{name:30s} {hashlib.sha1(asm.encode()).hexdigest()[:12]:14s} {smem:10d}  "
          f"{SMEM_PER_SM // (smem + RESERVED_PER_CTA)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
