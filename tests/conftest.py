"""Shared test settings: float32 JAX on CPU, deterministic keys."""

import importlib.metadata
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# numpy asks the kernel for huge pages on large arrays, and on these VMs (THP defrag
# "madvise") a process's first large array then waits for memory compaction: Gemma 3's
# 680 MB embedding took 9.9 s to fill the first time, 0.5 s without (its load 15 -> 5 s).
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
# Eight host devices for the sharding tests (meshes of 4 and 8); the other tests run on
# the first one, as with a single device.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = f"{_flags} --xla_force_host_platform_device_count=8".strip()
# The suite is mostly XLA compilation of small programs: LLVM's optimisation level 0
# compiles them faster than they then run slower (2 cores: ~440 s against ~594 s).
if "xla_backend_optimization_level" not in _flags:
  _flags = f"{_flags} --xla_backend_optimization_level=0"
# XLA's older elemental emitters compile a small CPU fusion in ~40 ms against ~65 ms for
# the MLIR fusion emitters (jaxlib 0.10, 2 cores), and the suite compiles ~11K programs.
# Only where measured: an XLA that no longer knows the flag would refuse to start.
_jaxlib = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
if "xla_cpu_use_fusion_emitters" not in _flags and _jaxlib == (0, 10):
  _flags = f"{_flags} --xla_cpu_use_fusion_emitters=false"
# XLA splits each CPU program into parts that LLVM compiles on parallel threads; with one
# test worker per core the threads only contend: one part compiled a compile-heavy sample
# of the suite (5 files, 2 workers) in 79-88 s of backend time against 95-103 s.
if "xla_cpu_parallel_codegen_split_count" not in _flags and _jaxlib == (0, 10):
  _flags = f"{_flags} --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = _flags

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

# numpy reads the variable once, at import: in case a plugin imported it first.
getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage",
        lambda _: None)(os.environ["NUMPY_MADVISE_HUGEPAGE"] != "0")
import pytest  # noqa: E402
from flax import nnx  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test file. Every XLA CPU executable holds
  memory mappings of its code, and a worker that kept them all passed Linux's limit of
  65,530 mappings per process (vm.max_map_count) late in the run: LLVM then crashed the
  worker while compiling (seen as a segfault and as an abort inside
  backend_compile_and_load, each time at ~98% of the suite)."""
  yield
  jax.clear_caches()


def unit_vectors(key, n, d):
  x = jax.random.normal(key, (n, d))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# The longest files first: the two CI workers start from the two halves of the collection
# order (`--dist worksteal`), and alphabetically the longest files came last, so their
# slowest tests were the last to start.
_LONG_FILES_FIRST = ("test_real_models.py", "test_turboquant_cache.py", "test_sharding.py",
                     "test_models_sharding.py", "test_tile_codes.py",
                     "test_kernel_attention_mosaic.py", "test_decode_attention.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files intact


@functools.partial(nnx.jit, static_argnames="prefill")
def forward(model, tokens, caches=None, *, num_tokens=None, prefill=False):
  """`model(tokens, caches=caches, ...)` as one compiled program per shape. Called eagerly,
  a decoder's forward compiles each of its several hundred ops on its own, for each new
  shape: on the CPU that was most of a model test's time."""
  return model(tokens, caches=caches, num_tokens=num_tokens, prefill=prefill)
