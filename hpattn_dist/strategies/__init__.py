"""Sequence-parallel attention strategies (each a ``torch.autograd.Function`` with its backward)."""

from hpattn_dist.strategies.ring import ring_attention

__all__ = ["ring_attention"]
