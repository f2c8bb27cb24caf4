"""Tensor-parallel decoders: attention heads and MLP columns over a mesh's model axis.

    mesh = jax.make_mesh((1, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    shard_decoder(model, mesh)                       # weights move to their devices
    caches = model.init_caches(b, max_len, sharded(TurboQuantKVCache.create, mesh))
    logits, caches = jax.jit(...)(model, tokens, caches)

Megatron's split: q/k/v projections and the MLP's gate/up by output column (each device
computes its own heads and its slice of the hidden layer), the output and down
projections by input row (one all-reduce each per block); embeddings and norms are
replicated. With the cache split the same way (`turboquant_jax.sharding`), a device's
heads never leave it: attention needs no communication at all. The mesh's axes should be
`AxisType.Auto` so that XLA places the all-reduces.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})


def decoder_partition_specs(model: nnx.Module, model_axis: str = "model") -> nnx.State:
  """The `PartitionSpec` of every parameter of a `models.Decoder` (a State of specs)."""
  def spec(path, x):
    names = {str(getattr(p, "key", p)) for p in path}
    if names & COLUMN_PARALLEL and x.ndim == 2:
      return P(None, model_axis)   # kernel [in, out]: split the outputs
    if names & ROW_PARALLEL and x.ndim == 2:
      return P(model_axis, None)   # split the inputs; the partial sums are all-reduced
    return P()
  return jax.tree_util.tree_map_with_path(spec, nnx.state(model))


def shard_decoder(model: nnx.Module, mesh: Mesh, model_axis: str = "model") -> nnx.Module:
  """Places the decoder's weights on the mesh (in place) and returns it."""
  cfg = model.cfg
  n = mesh.shape[model_axis]
  for name, value in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                      ("ffn_dim", cfg.ffn_dim)):
    if value % n:
      raise ValueError(f"{name} = {value} does not split over the {n} devices of "
                       f"axis {model_axis!r}")
  specs = decoder_partition_specs(model, model_axis)
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                 state, specs))
  return model
