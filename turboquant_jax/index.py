"""`TurboQuantIndex`: nearest-neighbour search over TurboQuant codes, with no training.

    index = TurboQuantIndex(dim=576, bits=4)                 # metric "ip" by default
    ids = index.add(vectors)                                 # [n, dim] -> [n] int64 ids
    scores, ids = index.search(queries, k=10)                # [q, dim] -> [q, k] each
    index.remove(ids[:3]); index.save("db.tqi"); index = TurboQuantIndex.load("db.tqi")

Indexing is quantizing: a random rotation and a fixed Lloyd-Max codebook, nothing learned
from the data, so `add` costs one rotation per vector and the first vector is as well
served as the millionth.

Storage: fixed-size blocks of `block_size` rows (packed codes, norms, tombstones, and the
raw vectors if `keep_vectors`). Adding fills the last block and opens new ones; it never
copies the whole database. Search streams the blocks: per block, scores of all queries
against its codes in the rotated domain (the query is rotated once), a per-block top-k,
and a running merge, so memory stays O(queries · block_size) whatever the database size.
On a GPU the per-block scoring and top-k run in one Pallas kernel
(`pallas_kernels.index_scoring`); elsewhere in jnp.

Several devices: `TurboQuantIndex(..., devices=jax.devices())` (or a `Mesh`) places the
blocks round-robin, so the database's rows are split evenly across them. A search runs
one scan per device over its own blocks, each launched from its own thread so that the
devices work at once, and merges the per-device top-k (k rows per query per device travel, never a block).

Metrics: "ip" (inner product, larger is better), "cosine" (vectors and queries
normalized), "l2" (squared Euclidean distance to the reconstruction, smaller is better,
as FAISS reports it).

Quantizers: "mse" (Algorithm 1, default) or "prod" (Algorithm 2: unbiased inner
products from a (b-1)-bit MSE code plus a 1-bit QJL sketch). The default is the one with
the higher recall in `benchmarks/nn_search.py`: ranking punishes the QJL term's variance
more than it rewards its unbiasedness.

Saved files: a magic string, a format version, a JSON header (configuration, array
manifest, payload length and SHA-256), then the arrays. Saving writes a temporary file in
the same directory and renames it over the target, so a failed save leaves the old file
intact; loading checks the magic, version, length and checksum and refuses anything else.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.quantizers import MSEQuantizer, ProdQuantizer

Array = jax.Array

MAGIC = b"TQINDEX\n"
FORMAT_VERSION = 1
METRICS = ("ip", "cosine", "l2")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """Static configuration of a `TurboQuantIndex`.

  Attributes:
    dim: vector dimension (≥ 16, divisible by 8).
    bits: bits per coordinate, 1-5 (the norm adds 32 bits per vector).
    metric: "ip", "cosine" or "l2".
    quantizer: "mse" or "prod".
    rotation: "haar" (any dim) or "hadamard" (power-of-two dim).
    seed: PRNG seed of the rotation (and the QJL sketch).
    block_size: rows per storage block, the unit of streaming in search.
    keep_vectors: also store the raw float32 vectors, for exact re-ranking.
  """

  dim: int
  bits: int
  metric: str = "ip"
  quantizer: str = "mse"
  rotation: str = "haar"
  seed: int = 0
  block_size: int = 16384
  keep_vectors: bool = False

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
    if self.quantizer not in ("mse", "prod"):
      raise ValueError(f"quantizer must be 'mse' or 'prod', got {self.quantizer!r}")
    if self.quantizer == "prod" and self.bits < 2:
      raise ValueError("the prod quantizer needs bits >= 2 (one of them is the QJL sign)")
    if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size % 16:
      raise ValueError(f"block_size must be a positive multiple of 16, got {self.block_size}")

  def make_quantizer(self) -> MSEQuantizer | ProdQuantizer:
    cls = MSEQuantizer if self.quantizer == "mse" else ProdQuantizer
    return cls.create(jax.random.PRNGKey(self.seed), self.dim, self.bits,
                      rotation=self.rotation)


# -- jitted pieces (one compilation per block shape) ----------------------------------------

def _transform_queries(quantizer, q: Array) -> tuple[Array, ...]:
  out = quantizer.rotate_queries(q)
  return out if isinstance(out, tuple) else (out,)


def _block_scores(quantizer, q_t: tuple[Array, ...], codes) -> Array:
  """[Q, block] estimated inner products of the queries with a block's vectors."""
  return quantizer.inner_products_rotated(*q_t, codes)


