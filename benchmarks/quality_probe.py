"""Where Gemma 3's budget loses perplexity: probes behind the quality targets (CPU).

- `rotations`: per rotation seed and layer, the attention-output error of the prompt's
  queries with keys, values, or both read back from a cache of the budget's widths
  (`budget.readback_errors`: no exact window, the layer's sliding window and soft-cap), on
  the first 256 tokens (what a cache calibrates on) and on all 2,048: does a seed's error
  predict its perplexity (`quality_gemma3_budget_5seeds_cpu.json` per seed)? If so, a
  cache could keep the best of a few rotations at calibration.
- `exact`: the budget's perplexity per seed with the given layers kept exact (dense): the
  most that more bits for those layers could give; or with some layers' widths replaced
  (`--widths`, e.g. values before keys in the local layers at the same stored bits).
- `rings`: dense global layers, the sliding-window layers' rings exact, int8 (q8_0-style)
  and int8 with their latest 128 tokens exact; and llama.cpp's q8_0 on every layer with
  no exact window or sinks: what 8-bit codes on the most recent tokens cost.
- `heads`: would widths per kv head beat widths per layer? Per (layer, kv head), the
  attention-output error of that head's query group at each width on the text's first
  256 tokens (what the measured budget sees, `budget.width_errors`); then the greedy
  allocation (`budget.allocate_bits`) at budgets 2.5/3/3.5 with one width per layer
  (the heads' errors summed) against one per (layer, head), compared by their summed
  errors (a proxy, not perplexity). Gemma 3 270M has one kv head: nothing to gain there.

    python -m benchmarks.quality_probe rotations [--model gemma3] [--budget 3.5] [--seeds 5]
    python -m benchmarks.quality_probe exact --layers 11 [--model gemma3] [--budget 3.5]
    python -m benchmarks.quality_probe exact --layers "" --widths 3=3/3.5,4=3/3.5
    python -m benchmarks.quality_probe rings [--model gemma3]
    python -m benchmarks.quality_probe heads --model smollm2 [--text T --text-lines a:b]

Writes benchmarks/results/quality_probe_<model>_cpu.json (one key per probe and budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import quality
from models import evaluation, gguf_loader
from models.tokenizer import tokenizer_from_gguf
from turboquant_jax import (DenseKVCache, TurboQuantConfig, UniformConfig, UniformKVCache)
from turboquant_jax import budget as budget_lib
from turboquant_jax.budget import budget_layer_bits, readback_errors
from turboquant_jax.layer_policy import turboquant_per_layer, window_rings


def load(name: str, tokens: int = 2048, text=quality.PERPLEXITY_TEXT,
         lines: str | None = None):
  model, gguf_file = gguf_loader.load_gguf(quality.MODELS[name]())
  tok = tokenizer_from_gguf(gguf_file)
  return model, quality.text_tokens(tok, quality.load_text(text, lines), tokens)


def rotations(model, tokens, budget: float, seeds: int) -> dict:
  cfg = model.cfg
  bits = budget_layer_bits(budget, cfg.num_layers, cfg.head_dim, layer_window=cfg.layer_window)
  qkv = evaluation.layer_qkv(model, tokens)
  out = {"layer_bits": {str(k): v for k, v in bits.items()}}
  for t in (256, tokens.shape[1]):
    errors = np.zeros((seeds, cfg.num_layers, 3))
    for layer, (q, k, v) in enumerate(qkv):
      configs = [TurboQuantConfig(key_bits=bits[layer][0], value_bits=bits[layer][1],
                                  seed=s, window=0) for s in range(seeds)]
      errors[:, layer] = readback_errors(
          q[:, :t], k[:, :t], v[:, :t], configs, layer=layer, rope=cfg.layer_rope(layer),
          scale=cfg.scale, sliding_window=cfg.layer_window(layer),
          soft_cap=cfg.attn_soft_cap, both=True)
    out[f"first_{t}_tokens"] = {
        "errors_seed_layer_kvboth": errors.tolist(),
        "sum_over_layers_per_seed": errors.sum(1).tolist()}
  return out


def exact_layers(model, tokens, budget: float, seeds: int, layers: tuple[int, ...],
                 widths: dict | None = None) -> dict:
  cfg = model.cfg
  bits = budget_layer_bits(budget, cfg.num_layers, cfg.head_dim, layer_window=cfg.layer_window)
  bits.update(widths or {})
  for layer in layers:
    bits.pop(layer)
  makes = [turboquant_per_layer(TurboQuantConfig(seed=s), layer_bits=bits,
                                full_precision_layers=layers) for s in range(seeds)]
  start = time.perf_counter()
  nll = evaluation.decode_nll_variants(model, tokens, makes)
  ppl = [evaluation.perplexity(n) for n in nll]
  return {"exact_layers": list(layers), "layer_bits": {str(k): v for k, v in bits.items()},
          "perplexity": ppl, "mean": float(np.mean(ppl)),
          "seconds": time.perf_counter() - start}


def rings(model, tokens) -> dict:
  """Perplexity (one run each: no rotation) of dense caches with the local layers' rings
  exact, int8, int8 with 128 exact recent tokens; and q8_0 with no exact tokens."""
  window = model.cfg.layer_window
  makes = {
      "dense": DenseKVCache.create,
      "dense, exact local rings": window_rings(DenseKVCache.create, window),
      "dense, int8 local rings": window_rings(DenseKVCache.create, window,
                                              ring_dtype=jnp.int8),
      "dense, int8 local rings exact 128": window_rings(
          DenseKVCache.create, window, ring_dtype=jnp.int8, exact_recent=128),
      "q8_0, no window or sinks": functools.partial(
          UniformKVCache.create, config=UniformConfig.llama_cpp(8, window=0, num_sinks=0)),
  }
  out = {}
  for name, make in makes.items():
    start = time.perf_counter()
    out[name] = evaluation.perplexity(evaluation.decode_nll(model, tokens, make)[0])
    print(f"{name:36s} ppl {out[name]:.4f}  {time.perf_counter() - start:5.0f} s", flush=True)
  return {"perplexity": out, "change_vs_dense_pct": {
      k: 100 * (v / out["dense"] - 1) for k, v in out.items()}}


def heads(model, tokens, budgets=(2.5, 3.0, 3.5)) -> dict:
  """Widths per (layer, kv head) against per layer, by the summed attention-output error
  of the greedy allocation at each budget (see the module docstring)."""
  cfg = model.cfg
  config = dataclasses.replace(quality.tq_config(), seed=0)
  widths = budget_lib._widths(config, None)
  costs = budget_lib._costs(config, widths, cfg.head_dim)
  qkv = evaluation.layer_qkv(model, tokens[:, :quality.MEASURED_PROMPT])
  hkv = qkv[0][1].shape[2]
  group = qkv[0][0].shape[2] // hkv
  errors = {}   # (layer, head) -> [2, W]
  for layer, (q, k, v) in enumerate(qkv):
    for h in range(hkv):
      errors[layer, h] = budget_lib.width_errors(
          q[:, :, h * group:(h + 1) * group], k[:, :, h:h + 1], v[:, :, h:h + 1],
          config=config, widths=widths, rope=cfg.layer_rope(layer), scale=cfg.scale,
          sliding_window=cfg.layer_window(layer), soft_cap=cfg.attn_soft_cap)
  at = {w: i for i, w in enumerate(widths)}

  def total(choice):   # (layer, head) -> (key width, value width)
    return float(sum(e[0, at[choice(*u)[0]]] + e[1, at[choice(*u)[1]]]
                     for u, e in errors.items()))
  out = {"kv_heads": hkv, "widths": list(widths)}
  layers = sorted({layer for layer, _ in errors})
  for b in budgets:
    per_layer = budget_lib.allocate_bits(
        {layer: sum(errors[layer, h] for h in range(hkv)) for layer in layers}, costs, b,
        widths)
    per_head = budget_lib.allocate_bits({layer * hkv + h: e for (layer, h), e in errors.items()},
                                    costs, b, widths)
    e_layer = total(lambda layer, h: per_layer[layer])
    e_head = total(lambda layer, h: per_head[layer * hkv + h])
    out[f"budget {b}"] = {"per_layer_error": e_layer, "per_head_error": e_head,
                          "ratio": e_head / e_layer}
  # Within a layer, how far apart its heads' key errors are at 3 bits (max / min).
  spread = [max(errors[layer, h][0, at[3]] for h in range(hkv))
            / max(min(errors[layer, h][0, at[3]] for h in range(hkv)), 1e-30)
            for layer in layers]
  out["key_error_spread_3_bits"] = {"median": float(np.median(spread)),
                                    "max": float(np.max(spread))}
  out["errors"] = {f"{layer},{h}": e.tolist() for (layer, h), e in errors.items()}
  return out


def _width(text: str) -> float | int:
  return float(text) if "." in text else int(text)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("probe", choices=("rotations", "exact", "rings", "heads"))
  p.add_argument("--model", default="gemma3", choices=sorted(quality.MODELS))
  p.add_argument("--budget", type=float, default=3.5)
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--layers", default="11", help="exact: layers kept exact, e.g. 5,11,17")
  p.add_argument("--widths", default="",
                 help="exact: layers' widths replaced, e.g. 3=3/3.5,4=3/3.5 (key/value)")
  p.add_argument("--text", type=pathlib.Path, default=quality.PERPLEXITY_TEXT)
  p.add_argument("--text-lines", help="a:b, only these lines of --text")
  args = p.parse_args(argv)
  model, tokens = load(args.model, text=args.text, lines=args.text_lines)
  text = args.text.name + (f" {args.text_lines}" if args.text_lines else "")
  if args.probe == "heads":
    result = heads(model, tokens)
    key = f"heads {text}"
  elif args.probe == "rotations":
    result = rotations(model, tokens, args.budget, args.seeds)
    key = f"rotations budget {args.budget}"
  elif args.probe == "rings":
    result = rings(model, tokens)
    key = "rings"
  else:
    layers = tuple(int(x) for x in args.layers.split(",") if x)
    widths = {int(layer): tuple(_width(x) for x in kv.split("/"))
              for layer, kv in (item.split("=") for item in args.widths.split(",") if item)}
    result = exact_layers(model, tokens, args.budget, args.seeds, layers, widths)
    key = (f"exact layers {args.layers} budget {args.budget}"
           + (f" widths {args.widths}" if args.widths else ""))
  path = common.RESULTS_DIR / f"quality_probe_{args.model}_cpu.json"
  out = json.loads(path.read_text()) if path.exists() else {}
  out.pop("environment", None)
  out.pop("benchmark", None)
  out[key] = result
  common.write_result(f"quality_probe_{args.model}", out)
  print(key, json.dumps({k: v for k, v in result.items() if "errors" not in k})[:600])


if __name__ == "__main__":
  main()
