"""The helpers every benchmark shares (timing is measured on the GPU, never tested)."""

import io
import json

from benchmarks import common


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_prints_one_line_per_configuration_on_a_terminal_only():
  tty = _Terminal()
  progress = common.Progress(3, stream=tty)
  for label in ("a", "b", "c"):
    progress.step(label)
  lines = tty.getvalue().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("[1/3] a  elapsed ") and "remaining ~" in lines[0]
  assert lines[-1].endswith("remaining ~0m00s")
  pipe = io.StringIO()  # not a terminal: silent unless asked
  quiet = common.Progress(2, stream=pipe)
  assert "[1/2] x" in quiet.step("x")
  assert pipe.getvalue() == ""
  common.Progress(1, stream=pipe, enabled=True).step("y")
  assert "[1/1] y" in pipe.getvalue()


def test_clock_format():
  assert common.Progress._clock(75) == "1m15s"
  assert common.Progress._clock(3725) == "1h02m05s"


def test_write_result_records_the_device_and_versions(tmp_path):
  path = common.write_result("unit", {"x": 1}, tmp_path)
  data = json.loads(path.read_text())
  assert data["x"] == 1 and data["benchmark"] == "unit"
  assert data["environment"]["device"] and "jax" in data["environment"]["versions"]
