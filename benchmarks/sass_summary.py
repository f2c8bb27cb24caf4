"""Opcode counts of the kernels Mosaic GPU dumped (MOSAIC_GPU_DUMP_TO=DIR), per file.

    MOSAIC_GPU_DUMP_TO=/tmp/dump python -m benchmarks.mgpu_probe --check-only
    python -m benchmarks.sass_summary /tmp/dump

Prints, for every *.sass file, the total instruction count and the most frequent opcodes
(modifiers dropped: LOP3.LUT -> LOP3), and for every ptxas log its register and spill
lines: what to compare before and after a change to the decode.
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def opcode_counts(text: str) -> collections.Counter:
  counts = collections.Counter()
  for line in text.splitlines():
    m = _INSTR.search(line)
    if m:
      counts[m.group(2)] += 1
  return counts


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  root = pathlib.Path(argv[0])
  top = int(argv[1]) if len(argv) > 1 else 24
  for path in sorted(root.rglob("*")):
    if not path.is_file():
      continue
    text = path.read_text(errors="replace")
    if path.suffix == ".sass" or "sass" in path.name.lower():
      counts = opcode_counts(text)
      print(f"== {path.name}: {sum(counts.values())} instructions")
      print("   " + ", ".join(f"{k} {v}" for k, v in counts.most_common(top)))
    elif "ptxas" in path.name.lower():
      for line in text.splitlines():
        if re.search(r"registers|spill|stack", line, re.I):
          print(f"   {path.name}: {line.strip()}")


if __name__ == "__main__":
  main()
