"""Communication: the ring exchanger, autograd-aware collectives and traffic counters."""

from hpattn_dist.comm.counters import CommStats, count_communication
from hpattn_dist.comm.waits import ExchangeError, get_exchange_timeout, set_exchange_timeout

__all__ = ["CommStats", "ExchangeError", "count_communication", "get_exchange_timeout",
           "set_exchange_timeout"]
