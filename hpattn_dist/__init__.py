"""hpattn_dist: exact sequence-parallel self-attention over HEALPix grids.

The pixel dimension of a ``[B, N, E]`` field is sharded over the ranks of a ``torch.distributed``
process group; every strategy computes exactly what the single-device
:class:`SpatialSelfAttention` computes.
"""

from hpattn_dist.comm.counters import CommStats, count_communication
from hpattn_dist.oracle import SpatialSelfAttention
from hpattn_dist.strategies.ring import ring_attention

__all__ = ["CommStats", "SpatialSelfAttention", "count_communication", "ring_attention"]
__version__ = "0.1.0"
