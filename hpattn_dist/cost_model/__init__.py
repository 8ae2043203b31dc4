"""The one cost model: the bytes, memory and work of each strategy, per rank, without running it.

==================  ============================================================================
module              what it counts
==================  ============================================================================
``communication``   bytes sent per forward / backward (Note [communication volume], Note [halo
                    traffic]); ``strategy="auto"`` chooses by it
``memory``          bytes held per rank through a layer's forward and backward (Note [activation
                    memory]), event by event as the executors allocate them
``compute``         FLOPs per rank and the time lower bound from FLOPs and link bandwidth
==================  ============================================================================

Read by :mod:`hpattn_dist.strategies.auto`, the capacity planner (``hpattn-dist plan``,
:mod:`hpattn_dist.tools.plan`) and the tests, which hold every count to a measurement
(``count_communication``, the allocator's peak). Pure arithmetic: no process group, no tensors
of the field's size.
"""

from hpattn_dist.cost_model.communication import (
    AGREEMENT_BYTES, CommVolume, HaloRows, communication_volume, degree_for, equal_shard_cost, halo_rows,
    strategy_name,
)
from hpattn_dist.cost_model.compute import LayerWork, attention_flops, time_lower_bound
from hpattn_dist.cost_model.memory import (
    LayerMemory, LocalMemoryUnits, MemoryCase, WindowGeometry, global_layer_memory, local_attention_units,
    local_layer_memory,
)

__all__ = [
    "AGREEMENT_BYTES",
    "CommVolume",
    "HaloRows",
    "LayerMemory",
    "LayerWork",
    "LocalMemoryUnits",
    "MemoryCase",
    "WindowGeometry",
    "attention_flops",
    "communication_volume",
    "degree_for",
    "equal_shard_cost",
    "global_layer_memory",
    "halo_rows",
    "local_attention_units",
    "local_layer_memory",
    "strategy_name",
    "time_lower_bound",
]
