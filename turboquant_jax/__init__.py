"""turboquant_jax: TurboQuant vector and KV-cache compression (arXiv 2504.19874) in JAX.

Reads top-down as the paper does: codebook -> rotation -> QJL -> quantizers -> packing.
"""

from turboquant_jax.codebook import LloydMaxCodebook, lloyd_max_codebook
from turboquant_jax.packing import pack_codes, pack_signs, packed_bytes, plane_widths, unpack_codes, unpack_signs
from turboquant_jax.qjl import gaussian_sketch, qjl_inner_product, qjl_signs
from turboquant_jax.quantizers import MSECodes, MSEQuantizer, ProdCodes, ProdQuantizer
from turboquant_jax.rotation import (
    HaarRotation,
    HadamardRotation,
    fast_walsh_hadamard,
    haar_orthogonal,
    make_rotation,
)

__version__ = "0.1.0"
from turboquant_jax.channel_split import SplitQuantizer, outlier_permutation
from turboquant_jax.kv_cache import DenseKVCache, KVCache
from turboquant_jax.ring_cache import RingKVCache
from turboquant_jax.turboquant_cache import TurboQuantConfig, TurboQuantKVCache, value_rotation
from turboquant_jax.flax_attention import (
    TurboQuantMultiHeadAttention,
    TurboQuantMultiHeadDotProductAttention,
)
from turboquant_jax.uniform_cache import UniformConfig, UniformKVCache
from turboquant_jax.layer_policy import per_layer, turboquant_per_layer, window_rings
from turboquant_jax.index import IndexConfig, TurboQuantIndex