def _block_top_k(quantizer, q_t, codes, sq_norms, valid, *, k, metric):
  """jnp: one block's k best rows per query ([Q, k] scores, rows within the block)."""
  scores = _block_scores(quantizer, q_t, codes)
  if metric == "l2":
    scores = 2.0 * scores - sq_norms[None, :]  # = ‖q‖² - ‖q - x̂‖², ‖q‖² added later
  scores = jnp.where(valid[None, :], scores, -jnp.inf)
  s, i = jax.lax.top_k(scores, min(k, scores.shape[1]))
  return s, i.astype(jnp.int32)


def _merge_top_k(scores: list[Array], rows: list[Array], k: int) -> tuple[Array, Array]:
  """The k best of several [Q, ·] top lists (global row numbers): a block's into the
  running list, or the devices' lists into one."""
  s, pick = jax.lax.top_k(jnp.concatenate(scores, axis=1), k)
  return s, jnp.take_along_axis(jnp.concatenate(rows, axis=1), pick, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "metric", "use_kernel", "interpret"))
def _scan_blocks(quantizer, q: Array, blocks, offsets: Array, *, k: int, metric: str,
                 use_kernel: bool, interpret: bool) -> tuple[Array, Array]:
  """Streams the blocks ((codes, sq_norms, valid) each) with a running top k: one XLA
  program per number of blocks, so a search is one dispatch."""
  q_t = _transform_queries(quantizer, q)
  best_s = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
  best_i = jnp.zeros((q.shape[0], k), jnp.int32)
  for b, (codes, sq_norms, valid) in enumerate(blocks):
    if use_kernel:
      from pallas_kernels import index_scoring  # the kernel package depends on this one
      s, i = index_scoring.block_top_k(quantizer, q_t, codes, sq_norms, valid, k=k,
                                       metric=metric, interpret=interpret)
    else:
      s, i = _block_top_k(quantizer, q_t, codes, sq_norms, valid, k=k, metric=metric)
    best_s, best_i = _merge_top_k([best_s, s], [best_i, i + offsets[b]], k)
  return best_s, best_i


_merge_device_lists = jax.jit(_merge_top_k, static_argnames=("k",))


@functools.partial(jax.jit, static_argnames=("metric",))
def _exact_scores(queries: Array, vectors: Array, metric: str) -> Array:
  """[Q, R] exact scores of each query against its R candidate vectors ([Q, R, d])."""
  ip = jnp.einsum("qd,qrd->qr", queries, vectors, precision=jax.lax.Precision.HIGHEST)
  if metric == "l2":
    return 2.0 * ip - jnp.sum(jnp.square(vectors), axis=-1)
  return ip


@functools.partial(jax.jit, static_argnames=("with_sq_norms",))
def _encode(quantizer, x: Array, with_sq_norms: bool):
  """Codes and ‖x̂‖² (only l2 needs it; other metrics store zeros and skip the decode)."""
  codes = quantizer.quantize(x)
  if not with_sq_norms:
    return codes, jnp.zeros(x.shape[:1], jnp.float32)
  sq = jnp.sum(jnp.square(quantizer.rotated_values(codes)), axis=-1)
  return codes, sq


def _check_matrix(x: Any, dim: int, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim == 1:
    a = a[None, :]
  if a.ndim != 2 or a.shape[1] != dim:
    raise ValueError(f"{name} must have shape [n, {dim}] (or [{dim}]), got {np.shape(x)}")
  if not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"{name} must be floating point, got {a.dtype}")
  a = a.astype(np.float32)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} contains NaN or Inf")
  return a


