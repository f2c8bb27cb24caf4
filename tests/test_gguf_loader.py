"""models.gguf_loader's own GGUF header parser against the `gguf` package's reader, on a
file written by `gguf.GGUFWriter` (every metadata type, plain and quantized tensors)."""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="pip install gguf")


def _write(path, rng):
  import gguf
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_uint32("test.u32", 7)
  w.add_int32("test.i32", -3)
  w.add_float32("test.f32", 0.1)
  w.add_float64("test.f64", -2.5)
  w.add_bool("test.bool", True)
  w.add_uint64("test.u64", 2**40)
  w.add_string("test.str", "Ünïcödé ✓")
  w.add_array("test.strs", ["a", "", "<|im_start|>", "🙂"])
  w.add_array("test.ints", [1, -2, 3])
  w.add_array("test.floats", [0.5, -1.25])
  w.add_custom_alignment(64)
  tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
             "f16": rng.standard_normal((4, 32)).astype(np.float16)}
  for name, x in tensors.items():
    w.add_tensor(name, x)
  q = rng.standard_normal((2, 64)).astype(np.float32)
  w.add_tensor("q8", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
               raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tensors, q


def test_header_parser_equals_the_gguf_reader(tmp_path, rng):
  import gguf
  from models.gguf_loader import GGUFFile
  path = tmp_path / "t.gguf"
  tensors, q = _write(path, rng)
  f, ref = GGUFFile(str(path)), gguf.GGUFReader(str(path))
  assert f.field("test.u32") == 7 and f.field("test.i32") == -3
  assert f.field("test.f32") == float(np.float32(0.1)) and f.field("test.f64") == -2.5
  assert f.field("test.bool") is True and f.field("test.u64") == 2**40
  assert f.field("test.str") == "Ünïcödé ✓"
  assert f.field("test.strs") == ["a", "", "<|im_start|>", "🙂"]
  assert f.field("test.ints") == [1, -2, 3] and f.field("test.floats") == [0.5, -1.25]
  assert f.field("general.architecture") == "llama" and f.field("missing", 4) == 4
  assert set(f.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
  for t in ref.tensors:
    mine = f.tensors[t.name]
    assert mine.tensor_type == t.tensor_type and mine.shape == tuple(int(x) for x in t.shape)
    np.testing.assert_array_equal(mine.data, t.data)
  for name, x in tensors.items():
    np.testing.assert_array_equal(f.tensor(name), x.astype(np.float32))
  np.testing.assert_allclose(f.tensor("q8"), q, atol=np.abs(q).max() / 100)
  # Our Q8_0 path (one output array written once) gives gguf's values exactly.
  q8 = next(t for t in ref.tensors if t.name == "q8")
  np.testing.assert_array_equal(f.tensor("q8"), gguf.quants.dequantize(
      q8.data, gguf.GGMLQuantizationType.Q8_0).reshape(q.shape))


def test_header_parser_refuses_other_files(tmp_path):
  from models.gguf_loader import GGUFFile
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGML" + bytes(60))
  with pytest.raises(ValueError, match="not a GGUF file"):
    GGUFFile(str(bad))
  old = tmp_path / "old.gguf"
  old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(60))
  with pytest.raises(ValueError, match="version 1"):
    GGUFFile(str(old))
