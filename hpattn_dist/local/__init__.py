"""Local attention on the HEALPix hierarchy: windows, the sharded op, its dense oracle, layers."""

from hpattn_dist.local import ops as _ops  # noqa: F401  (registers hpattn::window_attention_fwd/bwd)
from hpattn_dist.local.attention import healpix_local_attention
from hpattn_dist.local.plan import plan_local_attention
from hpattn_dist.local.modules import DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention
from hpattn_dist.local.oracle import dense_local_attention, window_mask
from hpattn_dist.local.traffic import WindowTraffic, window_traffic
from hpattn_dist.local.windows import WINDOW_MODES, cell_neighbours, window_cells

__all__ = [
    "WINDOW_MODES",
    "WindowTraffic",
    "DistributedLocalSpatialSelfAttention",
    "LocalSpatialSelfAttention",
    "cell_neighbours",
    "dense_local_attention",
    "healpix_local_attention",
    "plan_local_attention",
    "window_cells",
    "window_mask",
    "window_traffic",
]