def _normalize(x: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(n > 0, n, 1.0)


class TurboQuantIndex:
  """A growable vector index over TurboQuant codes; see the module docstring.

  A plain Python object that owns device arrays (like a FAISS index), not a pytree: it is
  mutated by `add` and `remove`. Its search runs jitted per block.
  """

  def __init__(self, dim: int, bits: int, metric: str = "ip", quantizer: str = "mse", *,
               rotation: str = "haar", seed: int = 0, block_size: int = 16384,
               keep_vectors: bool = False,
               devices: Sequence[jax.Device] | jax.sharding.Mesh | None = None):
    """See `IndexConfig` for the settings. devices: where the blocks live, round-robin
    (a list of devices or a Mesh, all its devices); default: JAX's default device."""
    self.config = IndexConfig(dim=dim, bits=bits, metric=metric, quantizer=quantizer,
                              rotation=rotation, seed=seed, block_size=block_size,
                              keep_vectors=keep_vectors)
    if isinstance(devices, jax.sharding.Mesh):
      devices = list(devices.devices.flat)
    self.devices: tuple[Any, ...] = tuple(devices) if devices else (None,)
    if len(set(self.devices)) != len(self.devices):
      raise ValueError("devices must be distinct")
    self.quantizer = self.config.make_quantizer()
    self._quantizer_copies: dict[Any, Any] = {}
    self._blocks: list[dict[str, Any]] = []  # codes, sq_norms, vectors: device arrays
    self._valid: list[np.ndarray] = []       # [block_size] bool per block (host)
    self._ids: list[np.ndarray] = []         # [block_size] int64 per block (host)
    self._rows = 0                           # rows used, tombstones included
    self._next_id = 0
    self._where: dict[int, int] = {}         # id -> row
    self._device_valid: list[Array] | None = None  # device copy of _valid, per search

  # -- placement ---------------------------------------------------------------------------

  def _device_of(self, b: int):
    """The device of block b (None: the default one)."""
    return self.devices[b % len(self.devices)]

  def _on(self, device, x):
    return x if device is None else jax.device_put(x, device)

  def _quantizer_on(self, device):
    if device is None:
      return self.quantizer
    if device not in self._quantizer_copies:
      self._quantizer_copies[device] = jax.device_put(self.quantizer, device)
    return self._quantizer_copies[device]

  # -- properties --------------------------------------------------------------------------

  @property
  def dim(self) -> int:
    return self.config.dim

  @property
  def ntotal(self) -> int:
    """Vectors searchable now (added and not removed)."""
    return len(self._where)

  def bytes_per_vector(self) -> int:
    """Stored bytes per vector: packed codes and norms (plus ‖x̂‖² for l2; plus the raw
    vector with keep_vectors)."""
    n = self.quantizer.bytes_per_vector()
    if self.config.metric == "l2":
      n += 4
    if self.config.keep_vectors:
      n += 4 * self.dim
    return n

  # -- adding and removing -----------------------------------------------------------------

  def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
    """Adds vectors [n, dim]; returns their int64 ids (given, or consecutive from the
    largest seen plus one). Ids must be new and unique."""
    x = _check_matrix(vectors, self.dim, "vectors")
    n = x.shape[0]
    if ids is None:
      new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
    else:
      new_ids = np.asarray(ids).reshape(-1)
      if new_ids.shape[0] != n or not np.issubdtype(new_ids.dtype, np.integer):
        raise ValueError(f"ids must be {n} integers, got {np.shape(ids)} {new_ids.dtype}")
      new_ids = new_ids.astype(np.int64)
      if len(np.unique(new_ids)) != n:
        raise ValueError("ids must be unique")
      taken = [int(i) for i in new_ids if int(i) in self._where]
      if taken:
        raise ValueError(f"ids already in the index: {taken[:5]}")
    if self.config.metric == "cosine":
      x = _normalize(x)
    bs = self.config.block_size
    start = 0
    while start < n:
      if self._rows == len(self._blocks) * bs:
        self._open_block()
      b, row = divmod(self._rows, bs)
      take = min(n - start, bs - row)
      self._write(b, row, x[start:start + take], new_ids[start:start + take])
      start += take
    if n:
      self._next_id = max(self._next_id, int(new_ids.max()) + 1)
    return new_ids

  def _open_block(self) -> None:
    bs, d = self.config.block_size, self.dim
    codes, sq = jax.eval_shape(functools.partial(_encode, with_sq_norms=False),
                               self.quantizer, jax.ShapeDtypeStruct((bs, d), jnp.float32))
    block = {"codes": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), codes),
             "sq_norms": jnp.zeros(sq.shape, sq.dtype)}
    if self.config.keep_vectors:
      block["vectors"] = jnp.zeros((bs, d), jnp.float32)
    self._blocks.append(self._on(self._device_of(len(self._blocks)), block))
    self._valid.append(np.zeros(bs, bool))
    self._ids.append(np.full(bs, -1, np.int64))

  def _write(self, b: int, row: int, x: np.ndarray, ids: np.ndarray) -> None:
    n = x.shape[0]
    # Encode in pieces of at most a block, padded to a power of two rows so that a stream
    # of odd-sized adds compiles only a few shapes.
    pad = max(16, 1 << (n - 1).bit_length())
    xp = np.zeros((pad, self.dim), np.float32)
    xp[:n] = x
    device = self._device_of(b)
    codes, sq = _encode(self._quantizer_on(device), self._on(device, jnp.asarray(xp)),
                        with_sq_norms=self.config.metric == "l2")
    block = self._blocks[b]
    put = lambda buf, new: buf.at[row:row + n].set(new[:n])  # noqa: E731
    block["codes"] = jax.tree.map(put, block["codes"], codes)
    block["sq_norms"] = put(block["sq_norms"], sq)
    if "vectors" in block:
      block["vectors"] = put(block["vectors"], self._on(device, jnp.asarray(x)))
    self._valid[b][row:row + n] = True
    self._device_valid = None
    self._ids[b][row:row + n] = ids
    base = b * self.config.block_size + row
    self._where.update((int(i), base + j) for j, i in enumerate(ids))
    self._rows += n

  def remove(self, ids: Any) -> int:
    """Removes vectors by id; returns how many. Unknown ids raise KeyError."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    missing = [i for i in ids if i not in self._where]
    if missing:
      raise KeyError(f"ids not in the index: {missing[:5]}")
    bs = self.config.block_size
    for i in ids:
      b, row = divmod(self._where.pop(i), bs)
      self._valid[b][row] = False
    self._device_valid = None
    return len(ids)

  # -- search ------------------------------------------------------------------------------

  def search(self, queries: Any, k: int, *, rerank: int | None = None,
             use_kernel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best vectors per query.

    Args:
      queries: [q, dim] (or [dim]) float.
      k: neighbours per query, 1 ≤ k ≤ ntotal.
      rerank: with keep_vectors, take this many candidates (≥ k) from the codes and
        order them by their exact scores.
      use_kernel: the Pallas scoring kernel (default: on GPU); jnp otherwise.

    Returns:
      (scores [q, k] float32, ids [q, k] int64), best first: inner products for "ip" and
      "cosine", squared distances for "l2".
    """
    q = _check_matrix(queries, self.dim, "queries")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
      raise ValueError(f"k must lie in [1, ntotal={self.ntotal}], got {k!r}")
    if rerank is not None:
      if not self.config.keep_vectors:
        raise ValueError("rerank needs an index built with keep_vectors=True")
      if rerank < k:
        raise ValueError(f"rerank ({rerank}) must be >= k ({k})")
      rerank = min(rerank, self.ntotal)
    if self.config.metric == "cosine":
      q = _normalize(q)
    depth = k if rerank is None else rerank
    scores, rows = self._scan(jnp.asarray(q), depth, use_kernel)
    if rerank is not None:
      scores, rows = self._rerank(jnp.asarray(q), rows, k)
    scores, rows = np.asarray(scores), np.asarray(rows)
    if self.config.metric == "l2":
      scores = np.sum(q * q, axis=1, keepdims=True) - scores
    return scores.astype(np.float32), self._ids_of_rows(rows)

  def _ids_of_rows(self, rows: np.ndarray) -> np.ndarray:
    """Ids of global rows, block by block (no copy of the whole id table per search)."""
    block, row = np.divmod(rows, self.config.block_size)
    out = np.empty(rows.shape, np.int64)
    for b in np.unique(block):
      here = block == b
      out[here] = self._ids[b][row[here]]
    return out

  def _scan(self, q: Array, k: int, use_kernel: bool | None) -> tuple[Array, Array]:
    bs = self.config.block_size
    # The kernel tiles a block in 128-row pieces (k ≤ 128 per piece).
    kernel_ok = bs % 128 == 0 and k <= 128
    if use_kernel is None:
      use_kernel = jax.default_backend() == "gpu" and kernel_ok
    elif use_kernel and not kernel_ok:
      raise ValueError(f"the scoring kernel needs block_size % 128 == 0 and k <= 128, got "
                       f"block_size {bs}, k {k}")
    if self._device_valid is None:
      self._device_valid = [self._on(self._device_of(b), jnp.asarray(v))
                            for b, v in enumerate(self._valid)]
    live = [b for b, v in enumerate(self._valid) if v.any()]
    groups = [(device, [b for b in live if self._device_of(b) == device])
              for device in self.devices]
    groups = [(device, mine) for device, mine in groups if mine]

    def scan(group):
      device, mine = group
      return _scan_blocks(
          self._quantizer_on(device), self._on(device, q),
          [(self._blocks[b]["codes"], self._blocks[b]["sq_norms"], self._device_valid[b])
           for b in mine],
          self._on(device, jnp.asarray([b * bs for b in mine], jnp.int32)), k=k,
          metric=self.config.metric, use_kernel=use_kernel,
          interpret=jax.default_backend() != "gpu")

    if len(groups) == 1:
      return scan(groups[0])
    # One scan per device over its own blocks, each launched from its own thread: a scan
    # of many blocks is many kernel launches, and launching them one device after the
    # other from one thread would serialize the devices.
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
      results = list(pool.map(scan, groups))
    return _merge_device_lists([jax.device_put(s, self.devices[0]) for s, _ in results],
                               [jax.device_put(i, self.devices[0]) for _, i in results], k=k)

  def _rerank(self, q: Array, rows: Array, k: int) -> tuple[Array, Array]:
    bs = self.config.block_size
    # Gather the candidates block by block: never a copy of the whole database.
    candidates = jnp.zeros((*rows.shape, self.dim), jnp.float32)
    for b, block in enumerate(self._blocks):
      local = rows - b * bs
      inside = (local >= 0) & (local < bs)
      picked = block["vectors"][self._on(self._device_of(b), jnp.clip(local, 0, bs - 1))]
      candidates = jnp.where(inside[..., None], jax.device_put(picked, candidates.device),
                             candidates)
    exact = _exact_scores(q, candidates, self.config.metric)
    s, pick = jax.lax.top_k(exact, k)
    return s, jnp.take_along_axis(rows, pick, axis=1)

  def reconstruct(self, ids: Any) -> np.ndarray:
    """The decoded vectors x̂ [n, dim] of the given ids (normalized inputs for cosine)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    missing = [i for i in ids if i not in self._where]
    if missing:
      raise KeyError(f"ids not in the index: {missing[:5]}")
    block, row = np.divmod(np.asarray([self._where[i] for i in ids], np.int64),
                           self.config.block_size)
    out = np.zeros((len(ids), self.dim), np.float32)
    # One decode per block touched, not one per id.
    for b in np.unique(block):
      here = block == b
      codes = jax.tree.map(lambda x: x[row[here]], self._blocks[b]["codes"])
      out[here] = np.asarray(self._quantizer_on(self._device_of(b)).dequantize(codes))
    return out

  # -- persistence -------------------------------------------------------------------------

  def _arrays(self) -> dict[str, np.ndarray]:
    arrays = {}
    for j, leaf in enumerate(jax.tree.leaves(self.quantizer)):
      arrays[f"quantizer/{j}"] = np.asarray(leaf)
    for b, block in enumerate(self._blocks):
      for j, leaf in enumerate(jax.tree.leaves(block)):
        arrays[f"block{b}/{j}"] = np.asarray(leaf)
      arrays[f"block{b}/valid"] = self._valid[b]
      arrays[f"block{b}/ids"] = self._ids[b]
    return arrays

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index to `path` atomically (temporary file, then rename)."""
    path = pathlib.Path(path)
    buf = io.BytesIO()
    np.savez(buf, **self._arrays())
    payload = buf.getvalue()
    header = json.dumps({
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(self.config),
        "rows": self._rows, "next_id": self._next_id, "blocks": len(self._blocks),
        "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent if str(path.parent) else ".")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(MAGIC)
        f.write(FORMAT_VERSION.to_bytes(4, "little"))
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike,
           devices: Sequence[jax.Device] | jax.sharding.Mesh | None = None
           ) -> "TurboQuantIndex":
    """Reads an index saved by `save` (onto `devices`, as in the constructor); raises
    ValueError on a damaged or foreign file."""
    data = pathlib.Path(path).read_bytes()
    if not data.startswith(MAGIC):
      raise ValueError(f"{path} is not a TurboQuantIndex file (bad magic)")
    pos = len(MAGIC)
    if len(data) < pos + 12:
      raise ValueError(f"{path} is truncated (no header)")
    version = int.from_bytes(data[pos:pos + 4], "little")
    if version != FORMAT_VERSION:
      raise ValueError(f"{path} has format version {version}; this library reads "
                       f"{FORMAT_VERSION}")
    hlen = int.from_bytes(data[pos + 4:pos + 12], "little")
    pos += 12
    try:
      header = json.loads(data[pos:pos + hlen])
    except (ValueError, UnicodeDecodeError):
      raise ValueError(f"{path} has a damaged header") from None
    payload = data[pos + hlen:]
    if len(payload) != header["payload_bytes"]:
      raise ValueError(f"{path} is truncated or padded: payload of {len(payload)} bytes, "
                       f"expected {header['payload_bytes']}")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
      raise ValueError(f"{path} fails its checksum: the file was altered or damaged")
    arrays = dict(np.load(io.BytesIO(payload), allow_pickle=False))
    index = cls(**header["config"], devices=devices)
    treedef = jax.tree.structure(index.quantizer)
    leaves = [jnp.asarray(arrays[f"quantizer/{j}"]) for j in range(treedef.num_leaves)]
    index.quantizer = jax.tree.unflatten(treedef, leaves)
    index._quantizer_copies = {}
    for b in range(header["blocks"]):
      index._open_block()
      treedef = jax.tree.structure(index._blocks[b])
      index._blocks[b] = index._on(index._device_of(b), jax.tree.unflatten(treedef, [
          jnp.asarray(arrays[f"block{b}/{j}"]) for j in range(treedef.num_leaves)]))
      index._valid[b] = arrays[f"block{b}/valid"].copy()
      index._ids[b] = arrays[f"block{b}/ids"].copy()
    index._device_valid = None
    index._rows, index._next_id = header["rows"], header["next_id"]
    bs = index.config.block_size
    for b, (valid, ids) in enumerate(zip(index._valid, index._ids)):
      index._where.update((int(ids[r]), b * bs + int(r)) for r in np.flatnonzero(valid))
    return index
