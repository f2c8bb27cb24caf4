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

It also draws, per model, the worst text's change against stored bits per coordinate
(every per-token buffer counted; with sliding-window rings, the whole cache at the text's
length) for the methods measured on at least three texts, and marks the Pareto front: the
settings no other setting beats on both bits and worst text
(`quality_texts_pareto_<platform>.png`, if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

from benchmarks import common

DEFAULT_DIRS = ("", "quality_debref", "quality_vim", "quality_code")
PARETO_MIN_TEXTS = 3   # a worst text over two texts says little


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


def method_bits(result: dict) -> dict[str, float]:
  """{method: stored bits per cached coordinate}: the whole cache at the text's length
  where the method has sliding-window rings (their size does not grow with the text),
  else what each further token stores."""
  return {m: p.get("stored_bits_per_coordinate_at_tokens", p["stored_bits_per_coordinate"])
          for m, p in result["perplexity"].items() if "stored_bits_per_coordinate" in p}


def load_texts(dirs: list[pathlib.Path], model: str
               ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  """({text name: deltas} for every folder holding this model's results, {method: stored
  bits}). A method's bits do not depend on the text (all texts are read at the same
  length); the first folder that measured it gives them."""
  out, bits = {}, {}
  for d in dirs:
    path = d / f"quality_{model}_cpu.json"
    if not path.exists():
      continue
    raw = json.loads(path.read_text())
    result = raw["models"][model] if "models" in raw else raw
    out[text_name(result)] = deltas(result)
    for m, b in method_bits(result).items():
      bits.setdefault(m, b)
  return out, bits


FAMILIES = {"integer (llama.cpp, KIVI)": "tab:red", "TurboQuant uniform": "tab:blue",
            "TurboQuant K/V split": "tab:cyan", "TurboQuant budget": "tab:orange",
            "TurboQuant ring budget": "tab:green"}


def family(method: str) -> str:
  """The plot's family of a method (a key of FAMILIES), from its name."""
  if method.startswith("int"):
    return "integer (llama.cpp, KIVI)"
  if "ring budget" in method:
    return "TurboQuant ring budget"
  if "budget" in method:
    return "TurboQuant budget"
  if "/V" in method:
    return "TurboQuant K/V split"
  return "TurboQuant uniform"


def pareto_points(model: dict) -> dict[str, tuple[float, float]]:
  """{method: (stored bits, worst text's change)} of one model's rows (`main`) measured on
  at least PARETO_MIN_TEXTS texts."""
  bits = model["stored_bits"]
  return {r["method"]: (bits[r["method"]], r["worst"]) for r in model["methods"]
          if r["texts"] >= PARETO_MIN_TEXTS and bits.get(r["method"]) is not None}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
  """The methods no other method beats on both coordinates ((bits, loss): lower is
  better on each, a tie on both is kept), by bits."""
  front = [m for m, (b, y) in points.items()
           if not any(b2 <= b and y2 <= y and (b2, y2) != (b, y)
                      for m2, (b2, y2) in points.items() if m2 != m)]
  return sorted(front, key=lambda m: points[m])


def plot_pareto(models: dict[str, dict], path: pathlib.Path) -> None:
  """Worst text's change against stored bits per model (rows from `main`)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
  for ax, (name, r) in zip(axes[0], models.items()):
    points = pareto_points(r)
    rows = {row["method"]: row for row in r["methods"] if row["method"] in points}
    for fam, color in FAMILIES.items():
      ms = [m for m in rows if family(m) == fam]
      if not ms:
        continue
      x, worst = zip(*(points[m] for m in ms))
      ax.scatter(x, worst, label=fam, color=color, zorder=3)
      ax.vlines(x, [rows[m]["mean"] for m in ms], worst, color="0.7", lw=1, zorder=2)
    front = r["pareto"]
    ax.plot([points[m][0] for m in front], [points[m][1] for m in front], "k--", lw=1,
            label="Pareto front")
    labels = {}                      # one label per point (equal caches share one)
    for m in front:
      labels.setdefault(points[m], []).append(m.replace("turboquant ", ""))
    for point, names in labels.items():
      ax.annotate(" = ".join(names), point, fontsize=6, xytext=(3, 3),
                  textcoords="offset points")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("stored bits per cached coordinate (K and V, every buffer)")
    ax.set_ylabel("perplexity change vs fp32, worst text (line to the mean), %")
    ax.set_title(f"{name}: {len(r['texts'])} texts, methods on >= {PARETO_MIN_TEXTS}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
    per_text, bits = load_texts(dirs, model)
    rows = across_texts(per_text)
    entry = {"texts": list(per_text), "methods": rows,
             "stored_bits": {r["method"]: bits.get(r["method"]) for r in rows}}
    entry["pareto"] = pareto_front(pareto_points(entry))
    result["models"][model] = entry
    texts = list(per_text)
    front = set(result["models"][model]["pareto"])
    table = [{"method": r["method"][:48] + (" *" if r["method"] in front else ""),
              "bits": f"{bits[r['method']]:.2f}" if r["method"] in bits else "",
              **{t[:14]: (f"{r['per_text'][t]:+.2f}%" if t in r["per_text"] else "")
                 for t in texts},
              "mean": f"{r['mean']:+.2f}%", "worst": f"{r['worst']:+.2f}%"} for r in rows]
    print(f"\n{model}: perplexity change against fp32, per text (* Pareto front over "
          f"methods on >= {PARETO_MIN_TEXTS} texts: stored bits, worst text)")
    if table:
      common.print_table(table, list(table[0]))
  path = common.write_result("quality_texts", result, args.out)
  plot_pareto(result["models"], path.with_name(path.stem.replace(
      "quality_texts", "quality_texts_pareto") + ".png"))


if __name__ == "__main__":
  main()
