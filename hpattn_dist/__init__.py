"""hpattn_dist: exact sequence-parallel self-attention over HEALPix grids.

The pixel dimension of a ``[B, N, E]`` field is sharded over the ranks of a ``torch.distributed``
process group; every strategy computes exactly what the single-device
:class:`SpatialSelfAttention` computes.

What lives here: the layers (``oracle``, ``modules``), the HEALPix shard plan and scatter /
gather (``healpix``), gradient reduction of replicated parameters (``grad_sync``), hybrid process
groups (``mesh``), shared rules (``validation``, ``masks``, ``precision``, ``merge``), and the
subpackages ``strategies`` (planning door and executors), ``comm`` (every collective),
``kernels`` (block attention), ``integrations`` (DeepSpeed), ``cost_model`` (the bytes, memory and
work of each strategy, read by ``auto`` and the planner) and ``io`` (sharded zarr reading and
writing; the ``[io]`` extra, not imported here); the ``hpattn-dist`` tools are ``cli``, ``verify``,
``bench`` and ``plan``. This module holds the public API only.
"""

from hpattn_dist.checkpoint import checkpoint_context_fn
from hpattn_dist.comm.counters import CommStats, count_communication
from hpattn_dist.cross import DistributedSpatialCrossAttention, SpatialCrossAttention
from hpattn_dist.grad_sync import broadcast_parameters
from hpattn_dist.local import (
    DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention, healpix_local_attention,
)
from hpattn_dist.mesh import build_hybrid_groups
from hpattn_dist.modules import DistributedSpatialSelfAttention, convert_spatial_attention
from hpattn_dist.oracle import SpatialSelfAttention
from hpattn_dist.strategies import (
    choose_strategy, hybrid_attention, ring_attention, ring_cross_attention, ulysses_attention,
)

__all__ = [
    "CommStats",
    "DistributedLocalSpatialSelfAttention",
    "DistributedSpatialCrossAttention",
    "DistributedSpatialSelfAttention",
    "LocalSpatialSelfAttention",
    "SpatialCrossAttention",
    "SpatialSelfAttention",
    "broadcast_parameters",
    "build_hybrid_groups",
    "checkpoint_context_fn",
    "choose_strategy",
    "convert_spatial_attention",
    "count_communication",
    "healpix_local_attention",
    "hybrid_attention",
    "ring_attention",
    "ring_cross_attention",
    "ulysses_attention",
]
__version__ = "0.1.0"
