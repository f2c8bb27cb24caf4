"""The one timing helper and the one result writer that every benchmark shares."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
  """Device name and library versions, recorded with every result."""
  versions = {}
  for name in ("jax", "jaxlib", "flax", "numpy", "turboquant-jax"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  return {
      "device": getattr(device, "device_kind", str(device)),
      "platform": device.platform,
      "device_count": jax.device_count(),
      "python": platform.python_version(),
      "versions": versions,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def write_result(name: str, payload: dict[str, Any], results_dir: pathlib.Path | None = None
                 ) -> pathlib.Path:
  """Writes {environment, payload} to <results_dir>/<name>_<platform>.json."""
  env = environment()
  out_dir = pathlib.Path(results_dir or RESULTS_DIR)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}_{env['platform']}.json"
  path.write_text(json.dumps({"benchmark": name, "environment": env, **payload}, indent=1))
  return path


def device_time(fn: Callable[..., Any], *args, calls: int = 10, repeats: int = 21,
                warmup: int = 2) -> float:
  """Median seconds per call of a jitted `fn`, in device time.

  Each repeat queues `calls` calls and blocks once, so host dispatch overlaps device work
  and a per-call host-clock reading (which counts dispatch, tens of µs) is never taken.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - start) / calls)
  return statistics.median(samples)


def device_time_chained(fn: Callable[..., Any], args: Sequence[Any], small_arg: int,
                        iters: int = 16, **kwargs) -> float:
  """Median seconds of one `fn(*args)` when `iters` calls run back to back on the device.

  For kernels shorter than a host dispatch (tens of µs): one jitted call runs `iters`
  calls unrolled, each made to depend on the previous one through args[small_arg] (a
  small floating array, perturbed by 0·out so no call can be hoisted or merged), so the
  device never waits for the host. The perturbation is one tiny fusion per call, counted.
  """
  def chained(*a):
    a = list(a)
    out = None
    for _ in range(iters):
      if out is not None:
        first = jax.tree.leaves(out)[0]
        dep = (first.ravel()[0] * 0).astype(a[small_arg].dtype)
        a[small_arg] = a[small_arg] + dep
      out = fn(*a)
    return out
  return device_time(jax.jit(chained), *args, **kwargs) / iters


def checked(rows: list, fn: Callable[..., dict], *args, error_fields: dict | None = None,
            **kwargs) -> dict:
  """Appends fn(*args, **kwargs) to rows, or, where it raises, a failed row with the error
  (and error_fields): a GPU check run reports every case instead of stopping at one.
  Returns the row, printed."""
  import traceback
  try:
    rows.append(fn(*args, **kwargs))
  except Exception as e:  # noqa: BLE001 - report every case
    traceback.print_exc()
    rows.append(dict(**(error_fields or {}), error=repr(e)[:300], ok=False))
  print("check", rows[-1], flush=True)
  return rows[-1]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  """Prints rows as an aligned text table with the given column order."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


class Progress:
  """One line per finished configuration: its label, time elapsed and time remaining.

  Silent unless the stream is a terminal (a log file or a pipe gets the results alone),
  or `enabled` says otherwise. Remaining time extrapolates the mean so far.
  """

  def __init__(self, total: int, stream=None, enabled: bool | None = None):
    import sys
    self.total, self.done = total, 0
    self.stream = sys.stderr if stream is None else stream
    if enabled is None:
      enabled = bool(getattr(self.stream, "isatty", lambda: False)())
    self.enabled = enabled
    self.start = time.perf_counter()

  @staticmethod
  def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"

  def step(self, label: str) -> str:
    """Marks one configuration done; returns the line (printed only when enabled)."""
    self.done += 1
    elapsed = time.perf_counter() - self.start
    remaining = elapsed / self.done * max(self.total - self.done, 0)
    line = (f"[{self.done}/{self.total}] {label}  elapsed {self._clock(elapsed)}"
            f"  remaining ~{self._clock(remaining)}")
    if self.enabled:
      print(line, file=self.stream, flush=True)
    return line
