"""Perplexity change of cache settings over many rotation seeds, from `readback_nll`.

The quality harness (`benchmarks.quality`) fills the cache token by token (about 4 minutes
a seed for SmolLM2 on 2 cores); this reads each layer's codes back in one causal pass
(`models.evaluation.readback_nll`: SmolLM2's K4/V2.5 on Python source within 2e-4 of the
decode path's perplexity at each of 8 seeds, 11-16 s a run), so many seeds are cheap: a
setting's mean over seeds, and its difference from the first setting paired by seed.

    python -m benchmarks.readback_perplexity --text argparse.py --text-lines 100:2400 \
        --seeds 0-7 --settings kw35 kw35-projected-values k5v5

Settings (`SETTINGS`) start from the key-weighted budget 3.5's choice on SmolLM2 (K4/V2.5,
fp16 key / fp8 value norms, window 256) with the fitted norms of 2026-12-03 (projected keys,
matched values: `BASE` pins them, so a row names what it changes; the library's default
since 2026-12-04 is the "-projected-values" rows'). `--model gemma3` takes the budget rows.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.evaluation import readback_nll
from turboquant_jax.budget import KEY_WEIGHT, budget_layer_bits
from turboquant_jax.layer_policy import turboquant_per_layer


def _per_head(config, cfg, widths: Sequence[tuple[float, float]]):
  """One maker per kv head, head h at widths[h] on every layer."""
  return tuple(turboquant_per_layer(config, layer_bits={i: w for i in range(cfg.num_layers)})
               for w in widths)


def _layers(config, cfg, bits: Callable[[int], tuple[float, float]]):
  return turboquant_per_layer(config, layer_bits={i: bits(i) for i in range(cfg.num_layers)})


def _budget(config, cfg, budget: float):
  """The key-weighted budget's widths for the model (`budget_layer_bits`)."""
  return turboquant_per_layer(config, layer_bits=budget_layer_bits(
      budget, cfg.num_layers, cfg.head_dim, layer_window=cfg.layer_window, config=config,
      key_weight=KEY_WEIGHT))


_K4V25 = lambda c, m: _layers(c, m, lambda i: (4, 2.5))  # noqa: E731
_PROJECTED = {"norm_fit": ("projected", "projected")}

# name -> (config overrides, maker from (config, the model's DecoderConfig)); the kw35,
# k*v* and v5-* rows are SmolLM2's (v5-head*: 3 kv heads), budget* any model's.
SETTINGS: dict[str, tuple[dict, Callable]] = {
    "kw35": ({}, _K4V25),
    "kw35-projected-values": (_PROJECTED, _K4V25),
    "kw35-exact-values": ({"norm_fit": ("projected", "exact")}, _K4V25),
    "kw35-projected-centred-values": ({**_PROJECTED, "center_values": True}, _K4V25),
    "k5v5": ({}, lambda c, m: _layers(c, m, lambda i: (5, 5))),
    "k4v5": ({}, lambda c, m: _layers(c, m, lambda i: (4, 5))),
    "k5v2.5": ({}, lambda c, m: _layers(c, m, lambda i: (5, 2.5))),
    **{f"v5-head{h}": ({}, functools.partial(
        lambda h, c, m: _per_head(c, m, [(4, 5) if g == h else (4, 2.5) for g in range(3)]),
        h)) for h in range(3)},
    **{f"v5-layers{g}-{g + 4}": ({}, functools.partial(
        lambda g, c, m: _layers(c, m, lambda i: (4, 5 if g <= i < g + 5 else 2.5)), g))
       for g in range(0, 30, 5)},
    **{f"budget{b:g}{suffix}": (over, functools.partial(
        lambda b, c, m: _budget(c, m, b), b))
       for b in (2.5, 3.0, 3.5) for suffix, over in (("", {}), ("-projected-values", _PROJECTED))},
}
BASE = dict(norm_dtype=(jnp.float16, jnp.float8_e4m3fn), window=256,
            norm_fit=("projected", "matched"))


def _seeds(spec: str) -> list[int]:
  out = []
  for part in spec.split(","):
    lo, _, hi = part.partition("-")
    out += list(range(int(lo), int(hi or lo) + 1))
  return out


def main(argv=None) -> None:
  from benchmarks import common
  from benchmarks.quality import tq_config
  from benchmarks.quality_probe import load

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"))
  p.add_argument("--text", type=pathlib.Path, required=True)
  p.add_argument("--text-lines", default=None)
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3,5")
  p.add_argument("--settings", nargs="+", default=["kw35"], choices=sorted(SETTINGS))
  p.add_argument("--name", default="readback_perplexity", help="result file name")
  p.add_argument("--out", type=pathlib.Path, default=None, help="results directory")
  args = p.parse_args(argv)
  model, tokens = load(args.model, args.tokens, text=args.text, lines=args.text_lines)
  dense = readback_nll(model, tokens, None)
  rows = []
  for seed in _seeds(args.seeds):
    for name in args.settings:
      overrides, maker = SETTINGS[name]
      config = tq_config(**{**BASE, **overrides, "seed": seed})
      start = time.perf_counter()
      nll = readback_nll(model, tokens, maker(config, model.cfg))
      rows.append(dict(setting=name, seed=seed,
                       change_pct=float(100 * np.expm1(nll.mean() - dense.mean())),
                       seconds=time.perf_counter() - start))
      print(rows[-1], flush=True)
      jax.clear_caches()   # each seed's config compiles anew: 60+ runs ran out of memory
  first = {r["seed"]: r["change_pct"] for r in rows if r["setting"] == args.settings[0]}
  summary = []
  for name in args.settings:
    per = {r["seed"]: r["change_pct"] for r in rows if r["setting"] == name}
    diff = np.array([per[s] - first[s] for s in per])
    summary.append(dict(setting=name, seeds=len(per), mean_pct=float(np.mean(list(per.values()))),
                        paired_pct=float(diff.mean()),
                        paired_se=float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1
                        else 0.0,
                        lower_on=int(np.sum(diff < 0))))
  path = common.write_result(args.name, dict(
      model=args.model, text=str(args.text), text_lines=args.text_lines,
      tokens=int(tokens.shape[1]), base_config=repr(tq_config(**BASE)),
      dense_ppl=float(np.exp(dense.mean())), rows=rows, summary=summary), args.out)
  print(f"wrote {path}")
  common.print_table(summary, ["setting", "seeds", "mean_pct", "paired_pct", "paired_se",
                               "lower_on"])


if __name__ == "__main__":
  main()
