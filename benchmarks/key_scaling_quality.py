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
results folder, for its dense fp32 row). The rows come back named with " key-scaled"
beside the unscaled rows of the same names (set aside while it runs: quality skips rows
its file holds).

Measured (2026-12-03, SmolLM2, key-weighted budget 3.5, 8 seeds, Python source): +0.71%
against the unscaled +0.54% (worse on 6 of 8 seeds; `quality_code_key_scaled/`), although
the probe cut the keys' attention-output error to 0.80x. s from the keys alone (E_q flat,
what a cache calibrating on keys could use) raises that error (1.08x at 4 bits;
`transform_probe_keys_only_cpu.json`). Not built into the cache.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp

from benchmarks import quality
from models import evaluation, gguf_loader
from models.tokenizer import tokenizer_from_gguf
from turboquant_jax import rope as rope_lib

CALIBRATION = 256
SUFFIX = " key-scaled"


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


def pair_scales(cfg, layer: int, q, k, use_queries: bool = True):
  """float32 [Hkv, D]: s per channel (equal within a RoPE pair), geometric mean 1.

  use_queries False: s = E_k^(1/4), the optimum were the query energy flat (what a cache
  that sees only keys when it calibrates could use)."""
  e_k, e_q = pair_energies(cfg, layer, q, k)
  e_q = e_q if use_queries else jnp.ones_like(e_q)
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


def rows_path(quality_argv) -> tuple[pathlib.Path, str]:
  """The quality results file a run of `quality_argv` writes (one --model, CPU), and the
  model."""
  q = argparse.ArgumentParser(add_help=False)
  q.add_argument("--model", action="append")
  q.add_argument("--out", type=pathlib.Path, default=quality.common.RESULTS_DIR)
  known, _ = q.parse_known_args(quality_argv)
  if not known.model or len(known.model) != 1:
    raise ValueError("give exactly one --model to the quality arguments")
  return known.out / f"quality_{known.model[0]}_cpu.json", known.model[0]


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  cut = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--text", default=str(quality.PERPLEXITY_TEXT))
  p.add_argument("--text-lines", default=None)
  args = p.parse_args(argv[:cut])
  quality_argv = argv[cut + 1:]
  path, model_name = rows_path(quality_argv)
  # quality skips the rows its results file holds: the unscaled rows of these names would
  # stand in for the scaled ones. They are set aside and put back, the scaled rows renamed.
  out = json.loads(path.read_text()) if path.exists() else {}
  rows = out.get("models", {}).get(model_name, {}).get("perplexity", {})
  unscaled = {n: rows.pop(n) for n in list(rows) if n != "dense fp32" and
              not n.endswith(SUFFIX)}
  if out:
    path.write_text(json.dumps(out, indent=1))
  load = gguf_loader.load_gguf

  def folded(path):
    model, gguf_file = load(path)
    text = quality.load_text(pathlib.Path(args.text), args.text_lines)
    fold_key_scaling(model, quality.text_tokens(tokenizer_from_gguf(gguf_file), text, 2048))
    return model, gguf_file

  gguf_loader.load_gguf = folded   # quality looks it up at call time
  try:
    quality.main(quality_argv)
  finally:
    gguf_loader.load_gguf = load
    out = json.loads(path.read_text()) if path.exists() else {"models": {model_name: {}}}
    rows = out["models"][model_name].setdefault("perplexity", {})
    scaled = {n + SUFFIX: rows.pop(n) for n in list(rows)
              if n != "dense fp32" and not n.endswith(SUFFIX)}
    rows.update(unscaled)
    rows.update(scaled)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
