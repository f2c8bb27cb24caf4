"""KV caches over a `jax.sharding.Mesh`: sequences over a data axis, kv heads over a model
axis, each device holding and attending over its own part.

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    make = sharded(TurboQuantKVCache.create, mesh)          # a drop-in `make_cache`
    caches = model.init_caches(batch, max_len, make)        # each device allocates its shard
    logits, caches = model(tokens, caches=caches)           # same call as on one device

Every buffer of a cache with a batch and a head axis ([B, H, ...]: codes, norms, sketch
signs, window, sinks, key means, channel orders) is split over both axes; per-sequence
bookkeeping ([B, ...]: lengths, ring positions) over the data axis; rotations, sketches
and codebooks, shared by all sequences and heads, are replicated. `ShardedKVCache` runs
the wrapped cache's own `update` and `attend` under `jax.shard_map`, so each device
quantizes and attends over its own (sequences, heads) - the Pallas kernel included,
which XLA could not partition by itself - and nothing of the cache ever moves between
devices. Queries, keys and values arrive as [B, T, heads, D] split the same way
(q heads h = kv_head·G + g, so splitting q heads splits kv heads alike).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from turboquant_jax import kv_cache

Array = jax.Array

# Fields shared by every sequence and head (replicated), and per-sequence fields ([B, ...]).
REPLICATED_FIELDS = frozenset({"key_quantizer", "value_quantizer"})
BATCH_FIELDS = frozenset({"window_positions", "calibrated", "lengths", "overflowed"})


def _axis_size(mesh: Mesh, axis: str | None) -> int:
  return 1 if axis is None else mesh.shape[axis]


def _spec(*axes: str | None) -> P:
  """A PartitionSpec without trailing Nones: the spelling of the shardings XLA returns."""
  axes = list(axes)
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def cache_partition_specs(cache: Any, data_axis: str | None = "data",
                          model_axis: str | None = "model") -> Any:
  """A pytree like `cache` with the `PartitionSpec` of each leaf (see the module docstring).

  Works for any cache dataclass whose fields follow the protocol's layout: [B, H, ...]
  buffers, the per-sequence `BATCH_FIELDS` and the shared `REPLICATED_FIELDS`.
  """
  def spec(name):
    if name in REPLICATED_FIELDS:
      return _spec()
    if name in BATCH_FIELDS:
      return _spec(data_axis)
    return _spec(data_axis, model_axis)
  updates = {}
  for field in dataclasses.fields(cache):
    if not field.metadata.get("pytree_node", True):
      continue
    value = getattr(cache, field.name)
    updates[field.name] = jax.tree.map(lambda _, s=spec(field.name): s, value)
  return cache.replace(**updates)


def cache_shardings(cache: Any, mesh: Mesh, data_axis: str | None = "data",
                    model_axis: str | None = "model") -> Any:
  """`NamedSharding`s of every leaf, for `jax.jit`'s in/out_shardings or `device_put`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      cache_partition_specs(cache, data_axis, model_axis))


def _kv_spec(data_axis, model_axis) -> P:
  return P(data_axis, None, model_axis, None)  # [B, T, heads, D]


def _place(mesh: Mesh, spec: P, x: Array | None) -> Array | None:
  """x laid out as `spec` on the mesh (a no-op when it already is; a constraint in jit)."""
  return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))


def _local_update(cache, k, v, positions, num_tokens):
  return cache.update(k, v, positions=positions, num_tokens=num_tokens)


@dataclasses.dataclass(frozen=True)
class _LocalAttend:
  """A device's `attend`, its settings compared by value (a static argument of jit)."""
  scale: float | None
  sliding_window: int | None
  soft_cap: float | None
  kwargs: tuple[tuple[str, Any], ...]

  def __call__(self, cache, q, q_positions):
    return cache.attend(q, q_positions=q_positions, scale=self.scale,
                        sliding_window=self.sliding_window, soft_cap=self.soft_cap,
                        **dict(self.kwargs))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _shard_mapped(fn, mesh, in_specs, out_specs, *args):
  # Jitted so that an eager call compiles one program per shape: shard_map run eagerly
  # compiled each of the wrapped cache's ops on its own (hundreds per call on the CPU).
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


