"""Communication: the ring exchanger, autograd-aware collectives and traffic counters."""

from hpattn_dist.comm.counters import CommStats, count_communication

__all__ = ["CommStats", "count_communication"]
