"""Perplexity with keys scaled per RoPE pair before the cache (`transform_probe keys`), CPU.

Folds s = (E_k / E_q)^(1/4) per RoPE pair and kv head (centred pre-RoPE key energy over
query energy, from the text's own first 256 tokens: what a cache calibrates on) into the
decoder's projections, keys by 1/s and queries by s, so q·k is unchanged and only the
cache sees scaled keys; then runs `benchmarks.quality` on the folded model. A trial of
the idea before the cache calibrates s itself (its append and query transform would
carry it at no kernel cost).

    python -m benchmarks.key_scaling_quality --text T [--text-lines a:b] -- <quality args>

e.g. `... --text /usr/share/vim/vim90/doc/usr_03.txt -- --model smollm2 --needle-lengths ""
--exact "turboquant key-weighted budget 3.5 fp16 key fp8 value norms window 256" --text
/usr/share/vim/vim90/doc/usr_03.txt --seeds 8 --out DIR` (DIR: a copy of the text's
results folder, for its dense fp32 row).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp

from benchmarks import quality
from models import evaluation, gguf_loader
from models.tokenizer import tokenizer_from_gguf
from turboquant_jax import rope as rope_lib

CALIBRATION = 256


def pair_energies(cfg, layer: int, q, k):
  """float32 [Hkv, D/2] each: the centred pre-RoPE key energy and the query energy (over
  the kv head's query heads) of every RoPE pair."""
  spec = cfg.layer_rope(layer)
  b, t, hkv, d = k.shape
  g = q.shape[2] // hkv
  pos = jnp.arange(t)[None, :, None]
  before = rope_lib.rotate(k.astype(jnp.float32), -pos, spec)
  a1, a2 = spec.pairs(before - before.mean(1, keepdims=True))
  e_k = (a1 ** 2 + a2 ** 2).mean((0, 1))
  b1, b2 = spec.pairs(q.astype(jnp.float32).reshape(b, t, hkv, g, d))
  e_q = (b1 ** 2 + b2 ** 2).mean((0, 1, 3))
  return e_k, e_q


def pair_scales(cfg, layer: int, q, k):
  """float32 [Hkv, D]: s per channel (equal within a RoPE pair), geometric mean 1."""
  e_k, e_q = pair_energies(cfg, layer, q, k)
  s = (e_k / jnp.maximum(e_q, 1e-12)) ** 0.25
  s = s / jnp.exp(jnp.log(s).mean(-1, keepdims=True))
  return cfg.layer_rope(layer).unpairs(s, s)


def fold_key_scaling(model, tokens) -> None:
  """Scales k_proj's columns by 1/s and q_proj's by s, in place (no q/k norms)."""
  cfg = model.cfg
  if cfg.qk_norm:
    raise ValueError("key scaling folds into the projections only without q/k norms")
  for layer, (q, k, _) in enumerate(evaluation.layer_qkv(model, tokens[:, :CALIBRATION])):
    s = pair_scales(cfg, layer, q, k)
    g = q.shape[2] // k.shape[2]
    attn = model.layers[layer].attn
    kk, qq = attn.k_proj.kernel[...], attn.q_proj.kernel[...]
    attn.k_proj.kernel[...] = (kk / s.reshape(-1)[None, :]).astype(kk.dtype)
    attn.q_proj.kernel[...] = (qq * jnp.repeat(s[:, None], g, axis=1).reshape(-1)[None, :]
                               ).astype(qq.dtype)   # q head h·g + j reads kv head h


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  cut = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--text", default=str(quality.PERPLEXITY_TEXT))
  p.add_argument("--text-lines", default=None)
  args = p.parse_args(argv[:cut])
  load = gguf_loader.load_gguf

  def folded(path):
    model, gguf_file = load(path)
    text = quality.load_text(pathlib.Path(args.text), args.text_lines)
    fold_key_scaling(model, quality.text_tokens(tokenizer_from_gguf(gguf_file), text, 2048))
    return model, gguf_file

  gguf_loader.load_gguf = folded   # quality looks it up at call time
  try:
    quality.main(argv[cut + 1:])
  finally:
    gguf_loader.load_gguf = load


if __name__ == "__main__":
  main()