@flax.struct.dataclass
class ShardedKVCache:
  """A cache split over a mesh, with the cache protocol (`update`, `attend`,
  `memory_report`, `lengths`). Create it with `ShardedKVCache.create` or `sharded`.

  Attributes:
    cache: the wrapped cache (`DenseKVCache`, `TurboQuantKVCache`, `UniformKVCache`),
      its arrays global and laid out by `cache_shardings`.
    mesh, data_axis, model_axis: where it lives (static).
  """

  cache: Any
  mesh: Mesh = flax.struct.field(pytree_node=False)
  data_axis: str | None = flax.struct.field(pytree_node=False, default="data")
  model_axis: str | None = flax.struct.field(pytree_node=False, default="model")

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, mesh: Mesh, make_cache: Callable[..., Any],
             data_axis: str | None = "data", model_axis: str | None = "model",
             layer: int = 0, rope: Any = None) -> "ShardedKVCache":
    """An empty cache; each device allocates only its own shard."""
    for axis in (data_axis, model_axis):
      if axis is not None and axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    n_data, n_model = _axis_size(mesh, data_axis), _axis_size(mesh, model_axis)
    # An axis of one device splits nothing: drop it from the specs, as XLA does in the
    # shardings it returns, so that a jitted step's outputs carry the same shardings as
    # its inputs and the next call hits the compilation cache.
    data_axis = data_axis if n_data > 1 else None
    model_axis = model_axis if n_model > 1 else None
    if batch % n_data:
      raise ValueError(f"batch {batch} does not split over the {n_data} devices of "
                       f"axis {data_axis!r}")
    if num_kv_heads % n_model:
      raise ValueError(f"{num_kv_heads} kv heads do not split over the {n_model} devices of "
                       f"axis {model_axis!r}")
    make = functools.partial(make_cache, batch, max_len, num_kv_heads, head_dim, dtype,
                             layer=layer, rope=rope)
    shardings = cache_shardings(jax.eval_shape(make), mesh, data_axis, model_axis)
    return cls(cache=jax.jit(make, out_shardings=shardings)(), mesh=mesh,
               data_axis=data_axis, model_axis=model_axis)

  # -- the protocol ------------------------------------------------------------------------

  @property
  def lengths(self) -> Array:
    return self.cache.lengths

  @property
  def overflowed(self) -> Array:
    return self.cache.overflowed

  @property
  def batch(self) -> int:
    return self.cache.batch

  @property
  def num_kv_heads(self) -> int:
    return self.cache.num_kv_heads

  @property
  def head_dim(self) -> int:
    return self.cache.head_dim

  @property
  def max_len(self) -> int:
    return self.cache.max_len

  def _specs(self) -> Any:
    return cache_partition_specs(self.cache, self.data_axis, self.model_axis)

  def _per_device(self, fn, out_specs, *args):
    """fn(local cache, *local args) on every device under `shard_map`. args: (array or
    None, spec) pairs; each array is laid out as its spec says before the call. fn, the
    mesh and the specs are jit's static arguments (hashable: module-level functions,
    `_LocalAttend`)."""
    in_specs = (self._specs(),) + tuple(P() if x is None else spec for x, spec in args)
    values = tuple(_place(self.mesh, spec, x) for x, spec in args)
    return _shard_mapped(fn, self.mesh, in_specs, out_specs, self.cache, *values)

  def update(self, k: Array, v: Array, positions: Array | None = None,
             num_tokens: Array | None = None) -> "ShardedKVCache":
    """Appends k, v ([B, T, Hkv, D]); each device writes its own sequences and heads."""
    c = self.cache
    kv_cache.check_update(k, v, c.batch, c.num_kv_heads, c.head_dim)
    # The full-cache and argument checks raise here, eagerly, as on one device.
    kv_cache.plan_update(c.lengths, c.max_len, k.shape[1], positions, num_tokens)
    row = lambda x: None if x is None else jnp.broadcast_to(  # noqa: E731
        jnp.asarray(x, jnp.int32), (c.batch,))
    kv, rows = _kv_spec(self.data_axis, self.model_axis), P(self.data_axis)
    new = self._per_device(_local_update, self._specs(), (k, kv), (v, kv),
                           (row(positions), rows), (row(num_tokens), rows))
    return self.replace(cache=new)

  def attend(self, q: Array, *, q_positions: Array | None = None, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None,
             **kwargs) -> Array:
    """Causal attention of q ([B, Tq, Hq, D]); each device over its own heads. Keyword
    arguments (implementation, kernel settings) go to the wrapped cache's `attend`."""
    c = self.cache
    kv_cache.check_query(q, c.batch, c.num_kv_heads, c.head_dim)
    if q.shape[2] % _axis_size(self.mesh, self.model_axis):
      raise ValueError(f"{q.shape[2]} q heads do not split over axis {self.model_axis!r}")
    spec = _kv_spec(self.data_axis, self.model_axis)
    local = _LocalAttend(scale, sliding_window, soft_cap, tuple(sorted(kwargs.items())))
    return self._per_device(
        local, spec, (q, spec), (q_positions, P(self.data_axis, None)))

  def memory_report(self) -> dict[str, Any]:
    """The wrapped cache's report (global bytes, all devices together), plus per device."""
    report = dict(self.cache.memory_report())
    report["devices"] = self.mesh.size
    report["total_per_device"] = max(
        sum(s.data.nbytes for x in jax.tree.leaves(self.cache)
            for s in x.addressable_shards if s.device == d)
        for d in self.mesh.devices.flat)
    return report


def sharded(make_cache: Callable[..., Any], mesh: Mesh, data_axis: str | None = "data",
            model_axis: str | None = "model") -> Callable[..., ShardedKVCache]:
  """`make_cache` (e.g. `TurboQuantKVCache.create`, or a partial with a config) made to
  build `ShardedKVCache`s: pass it wherever a `make_cache` goes (`init_caches`, `generate`)."""
  return functools.partial(ShardedKVCache.create, mesh=mesh, make_cache=make_cache,
                           data_axis=data_axis, model_axis=model_axis)
