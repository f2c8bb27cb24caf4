"""The decode grid from the paired runs: one table and one plot over every JSON.

`python -m benchmarks.decode_e2e --paired` writes one JSON per call (a few points, each
cache timed against bf16 in alternating rounds of one run); the grid grew over many calls.
This collects them: for each (model, batch x context, cache) the newest run's medians of
tokens/s against bf16, a call at a time and queued, and the file it came from. It writes
`decode_e2e_paired_grid_<platform>.json` and `.png` (matplotlib, if installed) and prints
the table. Nothing is timed here; the ratios are those of the runs, each measured side by
side with its own bf16.

    python -m benchmarks.paired_grid [--results DIR] [--caches a,b] [--platform gpu]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Iterable

from benchmarks import common

# The caches each model's grid shows: the Mosaic kernel's int8 path where head_dim is
# 128 or less, fp16 quintic tiles for Gemma 3's 256; plain 4-bit keys and 3 bits beside.
DEFAULT_CACHES = ("tq3.5-k4v3-int8-prerotated", "tq3.5-k4v3-quintic-prerotated",
                  "tq3.5-k4uv3-int8-prerotated", "tq3-int8-prerotated")


def collect(paths: Iterable[pathlib.Path], caches: Iterable[str]) -> list[dict[str, Any]]:
  """Rows (model, batch, context, cache, ratios, source) of the newest run of each point
  and cache among the paired JSONs at `paths` (newest by the run's recorded date)."""
  caches = tuple(caches)
  best: dict[tuple, dict[str, Any]] = {}
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    if "points" not in data:
      continue
    date = data.get("environment", {}).get("date", "")
    for key, point in data["points"].items():
      model, shape = key.split()
      batch, context = (int(x) for x in shape.split("x"))
      for name, r in point.items():
        if name not in caches or "x_bf16_median" not in r:
          continue
        at = (model, batch, context, name)
        if at in best and best[at]["date"] >= date:
          continue
        best[at] = {"model": model, "batch": batch, "context": context, "cache": name,
                    "x_bf16": r["x_bf16_median"], "range": r.get("x_bf16_range"),
                    "queued_x_bf16": r.get("queued_x_bf16_median"),
                    "tokens_per_s": r["tokens_per_s"],
                    "bf16_tokens_per_s": point.get("bf16", {}).get("tokens_per_s"),
                    "date": date, "source": pathlib.Path(path).name}
  return [best[k] for k in sorted(best)]


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> bool:
  """Tokens/s against bf16 per point, one panel per model, a bar per cache."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  models = sorted({r["model"] for r in rows})
  names = [c for c in DEFAULT_CACHES if any(r["cache"] == c for r in rows)]
  names += sorted({r["cache"] for r in rows} - set(names))
  fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models):
    mine = [r for r in rows if r["model"] == model]
    points = sorted({(r["context"], r["batch"]) for r in mine})
    width = 0.8 / max(1, len({r["cache"] for r in mine}))
    shown = [n for n in names if any(r["cache"] == n for r in mine)]
    for j, name in enumerate(shown):
      for i, (t, b) in enumerate(points):
        r = next((r for r in mine if (r["context"], r["batch"], r["cache"]) == (t, b, name)),
                 None)
        if r is None:
          continue
        lo, hi = r["range"] or (r["x_bf16"], r["x_bf16"])
        ax.bar(i + (j - (len(shown) - 1) / 2) * width, r["x_bf16"], width,
               yerr=[[r["x_bf16"] - lo], [hi - r["x_bf16"]]], capsize=2,
               color=f"C{names.index(name)}", label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels([f"{b}x{t // 1024}K" for t, b in points], rotation=45, fontsize=8)
    ax.set_title(model)
    ax.set_ylabel("tokens/s / bf16 cache's (median of rounds)")
    handles, labels = ax.get_legend_handles_labels()
    one_each = dict(zip(labels, handles))     # a bar per point, one entry per cache
    ax.legend(one_each.values(), one_each.keys(), fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", type=pathlib.Path, default=common.RESULTS_DIR)
  parser.add_argument("--caches", default=",".join(DEFAULT_CACHES))
  parser.add_argument("--platform", default="gpu")
  args = parser.parse_args(argv)
  paths = sorted(args.results.glob(f"decode_e2e_paired*_{args.platform}.json"))
  paths = [p for p in paths if not p.name.startswith("decode_e2e_paired_grid")]
  rows = collect(paths, args.caches.split(","))
  if not rows:
    raise SystemExit(f"no paired results for {args.caches} in {args.results}")
  name = f"decode_e2e_paired_grid_{args.platform}"
  plotted = plot(rows, args.results / f"{name}.png")
  (args.results / f"{name}.json").write_text(json.dumps(
      {"benchmark": "paired_grid", "note": __doc__.split("\n\n")[1].replace("\n", " "),
       "sources": [p.name for p in paths], "plot": plotted, "rows": rows}, indent=1) + "\n")
  common.print_table([{**r, "x_bf16": f"{r['x_bf16']:.2f}",
                       "queued": "-" if r["queued_x_bf16"] is None
                       else f"{r['queued_x_bf16']:.2f}",
                       "tok_s": f"{r['tokens_per_s']:.0f}"} for r in rows],
                     ["model", "batch", "context", "cache", "tok_s", "x_bf16", "queued",
                      "source"])


if __name__ == "__main__":
  main()
