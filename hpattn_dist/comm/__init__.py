"""Communication: every collective of the library, over one group model.

===================  ==========================================================================
module               what lives there
===================  ==========================================================================
``groups``           :class:`GroupInfo` / ``resolve_group``: the group object every collective
                     takes; the communication device of a backend
``waits``            the exchange timeout and :class:`ExchangeError` (Note [exchange timeout])
``meta``             the metadata all-gather of a few ints (label ``all_gather.meta``)
``agreement``        the signature protocol: local checks + one agreement, ranks fail together
``ring``             the ring exchanger (isend/irecv to neighbours, double buffering)
``all_to_all``       the autograd all-to-all over uneven sizes
``head_exchange``    Ulysses' pixel <-> head all-to-alls (one packing copy each way)
``collectives``      autograd gather / scatter / reduce-scatter along a dim
``counters``         calls and bytes per label (:func:`count_communication`)
===================  ==========================================================================
"""

from hpattn_dist.comm.counters import CommStats, count_communication
from hpattn_dist.comm.waits import ExchangeError, get_exchange_timeout, set_exchange_timeout

__all__ = ["CommStats", "ExchangeError", "count_communication", "get_exchange_timeout",
           "set_exchange_timeout"]
