"""Quality across texts: each cache's perplexity change on every text, its mean and worst.

    python -m benchmarks.quality_texts [--dirs DIR,DIR,...] [--model smollm2] [--out DIR]

A text's loss says little about another's (on GPL-3 SmolLM2's budget 3.0 reads +0.33%,
on Vim's manual +2.15%), so a setting is judged on several. Each folder holds one text's
`benchmarks.quality` results (`quality_<model>_cpu.json`, made by `python -m
benchmarks.quality --text T --out DIR`); this reads them all and, for every method
measured on at least two texts, prints the change against that text's own fp32 cache per
text, the mean over texts and the worst (the "any text" of a quality target), and writes
`quality_texts_<platform>.json`. The default folders are the committed texts: GPL-3
(benchmarks/results), Debian's reference manual, Vim's user manual, Python's argparse.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

from benchmarks import common

DEFAULT_DIRS = ("", "quality_debref", "quality_vim", "quality_code")


def text_name(result: dict) -> str:
  """A short name for a results file's text: its file name (and line range)."""
  text = result.get("text", "?")
  name = pathlib.PurePath(text.split(" lines ")[0]).name
  return name + (f" {text.split(' lines ')[1]}" if " lines " in text else "")


def deltas(result: dict) -> dict[str, float]:
  """{method: perplexity change against this text's fp32 cache, in %} (seed means)."""
  ppl = result["perplexity"]
  if "dense fp32" not in ppl:
    return {}
  base = ppl["dense fp32"]["mean"]
  return {m: 100.0 * (p["mean"] / base - 1.0) for m, p in ppl.items() if m != "dense fp32"}


def across_texts(per_text: dict[str, dict[str, float]], min_texts: int = 2) -> list[dict]:
  """Rows {method, per text, mean, worst, texts} for methods on at least min_texts texts,
  worst first."""
  methods = sorted({m for d in per_text.values() for m in d})
  rows = []
  for m in methods:
    got = {t: d[m] for t, d in per_text.items() if m in d}
    if len(got) < min_texts:
      continue
    values = np.array(list(got.values()))
    rows.append({"method": m, "per_text": got, "mean": float(values.mean()),
                 "worst": float(values.max()), "texts": len(got)})
  return sorted(rows, key=lambda r: -r["worst"])


def load_texts(dirs: list[pathlib.Path], model: str) -> dict[str, dict[str, float]]:
  """{text name: deltas} for every folder holding this model's results."""
  out = {}
  for d in dirs:
    path = d / f"quality_{model}_cpu.json"
    if not path.exists():
      continue
    raw = json.loads(path.read_text())
    result = raw["models"][model] if "models" in raw else raw
    out[text_name(result)] = deltas(result)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dirs", default=None,
                      help="comma-separated results folders, one text each")
  parser.add_argument("--model", action="append", default=None, help="default: both")
  parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR)
  args = parser.parse_args(argv)
  dirs = ([pathlib.Path(d) for d in args.dirs.split(",")] if args.dirs else
          [common.RESULTS_DIR / d for d in DEFAULT_DIRS])
  result = {"dirs": [os.path.relpath(d) for d in dirs], "models": {}}
  for model in args.model or ["smollm2", "gemma3"]:
    per_text = load_texts(dirs, model)
    rows = across_texts(per_text)
    result["models"][model] = {"texts": list(per_text), "methods": rows}
    texts = list(per_text)
    table = [{"method": r["method"][:48], **{t[:14]: (f"{r['per_text'][t]:+.2f}%"
                                                    if t in r["per_text"] else "")
                                             for t in texts},
              "mean": f"{r['mean']:+.2f}%", "worst": f"{r['worst']:+.2f}%"} for r in rows]
    print(f"\n{model}: perplexity change against fp32, per text")
    if table:
      common.print_table(table, list(table[0]))
  common.write_result("quality_texts", result, args.out)


if __name__ == "__main__":
  main()
